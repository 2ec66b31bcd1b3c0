"""The tutorial's character-level language model: config, loss, generation, train_and_evaluate."""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from rnn_jax import data as data_lib
from rnn_jax import parallel, train
from rnn_jax.cells import CELLS
from rnn_jax.losses import accuracy, softmax_cross_entropy
from rnn_jax.models import rnn_classifier
from rnn_jax.sample import make_sampler

# --compute_dtype: the dot algorithm of every matrix product in the loss (forward and backward).
# bfloat16 rounds the inputs of each product to bf16 and accumulates in float32, on the GPU/TPU
# matrix units; params, optimiser state, carry and elementwise math stay float32. XLA's CPU
# backend ignores the setting (measured: bit-identical gradients).
MATMUL_PRECISION = {"float32": None, "bfloat16": "BF16_BF16_F32"}


@dataclasses.dataclass(frozen=True)
class Config:
    """The tutorial's recipe (DESIGN.md §1) as defaults."""

    cell: str = "simple_rnn"
    units: int = 128
    seq_len: int = 10
    step: int = 1
    batch_size: int = 128
    iterations: int = 25
    epochs_per_iteration: int = 1
    num_preds: int = 100
    learning_rate: float = 1e-3
    rho: float = 0.9
    epsilon: float = 1e-7
    eps_in_sqrt: bool = True
    clip_norm: float | None = None
    seed: int = 0
    val_fraction: float = 0.0
    temperature: float = 0.0
    seed_text: str | None = None
    unroll: int = 0  # 0: unroll the scan fully for windows of up to 32 steps
    num_devices: int = 1  # data-parallel devices; 0: all (every host's)
    compute_dtype: str = "float32"  # or "bfloat16" matmul inputs (MATMUL_PRECISION)

    def validate(self):
        """Raises ``ValueError`` naming the flag of the first out-of-range value."""
        if self.cell not in CELLS:
            raise ValueError(f"--cell must be one of {sorted(CELLS)}, got {self.cell!r}")
        for name in ("units", "seq_len", "step", "batch_size", "iterations",
                     "epochs_per_iteration", "num_preds"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"--learning_rate must be positive, got {self.learning_rate}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"--clip_norm must be positive (or unset), got {self.clip_norm}")
        if not 0.0 <= self.rho < 1.0:
            raise ValueError(f"--rho must be in [0, 1), got {self.rho}")
        if not self.epsilon > 0:
            raise ValueError(f"--epsilon must be positive, got {self.epsilon}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if self.seed_text is not None and len(self.seed_text) < self.seq_len:
            raise ValueError(
                f"--seed_text has {len(self.seed_text)} characters; it needs at least "
                f"--seq_len={self.seq_len}"
            )
        if self.unroll < 0:
            raise ValueError(f"--unroll must be >= 0, got {self.unroll}")
        if self.num_devices < 0:
            raise ValueError(f"--num_devices must be >= 0 (0: all devices), got {self.num_devices}")
        if self.compute_dtype not in MATMUL_PRECISION:
            raise ValueError(f"--compute_dtype must be one of {sorted(MATMUL_PRECISION)}, "
                             f"got {self.compute_dtype!r}")

    def resume_key(self) -> dict:
        """The fields a resumed run must share with the checkpoint (not iterations, sampling).

        Nor the devices and matmul precision: a run may move between machines, and checkpoints
        written before those options existed still resume.
        """
        keep = {f.name for f in dataclasses.fields(self)}
        keep -= {"iterations", "num_preds", "temperature", "seed_text", "num_devices",
                 "compute_dtype"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k in keep}


def make_model(config: Config, vocab_size: int):
    cell = CELLS[config.cell](config.units)
    unroll = config.unroll or (True if config.seq_len <= 32 else 1)
    return cell, rnn_classifier(cell, vocab_size, vocab_size, unroll_steps=unroll)


def make_loss(model, compute_dtype: str = "float32"):
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


def seed_window(config: Config, vocab: data_lib.Vocabulary, windows, iteration: int):
    """The generation seed: ``--seed_text`` (its last ``seq_len`` chars) or a random example."""
    if config.seed_text is not None:
        if len(config.seed_text) < config.seq_len:
            raise ValueError(
                f"--seed_text has {len(config.seed_text)} characters; it needs at least "
                f"--seq_len={config.seq_len}"
            )
        return vocab.encode(config.seed_text[-config.seq_len :])
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), iteration)
    i = int(jax.random.randint(key, (), 0, windows.starts.shape[0]))
    start = int(windows.starts[i])
    return np.asarray(windows.tokens[start : start + config.seq_len])


