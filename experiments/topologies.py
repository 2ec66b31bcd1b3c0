"""The four RNN topologies as measured experiments (one-to-many, many-to-one, seq2seq, synced).

Run (one topology and cell per run; docs/topologies.md has the table and every command):
  python -m experiments.topologies --topology=seq2seq --cell=lstm --workdir=runs/topo/seq2seq_lstm
What the defaults reach here (2-core CPU shared with other jobs; seconds from the first step,
compilation and evaluations included, one seed):
  one_to_many  a number < 10^4 as one-hot digits in, its English name out (LSTM 128, 3000
               steps, ~2 min): exact match 1.0 on 1000 held-out numbers (GRU 0.997, SimpleRNN
               0.981).
  many_to_one  balanced parentheses, even lengths 2-20 (64 units, 3000 steps, < 1 min):
               accuracy 1.0 on those lengths for all cells, 0.80-0.88 on lengths 22-80.
  seq2seq      "123+45" -> "168" (128 units): held-out exact match 0.999 for LSTM and GRU
               after 8000 steps (~2 min; 0.99 first at steps 6500 and 5250), 0.993 for
               SimpleRNN after 20000 steps (~1.5 min). --stop_at=0.99 stops at the target.
  synced       truecasing Alice with a bidirectional layer (64 units each way, 3000 steps,
               ~1 min): upper-case F1 0.81-0.86 against 0 for all-lower-case, 0.58 for a rule.
Each run writes metrics.jsonl (a line per evaluation), orbax checkpoints (a rerun with the same
--workdir resumes) and learning_curve.png to --workdir. Unset flags (units, steps, eval_every,
batch_size, learning_rate, digits) take the topology's default (:data:`DEFAULTS`).
``python -m experiments.compare_topologies`` plots several runs in one figure.
"""

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import cli
from rnn_jax import synthetic
from rnn_jax.batches import with_replacement
from rnn_jax.cells import CELLS
from rnn_jax.data import (
    load_text,
    make_windows,
    read_corpus,
    rule_truecasing,
    tile_windows,
    truecasing_split,
)
from rnn_jax.loop import fit
from rnn_jax.losses import (
    accuracy,
    exact_match,
    masked_accuracy,
    masked_cross_entropy,
    sequence_mask,
    softmax_cross_entropy,
)
from rnn_jax.models import bidirectional, recurrent, sequence_classifier, sequence_tagger, stacked
from rnn_jax.optim import clipped, rmsprop
from rnn_jax.rundir import open_run
from rnn_jax.seq2seq import SequenceGenerator, encoder_decoder, one_to_many
from rnn_jax.synthetic import SequencePairs
from rnn_jax.train import create_train_state, make_trainer

TOPOLOGIES = ("one_to_many", "many_to_one", "seq2seq", "synced")


def _unit_interval(value) -> str | None:
    return None if isinstance(value, (int, float)) and 0 <= value <= 1 else "must be in [0, 1]"


def _open_unit_interval(value) -> str | None:
    return None if isinstance(value, (int, float)) and 0 < value < 1 else "must be in (0, 1)"


def _optional_target(value) -> str | None:
    if value is None or (isinstance(value, (int, float)) and 0 < value <= 1):
        return None
    return "must be in (0, 1] (unset: train every step)"


def _even_length(value) -> str | None:
    return None if value >= 2 and value % 2 == 0 else "must be even and >= 2"


