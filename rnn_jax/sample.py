"""Compiled greedy (or temperature) generation on device: the tutorial's rolling input window,
and stateful generation that carries the state one token at a time."""

import math

import jax
import jax.numpy as jnp

from rnn_jax._fast import step_from_zero, zero_initial_carry
from rnn_jax.cells import Cell, Recurrence
from rnn_jax.models import Model, dense


def _sample_one(cell: Cell, params, seed: jax.Array, num_chars: int, temperature: float, key):
    # The tutorial re-runs the recurrence over each new T-char window from the initial carry.
    # Window w reads s[w : w + T], so at time t every live window reads the same character
    # s[t]: the windows in flight are the rows of one carry, all advanced by one matrix product
    # per character, and the window that has read T characters gives the prediction. Same
    # arithmetic as the rolling window, T times fewer sequential steps.
    #
    # Ring buffer: window w lives in row w mod (T-1). At time t the window started at t-T+1
    # reads its last character and leaves row t mod (T-1), where the window starting at t
    # (one step from the initial carry: no product with a zero carry) takes its place. Rows
    # never move, so nothing is copied per character.
    seq_len = seed.shape[0]
    rows = cell.initial_carry(max(seq_len - 1, 1))
    prepared = cell.prepare(params["rnn"])
    start = _start_step(cell, prepared)

    def token_at(t, prediction):
        return jnp.where(t < seq_len, seed[jnp.minimum(t, seq_len - 1)], prediction)

    def body(state, t):
        # z, the projected token read at step t, comes in the loop carry: XLA would otherwise
        # fuse the token's selection and gather into the gate's kernel, once per element.
        rows, z = state
        fresh, y = start(z[None])
        if seq_len > 1:
            zs = jnp.broadcast_to(z, (seq_len - 1,) + z.shape)
            live, ys = cell.recur(prepared, rows, zs)
            slot = t % (seq_len - 1)
            y = jax.lax.dynamic_slice_in_dim(ys, slot, 1)
            fresh = jax.tree.map(
                lambda r, f: jax.lax.dynamic_update_slice_in_dim(r, f, slot, 0), live, fresh
            )
        logits = dense(params["dense"], y[0])
        if temperature == 0.0:
            nxt = _argmax(logits).astype(seed.dtype)
        else:
            nxt = jax.random.categorical(jax.random.fold_in(key, t), logits / temperature)
            nxt = nxt.astype(seed.dtype)
        z = cell.project(params["rnn"], token_at(t + 1, nxt))
        return (fresh, z), nxt

    steps = jnp.arange(seq_len + num_chars - 1)
    z = cell.project(params["rnn"], seed[0])
    _, out = jax.lax.scan(body, (rows, z), steps)
    return out[seq_len - 1 :]


def _argmax(logits: jax.Array) -> jax.Array:
    """``jnp.argmax`` over the last axis (the first maximum; the first NaN if there is one) as
    two plain reductions: XLA's CPU argmax (a variadic reduce) is several times slower."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    hit = (logits == top) | (jnp.isnan(logits) & jnp.isnan(top))
    index = jnp.arange(logits.shape[-1]).reshape((1,) * (logits.ndim - 1) + (-1,))
    return jnp.min(jnp.where(hit, index, logits.shape[-1]), axis=-1)


def _start_step(cell: Cell, prepared):
    """``z (1, k·units) -> (carry, y)``: a step from the initial carry; from a zero one of a
    :class:`Recurrence`, :func:`rnn_jax._fast.step_from_zero` (``0 @ U`` skipped)."""
    rec = cell.recur
    if not (isinstance(rec, Recurrence) and zero_initial_carry(cell)):
        return lambda z: cell.recur(prepared, cell.initial_carry(1), z)
    b_h = None if rec.recurrent_bias is None else rec.recurrent_bias(prepared)

    def start(z):
        carry = step_from_zero(rec, cell.initial_carry(1), z, b_h)
        return carry, cell.hidden(carry)

    return start


def make_sampler(cell: Cell, num_chars: int, temperature: float = 0.0):
    """A jitted ``sample(params, seeds, key=None) -> (batch, num_chars) int32``.

    The model is :func:`rnn_jax.sequence_classifier` of ``cell`` over tokens (params
    ``{"rnn", "dense"}``). For
    each seed window ``(seq_len,)``, predicts the next token from the current window, takes the
    argmax (``temperature == 0``, the tutorial's greedy decoding) or samples from
    ``softmax(logits / temperature)``, appends it and drops the window's first token, as the
    tutorial does, ``num_chars`` times, all in one compiled call; ``seeds (batch, seq_len)`` are
    generated at once (``vmap``).
    """
    if num_chars < 1:
        raise ValueError(f"num_chars={num_chars} must be positive")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature={temperature} must be finite and >= 0")

    @jax.jit
    def sample(params, seeds, key=None):
        if key is None:
            key = jax.random.PRNGKey(0)
        keys = jax.random.split(key, seeds.shape[0])
        one = lambda seed, k: _sample_one(cell, params, seed, num_chars, temperature, k)
        return jax.vmap(one)(seeds, keys)

    return sample


def make_stateful_sampler(model: Model, num_chars: int, temperature: float = 0.0):
    """A jitted ``sample(params, seeds, key=None) -> (batch, num_chars) int32`` that carries
    the state: one recurrent step per generated token (``num_chars`` tokens cost
    ``num_chars`` steps, where the rolling window of :func:`make_sampler` costs ``seq_len``
    per token), with any layer, stacks included.

    ``model`` is :func:`rnn_jax.language_model`: the seeds ``(batch, seed_len)`` are read from
    the initial carry, then each token is picked from the last logits, by argmax
    (``temperature == 0``) or from ``softmax(logits / temperature)``, and read in turn. As in
    :func:`make_sampler`, row ``b`` draws with ``jax.random.split(key, batch)[b]`` (token
    ``t`` with that key folded with ``t``), so a row's text does not depend on the rows
    generated beside it. The whole context is remembered through the carry, as in
    stateful training; nothing is dropped from a window.
    """
    if num_chars < 1:
        raise ValueError(f"num_chars={num_chars} must be positive")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature={temperature} must be finite and >= 0")

    def pick(logits, keys, t):
        if temperature == 0.0:
            return _argmax(logits)
        draw = lambda k, row: jax.random.categorical(jax.random.fold_in(k, t), row / temperature)
        return jax.vmap(draw)(keys, logits)

    @jax.jit
    def sample(params, seeds, key=None):
        if key is None:
            key = jax.random.PRNGKey(0)
        keys = jax.random.split(key, seeds.shape[0])
        carry, logits = model.apply(params, seeds)
        first = pick(logits[:, -1], keys, 0).astype(seeds.dtype)

        def body(state, t):
            carry, token = state
            carry, logits = model.apply(params, token[:, None], carry)
            nxt = pick(logits[:, 0], keys, t).astype(seeds.dtype)
            return (carry, nxt), nxt

        _, rest = jax.lax.scan(body, (carry, first), jnp.arange(1, num_chars))
        return jnp.concatenate([first[:, None], rest.T], axis=1)

    return sample
