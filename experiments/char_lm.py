"""The tutorial's char-RNN on Alice in Wonderland, with greedy generation after each iteration.

Run: python -m experiments.char_lm --workdir=runs/char_lm
Defaults are the tutorial's recipe (DESIGN.md §1-2): SimpleRNN(128) over 10-char windows (step
1), Dense + softmax, categorical cross-entropy, RMSprop (Keras 3 defaults), batch 128, 25
iterations of one epoch, 100 greedy characters after each; the last 5% of the text is held out
and scored as bits per character after each iteration (--val_fraction). The text is the alice
corpus (rnn_jax.data.CORPORA: obtained once from the package index, checked by sha256; the book
alone, cleaned as the tutorial does); --corpus, --text and --cleaning read others. On this
2-core CPU: about 1.6 s per epoch and 45-75 s for the whole run; at iteration 25 the training
loss is 1.3628 (1.97 bits/char) and the held-out 2.31 bits/char. With --val_fraction=0 (the
whole text, as the tutorial) the training loss at iteration 25 is 1.3630 (1.966 bits/char),
greedy sample "ne: 'tell her hand and some of the mock turtle some of the mock turtle ...".
--mode=stateful trains as char-rnn and Keras stateful=True do (DESIGN.md §7, docs/stateful.md):
--batch_size contiguous streams read in --bptt windows in order, the carry passed on, any cell
and --layers; held-out characters are scored in both modes alike.
Rerun with the same --workdir to resume from the newest checkpoint (one per iteration, and
inside long epochs every --checkpoint_every updates, the stateful carry included); the resumed
run ends bit-identical to one never stopped.
Several devices: --num_devices=0 (all); several hosts: --distributed, see docs/scaling.md.
In process: ``run(Config(units=8, iterations=2), workdir)`` returns a :class:`Result`.
"""

import dataclasses
import hashlib
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
from rnn_jax import data as data_lib
from rnn_jax import loop, optim, parallel, train
from rnn_jax.batches import in_order, shuffled_epoch, with_replacement
from rnn_jax.cells import Cell
from rnn_jax.losses import accuracy, masked_accuracy, masked_cross_entropy, softmax_cross_entropy
from rnn_jax.models import Layer, Model, language_model, recurrent, sequence_classifier, stacked
from rnn_jax.registry import NAMES, named_cell
from rnn_jax.rundir import RunDir, open_run
from rnn_jax.sample import make_sampler, make_stateful_sampler

MODES = ("windowed", "stateful")
# The generated samples, one per iteration, appended as they are made (never rewritten).
SAMPLES = "samples.txt"
# The samples drawn at the end (sample_chars), at each of sample_temperatures.
FINAL_SAMPLES = "final_samples.txt"

# compute_dtype: the dot algorithm of every matrix product in the loss (forward and backward).
# bfloat16 rounds the inputs of each product to bf16 and accumulates in float32, on the GPU/TPU
# matrix units; params, optimiser state, carry and elementwise math stay float32. XLA's CPU
# backend ignores the setting (measured: bit-identical gradients).
MATMUL_PRECISION = {"float32": None, "bfloat16": "BF16_BF16_F32"}


# Config fields a resumed run may change: see Config.resume_key.
_NOT_RESUMED = frozenset(
    (
        "iterations",
        "num_preds",
        "temperature",
        "seed_text",
        "num_devices",
        "compute_dtype",
        "text",
        "corpus",
        "cleaning",
        "steps_per_call",
        "checkpoint_every",
        "progress_seconds",
        "max_train_seconds",
        "val_block",
        "keep_best",
        "sample_chars",
        "sample_temperatures",
    )
)
# Fields added after checkpoints existed: left out of the resume key at their defaults, so
# that those checkpoints still resume.
_ADDED = (
    "optimizer",
    "weight_decay",
    "warmup_steps",
    "decay_steps",
    "steps_per_iteration",
    "reset_carry",
    "weight_drop",
    "random_windows",
)


