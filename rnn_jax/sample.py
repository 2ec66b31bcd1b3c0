"""Compiled greedy (or temperature) generation that rolls the input window forward on device."""

import jax
import jax.numpy as jnp

from rnn_jax.cells import Cell
from rnn_jax.models import dense


def _sample_one(cell: Cell, params, seed: jax.Array, num_chars: int, temperature: float, key):
    # The tutorial re-runs the recurrence over each new 10-char window from a zero carry. Window
    # w reads s[w : w + T], so at time t every live window reads the same character s[t]: we
    # keep the T windows that are in flight as the rows of one carry, advance all of them with
    # one matrix product per character, and read the prediction from the row that has seen T
    # characters. Same arithmetic as the rolling window, T times fewer sequential steps.
    seq_len = seed.shape[0]
    rows = cell.initial_carry(seq_len)
    fresh = jax.tree.map(lambda r: r[:1], rows)

    def body(state, t):
        rows, prev = state
        token = jnp.where(t < seq_len, seed[jnp.minimum(t, seq_len - 1)], prev)
        z = cell.project(params["rnn"], token)
        rows, ys = cell.recur(params["rnn"], rows, jnp.broadcast_to(z, (seq_len, z.shape[-1])))
        logits = dense(params["dense"], ys[-1])
        if temperature == 0.0:
            nxt = jnp.argmax(logits).astype(seed.dtype)
        else:
            nxt = jax.random.categorical(jax.random.fold_in(key, t), logits / temperature)
            nxt = nxt.astype(seed.dtype)
        # Row j holds the window that has read j + 1 characters; shift and start a fresh one.
        rows = jax.tree.map(lambda f, r: jnp.concatenate([f, r[:-1]]), fresh, rows)
        return (rows, nxt), nxt

    steps = jnp.arange(seq_len + num_chars - 1)
    _, out = jax.lax.scan(body, (rows, seed[-1]), steps)
    return out[seq_len - 1 :]


def make_sampler(cell: Cell, num_chars: int, temperature: float = 0.0):
    """A jitted ``sample(params, seeds, key=None) -> (batch, num_chars) int32``.

    The model is :func:`rnn_jax.rnn_classifier` over tokens (params ``{"rnn", "dense"}``). For
    each seed window ``(seq_len,)``, predicts the next token from the current window, takes the
    argmax (``temperature == 0``, the tutorial's greedy decoding) or samples from
    ``softmax(logits / temperature)``, appends it and drops the window's first token, as the
    tutorial does, ``num_chars`` times, all in one compiled call; ``seeds (batch, seq_len)`` are
    generated at once (``vmap``).
    """
    if num_chars < 1:
        raise ValueError(f"num_chars must be positive, got {num_chars}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")

    @jax.jit
    def sample(params, seeds, key=None):
        if key is None:
            key = jax.random.PRNGKey(0)
        keys = jax.random.split(key, seeds.shape[0])
        one = lambda seed, k: _sample_one(cell, params, seed, num_chars, temperature, k)
        return jax.vmap(one)(seeds, keys)

    return sample
