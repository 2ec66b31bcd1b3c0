"""Dense heads and sequence models built from a cell and :func:`rnn_jax.unroll`."""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from rnn_jax.cells import Cell, add_bias, glorot_uniform, matmul
from rnn_jax.scan import unroll

Params = Any


class Model(NamedTuple):
    """A model as two pure functions: ``init(key) -> params``, ``apply(params, xs, ...) -> ys``."""

    init: Callable[[jax.Array], Params]
    apply: Callable[..., jax.Array]


def dense_init(key: jax.Array, input_dim: int, output_dim: int) -> Params:
    """Keras ``Dense`` parameters: ``kernel (input_dim, output_dim)`` glorot-uniform, zero bias."""
    return {"kernel": glorot_uniform(key, (input_dim, output_dim)), "bias": jnp.zeros((output_dim,))}


def dense(params: Params, x: jax.Array) -> jax.Array:
    """``x @ kernel + bias`` (logits; the softmax lives in the loss)."""
    return add_bias(matmul(x, params["kernel"]), params["bias"])


def rnn_classifier(cell: Cell, input_dim: int, num_classes: int, unroll_steps: int | bool = 1):
    """Many-to-one: a recurrent layer's last output, then ``Dense(num_classes)`` logits.

    With ``input_dim`` the vocabulary size and integer tokens as input this is the tutorial's
    char-RNN (``SimpleRNN(128)`` + ``Dense(V)`` + softmax) without the one-hot arrays.

    Params: ``{"rnn": cell params, "dense": dense params}``.
    ``apply(params, xs, lengths=None) -> logits (batch, num_classes)`` with ``xs``
    ``(batch, time, input_dim)`` float or ``(batch, time)`` int.
    """

    def init(key):
        k_rnn, k_dense = jax.random.split(key)
        return {
            "rnn": cell.init(k_rnn, input_dim),
            "dense": dense_init(k_dense, cell.units, num_classes),
        }

    def apply(params, xs, lengths=None):
        _, h = unroll(cell, params["rnn"], xs, lengths=lengths, unroll=unroll_steps)
        return dense(params["dense"], h)

    return Model(init, apply)
