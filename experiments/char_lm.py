"""The tutorial's char-RNN on Alice in Wonderland, with greedy generation after each iteration.

Run: python -m experiments.char_lm --workdir=runs/char_lm
Defaults are the tutorial's recipe (DESIGN.md §1-2): SimpleRNN(128) over 10-char windows (step
1), Dense + softmax, categorical cross-entropy, RMSprop (Keras 3 defaults), batch 128, 25
iterations of one epoch, 100 greedy characters after each. On this 2-core CPU, idle: about
1 s per epoch and 30-40 s for the whole run (longer while other jobs share the cores); the
training loss at iteration 25 is 1.3759 (1.985 bits/char), greedy sample "t this, but she had
not done the room and she said to herself, ...". Rerun with the same --workdir to resume from
the newest checkpoint (one per iteration, and inside long epochs every --checkpoint_every
updates); the resumed run ends bit-identical to one never stopped.
Several devices: --num_devices=0 (all); several hosts: --distributed, see docs/scaling.md.
In process: ``run(Config(units=8, iterations=2), workdir)`` returns a :class:`Result`.
"""

import dataclasses
import hashlib
import math
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
from rnn_jax import data as data_lib
from rnn_jax import parallel, train
from rnn_jax.cells import CELLS, Cell
from rnn_jax.losses import accuracy, softmax_cross_entropy
from rnn_jax.models import Model, recurrent, sequence_classifier
from rnn_jax.sample import make_sampler

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
        "Text file to train on (unset: the shipped Alice, rnn_jax.data.alice_path()).",
        check=cli.optional(cli.non_empty),
    )
    cell: str = cli.field("simple_rnn", "Recurrence.", choices=tuple(CELLS))
    units: int = cli.field(128, "Hidden units.", check=cli.positive)
    seq_len: int = cli.field(10, "Input window (characters).", check=cli.positive)
    step: int = cli.field(1, "Stride between training windows.", check=cli.positive)
    batch_size: int = cli.field(128, "Examples per update.", check=cli.positive)
    iterations: int = cli.field(25, "Train-then-generate iterations.", check=cli.positive)
    epochs_per_iteration: int = cli.field(1, "Epochs per iteration.", check=cli.positive)
    num_preds: int = cli.field(100, "Characters generated per iteration.", check=cli.positive)
    learning_rate: float = cli.field(1e-3, "RMSprop learning rate.", check=cli.positive)
    rho: float = cli.field(0.9, "RMSprop decay of the squared-gradients' mean.", check=cli.fraction)
    epsilon: float = cli.field(1e-7, "RMSprop epsilon (Keras: 1e-7).", check=cli.positive)
    eps_in_sqrt: bool = cli.field(
        True,
        "RMSprop epsilon inside the square root (Keras 3) or outside (Keras 2, PyTorch).",
    )
    clip_norm: float | None = cli.clip_norm()
    seed: int = cli.field(0, "PRNG seed (init, shuffles, generation seeds).")
    val_fraction: float = cli.field(
        0.0, "Held-out tail of the text, for validation bits per char.", check=cli.fraction
    )
    temperature: float = cli.field(
        0.0, "0: greedy (the tutorial); > 0: sample.", check=cli.non_negative
    )
    seed_text: str | None = cli.field(
        None,
        "Generate from this text's last seq_len characters, lower-cased as the corpus is "
        "(unset: a random training window).",
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
        if self.seed_text is not None and len(self.seed_text) < self.seq_len:
            raise ValueError(
                f"seed_text={self.seed_text!r} has {len(self.seed_text)} characters; it needs at "
                f"least seq_len={self.seq_len}"
            )

    def resume_key(self) -> dict:
        """The fields a resumed run must share with the checkpoint.

        Not iterations nor the sampling options, nor the devices and matmul precision (a run
        may move between machines, and checkpoints written before those options existed still
        resume), nor the text's path: the text itself is identified beside them by ``run``.
        """
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _NOT_RESUMED}


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


