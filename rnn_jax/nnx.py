"""Flax NNX modules over the same pure cells and scan: a cell for ``nnx.RNN``, a layer, probes."""

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rnn_jax import checkpoint, gradients
from rnn_jax.cells import Carry, Cell, Params
from rnn_jax.registry import NAMES, named_cell
from rnn_jax.scan import ScanType, unroll
from rnn_jax.trees import named_leaves

# Attribute names a module of this file uses itself, never a parameter's.
_RESERVED = frozenset(("pure", "params", "param_names", "units"))


def _as_variables(name: str, value):
    """A pure parameter as NNX variables: an array as an ``nnx.Param``, a dict as an
    ``nnx.Dict`` of them (custom cells may nest their params)."""
    if isinstance(value, Mapping):
        return nnx.Dict({key: _as_variables(f"{name}/{key}", v) for key, v in value.items()})
    if not hasattr(value, "shape"):
        raise ValueError(
            f"parameter {name!r} is a {type(value).__name__}: a cell's params must be a dict "
            "of arrays (or of such dicts) to become nnx.Params"
        )
    return nnx.Param(value)


def _as_arrays(node):
    """The inverse of :func:`_as_variables`: the pure values (tracers under a transform)."""
    if isinstance(node, nnx.Variable):
        return node[...]
    return {key: _as_arrays(v) for key, v in node.items()}


class RNNCell(nnx.RNNCellBase):
    """A cell of :mod:`rnn_jax` (any of :data:`rnn_jax.registry.NAMES`, or any
    :class:`rnn_jax.Cell`, :func:`rnn_jax.custom_cell` included) as an NNX cell.

    It subclasses ``nnx.RNNCellBase``, so ``nnx.RNN(cell)`` and ``nnx.Bidirectional`` run it
    unchanged. Its parameters are ``nnx.Param`` attributes under the pure cell's own names
    (Keras's for the Keras cells: ``kernel``, ``recurrent_kernel``, ``bias``), in the same
    layout, drawn by the pure cell's ``init`` from the key ``rngs.params()`` gives: with the
    same key the module's and the pure function's params are the same arrays, and
    ``nnx.state(module, nnx.Param)`` is the pure params tree (:attr:`params`, :func:`set_params`).

    A step is the pure ``cell.step``, which derives the per-sequence part of the params
    (:attr:`rnn_jax.Cell.prepare`: expRNN's matrix exponential, IndRNN's clipped weights) at
    every call; :class:`Recurrent` runs :func:`rnn_jax.unroll` instead, which derives it once
    per sequence and takes the cell's fast path.

    Args:
      cell: a name of :data:`rnn_jax.registry.NAMES` or a :class:`rnn_jax.Cell`.
      in_features: features per step (the vocabulary size for integer tokens).
      units: hidden units, needed when ``cell`` is a name.
      length: the longest sequence trained on, for the cells whose initialisation depends on
        it (:func:`rnn_jax.registry.named_cell`: ``*_chrono``, ``indrnn``).
      rngs: ``nnx.Rngs`` with a ``params`` stream (or a default one).

    Attributes:
      pure: the :class:`rnn_jax.Cell`.
      param_names: the names of its params (the module's ``nnx.Param`` attributes).
      units: the width of each step's output.
    """

    def __init__(
        self,
        cell: str | Cell,
        in_features: int,
        *,
        units: int | None = None,
        length: int | None = None,
        rngs: nnx.Rngs,
    ):
        if isinstance(cell, Cell):
            if units is not None or length is not None:
                raise ValueError("units and length apply to a cell given by name, not to a Cell")
        elif cell in NAMES:
            if units is None:
                raise ValueError(f"RNNCell(cell={cell!r}) needs units")
            cell = named_cell(cell, units, length)
        else:
            raise ValueError(f"cell={cell!r} must be one of {', '.join(NAMES)} or a Cell")
        params = cell.init(rngs.params(), in_features)
        for name in params:
            if not str(name).isidentifier() or name in _RESERVED or hasattr(self, name):
                raise ValueError(
                    f"parameter name {name!r} cannot be an attribute of an NNX module: rename "
                    "it in the cell's init"
                )
        self.pure = cell
        self.units = cell.units
        self.param_names = tuple(params)
        for name, value in params.items():
            setattr(self, name, _as_variables(name, value))

    @property
    def params(self) -> Params:
        """The params as the pure cell takes them: ``{name: array}`` (nested for a custom
        cell that nests them)."""
        return {name: _as_arrays(getattr(self, name)) for name in self.param_names}

    def __call__(self, carry: Carry, inputs: jax.Array) -> tuple[Carry, jax.Array]:
        """One step, ``cell.step(params, carry, inputs)``: ``inputs (batch, in_features)``
        float or ``(batch,)`` int tokens; returns ``(carry, y (batch, units))``."""
        return self.pure.step(self.params, carry, inputs)

    def initialize_carry(
        self,
        input_shape: tuple[int, ...],
        rngs: nnx.Rngs | nnx.RngStream | None = None,
        carry_init=None,
    ) -> Carry:
        """The cell's initial carry (zeros) for inputs of shape ``(*batch, in_features)``.

        With ``carry_init`` (a ``(key, shape, dtype) -> array`` initialiser) every part of
        the carry is drawn from it instead, each from its own key of ``rngs`` (its ``carry``
        stream for an ``nnx.Rngs``).
        """
        batch = tuple(input_shape[:-1])
        zeros = self.pure.initial_carry(math.prod(batch))
        carry = jax.tree.map(lambda c: c.reshape(batch + c.shape[1:]), zeros)
        if carry_init is None:
            return carry
        if isinstance(rngs, nnx.Rngs):
            rngs = rngs.carry
        if rngs is None:
            raise ValueError("initialize_carry with carry_init needs rngs")
        return jax.tree.map(lambda c: carry_init(rngs(), c.shape, c.dtype), carry)

    @property
    def num_feature_axes(self) -> int:
        return 1