@dataclasses.dataclass(frozen=True)
class Config:
    """One run. Fields left None take the topology's default (:data:`DEFAULTS`, :func:`resolve`)."""

    topology: str = cli.field("seq2seq", "Which topology's task.", choices=TOPOLOGIES)
    cell: str = cli.field("lstm", "Recurrence.", choices=tuple(sorted(CELLS)))
    units: int | None = cli.field(
        None,
        "Hidden units per layer and direction (unset: per topology).",
        check=cli.optional_positive,
    )
    layers: int = cli.field(1, "Stacked recurrent layers.", check=cli.positive)
    steps: int | None = cli.field(
        None,
        "Training steps, a multiple of eval_every (unset: per topology and cell).",
        check=cli.optional_positive,
    )
    eval_every: int | None = cli.field(
        None,
        "Steps between evaluations and checkpoints (unset: 250).",
        check=cli.optional_positive,
    )
    batch_size: int | None = cli.field(
        None, "Examples per step (unset: per topology).", check=cli.optional_positive
    )
    optimizer: str = cli.field(
        "adam", "Adam, or RMSprop with the Keras defaults.", choices=("adam", "rmsprop")
    )
    learning_rate: float | None = cli.field(
        None, "Learning rate (unset: per topology and cell).", check=cli.optional_positive
    )
    clip_norm: float | None = cli.clip_norm(1.0)
    decay_start: float = cli.field(
        0.6,
        "Fraction of the steps after which the learning rate decays (cosine) to a tenth; "
        "1: constant.",
        check=_unit_interval,
    )
    seed: int = cli.field(0, "Seed for data, init and batches.", check=cli.non_negative)
    stop_at: float | None = cli.field(
        None,
        "Stop at the first evaluation whose headline metric reaches this (unset: every step).",
        check=_optional_target,
    )
    digits: int | None = cli.field(
        None,
        "one_to_many: numbers below 10**digits (unset: 4, at most 6); seq2seq: operands of up "
        "to this many digits (unset: 3).",
        check=cli.optional_positive,
    )
    test_fraction: float = cli.field(
        0.1, "one_to_many: the fraction of the numbers held out.", check=_open_unit_interval
    )
    train_examples: int = cli.field(200_000, "seq2seq: training problems.", check=cli.positive)
    test_examples: int = cli.field(5_000, "seq2seq: held-out problems.", check=cli.positive)
    reverse_input: bool = cli.field(True, "seq2seq: the encoder reads each question backwards.")
    train_max_len: int = cli.field(
        20, "many_to_one: longest training word (even).", check=_even_length
    )
    test_max_len: int = cli.field(
        80, "many_to_one: longest test word (even, >= train_max_len).", check=_even_length
    )
    count_per_length: int = cli.field(
        1_000, "many_to_one: training words per length (even).", check=_even_length
    )
    seq_len: int = cli.field(64, "synced: characters per window.", check=cli.positive)
    window_step: int = cli.field(4, "synced: stride between training windows.", check=cli.positive)
    val_fraction: float = cli.field(
        0.1, "synced: the held-out tail of the text.", check=_open_unit_interval
    )
    text: str | None = cli.field(
        None, "synced: a cased plain text to truecase (unset: the alice corpus, read cased)."
    )

    def __post_init__(self):
        cli.validate(self)
        if self.test_max_len < self.train_max_len:
            raise ValueError(
                f"test_max_len={self.test_max_len} must be >= train_max_len={self.train_max_len}"
            )
        if self.steps is not None and self.eval_every is not None and self.steps % self.eval_every:
            raise ValueError(
                f"steps={self.steps} must be a multiple of eval_every={self.eval_every}"
            )
        if self.digits is None:
            return
        if self.topology == "one_to_many" and self.digits > 6:
            raise ValueError(f"digits={self.digits}: one_to_many names numbers below 10**6")
        space = 10 ** (2 * self.digits)
        if self.topology == "seq2seq" and self.train_examples + self.test_examples > space:
            raise ValueError(
                f"train_examples={self.train_examples} and test_examples={self.test_examples} "
                f"exceed the {space} problems of digits={self.digits}; lower them or raise digits"
            )


DEFAULTS: dict[str, dict[str, Any]] = {
    "one_to_many": dict(
        units=128, steps=3000, eval_every=250, batch_size=64, learning_rate=3e-3, digits=4
    ),
    "many_to_one": dict(units=64, steps=3000, eval_every=250, batch_size=64, learning_rate=3e-3),
    # Per cell: gated cells learn addition fastest at 1e-2; SimpleRNN needs 3e-3 and longer.
    "seq2seq": dict(
        units=128,
        eval_every=250,
        batch_size=128,
        digits=3,
        steps={"lstm": 8000, "gru": 8000, "simple_rnn": 20000},
        learning_rate={"lstm": 1e-2, "gru": 1e-2, "simple_rnn": 3e-3},
    ),
    "synced": dict(units=64, steps=3000, eval_every=250, batch_size=32, learning_rate=3e-3),
}
"""Per topology, the value of each field left None (a dict: per cell)."""


