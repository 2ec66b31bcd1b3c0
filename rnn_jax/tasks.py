"""Long-range synthetic tasks (adding, copy) generated from a key, and a vmappable trainer."""

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rnn_jax.cells import Cell
from rnn_jax.losses import softmax_cross_entropy
from rnn_jax.models import Model, dense, dense_init
from rnn_jax.scan import unroll
from rnn_jax.train import _apply_update, create_train_state, rmsprop

COPY_BLANK = 0
"""Copy-task token 0: the blank, input and target."""


class Task(NamedTuple):
    """A synthetic sequence task with its analytic baseline.

    Attributes:
      name: ``"adding"`` or ``"copy"``.
      length: time steps per sequence.
      input_dim: features per step (float inputs) or the input vocabulary (integer tokens).
      output_dim: outputs per prediction (1 for a regression, classes for a classification).
      return_sequences: the loss reads every step's output, not only the last one.
      sample: ``(key, batch) -> (xs, targets)``, fresh examples on device.
      loss: ``(outputs, targets) -> (batch,)`` per-example loss; outputs are ``(batch,
        output_dim)`` or ``(batch, time, output_dim)``.
      baseline: the loss of the best predictor that ignores the inputs (a memoryless one for
        copy): a model has learned something only well below it.
      solved_below: the test loss under which the task counts as solved.
    """

    name: str
    length: int
    input_dim: int
    output_dim: int
    return_sequences: bool
    sample: Callable[[jax.Array, int], tuple[jax.Array, jax.Array]]
    loss: Callable[[jax.Array, jax.Array], jax.Array]
    baseline: float
    solved_below: float


@functools.partial(jax.jit, static_argnums=(1, 2))
def adding_batch(key: jax.Array, batch: int, length: int) -> tuple[jax.Array, jax.Array]:
    """The adding problem (Hochreiter & Schmidhuber 1997; Le, Jaitly & Hinton 2015).

    Each step carries a value uniform in [0, 1] and a marker; exactly two steps are marked, one
    uniformly in the first half ``[0, length // 2)`` and one in the second half; the target is
    the sum of the two marked values.

    Returns:
      ``xs (batch, length, 2)`` float32 ``[value, marker]`` and ``targets (batch,)`` float32.
    """
    if length < 2:
        raise ValueError(f"the adding problem needs length >= 2, got {length}")
    k_v, k_a, k_b = jax.random.split(key, 3)
    values = jax.random.uniform(k_v, (batch, length))
    half = length // 2
    first = jax.random.randint(k_a, (batch,), 0, half)
    second = jax.random.randint(k_b, (batch,), half, length)
    steps = jnp.arange(length)[None, :]
    markers = ((steps == first[:, None]) | (steps == second[:, None])).astype(jnp.float32)
    targets = jnp.sum(values * markers, axis=1)
    return jnp.stack([values, markers], axis=-1), targets


def adding_baseline() -> float:
    """MSE of always predicting 1.0, the mean target: ``Var(u₁ + u₂) = 2 · 1/12 = 1/6``."""
    return 1.0 / 6.0


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def copy_batch(
    key: jax.Array, batch: int, delay: int, num_symbols: int = 8, copy_length: int = 10
) -> tuple[jax.Array, jax.Array]:
    """The copy (memory) task of Arjovsky, Shah & Bengio (2016).

    Tokens: 0 blank, ``1 .. num_symbols`` the symbols, ``num_symbols + 1`` the cue. Input:
    ``copy_length`` random symbols, ``delay - 1`` blanks, the cue, ``copy_length`` blanks
    (``delay + 2·copy_length`` steps). Target: blanks for ``delay + copy_length`` steps, then
    the symbols in order.

    Returns:
      ``xs (batch, delay + 2·copy_length)`` int32 tokens and ``targets`` int32 of the same
      shape, in ``0 .. num_symbols``.
    """
    if delay < 1:
        raise ValueError(f"the copy task needs delay >= 1, got {delay}")
    symbols = jax.random.randint(key, (batch, copy_length), 1, num_symbols + 1)
    blank = jnp.full((batch, delay - 1), COPY_BLANK, jnp.int32)
    cue = jnp.full((batch, 1), num_symbols + 1, jnp.int32)
    tail = jnp.full((batch, copy_length), COPY_BLANK, jnp.int32)
    xs = jnp.concatenate([symbols, blank, cue, tail], axis=1)
    wait = jnp.full((batch, delay + copy_length), COPY_BLANK, jnp.int32)
    return xs, jnp.concatenate([wait, symbols], axis=1)


def copy_baseline(delay: int, num_symbols: int = 8, copy_length: int = 10) -> float:
    """Cross-entropy per step of the memoryless predictor: blanks, then uniform symbols.

    ``copy_length · ln(num_symbols) / (delay + 2·copy_length)``, i.e. ``10 ln 8 / (T + 20)``.
    """
    return copy_length * math.log(num_symbols) / (delay + 2 * copy_length)


def _squared_error(outputs, targets):
    return (outputs[:, 0] - targets) ** 2


def _sequence_cross_entropy(logits, targets):
    return jnp.mean(softmax_cross_entropy(logits, targets), axis=-1)


def adding_problem(length: int, solved_below: float = 0.05) -> Task:
    """The adding problem as a :class:`Task`: MSE on the last output, baseline 1/6."""
    return Task(
        name="adding",
        length=length,
        input_dim=2,
        output_dim=1,
        return_sequences=False,
        sample=lambda key, batch: adding_batch(key, batch, length),
        loss=_squared_error,
        baseline=adding_baseline(),
        solved_below=solved_below,
    )