@dataclasses.dataclass(frozen=True)
class Config:
    """One run; the defaults are the tutorial's recipe (DESIGN.md §1-2, pinned by a test)."""

    text: str | None = cli.field(
        None,
        "Text file to train on (unset: the corpus). With corpus set, a copy of that corpus, "
        "checked by sha256.",
        check=cli.optional(cli.non_empty),
    )
    corpus: str | None = cli.field(
        None,
        "Named corpus (rnn_jax.data.CORPORA), obtained once and checked by sha256 (unset: alice "
        "when no text is given).",
        choices=tuple(data_lib.CORPORA),
    )
    cleaning: str | None = cli.field(
        None,
        "How the text is read: tutorial (lower-cased ASCII, lines joined), cased, none (every "
        "character as it is); unset: the corpus's own, or tutorial for a text file.",
        choices=data_lib.CLEANINGS,
    )
    mode: str = cli.field(
        "windowed",
        "windowed: the tutorial's independent seq_len windows, shuffled; stateful: batch_size "
        "contiguous streams read in bptt windows in order, the carry passed on (DESIGN.md §7).",
        choices=MODES,
    )
    cell: str = cli.field("simple_rnn", "Recurrence (rnn_jax.registry).", choices=NAMES)
    units: int = cli.field(128, "Hidden units.", check=cli.positive)
    layers: int = cli.field(
        1, "Stacked recurrent layers (more than one: stateful mode).", check=cli.positive
    )
    seq_len: int = cli.field(
        10,
        "Input window (characters); stateful mode: generation seeds and the held-out "
        "characters left unscored, as in windowed mode.",
        check=cli.positive,
    )
    step: int = cli.field(1, "Stride between training windows.", check=cli.positive)
    bptt: int = cli.field(
        100,
        "Stateful mode: characters per window, where backpropagation is truncated.",
        check=cli.positive,
    )
    reset_carry: bool = cli.field(
        False,
        "Stateful mode: every training window starts from a zero carry (independent blocks of "
        "bptt characters, as nanoGPT trains) instead of the carry the window before ended with.",
    )
    random_windows: bool = cli.field(
        False,
        "Stateful mode with reset_carry: each update's windows start at offsets of the training "
        "text drawn uniformly (nanoGPT's get_batch) instead of the streams' fixed windows in "
        "order; an epoch is as many updates.",
    )
    batch_size: int = cli.field(
        128, "Examples per update (stateful mode: streams).", check=cli.positive
    )
    dropout: float = cli.field(
        0.0,
        "Stateful mode: dropout rate on the outputs the Dense head reads and, with layers > 1, "
        "on those each layer passes to the next, in training.",
        check=cli.fraction,
    )
    weight_drop: float = cli.field(
        0.0,
        "Stateful mode: DropConnect rate on each layer's recurrent kernel in training "
        "(AWD-LSTM's weight drop), one mask per update shared by every stream and step.",
        check=cli.fraction,
    )
    iterations: int = cli.field(25, "Train-then-generate iterations.", check=cli.positive)
    epochs_per_iteration: int = cli.field(1, "Epochs per iteration.", check=cli.positive)
    steps_per_iteration: int | None = cli.field(
        None,
        "Updates per iteration (its evaluation, sample, checkpoint and metrics row), cut at "
        "every epoch's end; unset: epochs_per_iteration epochs.",
        check=cli.optional(cli.positive),
    )
    max_train_seconds: float | None = cli.field(
        None,
        "End the run once it has trained this long (compiling, evaluating and sampling not "
        "counted), its last iteration cut there, evaluated, logged and checkpointed; a rerun "
        "with a larger value goes on. Unset: no limit.",
        check=cli.optional(cli.positive),
    )
    num_preds: int = cli.field(100, "Characters generated per iteration.", check=cli.positive)
    optimizer: str = cli.field(
        "rmsprop",
        "rmsprop (the tutorial's, Keras 3 defaults), adam, or adamw (decoupled weight decay on "
        "the kernels, as nanoGPT's).",
        choices=optim.OPTIMIZERS,
    )
    learning_rate: float = cli.field(
        1e-3, "Learning rate (the peak, with a schedule).", check=cli.positive_float32
    )
    warmup_steps: int = cli.field(
        0, "Updates of linear learning-rate warmup from 0.", check=cli.non_negative
    )
    decay_steps: int | None = cli.field(
        None,
        "Cosine decay of the learning rate to final_lr_fraction of it at this update (the "
        "warmup's counted), constant after; unset: no decay.",
        check=cli.optional(cli.positive),
    )
    final_lr_fraction: float = cli.field(
        0.1, "With decay_steps: the final learning rate over the peak.", check=cli.fraction
    )
    rho: float = cli.field(0.9, "RMSprop decay of the squared-gradients' mean.", check=cli.fraction)
    beta1: float = cli.field(0.9, "Adam(W) decay of the gradients' mean.", check=cli.fraction)
    beta2: float = cli.field(
        0.999, "Adam(W) decay of the squared gradients' mean.", check=cli.fraction
    )
    weight_decay: float = cli.field(
        0.0, "AdamW decoupled weight decay of the kernels.", check=cli.non_negative
    )
    epsilon: float = cli.field(
        1e-7, "RMSprop and Adam(W) epsilon (Keras: 1e-7).", check=cli.positive_float32
    )
    eps_in_sqrt: bool = cli.field(
        True,
        "RMSprop epsilon inside the square root (Keras 3) or outside (Keras 2, PyTorch).",
    )
    clip_norm: float | None = cli.clip_norm()
    seed: int = cli.field(0, "PRNG seed (init, shuffles, generation seeds).")
    val_fraction: float | None = cli.field(
        None,
        "Held-out tail of the text, for held-out bits per char, the same in both modes (0: train "
        "on all of it, as the tutorial does; unset: the corpus's own, alice 0.05, "
        "tiny_shakespeare 0.1 as nanoGPT; 0.05 for a text file).",
        check=cli.optional(cli.fraction),
    )
    val_block: int | None = cli.field(
        None,
        "Stateful mode: score every held-out character, as one stream and in consecutive "
        "blocks of this many characters each read from a zero carry (64: nanoGPT's "
        "shakespeare_char CPU recipe); unset: one stream from the seq_len-th character on, "
        "the characters the windowed mode scores.",
        check=cli.optional(cli.positive),
    )
    keep_best: bool = cli.field(
        False,
        "Keep the state of the iteration with the lowest held-out loss (the block loss with "
        "val_block) in workdir/best, and draw the final samples from it.",
    )
    temperature: float = cli.field(
        0.0, "0: greedy (the tutorial); > 0: sample.", check=cli.non_negative
    )
    sample_chars: int = cli.field(
        0,
        "At the end, this many characters drawn at each of sample_temperatures from the best "
        "state (keep_best) or the last, written to final_samples.txt (0: none).",
        check=cli.non_negative,
    )
    sample_temperatures: tuple[float, ...] = cli.field(
        (0.5, 0.8, 1.0), "The temperatures of the final samples.", check=cli.all_positive
    )
    seed_text: str | None = cli.field(
        None,
        "Generate from this text's last seq_len characters, lower-cased where the cleaning "
        "lower-cases the corpus (unset: a random training window).",
    )
    unroll: int = cli.field(
        0,
        "lax.scan unroll factor (0: fully for windows of up to 32 steps).",
        check=cli.non_negative,
    )
    num_devices: int = cli.field(
        1,
        "Data-parallel devices, the batch split over them (0: all, on every host).",
        check=cli.non_negative,
    )
    compute_dtype: str = cli.field(
        "float32",
        "bfloat16: matmul inputs rounded to bf16, float32 accumulation (GPU/TPU); params float32.",
        choices=tuple(MATMUL_PRECISION),
    )

    steps_per_call: int = cli.field(
        2000,
        "Most updates per compiled call: progress lines and mid-epoch checkpoints come between "
        "calls (the updates are the same for any value).",
        check=cli.positive,
    )
    checkpoint_every: int | None = cli.field(
        20000,
        "Updates between checkpoints inside an epoch (none: at iteration ends only).",
        check=cli.optional(cli.positive),
    )
    progress_seconds: float | None = cli.field(
        10.0,
        "Seconds between progress lines inside an epoch (none: no progress lines).",
        check=cli.optional(cli.positive),
    )

    def __post_init__(self):
        cli.validate(self)
        for name in ("dropout", "weight_drop", "val_block", "reset_carry", "random_windows"):
            if getattr(self, name) and self.mode != "stateful":
                raise ValueError(f"{name}={getattr(self, name)} needs mode='stateful'")
        if self.random_windows and not self.reset_carry:
            raise ValueError(
                "random_windows=True reads windows at random offsets, so no carry passes from "
                "one to the next: add reset_carry=True (--reset_carry)"
            )
        if self.random_windows and self.num_devices != 1:
            raise ValueError(
                f"random_windows=True runs on one device; num_devices={self.num_devices}: use "
                "the streams (random_windows=False) to split batches over devices"
            )
        if self.steps_per_iteration is not None and self.epochs_per_iteration != 1:
            raise ValueError(
                f"steps_per_iteration={self.steps_per_iteration} and epochs_per_iteration="
                f"{self.epochs_per_iteration} both set the iteration's length; pass one"
            )
        if self.keep_best and self.held_out_fraction() == 0:
            raise ValueError("keep_best=True needs a held-out text: val_fraction > 0")
        self.optimizer_spec()  # its own checks (weight decay, schedule)
        if self.weight_drop:  # the cell has a recurrent kernel to drop (else: what to do)
            recurrent(make_cell(self), weight_drop=self.weight_drop)
        if self.layers > 1 and self.mode != "stateful":
            raise ValueError(
                f"layers={self.layers} needs mode='stateful': the windowed mode's rolling-window "
                "sampler runs one cell"
            )
        if self.seed_text is not None and len(self.seed_text) < self.seq_len:
            raise ValueError(
                f"seed_text={self.seed_text!r} has {len(self.seed_text)} characters; it needs at "
                f"least seq_len={self.seq_len}"
            )

    def source(self) -> data_lib.Corpus | None:
        """The named corpus the text is (None: a text file of the user's)."""
        if self.corpus is None and self.text is not None:
            return None
        return data_lib.CORPORA[self.corpus or data_lib.DEFAULT_CORPUS]

    def text_cleaning(self) -> str:
        """``cleaning``, or the corpus's own (the tutorial's for a text file)."""
        if self.cleaning is not None:
            return self.cleaning
        source = self.source()
        return "tutorial" if source is None else source.cleaning

    def held_out_fraction(self) -> float:
        """``val_fraction``, or the corpus's own (0.05 for a text file)."""
        if self.val_fraction is not None:
            return self.val_fraction
        source = self.source()
        return 0.05 if source is None else source.val_fraction

    def optimizer_spec(self):
        """The optimiser (:func:`rnn_jax.optim.make_optimizer`) with its learning-rate
        schedule (:func:`rnn_jax.optim.learning_rate_schedule`)."""
        schedule = optim.learning_rate_schedule(
            self.learning_rate, self.warmup_steps, self.decay_steps, self.final_lr_fraction
        )
        return optim.make_optimizer(
            self.optimizer,
            schedule,
            rho=self.rho,
            beta1=self.beta1,
            beta2=self.beta2,
            epsilon=self.epsilon,
            eps_in_sqrt=self.eps_in_sqrt,
            weight_decay=self.weight_decay,
            clip_norm=self.clip_norm,
        )

    def resume_key(self) -> dict:
        """The fields a resumed run must share with the checkpoint.

        Not iterations nor the sampling options, nor the devices and matmul precision (a run
        may move between machines, and checkpoints written before those options existed still
        resume), nor the text's path: the text itself is identified beside them by ``run``.
        Nor ``mode``, ``bptt`` and ``layers`` in a run of the tutorial's shape (windowed, one
        layer), where they play no part, nor the optimiser's fields at their defaults or where
        the optimiser has no use for them: checkpoints from before they existed resume.
        """
        key = cli.resume_key(self, _NOT_RESUMED)
        key["val_fraction"] = self.held_out_fraction()
        if self.mode == "windowed":
            del key["mode"], key["bptt"], key["dropout"]
        elif self.dropout == 0:
            del key["dropout"]
        elif self.layers > 1:  # dropout between the layers too (a checkpoint without: refused)
            key["dropout"] = {"rate": self.dropout, "between_layers": True}
        if self.layers == 1:
            del key["layers"]
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in _ADDED:
            if key[name] == defaults[name]:
                del key[name]
        if self.decay_steps is None:
            del key["final_lr_fraction"]
        if self.optimizer == "rmsprop":
            del key["beta1"], key["beta2"]
        else:
            del key["rho"], key["eps_in_sqrt"]
        return key


