"""Every loss and metric, per example (means and masks over the batch belong to the caller)."""

import math

import jax
import jax.numpy as jnp
import optax


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Categorical cross-entropy in nats, per example: ``logits (..., V)``, int ``labels (...)``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def sequence_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy over the steps: ``logits (batch, time, V)``, ``labels (batch, time)``
    -> ``(batch,)``."""
    return jnp.mean(softmax_cross_entropy(logits, labels), axis=-1)


def squared_error(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """``(outputs[:, 0] - targets)²`` per example: a one-output regression head."""
    return (outputs[:, 0] - targets) ** 2


def bits(nats: float) -> float:
    """A cross-entropy in nats as bits (per character, for a character model)."""
    return nats / math.log(2.0)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """1.0 where the argmax of ``logits`` is the label, per example."""
    return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


def masked_mean(values: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Mean of ``values`` over the entries where ``mask`` is true (0 when there are none)."""
    mask = mask.astype(bool)
    total = jnp.sum(jnp.where(mask, values, 0.0), axis=axis)
    return total / jnp.maximum(jnp.sum(mask, axis=axis).astype(values.dtype), 1.0)


def sequence_mask(lengths: jax.Array, time: int) -> jax.Array:
    """``(batch, time)`` bool: true at the steps before each sequence's length."""
    return jnp.arange(time)[None, :] < jnp.asarray(lengths)[:, None]


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-example mean cross-entropy over the real steps: ``(batch,)``.

    Args:
      logits: ``(batch, time, classes)``.
      labels: ``(batch, time)`` int; any value at masked steps.
      mask: ``(batch, time)``; false marks padding, which contributes nothing (value or
        gradient), whatever its logits and labels.
    """
    mask = mask.astype(bool)
    safe_labels = jnp.where(mask, labels, 0)
    safe_logits = jnp.where(mask[..., None], logits, 0.0)
    losses = jnp.where(mask, softmax_cross_entropy(safe_logits, safe_labels), 0.0)
    return jnp.sum(losses, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1)


def masked_accuracy(predictions: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-example fraction of real steps where the int ``predictions`` equal ``labels``."""
    mask = mask.astype(bool)
    hits = jnp.sum(jnp.where(mask, predictions == labels, False), axis=1)
    return hits / jnp.maximum(jnp.sum(mask, axis=1), 1)


def exact_match(predictions: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-example 1.0 where every real step is right (padding ignored), else 0.0."""
    ok = jnp.where(mask.astype(bool), predictions == labels, True)
    return jnp.all(ok, axis=1).astype(jnp.float32)
