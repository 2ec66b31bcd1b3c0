"""Topologies from cells: stacked and bidirectional layers, seq2seq, per-step heads, masks."""

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from rnn_jax.cells import Carry, Cell
from rnn_jax.losses import softmax_cross_entropy
from rnn_jax.models import Model, dense, dense_init
from rnn_jax.scan import unroll

Params = Any


class Layer(NamedTuple):
    """A sequence layer as pure functions, :func:`rnn_jax.unroll`'s signature without the cell.

    Attributes:
      init: ``(key, input_dim) -> params``.
      apply: ``(params, xs, carry=None, *, lengths=None, return_sequences=False)
        -> (carry, ys)``; ``xs`` is ``(batch, time, input_dim)`` float or ``(batch, time)``
        int, ``ys`` is ``(batch, time, units)`` with ``return_sequences`` (zero past each
        length), else ``(batch, units)``.
      units: the width of ``ys``.
    """

    init: Callable[[jax.Array, int], Params]
    apply: Callable[..., tuple[Carry, jax.Array]]
    units: int


def recurrent(cell: Cell, *, reverse: bool = False, unroll_steps: int | bool = 1) -> Layer:
    """One cell over the sequence (Keras ``RNN(cell, go_backwards=reverse)``, outputs in order).

    With ``reverse`` and ``lengths`` each sequence is read from its own last real step down to
    step 0, as if it had been flipped alone; the last output is then step 0's.
    """

    def apply(params, xs, carry=None, *, lengths=None, return_sequences=False):
        return unroll(
            cell, params, xs, carry, lengths=lengths, reverse=reverse,
            return_sequences=return_sequences, unroll=unroll_steps,
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
        raise ValueError(f"merge must be one of {sorted(_MERGES)}, got {merge!r}")
    if merge == "sum" and forward.units != backward.units:
        raise ValueError(
            f"merge='sum' needs equal units, got {forward.units} and {backward.units}; "
            "use merge='concat'"
        )
    units = forward.units + backward.units if merge == "concat" else forward.units

    def init(key, input_dim):
        k_f, k_b = jax.random.split(key)
        return {"forward": forward.init(k_f, input_dim), "backward": backward.init(k_b, input_dim)}

    def apply(params, xs, carry=None, *, lengths=None, return_sequences=False):
        carry_f, carry_b = (None, None) if carry is None else carry
        kwargs = dict(lengths=lengths, return_sequences=return_sequences, unroll=unroll_steps)
        carry_f, ys_f = unroll(forward, params["forward"], xs, carry_f, **kwargs)
        carry_b, ys_b = unroll(backward, params["backward"], xs, carry_b, reverse=True, **kwargs)
        return (carry_f, carry_b), _MERGES[merge](ys_f, ys_b)

    return Layer(init, apply, units)


def stacked(layers: Sequence[Layer]) -> Layer:
    """Layers applied in turn, each reading every step of the one below (Keras stacked RNNs).

    Params: ``{"layer_0": ..., "layer_1": ...}``. Carry: a tuple with one carry per layer
    (``carry=None`` starts every layer from zeros); ``lengths`` reach every layer.
    """
    layers = tuple(layers)
    if not layers:
        raise ValueError("stacked needs at least one layer")

    def init(key, input_dim):
        params = {}
        for i, (layer, k) in enumerate(zip(layers, jax.random.split(key, len(layers)))):
            params[f"layer_{i}"] = layer.init(k, input_dim)
            input_dim = layer.units
        return params

    def apply(params, xs, carry=None, *, lengths=None, return_sequences=False):
        carries = (None,) * len(layers) if carry is None else tuple(carry)
        finals = []
        for i, layer in enumerate(layers):
            last = i == len(layers) - 1
            c, xs = layer.apply(
                params[f"layer_{i}"], xs, carries[i], lengths=lengths,
                return_sequences=return_sequences or not last,
            )
            finals.append(c)
        return tuple(finals), xs

    return Layer(init, apply, layers[-1].units)


def _layer_and_head_init(layer: Layer, input_dim: int, num_classes: int):
    """``init(key) -> {"rnn": layer params, "dense": Dense(num_classes) params}``."""

    def init(key):
        k_rnn, k_dense = jax.random.split(key)
        return {"rnn": layer.init(k_rnn, input_dim),
                "dense": dense_init(k_dense, layer.units, num_classes)}

    return init


def sequence_classifier(layer: Layer, input_dim: int, num_classes: int) -> Model:
    """Many-to-one: the layer's last output (each sequence's own) into ``Dense(num_classes)``.

    ``apply(params, xs, lengths=None) -> logits (batch, num_classes)``.
    Params: ``{"rnn": layer params, "dense": dense params}``.
    """

    init = _layer_and_head_init(layer, input_dim, num_classes)

    def apply(params, xs, lengths=None):
        _, h = layer.apply(params["rnn"], xs, lengths=lengths)
        return dense(params["dense"], h)

    return Model(init, apply)


def sequence_tagger(layer: Layer, input_dim: int, num_classes: int) -> Model:
    """Synced many-to-many: one ``Dense(num_classes)`` head on every step (``TimeDistributed``).

    ``apply(params, xs, lengths=None) -> logits (batch, time, num_classes)``; mask the steps
    past each length in the loss (:func:`masked_cross_entropy`).
    Params: ``{"rnn": layer params, "dense": dense params}``.
    """

    init = _layer_and_head_init(layer, input_dim, num_classes)

    def apply(params, xs, lengths=None):
        _, ys = layer.apply(params["rnn"], xs, lengths=lengths, return_sequences=True)
        return dense(params["dense"], ys)

    return Model(init, apply)


class SequenceGenerator(NamedTuple):
    """A conditional decoder: teacher-forced logits for training, greedy tokens for inference.

    Attributes:
      init: ``(key) -> params``.
      apply: ``(params, inputs, targets, lengths=None) -> logits (batch, out_len, num_outputs)``;
        the decoder reads ``[GO, targets[:, :-1]]`` (teacher forcing).
      generate: jitted ``(params, inputs, lengths=None) -> tokens (batch, out_len)`` int32: the
        decoder reads its own previous argmax, all steps in one ``lax.scan``.
      go: the GO token (``num_outputs``): the decoder's first input, never an output class.
    """

    init: Callable[[jax.Array], Params]
    apply: Callable[..., jax.Array]
    generate: Callable[..., jax.Array]
    go: int


def _check_decoder(cells: Sequence[Cell]) -> tuple[Cell, ...]:
    cells = tuple(cells)
    if not cells:
        raise ValueError("the decoder needs at least one cell")
    return cells


def decoder_init(key, cells: Sequence[Cell], num_outputs: int) -> Params:
    """Decoder params: ``{"layer_i": cell params}`` reading tokens ``0..num_outputs`` (GO
    included) and ``"dense"`` from the top layer to ``num_outputs`` logits."""
    keys = jax.random.split(key, len(cells) + 1)
    params, input_dim = {}, num_outputs + 1
    for i, (cell, k) in enumerate(zip(cells, keys[:-1])):
        params[f"layer_{i}"] = cell.init(k, input_dim)
        input_dim = cell.units
    params["dense"] = dense_init(keys[-1], input_dim, num_outputs)
    return params


def teacher_forced(cells: Sequence[Cell], params: Params, carries, targets: jax.Array, go: int):
    """Decoder logits ``(batch, out_len, num_outputs)`` reading ``[GO, targets[:, :-1]]``.

    Args:
      cells: one cell per decoder layer.
      params: :func:`decoder_init`'s params.
      carries: the initial carry of every layer (a tuple), e.g. an encoder's final carries.
      targets: ``(batch, out_len)`` int tokens.
      go: the GO token.
    """
    go_column = jnp.full((targets.shape[0], 1), go, targets.dtype)
    xs = jnp.concatenate([go_column, targets[:, :-1]], axis=1)
    for i, cell in enumerate(cells):
        _, xs = unroll(cell, params[f"layer_{i}"], xs, carries[i], return_sequences=True)
    return dense(params["dense"], xs)


def greedy_decode(cells: Sequence[Cell], params: Params, carries, out_len: int, go: int):
    """Greedy tokens ``(batch, out_len)`` int32: each step reads the previous step's argmax.

    One ``lax.scan`` over the steps; the stack of cells advances one step at a time.
    """
    batch = jax.tree.leaves(carries)[0].shape[0]

    def body(state, _):
        carries, token = state
        x, new = token, []
        for i, cell in enumerate(cells):
            c, x = cell.step(params[f"layer_{i}"], carries[i], x)
            new.append(c)
        token = jnp.argmax(dense(params["dense"], x), axis=-1).astype(jnp.int32)
        return (tuple(new), token), token

    first = jnp.full((batch,), go, jnp.int32)
    _, tokens = jax.lax.scan(body, (tuple(carries), first), None, length=out_len)
    return jnp.swapaxes(tokens, 0, 1)


def encoder_decoder(
    encoder_cells: Sequence[Cell],
    decoder_cells: Sequence[Cell],
    input_dim: int,
    num_outputs: int,
    out_len: int,
    reverse_input: bool = False,
) -> SequenceGenerator:
    """Many-to-many with different lengths: sequence to sequence (Sutskever et al. 2014).

    A stacked encoder reads the input (with ``lengths``, each sequence up to its own end); its
    final carries initialise the decoder layer by layer, so layer ``i`` of both stacks needs
    the same cell type and units. ``reverse_input`` runs every encoder layer backwards, which
    equals reading each sequence flipped on its own (Sutskever's reversal trick).

    Args:
      encoder_cells, decoder_cells: one cell per layer, matching carries.
      input_dim: the encoder's feature width, or its vocabulary size for int tokens.
      num_outputs: output classes, EOS included; the decoder also reads GO (= ``num_outputs``).
      out_len: decoder steps.
      reverse_input: read the inputs backwards.

    Params: ``{"encoder": stacked params, "decoder": decoder_init params}``.
    """
    decoder_cells = _check_decoder(decoder_cells)
    if len(encoder_cells) != len(decoder_cells):
        raise ValueError(
            f"{len(encoder_cells)} encoder and {len(decoder_cells)} decoder layers: the encoder's "
            "final carries initialise the decoder layer by layer, so use as many of each"
        )
    encoder = stacked([recurrent(c, reverse=reverse_input) for c in encoder_cells])

    def init(key):
        k_enc, k_dec = jax.random.split(key)
        return {"encoder": encoder.init(k_enc, input_dim),
                "decoder": decoder_init(k_dec, decoder_cells, num_outputs)}

    def apply(params, inputs, targets, lengths=None):
        carries, _ = encoder.apply(params["encoder"], inputs, lengths=lengths)
        return teacher_forced(decoder_cells, params["decoder"], carries, targets, num_outputs)

    @jax.jit
    def generate(params, inputs, lengths=None):
        carries, _ = encoder.apply(params["encoder"], inputs, lengths=lengths)
        return greedy_decode(decoder_cells, params["decoder"], carries, out_len, num_outputs)

    return SequenceGenerator(init, apply, generate, num_outputs)


def one_to_many(
    decoder_cells: Sequence[Cell], input_dim: int, num_outputs: int, out_len: int
) -> SequenceGenerator:
    """One vector in, a sequence out (image captioning's shape, Karpathy's "one to many").

    The vector sets every decoder layer's initial carry through its own ``tanh(Dense)`` per
    carry component (``h`` and, for LSTM, ``c``); the decoder then reads its previous token.

    ``num_outputs`` counts the output classes, EOS included; GO is ``num_outputs``.
    ``apply(params, vectors (batch, input_dim), targets, lengths=None)``: teacher-forced logits;
    ``generate(params, vectors)``: greedy tokens. Params: ``{"bridge": [per layer, per carry
    component dense params], "decoder": decoder_init params}``.
    """
    decoder_cells = _check_decoder(decoder_cells)
    structures = [jax.tree.structure(c.initial_carry(1)) for c in decoder_cells]

    def init(key):
        k_bridge, k_dec = jax.random.split(key)
        bridge = []
        for cell, structure, k in zip(
            decoder_cells, structures, jax.random.split(k_bridge, len(decoder_cells))
        ):
            ks = jax.random.split(k, structure.num_leaves)
            bridge.append([dense_init(kk, input_dim, cell.units) for kk in ks])
        return {"bridge": bridge, "decoder": decoder_init(k_dec, decoder_cells, num_outputs)}

    def carries_from(params, vectors):
        return tuple(
            jax.tree.unflatten(structure, [jnp.tanh(dense(p, vectors)) for p in layer])
            for structure, layer in zip(structures, params["bridge"])
        )

    def apply(params, vectors, targets, lengths=None):
        del lengths
        carries = carries_from(params, vectors)
        return teacher_forced(decoder_cells, params["decoder"], carries, targets, num_outputs)

    @jax.jit
    def generate(params, vectors, lengths=None):
        del lengths
        carries = carries_from(params, vectors)
        return greedy_decode(decoder_cells, params["decoder"], carries, out_len, num_outputs)

    return SequenceGenerator(init, apply, generate, num_outputs)


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