@dataclasses.dataclass(frozen=True)
class Launch:
    """Process-level flags of a multi-host run (docs/scaling.md); not part of the experiment."""

    distributed: bool = cli.field(
        False,
        "Multi-host: call jax.distributed.initialize first (with the three flags below, or "
        "detected on Cloud TPU, SLURM, Open MPI).",
    )
    coordinator_address: str | None = cli.field(
        None, "With --distributed: host:port of process 0.", check=cli.optional(cli.non_empty)
    )
    num_processes: int | None = cli.field(
        None, "With --distributed: how many processes.", check=cli.optional(cli.positive)
    )
    process_id: int | None = cli.field(
        None, "With --distributed: this process's index.", check=cli.optional(cli.non_negative)
    )

    def __post_init__(self):
        cli.validate(self)
        if not self.distributed:
            for name in ("coordinator_address", "num_processes", "process_id"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name}={getattr(self, name)!r} is only used with distributed=True"
                    )


def setup(launch: Launch) -> None:
    """Joins the multi-host run, before anything touches a device."""
    if launch.distributed:
        jax.distributed.initialize(
            launch.coordinator_address, launch.num_processes, launch.process_id
        )


class Result(NamedTuple):
    """What :func:`run` returns.

    Attributes:
      state: the final :class:`rnn_jax.train.TrainState`.
      history: one dict per iteration (those of a resumed earlier run included): ``loss``,
        ``accuracy``, ``bits_per_char``, ``seconds``, ``examples_per_second``, ``seed``,
        ``generated`` and, with ``val_fraction``, ``val_loss`` and ``val_bits_per_char``.
      vocabulary: the sorted characters of the text.
    """

    state: train.TrainState
    history: list[dict]
    vocabulary: data_lib.Vocabulary


