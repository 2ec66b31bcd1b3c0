"""Per-example losses and metrics (means and masks are applied by the training loop)."""

import jax
import jax.numpy as jnp
import optax


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Categorical cross-entropy in nats, per example: ``logits (..., V)``, int ``labels (...)``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """1.0 where the argmax of ``logits`` is the label, per example."""
    return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


def masked_mean(values: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Mean of ``values`` over the entries where ``mask`` is true (0 when there are none)."""
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)