def make_model(config: Config, vocab_size: int) -> tuple[Cell, Model]:
    """``(cell, model)``: the tutorial's ``cell`` + ``Dense(V)`` over integer tokens."""
    cell = CELLS[config.cell](config.units)
    unroll = config.unroll or (True if config.seq_len <= 32 else 1)
    return cell, sequence_classifier(recurrent(cell, unroll_steps=unroll), vocab_size, vocab_size)


def make_loss(model: Model, compute_dtype: str = "float32"):
    """Per-example categorical cross-entropy and accuracy for ``(inputs, labels)`` batches.

    ``compute_dtype="bfloat16"`` runs the model's matrix products on bf16 inputs with float32
    accumulation (see ``MATMUL_PRECISION``); the loss itself is float32.
    """
    precision = MATMUL_PRECISION[compute_dtype]

    def loss_fn(params, batch):
        inputs, labels = batch
        if precision is None:  # leave JAX's default (and JAX_DEFAULT_MATMUL_PRECISION) alone
            logits = model.apply(params, inputs)
        else:
            with jax.default_matmul_precision(precision):
                logits = model.apply(params, inputs)
        return softmax_cross_entropy(logits, labels), {"accuracy": accuracy(logits, labels)}

    return loss_fn


def _load(config: Config) -> tuple[str, str]:
    """``(path, cleaned text)``; errors name ``text=`` (and ``seq_len=`` for a short text)."""
    path = data_lib.alice_path() if config.text is None else config.text
    text = data_lib.load_text(path, name="text")
    if len(text) < config.seq_len + 1:
        raise data_lib.TextError(
            f"text={path!r} has {len(text)} characters after cleaning, fewer than "
            f"seq_len={config.seq_len} + 1; pass a longer text or a shorter seq_len"
        )
    return path, text


