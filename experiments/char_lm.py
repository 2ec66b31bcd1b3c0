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
from rnn_jax import parallel, train
from rnn_jax.batches import in_order, shuffled_epoch
from rnn_jax.cells import Cell
from rnn_jax.losses import accuracy, masked_accuracy, masked_cross_entropy, softmax_cross_entropy
from rnn_jax.models import Layer, Model, language_model, recurrent, sequence_classifier, stacked
from rnn_jax.registry import NAMES, named_cell
from rnn_jax.rundir import open_run
from rnn_jax.sample import make_sampler, make_stateful_sampler

MODES = ("windowed", "stateful")
# The generated samples, one per iteration, appended as they are made (never rewritten).
SAMPLES = "samples.txt"

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
    )
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
    batch_size: int = cli.field(
        128, "Examples per update (stateful mode: streams).", check=cli.positive
    )
    dropout: float = cli.field(
        0.0,
        "Stateful mode: dropout rate on the outputs the Dense head reads, in training.",
        check=cli.fraction,
    )
    iterations: int = cli.field(25, "Train-then-generate iterations.", check=cli.positive)
    epochs_per_iteration: int = cli.field(1, "Epochs per iteration.", check=cli.positive)
    num_preds: int = cli.field(100, "Characters generated per iteration.", check=cli.positive)
    learning_rate: float = cli.field(1e-3, "RMSprop learning rate.", check=cli.positive_float32)
    rho: float = cli.field(0.9, "RMSprop decay of the squared-gradients' mean.", check=cli.fraction)
    epsilon: float = cli.field(1e-7, "RMSprop epsilon (Keras: 1e-7).", check=cli.positive_float32)
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
    temperature: float = cli.field(
        0.0, "0: greedy (the tutorial); > 0: sample.", check=cli.non_negative
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
        if self.dropout > 0 and self.mode != "stateful":
            raise ValueError(f"dropout={self.dropout} needs mode='stateful'")
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

    def resume_key(self) -> dict:
        """The fields a resumed run must share with the checkpoint.

        Not iterations nor the sampling options, nor the devices and matmul precision (a run
        may move between machines, and checkpoints written before those options existed still
        resume), nor the text's path: the text itself is identified beside them by ``run``.
        Nor ``mode``, ``bptt`` and ``layers`` in a run of the tutorial's shape (windowed, one
        layer), where they play no part: its checkpoints from before they existed resume.
        """
        key = cli.resume_key(self, _NOT_RESUMED)
        key["val_fraction"] = self.held_out_fraction()
        if self.mode == "windowed":
            del key["mode"], key["bptt"], key["dropout"]
        elif self.dropout == 0:
            del key["dropout"]
        if self.layers == 1:
            del key["layers"]
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
    layers = [recurrent(make_cell(config), unroll_steps=unroll) for _ in range(config.layers)]
    return layers[0] if config.layers == 1 else stacked(layers)


def make_model(config: Config, vocab_size: int) -> tuple[Cell, Model]:
    """``(cell, model)``: the tutorial's ``cell`` + ``Dense(V)`` over integer tokens, reading
    a window to its last step (windowed, :func:`rnn_jax.sequence_classifier`) or every step
    with the carry in and out (stateful, :func:`rnn_jax.language_model`). The params are
    ``{"rnn", "dense"}`` either way."""
    if config.mode == "stateful":
        return make_cell(config), language_model(_layer(config), vocab_size, config.dropout)
    return make_cell(config), sequence_classifier(_layer(config), vocab_size, vocab_size)


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
    evaluate: Callable | None  # params -> {"loss", "accuracy"} over the held-out tail
    sample: Callable  # (params, seed tokens (n,), key) -> generated tokens (num_preds,)
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
        evaluate = lambda params: scores(params, val_windows)
    sampler = make_sampler(cell, config.num_preds, config.temperature)

    def sample(params, seed, key):
        return sampler(params, jnp.asarray(seed[-config.seq_len :])[None], key)[0]

    def random_seed(iteration: int) -> np.ndarray:
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed), iteration)
        i = int(jax.random.randint(key, (), 0, num_examples))
        start = int(windows.starts[i])
        return np.asarray(windows.tokens[start : start + config.seq_len])

    return _Mode(state, epoch, windows, num_examples, evaluate, sample, random_seed)