def copy_task(
    delay: int, num_symbols: int = 8, copy_length: int = 10, solved_fraction: float = 0.1
) -> Task:
    """The copy task as a :class:`Task`: mean cross-entropy over every step.

    Counted solved below ``solved_fraction`` of the memoryless baseline.
    """
    baseline = copy_baseline(delay, num_symbols, copy_length)
    return Task(
        name="copy",
        length=delay + 2 * copy_length,
        input_dim=num_symbols + 2,
        output_dim=num_symbols + 1,
        return_sequences=True,
        sample=lambda key, batch: copy_batch(key, batch, delay, num_symbols, copy_length),
        loss=_sequence_cross_entropy,
        baseline=baseline,
        solved_below=solved_fraction * baseline,
    )


TASKS: dict[str, Callable[..., Task]] = {"adding": adding_problem, "copy": copy_task}


def task_model(cell: Cell, task: Task) -> Model:
    """A recurrent layer and a ``Dense(task.output_dim)`` head on its last or every output.

    Params ``{"rnn", "dense"}``; ``apply(params, xs)`` gives ``(batch, output_dim)`` or, for
    sequence tasks, ``(batch, time, output_dim)``.
    """

    def init(key):
        k_rnn, k_dense = jax.random.split(key)
        return {
            "rnn": cell.init(k_rnn, task.input_dim),
            "dense": dense_init(k_dense, cell.units, task.output_dim),
        }

    def apply(params, xs):
        _, ys = unroll(cell, params["rnn"], xs, return_sequences=task.return_sequences)
        return dense(params["dense"], ys)

    return Model(init, apply)


class TrainCurves(NamedTuple):
    """What :func:`make_task_trainer`'s ``train`` records.

    Attributes:
      train_loss: ``(num_steps,)`` mean loss of each step's batch (before its update).
      grad_norm: ``(num_steps,)`` global gradient norm before clipping.
      test_loss: ``(num_evals + 1,)`` mean test loss at steps ``0, eval_every, 2·eval_every, …``.
    """

    train_loss: jax.Array
    grad_norm: jax.Array
    test_loss: jax.Array


def make_task_trainer(
    cell: Cell,
    task: Task,
    *,
    num_steps: int,
    eval_every: int,
    batch_size: int,
    learning_rate: float = 1e-3,
    optimizer: str = "adam",
) -> tuple[Model, Callable[..., tuple[Any, TrainCurves]]]:
    """A model for ``task`` and a pure ``train(params, key, clip_norm, test_xs, test_targets)``.

    The whole run is one ``lax.scan`` (of ``eval_every`` steps, then a test evaluation), so
    ``jax.vmap`` over ``params`` and ``key`` trains many seeds in one compiled program, and over
    ``clip_norm`` several clipping settings (``inf`` for none) at once. Each step draws a fresh
    batch of ``task.sample``; the update is :mod:`rnn_jax.train`'s, after
    ``optax.clip_by_global_norm``.

    Args:
      cell: the recurrence; the model is :func:`task_model`.
      task: a :class:`Task`.
      num_steps: updates; a multiple of ``eval_every``.
      eval_every: steps between test evaluations.
      batch_size: examples per update.
      learning_rate: of the optimiser.
      optimizer: ``"adam"`` (``optax.adam``, default betas) or ``"rmsprop"`` (the Keras 3
        defaults of :func:`rnn_jax.rmsprop`).

    Returns:
      ``(model, train)``. ``train(params, key, clip_norm, test_xs, test_targets)`` starts from
      ``params = model.init(...)``, draws the batches from ``key``, clips to ``clip_norm`` (a
      float scalar, may be traced; ``jnp.inf`` disables clipping), and returns the final params
      and :class:`TrainCurves`.
    """
    if num_steps < 1 or eval_every < 1 or num_steps % eval_every:
        raise ValueError(
            f"num_steps ({num_steps}) must be a positive multiple of eval_every ({eval_every})"
        )
    if optimizer not in ("adam", "rmsprop"):
        raise ValueError(f"optimizer must be 'adam' or 'rmsprop', got {optimizer!r}")
    model = task_model(cell, task)

    def loss_fn(params, batch):
        xs, targets = batch
        return task.loss(model.apply(params, xs), targets), {}

    def test_loss(params, test_xs, test_targets):
        return jnp.mean(task.loss(model.apply(params, test_xs), test_targets))

    def train(params, key, clip_norm, test_xs, test_targets):
        base = optax.adam(learning_rate) if optimizer == "adam" else rmsprop(learning_rate)
        opt = optax.chain(optax.clip_by_global_norm(clip_norm), base)
        k_data, k_state = jax.random.split(key)
        state = create_train_state(params, opt, k_state)
        weights = jnp.ones((batch_size,))

        def step(state, batch_key):
            batch = task.sample(batch_key, batch_size)
            state, sums = _apply_update(loss_fn, opt, state, batch, weights)
            return state, (sums["loss"] / batch_size, sums["grad_norm"])

        def chunk(state, keys):
            state, (losses, norms) = jax.lax.scan(step, state, keys)
            return state, (losses, norms, test_loss(state.params, test_xs, test_targets))

        keys = jax.random.split(k_data, num_steps)
        keys = keys.reshape((num_steps // eval_every, eval_every) + keys.shape[1:])
        first = test_loss(params, test_xs, test_targets)
        state, (losses, norms, tests) = jax.lax.scan(chunk, state, keys)
        curves = TrainCurves(
            losses.reshape(-1), norms.reshape(-1), jnp.concatenate([first[None], tests])
        )
        return state.params, curves

    return model, train