def run(config: Config, workdir: str | None, out: Callable[[str], None] = print) -> Result:
    """Trains the char-RNN on ``config.text`` with generation after every iteration.

    Writes ``metrics.jsonl`` (one line per iteration), ``samples.txt`` and orbax checkpoints to
    ``workdir`` and resumes from them (``None``: nothing written, nothing resumed). Everything
    is checked before the first epoch; only process 0 of a multi-host run calls ``out``.

    Raises:
      TextError: the text cannot be used (the message names ``text=``).
      ValueError: ``seed_text`` has characters outside the text's vocabulary, or
        ``val_fraction`` leaves too little text on one side.
      CheckpointError: ``workdir`` holds a checkpoint of another configuration or text.
      NonFiniteLossError: the loss became NaN or infinite (the last good checkpoint is kept).
    """
    if jax.process_index() != 0:
        out = lambda *_: None
    mesh = parallel.make_mesh(config.num_devices) if config.num_devices != 1 else None
    _, text = _load(config)
    vocab = data_lib.Vocabulary.from_text(text)
    tokens = vocab.encode(text)
    seed_tokens = None
    if config.seed_text is not None:
        seed_text = config.seed_text.lower()  # the corpus is lower-cased (DESIGN.md §1)
        try:  # fail before training, not after the first iteration
            seed_tokens = vocab.encode(seed_text)[-config.seq_len :]
        except ValueError as e:
            raise ValueError(f"seed_text={config.seed_text!r}: {e}") from e
    train_tokens, val_tokens = data_lib.split_tokens(tokens, config.val_fraction, config.seq_len)
    windows = data_lib.make_windows(train_tokens, config.seq_len, config.step)
    num_examples = int(windows.starts.shape[0])

    cell, model = make_model(config, vocab.size)
    loss_fn = make_loss(model, config.compute_dtype)
    optimizer = train.rmsprop(
        config.learning_rate, config.rho, config.epsilon, config.eps_in_sqrt, config.clip_norm
    )
    init_key, train_key = jax.random.split(jax.random.PRNGKey(config.seed))
    state = train.create_train_state(model.init(init_key), optimizer, train_key)
    if mesh is not None:  # placed once: the corpus and the state whole on every device
        windows, state = parallel.replicate((windows, state), mesh)

    def get_batch(w, indices):
        return data_lib.get_window_batch(w, indices, config.seq_len)

    epoch = train.make_train_steps(
        loss_fn,
        optimizer,
        train.shuffled_epoch(get_batch, num_examples, config.batch_size, mesh=mesh),
        mesh=mesh,
    )
    evaluate = None
    if val_tokens is not None:
        val_windows = data_lib.make_windows(val_tokens, config.seq_len, config.seq_len)
        val_batches = train.shuffled_epoch(
            get_batch,
            int(val_windows.starts.shape[0]),
            config.batch_size,
            shuffle=False,
            mesh=mesh,
        )
        evaluate = train.make_evaluate(loss_fn, val_batches, mesh=mesh)
        if mesh is not None:
            val_windows = parallel.replicate(val_windows, mesh)
    sampler = make_sampler(cell, config.num_preds, config.temperature)

    out(
        f"{len(text)} characters, vocabulary of {vocab.size}, {num_examples} training windows"
        + (f", batches split over {parallel.data_size(mesh)} devices" if mesh is not None else "")
    )

    def seed_window(iteration: int) -> np.ndarray:
        """The generation seed: ``seed_text``'s last ``seq_len`` tokens or a random window."""
        if seed_tokens is not None:
            return seed_tokens
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed), iteration)
        i = int(jax.random.randint(key, (), 0, num_examples))
        start = int(windows.starts[i])
        return np.asarray(windows.tokens[start : start + config.seq_len])

    def on_iteration(iteration, state, metrics):
        report = {
            "bits_per_char": metrics["loss"] / math.log(2),
            "examples_per_second": num_examples / metrics["seconds"],
        }
        if evaluate is not None:
            val = jax.device_get(evaluate(state.params, val_windows))
            report["val_loss"] = float(val["loss"])
            report["val_bits_per_char"] = float(val["loss"]) / math.log(2)
        seed = seed_window(iteration)
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), iteration)
        generated = vocab.decode(sampler(state.params, jnp.asarray(seed)[None], key)[0])
        report["seed"], report["generated"] = vocab.decode(seed), generated
        out("=" * 50)
        out(f"Iteration #: {iteration}")
        line = (
            f"loss {metrics['loss']:.4f}  acc {metrics['accuracy']:.4f}  "
            f"bpc {report['bits_per_char']:.4f}  {metrics['seconds']:.2f} s  "
            f"{report['examples_per_second']:.0f} chars/s"
        )
        if "val_bits_per_char" in report:
            line += f"  val bpc {report['val_bits_per_char']:.4f}"
        out(line)
        out(f'Generating from seed: "{report["seed"]}"')
        out(report["seed"] + generated)
        return report

    # The cleaned text is identified under "config" so that a mismatch is reported as text.
    text_id = {
        "length": len(text),
        "vocabulary": vocab.chars,
        "sha256": hashlib.sha256(text.encode("ascii")).hexdigest(),
    }
    meta = {"config": {**config.resume_key(), "text": text_id}, "vocabulary": vocab.chars}
    try:
        state, history = train.fit(
            state,
            epoch,
            windows,
            iterations=config.iterations,
            epochs_per_iteration=config.epochs_per_iteration,
            workdir=workdir,
            meta=meta,
            on_iteration=on_iteration,
            steps_per_call=config.steps_per_call,
            checkpoint_every=config.checkpoint_every,
            progress_seconds=config.progress_seconds,
            log=out,
        )
    except train.NonFiniteLossError as e:
        raise train.NonFiniteLossError(
            f"{e} (learning_rate={config.learning_rate}, clip_norm={config.clip_norm})"
        ) from e
    if workdir is not None and jax.process_index() == 0:
        _write_samples(os.path.join(workdir, "samples.txt"), history)
    return Result(state, history, vocab)


def _write_samples(path: str, history: list[dict]) -> None:
    with open(path, "w") as f:
        for row in history:
            f.write(f"iteration {row['iteration']}  loss {row['loss']:.4f}\n")
            f.write(f"{row['seed']}|{row['generated']}\n\n")


if __name__ == "__main__":
    cli.main(Config, run, workdir="runs/char_lm", launch_cls=Launch, setup=setup)
