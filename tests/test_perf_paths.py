"""The fast paths against the plain ones: the fused recurrence's custom JVP, dense, token rows.

``unroll`` runs a :class:`rnn_jax.cells.Recurrence` through a custom JVP (the zero first step
skipped, dU as one product, a rolled reverse loop for LSTM); a cell whose ``recur`` is a plain
function takes the step-by-step scan that JAX differentiates by itself. Values, reverse mode,
forward mode and second order must agree, in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import cells
from rnn_jax.cells import Recurrence, _rows
from rnn_jax.models import dense
from rnn_jax.sample import make_sampler
from rnn_jax.scan import unroll, zero_initial_carry

CELL_NAMES = ["simple_rnn", "lstm", "gru"]
# (initial carry, unroll options) per cell: each option on at least one cell, the tutorial's
# (zero carry, fully unrolled, last output) on every cell.
CASES = {
    "simple_rnn": lambda c: [(None, {"unroll": True}), (c, {"unroll": 1, "reverse": True})],
    "lstm": lambda c: [(None, {"unroll": True}), (c, {"unroll": 2, "return_sequences": True})],
    "gru": lambda c: [(None, {"unroll": True, "reverse": True, "return_sequences": True})],
}


def _plain(cell):
    """The same cell with ``recur`` hidden behind a plain function: the generic scan path."""
    recur = cell.recur
    return cell._replace(recur=lambda params, carry, z: recur(params, carry, z))


def _setup(name, units=4, input_dim=3, batch=2, time=3):
    cell = cells.CELLS[name](units)
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda k: cell.init(k, input_dim), jax.random.PRNGKey(0))
    params = {k: jnp.asarray(0.6 * rng.standard_normal(s.shape)) for k, s in shapes.items()}
    xs = jnp.asarray(rng.standard_normal((batch, time, input_dim)))
    carry = jax.tree.map(
        lambda c: jnp.asarray(0.5 * rng.standard_normal(c.shape)), cell.initial_carry(batch)
    )
    return cell, params, xs, carry


def _loss(cell, carry, **options):
    def loss(params, xs, carry=carry):
        final, ys = unroll(cell, params, xs, carry, **options)
        return jnp.sum(jnp.sin(ys)) + sum(jnp.sum(c**2) for c in jax.tree.leaves(final))

    return loss


def _assert_trees_close(got, want, rtol=1e-9, atol=1e-11):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", CELL_NAMES)
def test_fused_recurrence_matches_plain_scan(name):
    with jax.enable_x64(True):
        cell, params, xs, carry0 = _setup(name)
        assert isinstance(cell.recur, Recurrence) and zero_initial_carry(cell)
        tangent = jax.tree.map(jnp.cos, params)
        for carry, options in CASES[name](carry0):
            fast, plain = _loss(cell, carry, **options), _loss(_plain(cell), carry, **options)
            where = f"carry={'given' if carry is not None else 'zeros'}, {options}"
            argnums = (0, 1) if carry is None else (0, 1, 2)
            value, grads = jax.value_and_grad(fast, argnums)(params, xs, carry)
            want_value, want_grads = jax.value_and_grad(plain, argnums)(params, xs, carry)
            np.testing.assert_allclose(value, want_value, rtol=1e-12, err_msg=where)
            _assert_trees_close(grads, want_grads)
            np.testing.assert_allclose(
                jax.jvp(lambda p: fast(p, xs), (params,), (tangent,))[1],
                jax.jvp(lambda p: plain(p, xs), (params,), (tangent,))[1],
                rtol=1e-9, err_msg=where,
            )


def test_fused_recurrence_second_order_and_partial_gradients():
    """Forward over reverse (Hessian-vector products); gradients for inputs and carry only."""
    with jax.enable_x64(True):
        cell, params, xs, carry = _setup("lstm")
        fast, plain = _loss(cell, None, unroll=True), _loss(_plain(cell), None, unroll=True)
        tangent = jax.tree.map(jnp.sin, params)
        _assert_trees_close(  # Hessian-vector product: forward over reverse
            jax.jvp(jax.grad(lambda p: fast(p, xs)), (params,), (tangent,))[1],
            jax.jvp(jax.grad(lambda p: plain(p, xs)), (params,), (tangent,))[1],
        )
        # Gradients with respect to the inputs and carry only (the kernel's tangent is zero).
        fast_c, plain_c = _loss(cell, carry), _loss(_plain(cell), carry)
        got, want = (jax.grad(f, (1, 2))(params, xs, carry) for f in (fast_c, plain_c))
        _assert_trees_close(got, want)


def test_nonzero_initial_carry_is_not_skipped():
    """A Recurrence cell whose initial carry is not zero must run its first product."""
    with jax.enable_x64(True):
        cell, params, xs, _ = _setup("simple_rnn")
        shifted = cell._replace(initial_carry=lambda batch: jnp.full((batch, 4), 0.3))
        assert not zero_initial_carry(shifted)
        fast, plain = _loss(shifted, None, unroll=True), _loss(_plain(shifted), None, unroll=True)
        np.testing.assert_allclose(fast(params, xs), plain(params, xs), rtol=1e-12)
        _assert_trees_close(jax.grad(fast)(params, xs), jax.grad(plain)(params, xs))


def test_dense_custom_jvp_matches_matmul():
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        params = {"kernel": jnp.asarray(rng.standard_normal((4, 3))), "bias": jnp.ones(3)}
        x = jnp.asarray(rng.standard_normal((5, 2, 4)))

        def plain(p, x):
            return jnp.sum(jnp.tanh(x @ p["kernel"] + p["bias"][None, None]))

        fast = lambda p, x: jnp.sum(jnp.tanh(dense(p, x)))  # noqa: E731
        _assert_trees_close(jax.grad(fast, (0, 1))(params, x), jax.grad(plain, (0, 1))(params, x))
        t = jax.tree.map(jnp.cos, params)
        np.testing.assert_allclose(
            jax.jvp(lambda p: fast(p, x), (params,), (t,))[1],
            jax.jvp(lambda p: plain(p, x), (params,), (t,))[1], rtol=1e-12,
        )

        def hvp(f):
            return jax.jvp(jax.grad(lambda x: f(params, x)), (x,), (jnp.sin(x),))[1]

        np.testing.assert_allclose(hvp(fast), hvp(plain), rtol=1e-12)


def test_token_rows_are_one_hot_products_with_take_semantics():
    rng = np.random.default_rng(2)
    kernel = rng.standard_normal((5, 3)).astype(np.float32)
    tokens = np.array([[0, 4, 2], [1, 1, 3]])
    np.testing.assert_allclose(_rows(jnp.asarray(kernel), tokens), np.eye(5)[tokens] @ kernel,
                               rtol=1e-6)
    odd = np.array([-1, -5, -6, 5, 9])  # negatives count from the end; out of range is NaN
    got = np.asarray(_rows(jnp.asarray(kernel), odd))
    np.testing.assert_array_equal(got[:2], kernel[[4, 0]])
    assert np.isnan(got[2:]).all()
    weights = jnp.arange(3.0)[None, None]
    grad = jax.grad(lambda k: jnp.sum(_rows(k, tokens) * weights))(jnp.asarray(kernel))
    want = np.eye(5)[tokens].reshape(-1, 5).T @ np.tile(np.arange(3.0), (tokens.size, 1))
    np.testing.assert_allclose(grad, want, rtol=1e-6)


@pytest.mark.parametrize("seq_len", [2, 3])
def test_sampler_ring_buffer_short_windows(seq_len):
    """The ring buffer of T-1 rows against re-running the model on each rolled window."""
    from rnn_jax.models import rnn_classifier

    cell = cells.gru(8)
    model = rnn_classifier(cell, 7, 7)
    params = model.init(jax.random.PRNGKey(3))
    params["rnn"]["kernel"] = 4.0 * params["rnn"]["kernel"]
    params["rnn"]["bias"] = params["rnn"]["bias"] + 0.3  # a recurrent bias in the start step
    seeds = jnp.asarray(np.random.default_rng(seq_len).integers(0, 7, (3, seq_len)))
    out = np.asarray(make_sampler(cell, 12)(params, seeds))
    predict = jax.jit(lambda w: jnp.argmax(model.apply(params, w[None])[0]))
    for seed, got in zip(np.asarray(seeds), out, strict=True):
        window, want = list(seed), []
        for _ in range(12):
            want.append(int(predict(jnp.asarray(window))))
            window = window[1:] + [want[-1]]
        assert got.tolist() == want


def test_sampler_argmax_is_jnp_argmax():
    """Ties give the first maximum, NaN gives the first NaN, as ``jnp.argmax``."""
    from rnn_jax.sample import _argmax

    rng = np.random.default_rng(4)
    logits = rng.integers(0, 4, (200, 6)).astype(np.float32)  # many ties
    logits[rng.random(200) < 0.2, 2] = np.nan
    logits[rng.random(200) < 0.2, 4] = np.nan
    logits[rng.random(200) < 0.2, 0] = -np.inf
    np.testing.assert_array_equal(_argmax(jnp.asarray(logits)), np.argmax(logits, axis=-1))