def make_cell(config: Config) -> Cell:
    """The configured cell (:func:`rnn_jax.registry.named_cell`), set up for the longest
    dependency a training sequence spans: ``seq_len`` (windowed) or ``bptt`` (stateful)."""
    length = config.bptt if config.mode == "stateful" else config.seq_len
    return named_cell(config.cell, config.units, length)


def _layer(config: Config) -> Layer:
    length = config.bptt if config.mode == "stateful" else config.seq_len
    unroll = config.unroll or (True if length <= 32 else 1)
    layers = [
        recurrent(make_cell(config), unroll_steps=unroll, weight_drop=config.weight_drop)
        for _ in range(config.layers)
    ]
    return layers[0] if config.layers == 1 else stacked(layers, config.dropout)


def make_model(config: Config, vocab_size: int) -> tuple[Cell, Model]:
    """``(cell, model)``: the tutorial's ``cell`` + ``Dense(V)`` over integer tokens, reading
    a window to its last step (windowed, :func:`rnn_jax.sequence_classifier`) or every step
    with the carry in and out (stateful, :func:`rnn_jax.language_model`). The params are
    ``{"rnn", "dense"}`` either way."""
    if config.mode == "stateful":
        return make_cell(config), language_model(_layer(config), vocab_size, config.dropout)
    return make_cell(config), sequence_classifier(_layer(config), vocab_size, vocab_size)


