"""Models from cells: recurrent, stacked and bidirectional layers and their Dense heads."""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnn_jax._fast import matmul
from rnn_jax.cells import Carry, Cell, add_bias, glorot_uniform
from rnn_jax.scan import unroll

Params = Any


class Model(NamedTuple):
    """A model as two pure functions: ``init(key) -> params``, ``apply(params, xs, ...) -> ys``."""

    init: Callable[[jax.Array], Params]
    apply: Callable[..., jax.Array]


def dense_init(key: jax.Array, input_dim: int, output_dim: int) -> Params:
    """Keras ``Dense`` parameters: ``kernel (input_dim, output_dim)`` glorot-uniform, zero bias."""
    return {
        "kernel": glorot_uniform(key, (input_dim, output_dim)),
        "bias": jnp.zeros((output_dim,)),
    }


def dense(params: Params, x: jax.Array) -> jax.Array:
    """``x @ kernel + bias`` (logits; the softmax lives in the loss)."""
    return add_bias(matmul(x, params["kernel"]), params["bias"])


class Layer(NamedTuple):
    """A sequence layer as pure functions, :func:`rnn_jax.unroll`'s signature without the cell.

    Attributes:
      init: ``(key, input_dim) -> params``.
      apply: ``(params, xs, carry=None, *, lengths=None, return_sequences=False, key=None)
        -> (carry, ys)``; ``xs`` is ``(batch, time, input_dim)`` float or ``(batch, time)``
        int, ``ys`` is ``(batch, time, units)`` with ``return_sequences`` (zero past each
        length), else ``(batch, units)``; ``key``, in training only, drives a layer's dropout
        (:func:`stacked`'s; the others have none).
      units: the width of ``ys``.
    """

    init: Callable[[jax.Array, int], Params]
    apply: Callable[..., tuple[Carry, jax.Array]]
    units: int


def recurrent(
    cell: Cell, *, reverse: bool = False, unroll_steps: int | bool = 1, weight_drop: float = 0.0
) -> Layer:
    """One cell over the sequence (Keras ``RNN(cell, go_backwards=reverse)``, outputs in order).

    With ``reverse`` and ``lengths`` each sequence is read from its own last real step down to
    step 0, as if it had been flipped alone; the last output is then step 0's.

    ``weight_drop`` regularises the recurrence itself (DropConnect on the recurrent weights,
    the weight drop of Merity et al. 2018's AWD-LSTM): given a ``key`` (training), every entry
    of the cell's ``recurrent_kernel`` is dropped with probability ``weight_drop`` and the rest
    scaled by ``1 / (1 - weight_drop)`` (:func:`inverted_dropout`), one mask for the whole call,
    shared by every sequence and step of it, so the carry passes on intact and the cell stays
    the cell (any fused or parallel path included); without a key the kernel is read as it is.
    The cell needs a ``recurrent_kernel`` parameter (every registry cell but ``min_gru`` and
    ``exp_rnn``, whose recurrent weights are not a parameter of their own).
    """
    _check_rate(weight_drop, "weight_drop")
    if weight_drop and "recurrent_kernel" not in _param_names(cell):
        raise ValueError(
            f"weight_drop={weight_drop} drops entries of a cell's 'recurrent_kernel', and this "
            f"cell's params are {sorted(_param_names(cell))}; use weight_drop=0 with it (or "
            "dropout between layers)"
        )

    def apply(params, xs, carry=None, *, lengths=None, return_sequences=False, key=None):
        if key is not None and weight_drop:
            dropped = inverted_dropout(key, weight_drop, params["recurrent_kernel"])
            params = {**params, "recurrent_kernel": dropped}
        return unroll(
            cell,
            params,
            xs,
            carry,
            lengths=lengths,
            reverse=reverse,
            return_sequences=return_sequences,
            unroll=unroll_steps,
        )

    return Layer(cell.init, apply, cell.units)


_MERGES = {"concat": lambda a, b: jnp.concatenate([a, b], axis=-1), "sum": lambda a, b: a + b}


