"""unroll against a Python loop over step: a toy counter, real cells, reverse, unroll, lengths;
its prologue (shared with the probes) and the scan switch."""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest

import rnn_jax
from rnn_jax import cells
from rnn_jax.scan import ScanType, unroll

CELL_NAMES = ["simple_rnn", "lstm", "gru"]


def counter_cell(units=1):
    """A toy cell whose step adds 1 to its carry and outputs the new carry (input ignored)."""

    def step(_params, carry, x):
        carry = carry + 1.0 + 0.0 * x[:, :1]
        return carry, carry

    return cells.custom_cell(
        lambda key, input_dim: {}, lambda batch: jnp.zeros((batch, units)), step, units=units
    )


def test_counter_gives_arange():
    xs = jnp.zeros((2, 5, 1))
    carry, ys = unroll(counter_cell(), {}, xs, return_sequences=True)
    np.testing.assert_array_equal(ys[..., 0], np.tile(np.arange(1, 6), (2, 1)))
    np.testing.assert_array_equal(carry[:, 0], [5, 5])
    _, last = unroll(counter_cell(), {}, xs)
    np.testing.assert_array_equal(last[:, 0], [5, 5])

    # Reverse: the last step is processed first, outputs stay in input order.
    carry, ys = unroll(counter_cell(), {}, xs, reverse=True, return_sequences=True)
    np.testing.assert_array_equal(ys[..., 0], np.tile(np.arange(5, 0, -1), (2, 1)))
    _, last = unroll(counter_cell(), {}, xs, reverse=True)
    np.testing.assert_array_equal(last[:, 0], [5, 5])

    # A given initial carry is where counting starts.
    carry, _ = unroll(counter_cell(), {}, xs, carry=jnp.full((2, 1), 10.0))
    np.testing.assert_array_equal(carry[:, 0], [15, 15])