def _flip_within(ys: jax.Array, lengths: jax.Array | None) -> jax.Array:
    """``ys (batch, time, ·)`` with each sequence's first ``lengths[b]`` steps in reverse
    order (all of them without lengths); the steps past a length stay where they are."""
    if lengths is None:
        return jnp.flip(ys, axis=1)
    t = jnp.arange(ys.shape[1])[None, :]
    index = jnp.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)
    return jnp.take_along_axis(ys, index[..., None], axis=1)


class Recurrent(nnx.Module):
    """An :class:`RNNCell` over the sequence by :func:`rnn_jax.unroll`: a layer shaped like
    ``nnx.RNN`` (the same call; the cell's params under ``cell``), run by the library's scan.

    What it does that ``nnx.RNN`` does not: :func:`rnn_jax.unroll` derives the cell's
    per-sequence params once (:attr:`rnn_jax.Cell.prepare`), computes the input half of every
    step as one product before the scan, takes the fused fast path of the built-in cells or the
    associative scan of a linear recurrence (``scan``, a :class:`rnn_jax.ScanType`), reads
    integer tokens as one-hot rows without building them, and masks by lengths as Keras does:
    past ``seq_lengths[b]`` the carry stays frozen and the output is zero (``nnx.RNN`` runs on
    over the padding and only selects the final carry).

    Args:
      cell: the :class:`RNNCell`.
      return_sequences: every step's output ``(batch, time, units)`` (as ``nnx.RNN``), else
        the last step's ``(batch, units)`` (each sequence's own last real step).
      return_carry: also return the final carry, as ``(carry, outputs)``.
      reverse: read from the last step to the first (from each sequence's own last real step).
      keep_order: with ``reverse``, outputs in input order; else in the order read (as
        ``nnx.RNN``'s flag).
      time_major: inputs and outputs ``(time, batch, ·)``.
      unroll: ``lax.scan``'s unroll factor.
      scan: how to run the cell, a :class:`rnn_jax.ScanType`.

    Call: ``layer(xs, *, initial_carry=None, seq_lengths=None, ...)`` with ``xs (batch, time,
    in_features)`` float or ``(batch, time)`` int tokens; the keywords of ``nnx.RNN``'s call
    override the attributes of the same name (``rngs`` is accepted and unused: the initial
    carry is zeros), so ``nnx.Bidirectional`` runs two of these.
    """

    def __init__(
        self,
        cell: RNNCell,
        *,
        return_sequences: bool = True,
        return_carry: bool = False,
        reverse: bool = False,
        keep_order: bool = True,
        time_major: bool = False,
        unroll: int | bool = 1,
        scan: ScanType = ScanType.AUTO,
    ):
        if not isinstance(cell, RNNCell):
            raise ValueError(f"cell must be an rnn_jax.nnx.RNNCell, got {type(cell).__name__}")
        self.cell = cell
        self.return_sequences = return_sequences
        self.return_carry = return_carry
        self.reverse = reverse
        self.keep_order = keep_order
        self.time_major = time_major
        self.unroll = unroll
        self.scan = scan

    def __call__(
        self,
        xs: jax.Array,
        *,
        initial_carry: Carry | None = None,
        seq_lengths: jax.Array | None = None,
        return_carry: bool | None = None,
        time_major: bool | None = None,
        reverse: bool | None = None,
        keep_order: bool | None = None,
        rngs: Any = None,
    ):
        del rngs
        pick = lambda given, default: default if given is None else given
        return_carry = pick(return_carry, self.return_carry)
        time_major = pick(time_major, self.time_major)
        reverse = pick(reverse, self.reverse)
        keep_order = pick(keep_order, self.keep_order)
        if time_major:
            xs = jnp.swapaxes(xs, 0, 1)
        carry, ys = unroll(
            self.cell.pure,
            self.cell.params,
            xs,
            initial_carry,
            lengths=seq_lengths,
            reverse=reverse,
            return_sequences=self.return_sequences,
            unroll=self.unroll,
            scan=self.scan,
        )
        if self.return_sequences:
            if reverse and not keep_order:
                ys = _flip_within(ys, seq_lengths)
            if time_major:
                ys = jnp.swapaxes(ys, 0, 1)
        return (carry, ys) if return_carry else ys