def bidirectional(
    forward: Cell, backward: Cell | None = None, merge: str = "concat", unroll_steps: int | bool = 1
) -> Layer:
    """A forward and a reversed scan over the same inputs, merged (Keras ``Bidirectional``).

    Both directions honour ``lengths``: the backward scan meets the padding first with its
    carry frozen, so it starts at each sequence's own last real step (not at the padded end).
    With ``return_sequences`` step ``t`` merges the forward output after reading ``x_0..x_t``
    with the backward output after reading ``x_{len-1}..x_t``; otherwise the forward output at
    ``len - 1`` is merged with the backward output at step 0 (both have read the whole
    sequence).

    Args:
      forward: the forward cell.
      backward: the backward cell (its own parameters either way); ``forward`` when None.
      merge: ``"concat"`` (units = sum of both) or ``"sum"`` (both cells need equal units).
      unroll_steps: ``lax.scan``'s unroll factor.

    Params: ``{"forward": ..., "backward": ...}``. Carry: ``(forward carry, backward carry)``.
    """
    backward = forward if backward is None else backward
    if merge not in _MERGES:
        raise ValueError(f"merge={merge!r} must be one of {sorted(_MERGES)}")
    if merge == "sum" and forward.units != backward.units:
        raise ValueError(
            f"merge='sum' needs equal units, got {forward.units} and {backward.units}; "
            "use merge='concat'"
        )
    units = forward.units + backward.units if merge == "concat" else forward.units

    def init(key, input_dim):
        k_f, k_b = jax.random.split(key)
        return {"forward": forward.init(k_f, input_dim), "backward": backward.init(k_b, input_dim)}

    def apply(params, xs, carry=None, *, lengths=None, return_sequences=False, key=None):
        del key  # no dropout inside a recurrence
        carry_f, carry_b = (None, None) if carry is None else carry
        kwargs = dict(lengths=lengths, return_sequences=return_sequences, unroll=unroll_steps)
        carry_f, ys_f = unroll(forward, params["forward"], xs, carry_f, **kwargs)
        carry_b, ys_b = unroll(backward, params["backward"], xs, carry_b, reverse=True, **kwargs)
        return (carry_f, carry_b), _MERGES[merge](ys_f, ys_b)

    return Layer(init, apply, units)


def inverted_dropout(key: jax.Array | None, rate: float, xs: jax.Array) -> jax.Array:
    """Inverted dropout: each entry zeroed with probability ``rate``, the others scaled by
    ``1 / (1 - rate)``; ``xs`` as it is without a ``key`` (evaluation) or at rate 0."""
    if key is None or rate == 0.0:
        return xs
    keep = jax.random.bernoulli(key, 1.0 - rate, xs.shape)
    return jnp.where(keep, xs / (1.0 - rate), 0.0)


def _check_rate(rate: float, name: str = "dropout") -> None:
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name}={rate} must be in [0, 1)")


def _param_names(cell: Cell) -> set[str]:
    """The names at the top of a cell's params (shapes only: nothing is drawn)."""
    params = jax.eval_shape(lambda key: cell.init(key, 1), jax.random.PRNGKey(0))
    return set(params) if isinstance(params, dict) else set()


def stacked(layers: Sequence[Layer], dropout_rate: float = 0.0) -> Layer:
    """Layers applied in turn, each reading every step of the one below (Keras stacked RNNs).

    Params: ``{"layer_0": ..., "layer_1": ...}``. Carry: a tuple with one carry per layer
    (``carry=None`` starts every layer from zeros); ``lengths`` reach every layer. With
    ``dropout_rate`` and a ``key`` (training), the outputs a layer passes to the next are
    dropped out (:func:`inverted_dropout`, layer ``i``'s with ``fold_in(key, i)``), the carries left
    alone (Zaremba et al. 2014); the key reaches layer ``i`` itself as ``fold_in(key, n + i)``
    (``n`` layers: a :func:`recurrent` layer's ``weight_drop``).
    """
    layers = tuple(layers)
    if not layers:
        raise ValueError("stacked needs at least one layer")
    _check_rate(dropout_rate)

    def init(key, input_dim):
        params = {}
        for i, (layer, k) in enumerate(zip(layers, jax.random.split(key, len(layers)))):
            params[f"layer_{i}"] = layer.init(k, input_dim)
            input_dim = layer.units
        return params

    def apply(params, xs, carry=None, *, lengths=None, return_sequences=False, key=None):
        carries = (None,) * len(layers) if carry is None else tuple(carry)
        finals = []
        for i, layer in enumerate(layers):
            last = i == len(layers) - 1
            if i > 0:
                xs = inverted_dropout(
                    None if key is None else jax.random.fold_in(key, i), dropout_rate, xs
                )
            c, xs = layer.apply(
                params[f"layer_{i}"],
                xs,
                carries[i],
                lengths=lengths,
                return_sequences=return_sequences or not last,
                key=None if key is None else jax.random.fold_in(key, len(layers) + i),
            )
            finals.append(c)
        return tuple(finals), xs

    return Layer(init, apply, layers[-1].units)