def resolve(config: Config) -> Config:
    """``config`` with every field left None set to its topology's default (validated again)."""
    filled = {}
    for name, value in DEFAULTS[config.topology].items():
        if getattr(config, name) is None:
            filled[name] = value[config.cell] if isinstance(value, dict) else value
    return dataclasses.replace(config, **filled)


# The targets each topology should reach; the run reports when each is first met.
TARGETS = {"one_to_many": 0.99, "many_to_one": 0.95, "seq2seq": 0.99, "synced": 0.8}
METRICS = {
    "one_to_many": "test_exact_match",
    "many_to_one": "seen_accuracy",
    "seq2seq": "test_exact_match",
    "synced": "val_upper_f1",
}


class TopologyTask(NamedTuple):
    """What a topology gives the shared loop: model, loss, data and evaluation."""

    init: Callable[[jax.Array], Any]
    loss_fn: Callable
    get_batch: Callable  # (data, indices) -> batch
    data: Any
    num_examples: int
    evaluate: Callable[[Any], dict]  # params -> metrics (floats, lists)
    meta: dict  # saved beside the checkpoints


def _cells(config: Config):
    return [CELLS[config.cell](config.units) for _ in range(config.layers)]


def _gather(data, indices):
    return jax.tree.map(lambda a: a[indices], data)


def _generator_loss(model: SequenceGenerator):
    def loss_fn(params, batch):
        logits = model.apply(params, batch.inputs, batch.targets, batch.lengths)
        predictions = jnp.argmax(logits, axis=-1)
        mask = batch.target_mask
        return masked_cross_entropy(logits, batch.targets, mask), {
            "token_accuracy": masked_accuracy(predictions, batch.targets, mask),
            "teacher_forced_exact": exact_match(predictions, batch.targets, mask),
        }

    return loss_fn


def _greedy_hits(model: SequenceGenerator, data: SequencePairs):
    """``evaluate(params) -> (greedy tokens, per-example exact match as floats)`` on ``data``."""
    data = jax.tree.map(jnp.asarray, data)

    def evaluate(params):
        tokens = model.generate(params, data.inputs, data.lengths)
        return tokens, np.asarray(exact_match(tokens, data.targets, data.target_mask))

    return evaluate


def one_to_many_task(config: Config) -> TopologyTask:
    """A number's one-hot digits in, its English name out, character by character."""
    train_numbers, test_numbers = synthetic.split_numbers(
        config.digits, config.test_fraction, config.seed
    )
    train_set = synthetic.number_names(train_numbers, config.digits)
    test_set = synthetic.number_names(test_numbers, config.digits)
    out_len = train_set.targets.shape[1]
    chars = synthetic.NAME_CHARS
    model = one_to_many(_cells(config), 10 * config.digits, len(chars) + 1, out_len)
    # Test and training numbers in one call: one compiled decoder for both.
    both = jax.tree.map(lambda a, b: np.concatenate([a, b]), test_set, train_set)
    greedy = _greedy_hits(model, both)

    def evaluate(params):
        tokens, hits = greedy(params)
        names = synthetic.decode_targets(tokens[:3], chars)
        return {
            "test_exact_match": float(hits[: len(test_numbers)].mean()),
            "train_exact_match": float(hits[len(test_numbers) :].mean()),
            "samples": [f"{n} -> {s}" for n, s in zip(test_numbers[:3].tolist(), names)],
        }

    meta = {"test_numbers": len(test_numbers), "train_numbers": len(train_numbers)}
    data = jax.tree.map(jnp.asarray, train_set)
    return TopologyTask(
        model.init, _generator_loss(model), _gather, data, len(train_numbers), evaluate, meta
    )