def _stateful(config, model, optimizer, state, train_tokens, val_tokens, mesh):
    """``batch_size`` contiguous streams read in ``bptt`` windows, the carry passed on."""
    loss_fn = make_stateful_loss(model, config.compute_dtype)
    streams, num_windows = data_lib.make_streams(train_tokens, config.batch_size, config.bptt)
    # A row per stream, whatever the devices: checkpoints resume on any number of them.
    state = state._replace(carry=zero_carry(model, state.params, config.batch_size))
    if mesh is not None:
        streams, state = parallel.replicate((streams, state), mesh)
    get_batch = lambda s, k: data_lib.stream_batch(s, k, config.bptt)
    batches = in_order(get_batch, num_windows, mesh=mesh, with_keys=config.dropout > 0)
    epoch = train.make_trainer(loss_fn, optimizer, batches, mesh=mesh)
    evaluate = None
    if val_tokens is not None:
        # One stream over the whole tail, the carry passed across its windows; the first
        # seq_len - 1 predictions warm the carry up and are not scored, so that both modes
        # score the same characters.
        val_streams, val_windows = data_lib.make_streams(
            val_tokens, 1, config.bptt, scored_from=config.seq_len - 1
        )
        scores = train.make_evaluate(
            loss_fn,
            in_order(get_batch, val_windows),
            carry=zero_carry(model, state.params, 1),
        )
        evaluate = lambda params: scores(params, val_streams)
    sampler = make_stateful_sampler(model, config.num_preds, config.temperature)

    def sample(params, seed, key):
        return sampler(params, jnp.asarray(seed)[None], key)[0]

    def random_seed(iteration: int) -> np.ndarray:
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed), iteration)
        start = int(jax.random.randint(key, (), 0, len(train_tokens) - config.seq_len + 1))
        return np.asarray(train_tokens[start : start + config.seq_len])

    num_examples = int(np.sum(jax.device_get(streams.lengths)))
    return _Mode(state, epoch, streams, num_examples, evaluate, sample, random_seed)


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
    optimizer = train.rmsprop(
        config.learning_rate, config.rho, config.epsilon, config.eps_in_sqrt, config.clip_norm
    )
    init_key, train_key = jax.random.split(jax.random.PRNGKey(config.seed))
    state = train.create_train_state(model.init(init_key), optimizer, train_key)
    if config.mode == "stateful":
        mode = _stateful(config, model, optimizer, state, train_tokens, val_tokens, mesh)
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

    def on_iteration(iteration, state, metrics):
        report = {
            "bits_per_char": metrics["loss"] / math.log(2),
            "examples_per_second": mode.num_examples / metrics["seconds"],
        }
        if mode.evaluate is not None:
            val = jax.device_get(mode.evaluate(state.params))
            report["val_loss"] = float(val["loss"])
            report["val_bits_per_char"] = float(val["loss"]) / math.log(2)
        seed = seed_tokens if seed_tokens is not None else mode.random_seed(iteration)
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), iteration)
        generated = vocab.decode(mode.sample(state.params, seed, key))
        shown = seed if config.mode == "stateful" else seed[-config.seq_len :]
        report["seed"], report["generated"] = vocab.decode(shown), generated
        out("=" * 50)
        out(f"Iteration #: {iteration}")
        line = (
            f"loss {metrics['loss']:.4f}  acc {metrics['accuracy']:.4f}  "
            f"bpc {report['bits_per_char']:.4f}  {metrics['seconds']:.2f} s  "
            f"{report['examples_per_second']:.0f} chars/s"
        )
        if "val_bits_per_char" in report:
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
    with open_run(workdir, meta, files=(SAMPLES,)) as run:

        def report(iteration, state, metrics):
            row = on_iteration(iteration, state, metrics)
            run.append(
                SAMPLES,
                f"iteration {iteration}  loss {metrics['loss']:.4f}\n"
                f"{row['seed']}|{row['generated']}\n\n",
            )
            return row

        try:
            state, history = train.fit(
                mode.state,
                mode.epoch,
                mode.data,
                run,
                iterations=config.iterations,
                epochs_per_iteration=config.epochs_per_iteration,
                on_iteration=report,
                steps_per_call=config.steps_per_call,
                checkpoint_every=config.checkpoint_every,
                progress_seconds=config.progress_seconds,
                interrupted=cli.stop_requested,
                log=out,
            )
        except train.NonFiniteLossError as e:
            raise train.NonFiniteLossError(
                f"{e} (learning_rate={config.learning_rate}, clip_norm={config.clip_norm})"
            ) from e
    if history:
        last = history[-1]
        if "val_bits_per_char" in last:
            out(
                f"final: iteration {last['iteration']}, held-out bpc "
                f"{last['val_bits_per_char']:.4f}, training bpc {last['bits_per_char']:.4f}"
            )
    return Result(state, history, vocab)


if __name__ == "__main__":
    cli.main(
        Config, run, workdir="runs/char_lm", launch_cls=Launch, setup=setup, interruptible=True
    )