def _as_layer(layer: Layer | Cell) -> Layer:
    return recurrent(layer) if isinstance(layer, Cell) else layer


def _with_head(layer: Layer, input_dim: int, num_classes: int):
    """``init(key) -> {"rnn": layer params, "dense": Dense(num_classes) params}``."""

    def init(key):
        k_rnn, k_dense = jax.random.split(key)
        return {
            "rnn": layer.init(k_rnn, input_dim),
            "dense": dense_init(k_dense, layer.units, num_classes),
        }

    return init


def sequence_classifier(layer: Layer | Cell, input_dim: int, num_classes: int) -> Model:
    """Many-to-one: the layer's last output (each sequence's own) into ``Dense(num_classes)``.

    With a cell, the vocabulary as ``input_dim`` and ``num_classes`` and integer tokens as
    input, this is the tutorial's char-RNN (``SimpleRNN(128)`` + ``Dense(V)`` + softmax)
    without the one-hot arrays.

    Args:
      layer: a :class:`Layer` or a :class:`rnn_jax.Cell` (run by :func:`recurrent`).
      input_dim: features per step, or the vocabulary size for integer tokens.
      num_classes: the head's outputs.

    Returns:
      ``Model``: ``apply(params, xs, lengths=None) -> logits (batch, num_classes)``, params
      ``{"rnn": layer params, "dense": dense params}``.
    """
    layer = _as_layer(layer)

    def apply(params, xs, lengths=None):
        _, h = layer.apply(params["rnn"], xs, lengths=lengths)
        return dense(params["dense"], h)

    return Model(_with_head(layer, input_dim, num_classes), apply)


def sequence_tagger(layer: Layer | Cell, input_dim: int, num_classes: int) -> Model:
    """Synced many-to-many: one ``Dense(num_classes)`` head on every step (``TimeDistributed``).

    As :func:`sequence_classifier`, but ``apply(params, xs, lengths=None) -> logits (batch,
    time, num_classes)``; mask the steps past each length in the loss
    (:func:`rnn_jax.losses.masked_cross_entropy`).
    """
    layer = _as_layer(layer)

    def apply(params, xs, lengths=None):
        _, ys = layer.apply(params["rnn"], xs, lengths=lengths, return_sequences=True)
        return dense(params["dense"], ys)

    return Model(_with_head(layer, input_dim, num_classes), apply)


def language_model(layer: Layer | Cell, vocab_size: int, dropout: float = 0.0) -> Model:
    """Next-token model over integer tokens, its carry in and out (stateful training).

    The layer reads tokens and a ``Dense(vocab_size)`` head reads every step's output, as
    :func:`sequence_tagger` (same params, ``{"rnn", "dense"}``: a windowed model's params serve
    here too), but the carry is an argument and a result, so that a long text can be read in
    windows with the carry passed from each to the next, and generation can go one token at a
    time.

    Args:
      layer: a :class:`Layer` (e.g. :func:`stacked`) or a cell.
      vocab_size: tokens in and classes out.
      dropout: the rate of (inverted) dropout on the outputs the head reads, the carry left
        alone (Zaremba et al. 2014); applied only when ``apply`` gets a ``key``, which also
        reaches the layer (``fold_in(key, 1)``: a :func:`stacked` layer's dropout between its
        layers).

    Returns:
      ``Model``: ``apply(params, tokens (batch, time), carry=None, key=None) -> (carry, logits
      (batch, time, vocab_size))``; ``carry=None`` starts from the layer's initial carry
      (zeros).
    """
    _check_rate(dropout)
    layer, rate = _as_layer(layer), dropout

    def apply(params, tokens, carry=None, key=None):
        layer_key = None if key is None else jax.random.fold_in(key, 1)
        carry, ys = layer.apply(params["rnn"], tokens, carry, return_sequences=True, key=layer_key)
        return carry, dense(params["dense"], inverted_dropout(key, rate, ys))

    return Model(_with_head(layer, vocab_size, vocab_size), apply)