# --- parameters in and out ---------------------------------------------------------------------


def pure(module: nnx.Module) -> tuple[Cell, Params]:
    """``(cell, params)``: the pure :class:`rnn_jax.Cell` of ``module`` and its params, for
    any function of the library (:func:`rnn_jax.unroll`, :mod:`rnn_jax.gradients`, the
    sampler). ``module``: an :class:`RNNCell`, or a layer holding one as ``.cell``
    (:class:`Recurrent`, ``nnx.RNN``)."""
    cell = module if isinstance(module, RNNCell) else getattr(module, "cell", None)
    if not isinstance(cell, RNNCell):
        raise ValueError(
            f"{type(module).__name__} is not an rnn_jax.nnx.RNNCell nor a layer holding one as "
            ".cell (rnn_jax.nnx.Recurrent, nnx.RNN)"
        )
    return cell.pure, cell.params


def set_params(module: nnx.Module, params: Params) -> None:
    """Writes pure ``params`` (the pytree :func:`rnn_jax.unroll` takes, from the pure
    functions, the linen module, Keras or :func:`rnn_jax.from_torch`) into ``module``'s
    ``nnx.Param`` attributes (``nnx.update``).

    ``module`` is an :class:`RNNCell`, a layer holding one, or any module whose
    ``nnx.state(module, nnx.Param)`` has the structure of ``params`` (a whole model, e.g.).

    Raises:
      ValueError: the names or shapes differ from the module's (naming the first that does).
    """
    cell = getattr(module, "cell", None)
    if not isinstance(module, RNNCell) and isinstance(cell, RNNCell):
        module = cell
    have = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    have_flat, given_flat = dict(named_leaves(have)), dict(named_leaves(params))
    shape = lambda x: tuple(jnp.shape(x))
    for path in sorted(have_flat.keys() | given_flat.keys(), key=str):
        name = "/".join(map(str, path))
        if path not in given_flat or path not in have_flat:
            lacking, holding = ("params", "module") if path in have_flat else ("module", "params")
            raise ValueError(
                f"parameter {name!r} of the {holding} is missing from the {lacking}: the "
                f"module has {sorted(have)}, the params {sorted(params)}"
            )
        if shape(have_flat[path]) != shape(given_flat[path]):
            raise ValueError(
                f"parameter {name!r} has shape {shape(given_flat[path])}; the module's is "
                f"{shape(have_flat[path])}"
            )
    nnx.update(module, jax.tree.map(jnp.asarray, params))