def test_counter_with_lengths():
    xs = jnp.zeros((3, 5, 1))
    lengths = jnp.array([5, 2, 0])
    carry, ys = unroll(counter_cell(), {}, xs, lengths=lengths, return_sequences=True)
    want = np.array([[1, 2, 3, 4, 5], [1, 2, 0, 0, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(ys[..., 0], want)
    np.testing.assert_array_equal(carry[:, 0], [5, 2, 0])  # frozen past each length
    _, last = unroll(counter_cell(), {}, xs, lengths=lengths)
    np.testing.assert_array_equal(last[:, 0], [5, 2, 0])

    # Reverse: padding is met first (carry stays 0), then each sequence counts from its own end.
    carry, ys = unroll(counter_cell(), {}, xs, lengths=lengths, reverse=True, return_sequences=True)
    want = np.array([[5, 4, 3, 2, 1], [2, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(ys[..., 0], want)
    np.testing.assert_array_equal(carry[:, 0], [5, 2, 0])
    _, last = unroll(counter_cell(), {}, xs, lengths=lengths, reverse=True)
    np.testing.assert_array_equal(last[:, 0], [5, 2, 0])

    with pytest.raises(ValueError, match="lengths"):
        unroll(counter_cell(), {}, xs, lengths=jnp.array([1, 2]))


def _setup(name, seed=0, batch=3, time=6, input_dim=4, units=5):
    """The cell, random params of its shapes (biases too, so zeros hide nothing) and inputs."""
    cell = cells.CELLS[name](units)
    shapes = jax.eval_shape(lambda key: cell.init(key, input_dim), jax.random.PRNGKey(0))
    rng = np.random.default_rng(seed)
    params = {
        k: jnp.asarray(0.5 * rng.standard_normal(s.shape), jnp.float32) for k, s in shapes.items()
    }
    xs = jnp.asarray(rng.standard_normal((batch, time, input_dim)), jnp.float32)
    return cell, params, xs


def _loop(cell, params, xs, carry, reverse=False):
    ys = [None] * xs.shape[1]
    for t in reversed(range(xs.shape[1])) if reverse else range(xs.shape[1]):
        carry, ys[t] = cell.step(params, carry, xs[:, t])
    return carry, jnp.stack(ys, axis=1)


def _close(a, b, tol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", CELL_NAMES)
def test_unroll_matches_python_loop(name):
    """A given carry, reverse, every output and the last; the zero carry; unroll factors
    (``unroll=3`` leaves a remainder of the 7 steps); integer tokens as one-hot rows."""
    cell, params, xs = _setup(name, time=7)
    carry0 = jax.tree.map(lambda c: c + 0.2, cell.initial_carry(xs.shape[0]))
    tokens = jnp.asarray(np.random.default_rng(9).integers(0, 4, (3, 7)), jnp.int32)

    @jax.jit
    def both(params, xs, carry0, tokens):
        out = {}
        for reverse in (False, True):
            out[str(reverse)] = (
                _loop(cell, params, xs, carry0, reverse),
                unroll(cell, params, xs, carry0, reverse=reverse, return_sequences=True),
                unroll(cell, params, xs, carry0, reverse=reverse)[1],
            )
        out["zeros"] = (
            _loop(cell, params, xs, cell.initial_carry(3)),
            [unroll(cell, params, xs, return_sequences=True, unroll=u) for u in (1, 3, True)],
            unroll(cell, params, xs)[1],
        )
        out["tokens"] = [
            unroll(cell, params, t, return_sequences=True)
            for t in (tokens, jax.nn.one_hot(tokens, 4))
        ]
        return out

    out = both(params, xs, carry0, tokens)
    for reverse in (False, True):
        (want_carry, want_ys), (carry, ys), last = out[str(reverse)]
        _close(ys, want_ys)
        _close(carry, want_carry)
        assert type(carry) is type(want_carry)
        _close(last, want_ys[:, 0] if reverse else want_ys[:, -1])
    want, factors, last = out["zeros"]
    for got in factors:
        _close(got, want)
    _close(last, want[1][:, -1])
    _close(*out["tokens"], tol=1e-6)


@pytest.mark.parametrize("name", CELL_NAMES)
def test_lengths_match_truncated_sequences(name):
    """Against float64 NumPy runs of each sequence cut at its length (numpy_reference)."""
    cell, params, xs = _setup(name, batch=3, time=6)
    lengths = (6, 3, 1)

    @jax.jit
    def run(params, xs, lengths):
        return [
            (
                unroll(cell, params, xs, lengths=lengths, reverse=reverse, return_sequences=True),
                unroll(cell, params, xs, lengths=lengths, reverse=reverse)[1],
            )
            for reverse in (False, True)
        ]

    p64 = {k: np.asarray(v, np.float64) for k, v in params.items()}
    step = lambda c, x: ref.keras_step(name, p64, c, x)
    for reverse, ((carry, ys), last) in zip(
        (False, True), run(params, xs, jnp.array(lengths)), strict=True
    ):
        for b, n in enumerate(lengths):
            x = np.asarray(xs[b : b + 1, :n], np.float64)
            want_carry, want_ys = ref.run(
                step, ref.keras_initial_carry(name, 1, cell.units), x, reverse
            )
            _close(jax.tree.map(lambda c, b=b: c[b : b + 1], carry), want_carry)
            _close(ys[b : b + 1, :n], want_ys)
            np.testing.assert_array_equal(ys[b, n:], 0.0)
            _close(last[b], want_ys[0, 0] if reverse else want_ys[0, n - 1])


@pytest.mark.parametrize("name", CELL_NAMES)
def test_unroll_under_vmap(name):
    """vmap over a stack of parameter sets equals one call per set (the fast path's batching;
    its derivatives under vmap are in test_fast)."""
    cell, params, xs = _setup(name)

    @jax.jit
    def run(params, xs):
        half = jax.tree.map(lambda p: 0.5 * p, params)
        stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), params, half)
        batched = jax.vmap(lambda p: unroll(cell, p, xs, return_sequences=True))(stacked)
        singles = [unroll(cell, p, xs, return_sequences=True) for p in (params, half)]
        return batched, singles

    batched, singles = run(params, xs)
    for i, single in enumerate(singles):
        _close(jax.tree.map(lambda b, i=i: b[i], batched), single)


def test_forward_mode_equals_reverse_mode_of_a_jitted_unroll():
    """``jvp(jit(f))`` is ``<grad(jit(f)), v>``, for zero and given initial carries: the fast
    path's custom JVP through an inner ``jit`` (the GRU: two gate inputs, a recurrent bias)."""
    cell, params, xs = _setup("gru")
    direction = jax.tree.map(lambda p: jnp.cos(p + 1.0), params)
    carry0 = jax.tree.map(lambda c: c + 0.2, cell.initial_carry(xs.shape[0]))

    @jax.jit
    def both(params, direction, carry0):
        out = []
        for carry in (None, carry0):
            # An inner jit: differentiating a jitted unroll is what users do.
            loss = jax.jit(lambda p, c=carry: jnp.sum(jnp.sin(unroll(cell, p, xs, c)[1])))
            out.append((jax.jvp(loss, (params,), (direction,))[1], jax.grad(loss)(params)))
        return out

    for carry, (forward, grads) in zip(("zeros", "given"), both(params, direction, carry0)):
        reverse = sum(
            jnp.vdot(g, d)
            for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True)
        )
        assert np.any(np.asarray(jax.tree.leaves(grads)[0]) != 0)
        np.testing.assert_allclose(forward, reverse, rtol=1e-4, atol=1e-5, err_msg=f"carry={carry}")


def test_unroll_and_the_probes_cast_a_given_carry_to_the_inputs_dtype():
    """Float64 params and inputs (under x64) with a float32 initial carry: ``unroll`` (fused
    and sequential) and the probes, through their one prologue, run the recursion in float64
    from the carry cast: every output and the final carry are the float64 NumPy loop's to
    1e-12 (float32 arithmetic anywhere would leave errors near 1e-7)."""
    units, batch, time, input_dim = 4, 2, 5, 3
    cell = cells.lstm(units)
    rng = np.random.default_rng(4)
    shapes = jax.eval_shape(lambda key: cell.init(key, input_dim), jax.random.PRNGKey(0))
    params = {k: 0.5 * rng.standard_normal(s.shape) for k, s in shapes.items()}
    xs = rng.standard_normal((batch, time, input_dim))
    carry32 = [rng.standard_normal((batch, units)).astype(np.float32) for _ in range(2)]
    want_carry, want_ys = ref.run(
        lambda c, x: ref.lstm_step(params, c, x), tuple(np.float64(c) for c in carry32), xs
    )

    with jax.enable_x64(True):

        @jax.jit
        def run(params, xs, carry):
            unrolled = [
                unroll(cell, params, xs, carry, return_sequences=True, scan=scan)
                for scan in (ScanType.FUSED, ScanType.SEQUENTIAL)
            ]
            loss_fn = lambda ys: jnp.sum(ys, axis=(1, 2))
            probed = rnn_jax.carry_gradients(
                cell, params, xs, loss_fn, carry, return_sequences=True
            )
            return unrolled, probed[0]

        carry = cells.LSTMCarry(*(jnp.asarray(c) for c in carry32))
        unrolled, losses = run(jax.tree.map(jnp.asarray, params), jnp.asarray(xs), carry)

    for final, ys in unrolled:
        assert ys.dtype == jnp.float64 and final.c.dtype == jnp.float64
        np.testing.assert_allclose(ys, want_ys, rtol=1e-12, atol=1e-12)
        _close(final, want_carry, tol=1e-12)
    np.testing.assert_allclose(losses, want_ys.sum(axis=(1, 2)), rtol=1e-12)


def test_scan_must_be_a_scan_type():
    cell, params, xs = _setup("gru")
    with pytest.raises(ValueError, match=r"scan='fused' must be a rnn_jax.ScanType"):
        unroll(cell, params, xs, scan="fused")
