"""The sweep trainer of synthetic tasks: a pure ``train``, vmappable over seeds and clipping."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from rnn_jax.batches import generated
from rnn_jax.models import sequence_classifier, sequence_tagger
from rnn_jax.optim import clipped
from rnn_jax.train import create_train_state, scan_updates


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
    cell,
    task,
    *,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    eval_every: int,
    batch_size: int,
):
    """A model for a synthetic ``task`` and a pure, vmappable ``train`` on generated batches.

    The model is ``cell`` with a ``Dense(task.output_dim)`` head on its last output
    (:func:`rnn_jax.sequence_classifier`) or, for sequence tasks, on every output
    (:func:`rnn_jax.sequence_tagger`). The whole run is one ``lax.scan`` of
    :func:`rnn_jax.train.scan_updates` calls (``eval_every`` steps of fresh ``task.sample``
    batches, then a test evaluation), so ``jax.vmap`` over ``params`` and ``key`` trains many
    seeds in one compiled program, and over ``clip_norm`` several clipping settings at once.

    Args:
      cell: the recurrence.
      task: a :class:`rnn_jax.synthetic.Task`.
      optimizer: the optimiser, applied after the clipping, e.g. ``optax.adam(1e-2)`` or
        :func:`rnn_jax.optim.rmsprop`. Per-parameter learning rates are an
        ``optax.multi_transform`` over the parameters' names (:func:`rnn_jax.trees.leaf_name`;
        experiments/long_range.py's ``make_optimizer``); the clip sees the whole gradient.
      num_steps: updates; a multiple of ``eval_every``.
      eval_every: steps between test evaluations.
      batch_size: examples per update.

    Returns:
      ``(model, train)``. ``train(params, key, clip_norm, test_xs, test_targets)`` starts from
      ``params = model.init(...)``, draws the batches from ``key``, clips the global gradient
      norm to ``clip_norm`` (a float scalar, may be traced; ``jnp.inf`` for no clipping) and
      returns the final params and :class:`TrainCurves`.
    """
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"optimizer={optimizer!r} must be an optax.GradientTransformation, e.g. "
            "optax.adam(1e-3)"
        )
    if num_steps < 1 or eval_every < 1 or num_steps % eval_every:
        raise ValueError(
            f"num_steps={num_steps} must be a positive multiple of eval_every={eval_every}"
        )
    head = sequence_tagger if task.return_sequences else sequence_classifier
    model = head(cell, task.input_dim, task.output_dim)
    batches = generated(task.sample, batch_size, eval_every)

    def loss_fn(params, batch):
        xs, targets = batch
        return task.loss(model.apply(params, xs), targets), {}

    def test_loss(params, test_xs, test_targets):
        return jnp.mean(task.loss(model.apply(params, test_xs), test_targets))

    def train(params, key, clip_norm, test_xs, test_targets):
        # An array: clipped() takes it as is, inf included (no clipping).
        opt = clipped(optimizer, jnp.asarray(clip_norm))
        state = create_train_state(params, opt, key)

        def chunk(state, _):
            state, m = scan_updates(loss_fn, opt, batches, state, None, trace=True)
            test = test_loss(state.params, test_xs, test_targets)
            return state, (m["step_loss"], m["step_grad_norm"], test)

        first = test_loss(params, test_xs, test_targets)
        state, (losses, norms, tests) = jax.lax.scan(
            chunk, state, None, length=num_steps // eval_every
        )
        curves = TrainCurves(
            losses.reshape(-1), norms.reshape(-1), jnp.concatenate([first[None], tests])
        )
        return state.params, curves

    return model, train