# --- the gradient probes -----------------------------------------------------------------------


def carry_gradients(module: nnx.Module, xs, loss_fn, carry=None, *, return_sequences=False):
    """:func:`rnn_jax.gradients.carry_gradients` of the cell of ``module`` (see :func:`pure`)
    with its current params: ``(loss, ∂L/∂h_t for every step)``."""
    cell, params = pure(module)
    return gradients.carry_gradients(
        cell, params, xs, loss_fn, carry, return_sequences=return_sequences
    )


def carry_gradient_norms(module: nnx.Module, xs, loss_fn, carry=None, *, return_sequences=False):
    """:func:`rnn_jax.gradients.carry_gradient_norms` of the cell of ``module``:
    ``(loss, ‖∂L/∂h_t‖ (batch, time) per carry part)``."""
    cell, params = pure(module)
    return gradients.carry_gradient_norms(
        cell, params, xs, loss_fn, carry, return_sequences=return_sequences
    )


def step_jacobians(module: nnx.Module, xs, carry=None) -> jax.Array:
    """:func:`rnn_jax.gradients.step_jacobians` of the cell of ``module``: ``(batch, time, n,
    n)``."""
    cell, params = pure(module)
    return gradients.step_jacobians(cell, params, xs, carry)


def jacobian_norms(module: nnx.Module, xs, carry=None, *, spectrum=False) -> dict:
    """:func:`rnn_jax.gradients.jacobian_norms` of the cell of ``module``."""
    cell, params = pure(module)
    return gradients.jacobian_norms(cell, params, xs, carry, spectrum=spectrum)


def saturation(module: nnx.Module, xs, carry=None, *, margin=0.1) -> dict:
    """:func:`rnn_jax.gradients.saturation` of the cell of ``module``."""
    cell, params = pure(module)
    return gradients.saturation(cell, params, xs, carry, margin=margin)


# --- checkpoints -------------------------------------------------------------------------------


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _arrays(modules: Mapping[str, Any]) -> dict:
    """``{name: {path: array}}`` of every variable of each module (an ``nnx.Optimizer``
    included), paths joined by ``/`` as strings, PRNG keys as their raw data."""
    out = {}
    for name, module in modules.items():
        flat = nnx.to_flat_state(nnx.state(module))
        out[name] = {}
        for path, variable in flat:
            value = variable.get_value()
            out[name]["/".join(map(str, path))] = (
                jax.random.key_data(value) if _is_key(value) else value
            )
    return out


def save_checkpoint(directory: str, step: int, modules: Mapping[str, Any], meta: dict) -> None:
    """Writes every variable of ``modules`` (e.g. ``{"model": model, "optimizer":
    optimizer}``) as checkpoint ``step`` of :func:`rnn_jax.save_checkpoint` (orbax, with its
    digest), ``meta`` beside it."""
    checkpoint.save_checkpoint(directory, step, _arrays(modules), meta)


def restore_checkpoint(directory: str, step: int, modules: Mapping[str, Any]) -> dict:
    """Reads checkpoint ``step`` into ``modules`` in place (``nnx.update``): modules built as
    the saved ones were (fresh ones, say) continue exactly where those stopped. Returns the
    meta saved with it.

    Raises:
      CheckpointError: the step holds other modules (another model or optimiser), or none.
      DamagedCheckpointError: its files do not match their digest.
    """
    restored, meta = checkpoint.restore_checkpoint(directory, step, _arrays(modules))
    for name, module in modules.items():
        values = []
        for path, variable in nnx.to_flat_state(nnx.state(module)):
            value = restored[name]["/".join(map(str, path))]
            old = variable.get_value()
            if _is_key(old):
                value = jax.random.wrap_key_data(value, impl=jax.random.key_impl(old))
            values.append((path, value))
        nnx.update(module, nnx.from_flat_state(values))
    return meta