def train_and_evaluate(config: Config, workdir: str | None, text_path: str, out=print):
    """Trains the char-RNN on ``text_path`` with generation after every iteration.

    Writes ``metrics.jsonl`` (one line per iteration), ``samples.txt`` and orbax checkpoints to
    ``workdir`` and resumes from them. Returns ``(state, history, vocabulary)``.
    """
    config.validate()
    mesh = parallel.make_mesh(config.num_devices) if config.num_devices != 1 else None
    text = data_lib.load_text(text_path, min_length=config.seq_len + 1)
    vocab = data_lib.Vocabulary.from_text(text)
    tokens = vocab.encode(text)
    if config.seed_text is not None:
        try:  # fail before training, not after the first iteration
            vocab.encode(config.seed_text)
        except ValueError as e:
            raise ValueError(f"--seed_text: {e}") from e
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

    def get_batch(w, idx):
        return data_lib.get_window_batch(w, idx, config.seq_len)

    epoch = train.make_epoch(
        loss_fn, optimizer, get_batch, num_examples, config.batch_size, mesh=mesh
    )
    evaluate = None
    if val_tokens is not None:
        val_windows = data_lib.make_windows(val_tokens, config.seq_len, config.seq_len)
        evaluate = train.make_evaluate(
            loss_fn, get_batch, int(val_windows.starts.shape[0]), config.batch_size, mesh=mesh
        )
        if mesh is not None:
            val_windows = parallel.replicate(val_windows, mesh)
    sampler = make_sampler(cell, config.num_preds, config.temperature)

    out(f"{len(text)} characters, vocabulary of {vocab.size}, {num_examples} training windows"
        + (f", batches split over {parallel.data_size(mesh)} devices" if mesh is not None else ""))

    def on_iteration(iteration, state, metrics):
        report = {
            "bits_per_char": metrics["loss"] / math.log(2),
            "examples_per_second": num_examples / metrics["seconds"],
        }
        if evaluate is not None:
            val = jax.device_get(evaluate(state.params, val_windows))
            report["val_loss"] = float(val["loss"])
            report["val_bits_per_char"] = float(val["loss"]) / math.log(2)
        seed = seed_window(config, vocab, windows, iteration)
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), iteration)
        generated = vocab.decode(sampler(state.params, jnp.asarray(seed)[None], key)[0])
        report["seed"], report["generated"] = vocab.decode(seed), generated
        out("=" * 50)
        out(f"Iteration #: {iteration}")
        line = (f"loss {metrics['loss']:.4f}  acc {metrics['accuracy']:.4f}  "
                f"bpc {report['bits_per_char']:.4f}  {metrics['seconds']:.2f} s  "
                f"{report['examples_per_second']:.0f} chars/s")
        if "val_bits_per_char" in report:
            line += f"  val bpc {report['val_bits_per_char']:.4f}"
        out(line)
        out(f'Generating from seed: "{report["seed"]}"')
        out(report["seed"] + generated)
        return report

    # The text is identified under "config" so that a mismatch is reported as --text.
    text_id = {"length": len(text), "vocabulary": vocab.chars}
    meta = {"config": {**config.resume_key(), "text": text_id}, "vocabulary": vocab.chars}
    state, history = train.fit(
        state, epoch, windows, iterations=config.iterations,
        epochs_per_iteration=config.epochs_per_iteration, workdir=workdir, meta=meta,
        on_iteration=on_iteration,
    )
    if workdir is not None and jax.process_index() == 0:
        _write_samples(workdir)
    return state, history, vocab


def _write_samples(workdir: str):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(workdir, "samples.txt"), "w") as f:
        for row in rows:
            f.write(f"iteration {row['iteration']}  loss {row['loss']:.4f}\n")
            f.write(f"{row['seed']}|{row['generated']}\n\n")