def init_keys(config: Config) -> tuple[jax.Array, jax.Array]:
    """``(init_key, train_key)``, both from ``config.seed``: the key the model's params are
    drawn with, and the :class:`rnn_jax.train.TrainState`'s (shuffles, dropout)."""
    init_key, train_key = jax.random.split(jax.random.PRNGKey(config.seed))
    return init_key, train_key


def _apply_in_precision(apply, compute_dtype: str):
    precision = MATMUL_PRECISION[compute_dtype]
    if precision is None:  # leave JAX's default (and JAX_DEFAULT_MATMUL_PRECISION) alone
        return apply

    def in_precision(*args):
        with jax.default_matmul_precision(precision):
            return apply(*args)

    return in_precision


def make_loss(model: Model, compute_dtype: str = "float32"):
    """Per-example categorical cross-entropy and accuracy for ``(inputs, labels)`` batches.

    ``compute_dtype="bfloat16"`` runs the model's matrix products on bf16 inputs with float32
    accumulation (see ``MATMUL_PRECISION``); the loss itself is float32.
    """
    apply = _apply_in_precision(model.apply, compute_dtype)

    def loss_fn(params, batch):
        inputs, labels = batch
        logits = apply(params, inputs)
        return softmax_cross_entropy(logits, labels), {"accuracy": accuracy(logits, labels)}

    return loss_fn


def make_stateful_loss(model: Model, compute_dtype: str = "float32"):
    """The stateful loss ``(params, (inputs, targets, mask), carry) -> (loss (B,), {"accuracy"},
    carry)``: per stream, the mean cross-entropy over the window's scored characters
    (:func:`rnn_jax.data.stream_batch` weighs each row by their count, so the update's loss
    is the mean over every scored character). A batch ``((inputs, targets, mask), key)``
    (training with ``dropout``: :func:`rnn_jax.batches.in_order` with ``with_keys``) applies
    the model's dropout with that key; evaluation passes none."""
    apply = _apply_in_precision(model.apply, compute_dtype)

    def loss_fn(params, batch, carry):
        key = None
        if len(batch) == 2:  # in training, with a key for dropout (in_order(with_keys))
            batch, key = batch
        inputs, targets, mask = batch
        carry, logits = apply(params, inputs, carry, key)
        hits = masked_accuracy(jnp.argmax(logits, axis=-1), targets, mask)
        return masked_cross_entropy(logits, targets, mask), {"accuracy": hits}, carry

    return loss_fn


def zero_carry(model: Model, params, batch_size: int):
    """The model's initial carry for ``batch_size`` rows (zeros, any layer or stack)."""
    shapes, _ = jax.eval_shape(model.apply, params, jnp.zeros((batch_size, 1), jnp.int32))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def load_config_text(config: Config, log: Callable[[str], None] = print) -> str:
    """The text ``config`` trains on: its named corpus (obtained once and checked by sha256,
    :func:`rnn_jax.data.read_corpus`) or its text file, read with its cleaning. Errors name
    ``text=`` (and ``seq_len=`` for a short text)."""
    source, cleaning = config.source(), config.text_cleaning()
    if source is None:
        text = data_lib.load_text(config.text, name="text", cleaning=cleaning)
    else:
        try:
            text = data_lib.read_corpus(source, cleaning, path=config.text, log=log)
        except data_lib.TextError as e:
            raise data_lib.TextError(str(e).replace("path=", "text=")) from None
    if len(text) < config.seq_len + 1:
        raise data_lib.TextError(
            f"text={config.text or source.name!r} has {len(text)} characters after cleaning, "
            f"fewer than seq_len={config.seq_len} + 1; pass a longer text or a shorter seq_len"
        )
    return text


class _Mode(NamedTuple):
    """What differs between the two modes: the state, the training pass and its data, the
    held-out evaluation and generation."""

    state: train.TrainState
    epoch: train.Trainer
    data: object
    num_examples: int  # scored characters per epoch (windowed: windows)
    evaluate: Callable | None  # params -> {name: mean loss} over the held-out tail
    # (num_chars, temperature) -> sample(params, seed tokens (n,), key) -> tokens (num_chars,)
    sampler: Callable[[int, float], Callable]
    random_seed: Callable[[int], np.ndarray]  # iteration -> seq_len training tokens


