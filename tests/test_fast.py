"""The fast path (rnn_jax._fast) against the readable scan: values and every derivative.

``unroll(..., scan=ScanType.FUSED)`` (what ``AUTO``, the default, picks for it) runs a
:class:`rnn_jax.cells.Recurrence` through ``_fast.unroll_recurrence``: the zero first step peeled
(``_fast.step_from_zero``, the sampler's first step too), a custom JVP whose transpose forms the
recurrent kernel's gradient as one product. ``ScanType.SEQUENTIAL`` is the readable step-by-step
scan that JAX differentiates by itself. For every built-in cell and every unroll option the two
must agree in float32: outputs, reverse mode (params, inputs, carry), forward mode, second order
and ``vmap``. The GRU in its reset-before form is not a Recurrence: ``AUTO`` runs its readable
scan and ``FUSED`` is refused.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import cells
from rnn_jax._fast import matmul, step_from_zero, zero_initial_carry
from rnn_jax.cells import Recurrence, _rows
from rnn_jax.models import dense
from rnn_jax.scan import ScanType, unroll

FUSED, SEQUENTIAL = ScanType.FUSED, ScanType.SEQUENTIAL

VARIANTS = {
    "simple_rnn": lambda units: cells.simple_rnn(units),
    "simple_rnn_relu": lambda units: cells.simple_rnn(units, activation="relu"),
    "lstm": lambda units: cells.lstm(units),
    "gru": lambda units: cells.gru(units),
    "gru_reset_before": lambda units: cells.gru(units, reset_after=False),
}
# (a given initial carry?, unroll options): every pair of the binary options (given carry,
# reverse, return_sequences) occurs, the first is the tutorial's (zero carry, fully unrolled,
# last output), and unroll=2 meets both parities: with TIME = 3 the scan after a peeled zero
# first step runs 2 steps, from a given carry 3.
CASES = [
    (False, {"unroll": True}),
    (False, {"reverse": True, "return_sequences": True, "unroll": 2}),
    (True, {"return_sequences": True, "unroll": 1}),
    (True, {"reverse": True, "unroll": 2}),
]
# The relu SimpleRNN differs from the tanh one only in its gate: two complementary cases.
RELU_CASES = [CASES[0], (True, {"reverse": True, "return_sequences": True, "unroll": 2})]
# Per cell: its cases, the one whose second order is checked (None: none), whether reverse
# mode is also vmapped. Both compile slowly: second order on the two cells whose gates have
# several outputs, vmap once.
PLAN = {
    "simple_rnn": (CASES, None, True),
    "simple_rnn_relu": (RELU_CASES, None, False),
    "lstm": (CASES, 3, False),
    "gru": (CASES, 0, False),
}
TIME = 3
TOL = 1e-5


def _setup(variant, units=4, input_dim=3, batch=2, seed=0):
    """The cell and float32 random params (biases too, so a zero hides nothing), inputs, a
    carry, and tangents for all three."""
    cell = VARIANTS[variant](units)
    rng = np.random.default_rng(seed)

    def draw(tree, scale):
        return jax.tree.map(
            lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), jnp.float32), tree
        )

    params = draw(jax.eval_shape(lambda k: cell.init(k, input_dim), jax.random.PRNGKey(0)), 0.6)
    xs = draw(jax.ShapeDtypeStruct((batch, TIME, input_dim), jnp.float32), 1.0)
    carry = draw(jax.eval_shape(lambda: cell.initial_carry(batch)), 0.5)
    tangents = (draw(params, 1.0), draw(xs, 1.0), draw(carry, 1.0))
    return cell, params, xs, carry, tangents


def _derivatives(cell, case, scan, second_order, vmap, primals, tangents):
    """Outputs and derivatives of one unroll configuration, for one ``scan``."""
    given, options = case

    def run(params, xs, carry):
        return unroll(cell, params, xs, carry if given else None, scan=scan, **options)

    def loss(params, xs, carry):
        final, ys = run(params, xs, carry)
        return jnp.sum(jnp.sin(ys)) + sum(jnp.sum(c**2) for c in jax.tree.leaves(final))

    argnums = (0, 1, 2) if given else (0, 1)
    grad = jax.grad(loss, argnums)
    out = {
        "values and forward mode": jax.jvp(run, primals, tangents),
        "reverse mode": grad(*primals),
    }
    if given and not options.get("return_sequences"):
        # The inputs and carry alone: the kernel's and the recurrent bias's tangents are zero.
        out["reverse mode, inputs and carry only"] = jax.grad(loss, (1, 2))(*primals)
    if second_order:
        out["forward over reverse"] = jax.jvp(grad, primals, tangents)[1]
    if vmap:
        params, xs, carry = primals
        stacked = jax.tree.map(lambda p, t: jnp.stack([p, p + 0.1 * t]), params, tangents[0])
        out["vmap of reverse mode"] = jax.vmap(lambda p: grad(p, xs, carry))(stacked)
    return out


def _assert_close(got, want, tol, where):
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got) == len(want), where
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol, err_msg=where)


@pytest.mark.parametrize("variant", sorted(PLAN))
def test_fast_path_equals_readable_scan(variant):
    cell, params, xs, carry, tangents = _setup(variant)
    assert isinstance(cell.recur, Recurrence) and zero_initial_carry(cell)
    cases, second_order, vmap = PLAN[variant]

    @jax.jit
    def both(primals, tangents):
        return [
            [
                _derivatives(
                    cell, case, scan, i == second_order, vmap and i == 0, primals, tangents
                )
                for scan in (FUSED, SEQUENTIAL)
            ]
            for i, case in enumerate(cases)
        ]

    for (given, options), (fast, plain) in zip(cases, both((params, xs, carry), tangents)):
        assert set(fast) == set(plain)
        for key in fast:
            where = f"{variant}, {key}, carry={'given' if given else 'zeros'}, {options}"
            _assert_close(fast[key], plain[key], TOL, where)

    # Two different programs: FUSED adds the recurrence's custom JVP to the projection's, and
    # AUTO (the default) is FUSED, the same program; with lengths AUTO is SEQUENTIAL.
    def program(lengths=None, **scan):
        run = lambda p: unroll(cell, p, xs, lengths=lengths, **scan)
        return str(jax.make_jaxpr(run)(params))

    assert program(scan=FUSED).count("custom_jvp_call") > program(scan=SEQUENTIAL).count(
        "custom_jvp_call"
    )
    assert program() == program(scan=FUSED) != program(scan=SEQUENTIAL)
    lengths = jnp.array([TIME, 1])
    assert program(lengths) == program(lengths, scan=SEQUENTIAL)
    with pytest.raises(ValueError, match=r"scan=ScanType.FUSED needs.*no lengths.*lengths are"):
        unroll(cell, params, xs, lengths=lengths, scan=FUSED)


def test_fused_refuses_other_cells():
    """A ``recur`` that is not a Recurrence (GRU reset-before, a plain function) runs the
    readable scan by default (the same program as SEQUENTIAL); FUSED is refused with the
    scans that are available."""
    cell, params, xs, carry, _ = _setup("gru_reset_before")
    assert not isinstance(cell.recur, Recurrence)
    for given, options in CASES:

        def program(given=given, options=options, **scan):
            def run(params, xs, carry):
                return unroll(cell, params, xs, carry if given else None, **scan, **options)

            return str(jax.make_jaxpr(run)(params, xs, carry))

        assert program() == program(scan=SEQUENTIAL)
    message = (
        r"scan=ScanType.FUSED needs a cell whose recur is a rnn_jax.cells.Recurrence.*"
        r"available here ScanType.AUTO, ScanType.SEQUENTIAL$"
    )
    with pytest.raises(ValueError, match=message):
        unroll(cell, params, xs, scan=FUSED)


@pytest.mark.parametrize("variant", sorted(PLAN))
def test_step_from_zero_is_the_readable_step_from_zeros(variant):
    """The first step of the fused path and of the sampler, without ``0 @ U``, is ``recur``
    from the zero initial carry (with its product), the carry and the hidden state."""
    cell, params, xs, _, _ = _setup(variant)
    rec, zeros, zx = cell.recur, cell.initial_carry(2), cell.project(params, xs[:, 0])
    b_h = None if rec.recurrent_bias is None else rec.recurrent_bias(params)
    got = step_from_zero(rec, zeros, zx, b_h)
    want, y = rec(params, zeros, zx)
    _assert_close((got, cell.hidden(got)), (want, y), 1e-6, variant)
    assert np.any(np.asarray(y) != 0)


def test_nonzero_initial_carry_is_not_skipped():
    """A Recurrence cell whose initial carry is not zero runs its first product on the fast path."""
    cell, params, xs, _, _ = _setup("gru")
    shifted = cell._replace(initial_carry=lambda batch: jnp.full((batch, 4), 0.3))
    assert not zero_initial_carry(shifted)

    @jax.jit
    def both(params, xs):
        def loss(params, scan):
            final, ys = unroll(shifted, params, xs, return_sequences=True, scan=scan)
            return jnp.sum(jnp.sin(ys)) + jnp.sum(final**2)

        return [jax.value_and_grad(loss)(params, scan) for scan in (FUSED, SEQUENTIAL)]

    fast, plain = both(params, xs)
    _assert_close(fast, plain, 1e-5, "shifted initial carry")
    # And the carry counts: from zeros the numbers differ.
    zero = unroll(cell, params, xs, return_sequences=True, scan=SEQUENTIAL)[1]
    got = unroll(shifted, params, xs, return_sequences=True, scan=SEQUENTIAL)[1]
    assert np.max(np.abs(np.asarray(got) - np.asarray(zero))) > 1e-3


def test_matmul_custom_jvp_equals_plain_product():
    """``matmul`` (the projections' and the dense head's) against ``@``: grad, jvp, second order."""
    rng = np.random.default_rng(1)
    params = {
        "kernel": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
        "bias": jnp.ones(3),
    }
    x = jnp.asarray(rng.standard_normal((5, 2, 4)), jnp.float32)
    t = jax.tree.map(jnp.cos, params)

    def plain(p, x):
        return jnp.sum(jnp.tanh(x @ p["kernel"] + p["bias"][None, None]))

    def fast(p, x):
        return jnp.sum(jnp.tanh(dense(p, x)))

    @jax.jit
    def derivatives(p, x):
        out = []
        for f in (fast, plain):
            out.append(
                (
                    jax.grad(f, (0, 1))(p, x),
                    jax.jvp(lambda p: f(p, x), (p,), (t,))[1],
                    jax.jvp(jax.grad(lambda x: f(p, x)), (x,), (jnp.sin(x),))[1],
                    jax.jvp(jax.grad(lambda p: f(p, x)), (p,), (t,))[1],
                    # Only the kernel varies: the input's tangent is a symbolic zero.
                    jax.jvp(lambda k: matmul(x, k), (p["kernel"],), (t["kernel"],))[1],
                )
            )
        return out

    got, want = derivatives(params, x)
    _assert_close(got[:-1], want[:-1], 1e-5, "matmul")
    np.testing.assert_allclose(got[-1], x @ t["kernel"], rtol=1e-5, atol=1e-6)


def test_token_rows_are_one_hot_products_with_take_semantics():
    rng = np.random.default_rng(2)
    kernel = rng.standard_normal((5, 3)).astype(np.float32)
    tokens = np.array([[0, 4, 2], [1, 1, 3]])
    np.testing.assert_allclose(
        _rows(jnp.asarray(kernel), tokens), np.eye(5)[tokens] @ kernel, rtol=1e-6
    )
    odd = np.array([-1, -5, -6, 5, 9])  # negatives count from the end; out of range is NaN
    got = np.asarray(_rows(jnp.asarray(kernel), odd))
    np.testing.assert_array_equal(got[:2], kernel[[4, 0]])
    assert np.isnan(got[2:]).all()
    weights = jnp.arange(3.0)[None, None]
    grad = jax.grad(lambda k: jnp.sum(_rows(k, tokens) * weights))(jnp.asarray(kernel))
    want = np.eye(5)[tokens].reshape(-1, 5).T @ np.tile(np.arange(3.0), (tokens.size, 1))
    np.testing.assert_allclose(grad, want, rtol=1e-6)
