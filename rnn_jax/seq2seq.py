"""Sequence to sequence: encoder–decoder and one-to-many generators with greedy decoding."""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnn_jax.cells import Cell
from rnn_jax.models import dense, dense_init, recurrent, stacked
from rnn_jax.scan import unroll

Params = Any


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
        return {
            "encoder": encoder.init(k_enc, input_dim),
            "decoder": decoder_init(k_dec, decoder_cells, num_outputs),
        }

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