def _windowed(config, loss_fn, optimizer, state, train_tokens, val_tokens, mesh, cell):
    """The tutorial's recipe: shuffled seq_len windows, step ``config.step``."""
    windows = data_lib.make_windows(train_tokens, config.seq_len, config.step)
    num_examples = int(windows.starts.shape[0])
    if mesh is not None:  # placed once: the corpus and the state whole on every device
        windows, state = parallel.replicate((windows, state), mesh)

    def get_batch(w, indices):
        return data_lib.get_window_batch(w, indices, config.seq_len)

    epoch = train.make_trainer(
        loss_fn,
        optimizer,
        shuffled_epoch(get_batch, num_examples, config.batch_size, mesh=mesh),
        mesh=mesh,
    )
    evaluate = None
    if val_tokens is not None:
        # Every held-out character from the seq_len-th on, from the seq_len before it.
        val_windows = data_lib.make_windows(val_tokens, config.seq_len, 1)
        val_batches = shuffled_epoch(
            get_batch, int(val_windows.starts.shape[0]), config.batch_size, shuffle=False, mesh=mesh
        )
        scores = train.make_evaluate(loss_fn, val_batches, mesh=mesh)
        if mesh is not None:
            val_windows = parallel.replicate(val_windows, mesh)
        evaluate = lambda params: {"val": scores(params, val_windows)["loss"]}

    def sampler(num_chars, temperature):
        rolling = make_sampler(cell, num_chars, temperature)
        return lambda params, seed, key: rolling(
            params, jnp.asarray(seed[-config.seq_len :])[None], key
        )[0]

    def random_seed(iteration: int) -> np.ndarray:
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed), iteration)
        i = int(jax.random.randint(key, (), 0, num_examples))
        start = int(windows.starts[i])
        return np.asarray(windows.tokens[start : start + config.seq_len])

    return _Mode(state, epoch, windows, num_examples, evaluate, sampler, random_seed)


def _drops(config: Config) -> bool:
    """Whether training draws random masks (each window then gets a key of its own)."""
    return config.dropout > 0 or config.weight_drop > 0


def _stateful(config, model, optimizer, state, train_tokens, val_tokens, mesh):
    """``batch_size`` contiguous streams read in ``bptt`` windows, the carry passed on (or,
    with ``random_windows``, as many updates of blocks at uniform offsets)."""
    loss_fn = make_stateful_loss(model, config.compute_dtype)
    streams, num_windows = data_lib.make_streams(train_tokens, config.batch_size, config.bptt)
    # A row per stream, whatever the devices: checkpoints resume on any number of them.
    state = state._replace(carry=zero_carry(model, state.params, config.batch_size))
    if config.random_windows:  # num_windows updates an epoch, of blocks at uniform offsets
        data = jax.device_put(np.asarray(train_tokens, np.int32))
        batches = with_replacement(
            lambda tokens, starts: data_lib.block_batch(tokens, starts, config.bptt),
            len(train_tokens) - config.bptt,
            config.batch_size,
            num_windows,
            weighted=True,
            with_keys=_drops(config),
        )
        num_examples = num_windows * config.batch_size * config.bptt
    else:
        if mesh is not None:
            streams, state = parallel.replicate((streams, state), mesh)
        get_batch = lambda s, k: data_lib.stream_batch(s, k, config.bptt)
        batches = in_order(get_batch, num_windows, mesh=mesh, with_keys=_drops(config))
        data, num_examples = streams, int(np.sum(jax.device_get(streams.lengths)))
    train_loss = loss_fn
    if config.reset_carry:  # every window from zeros: the carry passed in is not read

        def train_loss(params, batch, carry):
            return loss_fn(params, batch, jax.tree.map(jnp.zeros_like, carry))

    epoch = train.make_trainer(train_loss, optimizer, batches, mesh=mesh)
    evaluate = None
    if val_tokens is not None:
        evaluate = _held_out_scores(config, model, loss_fn, state.params, val_tokens)

    def sampler(num_chars, temperature):
        carried = make_stateful_sampler(model, num_chars, temperature)
        return lambda params, seed, key: carried(params, jnp.asarray(seed)[None], key)[0]

    def random_seed(iteration: int) -> np.ndarray:
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed), iteration)
        start = int(jax.random.randint(key, (), 0, len(train_tokens) - config.seq_len + 1))
        return np.asarray(train_tokens[start : start + config.seq_len])

    return _Mode(state, epoch, data, num_examples, evaluate, sampler, random_seed)


# Held-out blocks scored side by side in one batch (val_block).
_BLOCK_ROWS = 256