def seq2seq_task(config: Config) -> TopologyTask:
    """Addition, ``"123+45" -> "168"``, encoder–decoder with teacher forcing (Keras's example)."""
    train_set, test_set = synthetic.addition_split(
        config.train_examples, config.test_examples, config.digits, config.seed
    )
    out_len = train_set.targets.shape[1]
    model = encoder_decoder(
        _cells(config),
        _cells(config),
        len(synthetic.ADDITION_CHARS),
        len(synthetic.SUM_CHARS) + 1,
        out_len,
        reverse_input=config.reverse_input,
    )
    greedy_test = _greedy_hits(model, test_set)
    questions = synthetic.decode_questions(test_set.inputs[:3], test_set.lengths[:3])

    def evaluate(params):
        tokens, hits = greedy_test(params)
        answers = synthetic.decode_targets(tokens[:3], synthetic.SUM_CHARS)
        return {
            "test_exact_match": float(hits.mean()),
            "samples": [f"{q} = {a}" for q, a in zip(questions, answers)],
        }

    data = jax.tree.map(jnp.asarray, train_set)
    return TopologyTask(
        model.init,
        _generator_loss(model),
        _gather,
        data,
        config.train_examples,
        evaluate,
        {"test_examples": config.test_examples},
    )


def many_to_one_task(config: Config) -> TopologyTask:
    """Balanced parentheses over even lengths, with accuracy by length up to ``test_max_len``."""
    seen = range(2, config.train_max_len + 1, 2)
    every = range(2, config.test_max_len + 1, 2)
    train_set = synthetic.balanced_parentheses(seen, config.count_per_length, config.seed)
    # Another seed: fresh words (the short lengths have few words, so some repeat training's).
    test_set = synthetic.balanced_parentheses(
        every, max(config.count_per_length // 4, 2), config.seed + 1
    )
    layer = stacked([recurrent(c) for c in _cells(config)])
    model = sequence_classifier(layer, len(synthetic.PAREN_CHARS), 2)

    def loss_fn(params, batch):
        logits = model.apply(params, batch.tokens, batch.lengths)
        return softmax_cross_entropy(logits, batch.labels), {
            "accuracy": accuracy(logits, batch.labels)
        }

    @jax.jit
    def correct(params, data):
        return accuracy(model.apply(params, data.tokens, data.lengths), data.labels)

    test_device = jax.tree.map(jnp.asarray, test_set)

    def evaluate(params):
        hits = np.asarray(correct(params, test_device))
        lengths = test_set.lengths
        longer = lengths > config.train_max_len
        return {
            "seen_accuracy": float(hits[~longer].mean()),
            "longer_accuracy": float(hits[longer].mean()) if longer.any() else None,
            "accuracy_by_length": {str(n): float(hits[lengths == n].mean()) for n in every},
        }

    data = jax.tree.map(jnp.asarray, train_set)
    meta = {"test_examples": len(test_set.labels)}
    return TopologyTask(model.init, loss_fn, _gather, data, len(train_set.labels), evaluate, meta)


class _TextWindows(NamedTuple):
    tokens: jax.Array
    labels: jax.Array
    starts: jax.Array


def upper_f1(pred: np.ndarray, gold: np.ndarray) -> tuple[float, float, float]:
    """Precision, recall and F1 of the upper-case class (label 1); 0 where undefined."""
    tp = int(np.sum((pred == 1) & (gold == 1)))
    precision = tp / max(int(np.sum(pred == 1)), 1)
    recall = tp / max(int(np.sum(gold == 1)), 1)
    return precision, recall, 2 * precision * recall / max(precision + recall, 1e-12)


def _cased_text(config: Config) -> str:
    if config.text is None:
        return read_corpus("alice", "cased")
    return load_text(config.text, name="text", cleaning="cased")


def synced_task(config: Config) -> TopologyTask:
    """Truecasing: per character of the lower-cased text, was it upper-case? (bidirectional)."""
    text = _cased_text(config)
    vocab, (train_tokens, train_labels), (val_tokens, val_labels) = truecasing_split(
        text, config.val_fraction, config.seq_len
    )
    windows = make_windows(train_tokens, config.seq_len, config.window_step)
    data = _TextWindows(jnp.asarray(train_tokens), jnp.asarray(train_labels), windows.starts)
    layer = stacked([bidirectional(c, CELLS[config.cell](config.units)) for c in _cells(config)])
    model = sequence_tagger(layer, vocab.size, 2)
    offsets = jnp.arange(config.seq_len)

    def get_batch(data, indices):
        positions = data.starts[indices][:, None] + offsets[None, :]
        return data.tokens[positions], data.labels[positions]

    def loss_fn(params, batch):
        tokens, labels = batch
        logits = model.apply(params, tokens)
        mask = jnp.ones(labels.shape, bool)
        return masked_cross_entropy(logits, labels, mask), {
            "accuracy": masked_accuracy(jnp.argmax(logits, -1), labels, mask)
        }

    val = tile_windows(val_tokens, val_labels, config.seq_len)
    val_device = jax.tree.map(jnp.asarray, val)

    @jax.jit
    def predict(params, val):
        return jnp.argmax(model.apply(params, val.tokens, val.lengths), axis=-1)

    mask = np.asarray(sequence_mask(val.lengths, config.seq_len))
    gold = val.labels[mask]
    start = max(0, min(2000, len(val_tokens) - 160))  # a stretch of prose to show
    rule = rule_truecasing(vocab.decode(val_tokens))
    baselines = {
        "baseline_accuracy": float(np.mean(gold == 0)),
        "baseline_upper_f1": 0.0,
        "rule_accuracy": float(np.mean(rule == gold)),
        "rule_upper_f1": upper_f1(rule, gold)[2],
    }

    def evaluate(params):
        pred = np.asarray(predict(params, val_device))[mask]
        precision, recall, f1 = upper_f1(pred, gold)
        shown = zip(vocab.decode(val_tokens[start : start + 160]), pred[start : start + 160])
        piece = "".join(c.upper() if p else c for c, p in shown)
        return {
            "val_accuracy": float(np.mean(pred == gold)),
            "val_upper_f1": f1,
            "val_upper_precision": precision,
            "val_upper_recall": recall,
            **baselines,
            "samples": [piece],
        }

    meta = {"vocabulary": vocab.chars, "text_length": len(text)}
    num_windows = int(windows.starts.shape[0])
    return TopologyTask(model.init, loss_fn, get_batch, data, num_windows, evaluate, meta)


TASKS = {
    "one_to_many": one_to_many_task,
    "many_to_one": many_to_one_task,
    "seq2seq": seq2seq_task,
    "synced": synced_task,
}


def make_optimizer(config: Config) -> optax.GradientTransformation:
    """Adam (or Keras-default RMSprop) after global-norm clipping (none when ``clip_norm`` is
    None). The learning rate is constant for the first ``decay_start`` of the steps, then
    follows a cosine down to a tenth of it."""
    lr = config.learning_rate
    start = int(config.decay_start * config.steps)
    if start < config.steps:
        lr = optax.join_schedules(
            [
                optax.constant_schedule(lr),
                optax.cosine_decay_schedule(lr, config.steps - start, alpha=0.1),
            ],
            [start],
        )
    base = rmsprop(lr) if config.optimizer == "rmsprop" else optax.adam(lr)
    return clipped(base, config.clip_norm)


class _Clock:
    """Wall-clock seconds since a run's first step, compilation and evaluations included,
    continuing from ``offset`` (the time of the row a resumed run starts after)."""

    def __init__(self, offset: float = 0.0):
        self._offset, self._start = offset, time.perf_counter()

    def seconds(self) -> float:
        return self._offset + time.perf_counter() - self._start


def run(config: Config, workdir: str, out=print) -> list[dict]:
    """Trains ``config.topology`` with :func:`rnn_jax.fit`, evaluating every ``eval_every`` steps.

    Writes ``metrics.jsonl``, ``checkpoints/`` and ``learning_curve.png`` to ``workdir`` (a
    rerun resumes). With ``stop_at`` training ends after the first evaluation whose headline
    metric (:data:`METRICS`) reaches it.

    Returns:
      One dict per evaluation, those of a run this one resumed included.
    """
    config = resolve(config)
    task = TASKS[config.topology](config)
    metric = METRICS[config.topology]
    optimizer = make_optimizer(config)
    init_key, train_key = jax.random.split(jax.random.PRNGKey(config.seed))
    state = create_train_state(task.init(init_key), optimizer, train_key)
    batches = with_replacement(
        task.get_batch, task.num_examples, config.batch_size, config.eval_every
    )
    train_fn = make_trainer(task.loss_fn, optimizer, batches)

    def on_iteration(_iteration, state, metrics):
        report = task.evaluate(state.params)
        report.update(elapsed_seconds=clock.seconds(), topology=config.topology, cell=config.cell)
        out(
            f"step {metrics['step']:6d}  loss {metrics['loss']:.4f}  {metric} "
            f"{report[metric]:.4f}  {report['elapsed_seconds']:.1f} s  "
            f"{report.get('samples', [''])[0][:60]}"
        )
        return report

    def stop(row):
        return config.stop_at is not None and row[metric] >= config.stop_at

    parameters = sum(x.size for x in jax.tree.leaves(state.params))
    out(
        f"{config.topology} / {config.cell}: {task.num_examples} training examples, "
        f"{parameters} parameters"
    )
    iterations = config.steps // config.eval_every
    # steps and stop_at may change between a run and its resumption; nothing else may.
    meta = {
        "experiment": "topologies",
        "config": cli.resume_key(config, ("steps", "stop_at")),
        **task.meta,
    }
    with open_run(workdir, meta) as run:
        clock = _Clock(run.history[-1]["elapsed_seconds"] if run.history else 0.0)
        _, rows = fit(
            state,
            train_fn,
            task.data,
            run,
            iterations=iterations,
            on_iteration=on_iteration,
            stop=stop,
            interrupted=cli.stop_requested,
        )
    if rows and rows[-1]["iteration"] < iterations:
        out(f"{metric} reached stop_at={config.stop_at}; stopped")
    plot_runs(
        [rows],
        os.path.join(workdir, "learning_curve.png"),
        metric,
        f"{config.topology} ({config.cell})",
    )
    if rows:
        last, target = rows[-1], TARGETS[config.topology]
        out(
            f"final {metric} {last[metric]:.4f} at step {last['step']} "
            f"({last['elapsed_seconds']:.0f} s)"
        )
        hit = next((r for r in rows if r[metric] >= target), None)
        if hit is not None:
            out(f"first reached {target} at step {hit['step']} ({hit['elapsed_seconds']:.0f} s)")
    return rows


def plot_runs(runs: list[list[dict]], path: str, metric: str, title: str):
    """A small PNG: ``metric`` and the training loss against the step, one line per run
    (many_to_one: the final accuracy by length instead of the loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_m, ax_r) = plt.subplots(1, 2, figsize=(7, 2.6), dpi=90)
    by_length = all(rows and "accuracy_by_length" in rows[-1] for rows in runs)
    for rows in runs:
        if not rows:
            continue
        steps = [r["step"] for r in rows]
        label = rows[-1].get("cell", "")
        ax_m.plot(steps, [r[metric] for r in rows], label=label)
        if by_length:
            final = rows[-1]["accuracy_by_length"]
            ax_r.plot([int(n) for n in final], list(final.values()), ".-", label=label)
        else:
            ax_r.plot(steps, [r["loss"] for r in rows], label=label)
    ax_m.set(xlabel="step", ylabel=metric, title=title)
    if by_length:
        ax_r.set(xlabel="length (final model)", ylabel="test accuracy")
    else:
        ax_r.set(xlabel="step", ylabel="training loss", yscale="log")
    ax_m.grid(alpha=0.3)
    ax_r.grid(alpha=0.3)
    ax_m.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    cli.main(Config, run, workdir=None, interruptible=True)
