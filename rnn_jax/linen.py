"""Flax linen layers over the same pure cells and scan, for models built with Flax."""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from rnn_jax.cells import CELLS, Cell
from rnn_jax.scan import unroll


class RNN(nn.Module):
    """A recurrent layer (Keras ``SimpleRNN``/``LSTM``/``GRU``) as a linen module.

    The parameters are the cell's own, under its Keras names: ``kernel``, ``recurrent_kernel``,
    ``bias``, in the layout of :mod:`rnn_jax.cells`, so they can be moved between this module,
    the pure functions, Keras and (through :mod:`rnn_jax.convert`) PyTorch. They are drawn by
    the cell's own ``init`` (Keras initialisers, unit forget bias) from the layer's 'params'
    key. The forward pass is :func:`rnn_jax.unroll`.

    Attributes:
      cell: ``"simple_rnn"``, ``"lstm"``, ``"gru"``, or a :class:`rnn_jax.Cell`.
      units: hidden units (needed when ``cell`` is a name).
      options: keyword arguments of the cell factory, e.g. ``{"reset_after": False}``,
        ``{"activation": "relu", "recurrent_init": "identity"}``, ``{"forget_bias": 2.0}``.
      return_sequences: output every step ``(batch, time, units)``, else the last step's
        ``(batch, units)``.
      return_state: also return the final carry, as ``(carry, outputs)``.
      reverse: run from the last step to the first (Keras ``go_backwards``, outputs in order).
      unroll: ``lax.scan``'s unroll factor.
      input_dim: the vocabulary size, needed only when the inputs are integer tokens.

    Call: ``layer(xs, carry=None, lengths=None)`` with ``xs`` ``(batch, time, input_dim)`` float
    or ``(batch, time)`` int; ``lengths (batch,)`` freezes the carry past each sequence's end.
    """

    cell: str | Cell = "lstm"
    units: int | None = None
    options: Mapping[str, Any] | None = None
    return_sequences: bool = False
    return_state: bool = False
    reverse: bool = False
    unroll: int | bool = 1
    input_dim: int | None = None

    def make_cell(self) -> Cell:
        """The pure :class:`rnn_jax.Cell` this layer runs."""
        if isinstance(self.cell, Cell):
            if self.options:
                raise ValueError("options apply to a cell given by name, not to a Cell")
            return self.cell
        if self.cell not in CELLS:
            raise ValueError(f"cell={self.cell!r} must be one of {sorted(CELLS)} or a Cell")
        if self.units is None:
            raise ValueError(f"RNN(cell={self.cell!r}) needs units")
        return CELLS[self.cell](self.units, **dict(self.options or {}))

    @nn.compact
    def __call__(self, xs: jax.Array, carry=None, lengths: jax.Array | None = None):
        cell = self.make_cell()
        if jnp.issubdtype(xs.dtype, jnp.integer):
            if self.input_dim is None:
                raise ValueError("integer token inputs need RNN(..., input_dim=vocabulary size)")
            input_dim = self.input_dim
        else:
            input_dim = xs.shape[-1]

        # The cell draws all its params from one key (one QR for the orthogonal kernel, not one
        # per param); on apply linen only reads the shapes of what init_one returns.
        drawn = cell.init(self.make_rng("params"), input_dim) if self.is_initializing() else None

        def init_one(name):
            if drawn is not None:
                return lambda key: drawn[name]
            return lambda key: cell.init(key, input_dim)[name]

        names = jax.eval_shape(lambda key: cell.init(key, input_dim), jax.random.PRNGKey(0))
        params = {name: self.param(name, init_one(name)) for name in names}
        carry, ys = unroll(
            cell,
            params,
            xs,
            carry,
            lengths=lengths,
            reverse=self.reverse,
            return_sequences=self.return_sequences,
            unroll=self.unroll,
        )
        return (carry, ys) if self.return_state else ys