def _held_out_scores(config, model, loss_fn, params, val_tokens) -> Callable:
    """``params -> {"val": loss}``, and ``"val_block"`` with ``val_block``: the held-out mean
    cross-entropy (nats per character).

    ``val``: the tail as one stream, the carry passed across its ``bptt`` windows. Without
    ``val_block`` the first ``seq_len - 1`` predictions warm the carry up and are not scored,
    so that both modes score the same characters; with it every character after the first is
    scored, as nanoGPT does. ``val_block``: the same characters in consecutive blocks of
    ``val_block``, each from a zero carry (:func:`rnn_jax.data.make_blocks`)."""
    scored_from = 0 if config.val_block else config.seq_len - 1
    streams, windows = data_lib.make_streams(val_tokens, 1, config.bptt, scored_from=scored_from)
    get_batch = lambda s, k: data_lib.stream_batch(s, k, config.bptt)
    stream = train.make_evaluate(
        loss_fn, in_order(get_batch, windows), carry=zero_carry(model, params, 1)
    )
    if not config.val_block:
        return lambda params: {"val": stream(params, streams)["loss"]}
    rows = min(_BLOCK_ROWS, -(-(len(val_tokens) - 1) // config.val_block))
    blocks, block_windows = data_lib.make_blocks(val_tokens, config.val_block, rows)
    get_block = lambda s, k: data_lib.stream_batch(s, k, config.val_block)
    from_zero = lambda params, batch: loss_fn(params, batch, None)[:2]
    block = train.make_evaluate(from_zero, in_order(get_block, block_windows))
    return lambda params: {
        "val": stream(params, streams)["loss"],
        "val_block": block(params, blocks)["loss"],
    }


def _final_samples(config, run: RunDir, mode: _Mode, state, vocab, seed_tokens, out) -> None:
    """``sample_chars`` characters at each of ``sample_temperatures``, from the best state
    (``keep_best``) or ``state``, into ``final_samples.txt`` and ``out``."""
    where = f"the last state (step {int(state.step)})"
    if config.keep_best:
        kept = run.restore_best(state)
        if kept is not None:
            state, row = kept
            where = f"the best state (iteration {row['iteration']}, step {row['step']})"
    seed = seed_tokens if seed_tokens is not None else mode.random_seed(0)
    shown = vocab.decode(seed if config.mode == "stateful" else seed[-config.seq_len :])
    lines = []
    for i, temperature in enumerate(config.sample_temperatures):
        sample = mode.sampler(config.sample_chars, temperature)
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed + 2), i)
        text = vocab.decode(sample(state.params, seed, key))
        lines.append(f"# {where}, temperature {temperature:g}\n{shown}|{text}\n\n")
    run.write(FINAL_SAMPLES, "".join(lines).encode())
    out(f"final samples from {where} in {FINAL_SAMPLES}:")
    out(lines[-1])


def run(config: Config, workdir: str | None, out: Callable[[str], None] = print) -> Result:
    """Trains the char-RNN on ``config.text`` with generation after every iteration.

    Writes ``metrics.jsonl`` (one line per iteration), ``samples.txt`` and orbax checkpoints to
    ``workdir`` and resumes from them (``None``: nothing written, nothing resumed). Everything
    is checked before the first epoch; only process 0 of a multi-host run calls ``out``.

    ``config.mode`` picks the tutorial's shuffled windows or stateful streams (DESIGN.md §7);
    both hold out the same tail (``val_fraction``) and score the same held-out characters.

    Raises:
      TextError: the text cannot be used (the message names ``text=``).
      ValueError: ``seed_text`` has characters outside the text's vocabulary, or
        ``val_fraction`` leaves too little text on one side, or too little for the streams.
      CheckpointError: ``workdir`` holds a checkpoint of another configuration or text.
      NonFiniteLossError: the loss became NaN or infinite (the last good checkpoint is kept).
    """
    if jax.process_index() != 0:
        out = lambda *_: None
    mesh = parallel.make_mesh(config.num_devices) if config.num_devices != 1 else None
    text = load_config_text(config, out)
    vocab = data_lib.Vocabulary.from_text(text)
    tokens = vocab.encode(text)
    seed_tokens = None
    if config.seed_text is not None:
        seed_text = config.seed_text
        if config.text_cleaning() == "tutorial":  # the corpus is lower-cased (DESIGN.md §1)
            seed_text = seed_text.lower()
        try:  # fail before training, not after the first iteration
            seed_tokens = vocab.encode(seed_text)
        except ValueError as e:
            raise ValueError(f"seed_text={config.seed_text!r}: {e}") from e
    train_tokens, val_tokens = data_lib.split_tokens(
        tokens, config.held_out_fraction(), config.seq_len
    )

    cell, model = make_model(config, vocab.size)
    optimizer = config.optimizer_spec()
    init_key, train_key = init_keys(config)
    state = train.create_train_state(model.init(init_key), optimizer, train_key)
    if config.mode == "stateful":
        mode = _stateful(config, model, optimizer, state, train_tokens, val_tokens, mesh)
        if config.random_windows:
            what = f"epochs of {mode.epoch.num_steps} updates of {config.batch_size} windows of "
            what += f"{config.bptt} at random offsets"
        else:
            what = f"{mode.epoch.num_steps} windows of {config.bptt} in {config.batch_size} streams"
    else:
        loss_fn = make_loss(model, config.compute_dtype)
        mode = _windowed(config, loss_fn, optimizer, state, train_tokens, val_tokens, mesh, cell)
        what = f"{mode.num_examples} training windows"
    held_out = f", {len(val_tokens)} held out" if val_tokens is not None else ""
    out(
        f"{len(text)} characters{held_out}, vocabulary of {vocab.size}, {what}"
        + (f", batches split over {parallel.data_size(mesh)} devices" if mesh is not None else "")
    )

    sample = mode.sampler(config.num_preds, config.temperature)

    def on_iteration(iteration, state, metrics):
        report = {
            "bits_per_char": metrics["loss"] / math.log(2),
            "examples_per_second": metrics["examples"] / metrics["seconds"],
        }
        if mode.evaluate is not None:
            for name, loss in jax.device_get(mode.evaluate(state.params)).items():
                report[f"{name}_loss"] = float(loss)
                report[f"{name}_bits_per_char"] = float(loss) / math.log(2)
        seed = seed_tokens if seed_tokens is not None else mode.random_seed(iteration)
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), iteration)
        generated = vocab.decode(sample(state.params, seed, key))
        shown = seed if config.mode == "stateful" else seed[-config.seq_len :]
        report["seed"], report["generated"] = vocab.decode(shown), generated
        out("=" * 50)
        out(f"Iteration #: {iteration}")
        line = (
            f"loss {metrics['loss']:.4f}  acc {metrics['accuracy']:.4f}  "
            f"bpc {report['bits_per_char']:.4f}  {metrics['seconds']:.2f} s  "
            f"{report['examples_per_second']:.0f} chars/s"
        )
        if "val_block_loss" in report:
            line += (
                f"  held-out nats: stream {report['val_loss']:.4f}, block "
                f"{report['val_block_loss']:.4f}"
            )
        elif "val_bits_per_char" in report:
            line += f"  held-out bpc {report['val_bits_per_char']:.4f}"
        out(line)
        out(f'Generating from seed: "{report["seed"]}"')
        out(report["seed"] + generated)
        return report

    # The cleaned text is identified under "config" so that a mismatch is reported as text.
    text_id = {
        "length": len(text),
        "vocabulary": vocab.chars,
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
    }
    meta = {
        "experiment": "char_lm",
        "config": {**config.resume_key(), "text": text_id},
        "vocabulary": vocab.chars,
    }
    with open_run(workdir, meta, files=(SAMPLES, FINAL_SAMPLES)) as run:

        def report(iteration, state, metrics):
            row = on_iteration(iteration, state, metrics)
            run.append(
                SAMPLES,
                f"iteration {iteration}  loss {metrics['loss']:.4f}\n"
                f"{row['seed']}|{row['generated']}\n\n",
            )
            return row

        try:
            state, history = loop.fit(
                mode.state,
                mode.epoch,
                mode.data,
                run,
                iterations=config.iterations,
                epochs_per_iteration=config.epochs_per_iteration,
                steps_per_iteration=config.steps_per_iteration,
                on_iteration=report,
                best=_held_out_loss if config.keep_best else None,
                steps_per_call=config.steps_per_call,
                checkpoint_every=config.checkpoint_every,
                progress_seconds=config.progress_seconds,
                max_train_seconds=config.max_train_seconds,
                interrupted=cli.stop_requested,
                log=out,
            )
        except loop.NonFiniteLossError as e:
            raise loop.NonFiniteLossError(
                f"{e} (learning_rate={config.learning_rate}, clip_norm={config.clip_norm})"
            ) from e
        if config.sample_chars:
            _final_samples(config, run, mode, state, vocab, seed_tokens, out)
    if history:
        _final_line(history, out)
    return Result(state, history, vocab)


def _held_out_loss(row: dict) -> float:
    """The held-out loss an iteration is judged by: the block loss where there is one."""
    return row.get("val_block_loss", row["val_loss"])


def _final_line(history: list[dict], out: Callable[[str], None]) -> None:
    last = history[-1]
    if "val_block_loss" in last:
        best = min(history, key=_held_out_loss)
        out(
            f"final: iteration {last['iteration']}, step {last['step']}, held-out nats: stream "
            f"{last['val_loss']:.4f}, block {last['val_block_loss']:.4f}; best: iteration "
            f"{best['iteration']}, stream {best['val_loss']:.4f}, block "
            f"{best['val_block_loss']:.4f}"
        )
    elif "val_bits_per_char" in last:
        out(
            f"final: iteration {last['iteration']}, held-out bpc "
            f"{last['val_bits_per_char']:.4f}, training bpc {last['bits_per_char']:.4f}"
        )


if __name__ == "__main__":
    cli.main(
        Config, run, workdir="runs/char_lm", launch_cls=Launch, setup=setup, interruptible=True
    )
