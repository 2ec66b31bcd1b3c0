"""Cells for long memory (DESIGN.md §6): chrono initialisation, the layer-normalised LSTM,
IndRNN and expRNN against float64 NumPy written from the equations; their initialisations and
constraints; and every tool of the library (unroll, the probes, the sampler, the trainer, the
linen layer) running them."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import optax
import pytest

import rnn_jax
from rnn_jax import cells
from rnn_jax.linen import RNN

T_MAX = 50.0
MAX_LENGTH = 20
BOUND = 2.0 ** (1.0 / MAX_LENGTH)
SEQUENTIAL = rnn_jax.ScanType.SEQUENTIAL


def _gru_ref(reset_after):
    return lambda p, h, x: ref.gru_step(p, h, x, reset_after=reset_after)


def _indrnn_ref(bound):
    return lambda p, h, x: ref.indrnn_step(p, h, x, bound)


# name: (factory(units), reference step (params, carry, x) -> (carry, y), LSTM-shaped carry)
VARIANTS = {
    "lstm_chrono": (lambda u: cells.lstm(u, chrono_t_max=T_MAX), ref.lstm_step, True),
    "gru_chrono": (lambda u: cells.gru(u, chrono_t_max=T_MAX), _gru_ref(True), False),
    "gru_chrono_reset_before": (
        lambda u: cells.gru(u, reset_after=False, chrono_t_max=T_MAX),
        _gru_ref(False),
        False,
    ),
    "lstm_layer_norm": (lambda u: cells.lstm(u, layer_norm=True), ref.ln_lstm_step, True),
    "lstm_layer_norm_chrono": (
        lambda u: cells.lstm(u, layer_norm=True, chrono_t_max=T_MAX),
        ref.ln_lstm_step,
        True,
    ),
    "indrnn": (lambda u: cells.indrnn(u, max_length=MAX_LENGTH), _indrnn_ref(BOUND), False),
    "indrnn_recurrent_max": (lambda u: cells.indrnn(u, recurrent_max=1.0), _indrnn_ref(1.0), False),
    "exp_rnn": (cells.exp_rnn, ref.exp_rnn_step, False),
}
# The cells walked through every tool: each new recurrence once. Chrono changes only the
# initial bias of LSTM and GRU, which the rest of the suite walks through every tool; here it
# comes with the layer-normalised LSTM (their params are drawn by the cell's own init).
TOOLS = ["lstm_layer_norm_chrono", "indrnn", "exp_rnn"]


def random_params(cell, input_dim, rng, scale=0.5):
    """Float64 params of the cell's shapes, every entry random (so a zero hides nothing). IndRNN's
    recurrent vector is drawn wide, so that some entries lie past its bound and are clipped."""
    shapes = jax.eval_shape(lambda key: cell.init(key, input_dim), jax.random.PRNGKey(0))
    params = {k: scale * rng.standard_normal(s.shape) for k, s in shapes.items()}
    if "recurrent_kernel" in params and params["recurrent_kernel"].ndim == 1:
        u = params["recurrent_kernel"]  # |u| log-normal about 1.1: some past 2^(1/20), some not
        params["recurrent_kernel"] = 1.1 * np.sign(u) * np.exp(0.3 * rng.standard_normal(u.shape))
    return params


def to_jax(tree, dtype=jnp.float64):
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)


def _carry(lstm_like, tree):
    return cells.LSTMCarry(*tree) if lstm_like else tree


def _close(got, want, tol, where=""):
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got) == len(want), where
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), w, rtol=tol, atol=tol, err_msg=where)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_unroll_matches_numpy_float64(variant):
    """``unroll`` against the float64 reference loop: every output and the final carry, from
    zeros and from a given carry, forwards and reversed, and with ``lengths`` (each sequence run
    alone up to its length; outputs zero past it). ``ScanType.SEQUENTIAL`` gives the same
    numbers as the default: on every configuration without lengths for a :class:`Recurrence`
    (chrono LSTM/GRU take the fused path), on one for the plain ``recur`` functions (the
    readable scan either way)."""
    factory, step, lstm_like = VARIANTS[variant]
    units, input_dim, batch, time = 4, 3, 3, 6
    cell = factory(units)
    rng = np.random.default_rng(0)
    params = random_params(cell, input_dim, rng)
    if variant.startswith("indrnn"):
        u, bound = np.abs(params["recurrent_kernel"]), BOUND if variant == "indrnn" else 1.0
        assert np.any(u > bound) and np.any(u < bound)  # the clip is exercised both ways
    xs = rng.standard_normal((batch, time, input_dim))
    zero = ref.keras_initial_carry("lstm" if lstm_like else "gru", batch, units)
    carry0 = jax.tree.map(lambda c: rng.standard_normal(c.shape), zero)
    lengths = np.array([time, 3, 1])
    run = lambda carry, xs, reverse=False: ref.run(
        lambda c, x: step(params, c, x), carry, xs, reverse
    )

    want = {
        "given": run(carry0, xs),
        "zeros, reverse": run(zero, xs, reverse=True),
        "given, reverse": run(carry0, xs, reverse=True),
    }
    for reverse in (False, True):
        cut = [
            run(jax.tree.map(lambda c: c[:1], zero), xs[b : b + 1, :n], reverse)
            for b, n in enumerate(lengths)
        ]
        want[f"lengths, reverse={reverse}"] = cut
    fast_path = isinstance(cell.recur, cells.Recurrence)

    with jax.enable_x64(True):

        @jax.jit
        def ours(params, xs, carry0):
            u = lambda *a, **k: rnn_jax.unroll(cell, params, xs, *a, return_sequences=True, **k)
            last = lambda **k: rnn_jax.unroll(cell, params, xs, carry0, **k)[1]
            out = {
                "given": u(carry0),
                "zeros, reverse": u(reverse=True),
                "given, reverse": u(carry0, reverse=True),
                "last": last(),
                "lengths, reverse=False": u(lengths=jnp.asarray(lengths)),
                "lengths, reverse=True": u(lengths=jnp.asarray(lengths), reverse=True),
            }
            readable = {"given": u(carry0, scan=SEQUENTIAL)}
            if fast_path:
                readable["zeros, reverse"] = u(reverse=True, scan=SEQUENTIAL)
                readable["given, reverse"] = u(carry0, reverse=True, scan=SEQUENTIAL)
                readable["last"] = last(scan=SEQUENTIAL)
            return out, readable

        out, readable = ours(to_jax(params), to_jax(xs), _carry(lstm_like, to_jax(carry0)))

    assert out["given"][1].dtype == jnp.float64
    for where in ("given", "zeros, reverse", "given, reverse"):
        _close(out[where], want[where], 1e-10, where)
    _close(out["last"], want["given"][1][:, -1], 1e-10, "last")
    for reverse in (False, True):
        where = f"lengths, reverse={reverse}"
        final, ys = out[where]
        for b, (n, (want_final, want_ys)) in enumerate(zip(lengths, want[where], strict=True)):
            _close(jax.tree.map(lambda c, b=b: c[b : b + 1], final), want_final, 1e-10, where)
            _close(ys[b : b + 1, :n], want_ys, 1e-10, where)
            np.testing.assert_array_equal(ys[b, n:], 0.0)
    for where, value in readable.items():
        _close(value, out[where], 1e-12 if fast_path else 0.0, f"SEQUENTIAL, {where}")


def test_activations_match_numpy_float64():
    """``cell.activations`` of the layer-normalised LSTM on the prepared params: its gates and
    tanh units (``cell_tanh`` is ``tanh(LN(c_t))``)."""
    factory, _, _ = VARIANTS["lstm_layer_norm"]
    units, input_dim, batch = 4, 3, 2
    cell = factory(units)
    rng = np.random.default_rng(5)
    params = random_params(cell, input_dim, rng, scale=1.0)
    x = rng.standard_normal((batch, input_dim))
    carry = (rng.standard_normal((batch, units)), rng.standard_normal((batch, units)))
    want = ref.ln_lstm_parts(params, carry, x)[1]
    with jax.enable_x64(True):
        p = to_jax(params)
        got = cell.activations(
            cell.prepare(p), cells.LSTMCarry(*to_jax(carry)), cell.project(p, to_jax(x))
        )
    assert jax.tree.map(np.shape, got) == jax.tree.map(np.shape, want)
    _close(got, want, 1e-12)


def _indrnn_twin(p):
    u = np.clip(p["recurrent_kernel"], -BOUND, BOUND)
    return {"kernel": p["kernel"], "recurrent_kernel": np.diag(u), "bias": p["bias"]}


def _exp_rnn_twin(p):
    a = p["recurrent_skew"]
    recurrent = ref.expm_skew(a - a.T)
    return {"kernel": p["kernel"], "recurrent_kernel": recurrent, "bias": np.zeros(len(a))}


# name: (the pre-activation z (params, h, x), the step's h from z (params, z), the params of a
# tanh SimpleRNN whose pre-activation is the same z), all float64 NumPy from the equations.
UNBOUNDED = {
    "indrnn": (
        lambda p, h, x: ref.indrnn_pre_activation(p, h, x, BOUND),
        lambda p, z: np.maximum(z, 0.0),
        _indrnn_twin,
    ),
    "exp_rnn": (ref.exp_rnn_pre_activation, lambda p, z: ref.modrelu(z, p["bias"]), _exp_rnn_twin),
}


@pytest.mark.parametrize("variant", sorted(UNBOUNDED))
def test_unbounded_cells_report_no_saturation(variant):
    """ReLU (IndRNN) and modReLU (expRNN) have no bound to saturate at: ``cell.activations``
    names no gate and no tanh unit and ``saturation`` reports nothing, at pre-activations (float64
    NumPy from the equations, checked against the cell's own step) large enough that most tanh
    units would be saturated there. A tanh SimpleRNN with the very same pre-activations reports
    its tanh units: their values, and per step the saturated fraction of the reference loop."""
    factory, _, _ = VARIANTS[variant]
    pre_activation, activate, twin_params = UNBOUNDED[variant]
    units, input_dim, batch, time = 4, 3, 3, 5
    cell, twin = factory(units), cells.simple_rnn(units)
    rng = np.random.default_rng(7)
    params = random_params(cell, input_dim, rng, scale=1.0)
    x, h = 8.0 * rng.standard_normal((batch, input_dim)), rng.standard_normal((batch, units))
    xs = 8.0 * rng.standard_normal((batch, time, input_dim))
    z = pre_activation(params, h, x)
    assert np.mean(np.abs(np.tanh(z)) > 0.9) > 0.5
    tparams = twin_params(params)

    with jax.enable_x64(True):

        @jax.jit
        def run(p, tp, h, x, xs):
            prepared, zx = cell.prepare(p), cell.project(p, x)
            return (
                cell.recur(prepared, h, zx)[1],
                cell.activations(prepared, h, zx),
                twin.activations(tp, h, twin.project(tp, x)),
                rnn_jax.saturation(cell, p, xs),
                rnn_jax.saturation(twin, tp, xs),
            )

        step, acts, twin_acts, sat, twin_sat = run(
            to_jax(params), to_jax(tparams), to_jax(h), to_jax(x), to_jax(xs)
        )

    _close(step, activate(params, z), 1e-12)  # z is the cell's pre-activation
    assert acts == {"gates": {}, "tanh": {}}
    assert sat == {}
    assert jax.tree.map(np.shape, twin_acts) == {"gates": {}, "tanh": {"tanh": z.shape}}
    _close(twin_acts["tanh"]["tanh"], np.tanh(z), 1e-12)
    _, hs = ref.run(lambda c, x: ref.simple_rnn_step(tparams, c, x), np.zeros((batch, units)), xs)
    want = np.mean(np.abs(hs) > 0.9, axis=-1)  # (batch, time)
    assert sorted(twin_sat) == ["tanh", "tanh_units"] and 0.0 < want.mean() < 1.0
    _close(twin_sat["tanh_units"], want, 1e-12)


@pytest.mark.parametrize("variant", TOOLS)
def test_step_is_recur_of_prepare_and_project(variant):
    """``step(p, c, x) == recur(prepare(p), c, project(p, x))``; tokens read as one-hot rows."""
    factory, _, _ = VARIANTS[variant]
    units, vocab = 3, 5
    cell = factory(units)
    params = to_jax(random_params(cell, vocab, np.random.default_rng(2)), jnp.float32)
    tokens = jnp.array([0, 3, 4, 1])

    @jax.jit
    def both(params, tokens):
        one_hot = jax.nn.one_hot(tokens, vocab)
        carry = jax.tree.map(lambda a: a + 0.3, cell.initial_carry(4))
        split = cell.recur(cell.prepare(params), carry, cell.project(params, tokens))
        projections = cell.project(params, tokens), cell.project(params, one_hot)
        return projections, cell.step(params, carry, one_hot), split

    projections, stepped, split = both(params, tokens)
    _close(*projections, 1e-6)
    _close(stepped, split, 1e-6)
    assert stepped[1].shape == (4, units)


# --- Chrono initialisation (Tallec & Ollivier 2018) ---------------------------------------------


def _ks_uniform(u, low, high):
    """Kolmogorov–Smirnov distance between the sample ``u`` and ``U[low, high]``."""
    u = np.sort(u)
    cdf = (u - low) / (high - low)
    n = len(u)
    return max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))


def _check_log_uniform(b, t_max):
    """``exp(b)`` is a ``U[1, t_max - 1]`` sample: its range, a KS test, its mean and spread."""
    u = np.exp(np.asarray(b, np.float64))
    n = len(u)
    assert u.min() >= 1.0 - 1e-6 and u.max() <= t_max - 1.0 + 1e-4
    assert u.min() < 1.0 + 0.02 * t_max and u.max() > t_max - 1.0 - 0.02 * t_max
    assert _ks_uniform(u, 1.0, t_max - 1.0) < 1.63 / math.sqrt(n)  # the 1 % level
    sd = (t_max - 2.0) / math.sqrt(12.0)
    assert abs(u.mean() - t_max / 2.0) < 4.0 * sd / math.sqrt(n)
    assert abs(u.std() / sd - 1.0) < 0.1


def test_chrono_initialisation():
    """LSTM: ``b_f = ln u``, ``u ~ U[1, T_max - 1]`` per unit, ``b_i = -b_f``, the other blocks
    0; GRU: ``b_z = ln u`` (input row of the reset-after ``(2, 3u)`` bias), the rest 0. The
    kernels are those of the same key without chrono. Layer norm composes with it."""
    units, t_max = 1000, 100.0
    # Identity recurrent kernels: the orthogonal one's QR compiles slowly and says nothing here
    # (both kernels come from the one split of the key, so an unchanged kernel shows it).
    kw = {"recurrent_init": "identity"}
    chrono = {**kw, "chrono_t_max": t_max}
    factories = {
        "lstm": lambda: cells.lstm(units, **chrono),
        "lstm_ln": lambda: cells.lstm(units, layer_norm=True, **chrono),
        "gru": lambda: cells.gru(units, **chrono),
        "gru_before": lambda: cells.gru(units, reset_after=False, **chrono),
        "lstm_plain": lambda: cells.lstm(units, **kw),
        "gru_plain": lambda: cells.gru(units, **kw),
    }
    draw = jax.jit(lambda key: {name: make().init(key, 1) for name, make in factories.items()})
    p = jax.tree.map(np.asarray, draw(jax.random.PRNGKey(0)))
    other = jax.tree.map(np.asarray, draw(jax.random.PRNGKey(1)))

    b_i, b_f, b_c, b_o = np.split(p["lstm"]["bias"], 4)
    _check_log_uniform(b_f, t_max)
    np.testing.assert_array_equal(b_i, -b_f)
    np.testing.assert_array_equal(np.concatenate([b_c, b_o]), 0.0)
    assert not np.allclose(b_f, np.split(other["lstm"]["bias"], 4)[1])  # another key, other draws
    np.testing.assert_array_equal(p["lstm_ln"]["bias"], p["lstm"]["bias"])
    np.testing.assert_array_equal(p["lstm"]["kernel"], p["lstm_plain"]["kernel"])
    np.testing.assert_array_equal(p["gru"]["kernel"], p["gru_plain"]["kernel"])

    assert p["gru"]["bias"].shape == (2, 3 * units)
    _check_log_uniform(p["gru"]["bias"][0, :units], t_max)
    np.testing.assert_array_equal(p["gru"]["bias"][0, units:], 0.0)
    np.testing.assert_array_equal(p["gru"]["bias"][1], 0.0)
    assert p["gru_before"]["bias"].shape == (3 * units,)
    _check_log_uniform(p["gru_before"]["bias"][:units], t_max)
    np.testing.assert_array_equal(p["gru_before"]["bias"][units:], 0.0)


def test_chrono_bias_follows_its_own_t_max():
    """The forget biases ``chrono_t_max=T`` draws pass the check above for ``T`` and fail it
    for any other ``T`` (too narrow, too wide), for LSTM and GRU: the law follows the argument
    (and the check has the power to tell)."""
    units, t_maxes = 2000, (20.0, 100.0, 500.0)
    kw = {"recurrent_init": "identity"}

    @jax.jit
    def forget_biases(key):
        out = {}
        for t in t_maxes:
            lstm = cells.lstm(units, chrono_t_max=t, **kw).init(key, 1)["bias"]
            gru = cells.gru(units, chrono_t_max=t, **kw).init(key, 1)["bias"]
            out[("lstm", t)], out[("gru", t)] = lstm[units : 2 * units], gru[0, :units]
        return out

    for (_, drawn_at), b in forget_biases(jax.random.PRNGKey(3)).items():
        _check_log_uniform(b, drawn_at)
        for checked_at in set(t_maxes) - {drawn_at}:
            with pytest.raises(AssertionError):
                _check_log_uniform(b, checked_at)


@pytest.mark.parametrize("bad", [2, 2.0, 1.5, -5.0, float("nan"), float("inf"), "10", True])
def test_chrono_t_max_validated(bad):
    for factory in (cells.lstm, cells.gru):
        with pytest.raises(ValueError, match=f"chrono_t_max={bad!r}"):
            factory(4, chrono_t_max=bad)


def test_layer_norm_init():
    """Each LN starts as the identity normalisation: gains 1, shifts 0; the Keras bias kept."""
    params = cells.lstm(5, layer_norm=True, forget_bias=2.0).init(jax.random.PRNGKey(0), 3)
    plain = cells.lstm(5, forget_bias=2.0).init(jax.random.PRNGKey(0), 3)
    for name, width in (("input", 20), ("recurrent", 20), ("cell", 5)):
        np.testing.assert_array_equal(params[f"{name}_norm_scale"], np.ones(width))
        np.testing.assert_array_equal(params[f"{name}_norm_bias"], np.zeros(width))
    for name in plain:
        np.testing.assert_array_equal(params[name], plain[name])
    assert len(params) == 9


# --- IndRNN (Li et al. 2018) ---------------------------------------------------------------------


def test_indrnn_recurrent_weights_bounded():
    """Whatever the params, ``|u_effective| ≤ 2^{1/T}`` (or ``recurrent_max``): inside entries
    unchanged, outside ones at the bound with their sign; every step Jacobian is diagonal with
    entries at most the bound, and over ``T`` steps their product grows at most by 2."""
    rng = np.random.default_rng(0)
    for kwargs, bound in (
        ({"max_length": 1}, 2.0),
        ({"max_length": 1000}, 2.0**1e-3),
        ({"recurrent_max": 0.3}, 0.3),
    ):
        cell = cells.indrnn(64, **kwargs)
        u = jnp.asarray(3.0 * rng.standard_normal(64), jnp.float32)
        eff = np.asarray(cell.prepare({"recurrent_kernel": u})["recurrent_kernel"], np.float64)
        u = np.asarray(u, np.float64)
        assert np.all(np.abs(eff) <= bound * (1 + 1e-7))
        inside = np.abs(u) <= bound
        assert 0 < inside.sum() < 64 or bound == 2.0
        np.testing.assert_array_equal(eff[inside], u[inside])
        np.testing.assert_allclose(eff[~inside], np.sign(u[~inside]) * bound, rtol=1e-7)
        drawn = np.asarray(cell.init(jax.random.PRNGKey(1), 2)["recurrent_kernel"])
        assert drawn.min() >= 0.0 and drawn.max() <= bound and drawn.max() > 0.8 * bound

    unbounded = cells.indrnn(8)
    u = {"recurrent_kernel": jnp.full((8,), 7.0)}
    np.testing.assert_array_equal(unbounded.prepare(u)["recurrent_kernel"], 7.0)

    # T steps with every |u| far past the bound, inputs that keep every unit active.
    time = 50
    cell = cells.indrnn(6, max_length=time)
    params = {
        "kernel": jnp.abs(jnp.asarray(rng.standard_normal((2, 6)), jnp.float32)),
        "recurrent_kernel": jnp.full((6,), 10.0),
        "bias": jnp.full((6,), 0.1),
    }
    xs = jnp.abs(jnp.asarray(rng.standard_normal((2, time, 2)), jnp.float32))
    probes = jax.jit(
        lambda p, xs: (rnn_jax.step_jacobians(cell, p, xs), rnn_jax.jacobian_norms(cell, p, xs))
    )
    jac, jac_norms = probes(params, xs)
    jac = np.asarray(jac)
    np.testing.assert_allclose(
        jac, np.broadcast_to(np.float32(2.0 ** (1 / time)) * np.eye(6), jac.shape), rtol=1e-6
    )
    log_product = np.asarray(jac_norms["log_product_norm"])
    np.testing.assert_allclose(log_product[:, 0], (time - 1) / time * np.log(2.0), rtol=1e-4)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"max_length": 0}, "max_length=0"),
        ({"max_length": 2.5}, "max_length=2.5"),
        ({"recurrent_max": 0.0}, "recurrent_max=0.0"),
        ({"recurrent_max": float("nan")}, "recurrent_max=nan"),
        ({"max_length": 10, "recurrent_max": 1.0}, "max_length=10 and recurrent_max=1.0"),
    ],
)
def test_indrnn_bad_options(kwargs, name):
    with pytest.raises(ValueError, match=name):
        cells.indrnn(4, **kwargs)


# --- expRNN (Lezcano-Casado & Martínez-Rubio 2019) ----------------------------------------------


def _orthogonality_error(r):
    r = np.asarray(r, np.float64)
    return np.abs(r.T @ r - np.eye(r.shape[0])).max()


def test_exp_rnn_orthogonal_and_norm_preserving():
    """``R = expm(A - Aᵀ)`` orthogonal to 1e-5 (float32) for random ``A``; the linear part
    ``h ↦ h R`` has every singular value 1; with every modReLU active (``b ≥ 0``) so does the
    whole step's Jacobian (:func:`rnn_jax.step_jacobians`)."""
    units = 16
    cell = cells.exp_rnn(units)
    rng = np.random.default_rng(0)
    scales = np.array([0.1, 1.0, 3.0])[:, None, None]
    skews = jnp.asarray(scales * rng.standard_normal((3, units, units)), jnp.float32)
    hs = jnp.asarray(rng.standard_normal((3, units)), jnp.float32)
    params = cell.init(jax.random.PRNGKey(0), 3)
    params = dict(
        params, bias=jnp.abs(params["bias"]), recurrent_skew=params["recurrent_skew"] + 0.3
    )
    xs = jnp.asarray(rng.standard_normal((2, 5, 3)), jnp.float32)

    @jax.jit
    def run(skews, hs, params, xs):
        bias = jnp.zeros(units)
        rs = jax.vmap(lambda a: cell.prepare({"recurrent_skew": a, "bias": bias}))(skews)
        rs = rs["recurrent_kernel"]
        linear = jax.vmap(lambda r, h: jax.jacfwd(lambda h: h @ r)(h))(rs, hs)
        return rs, linear, rnn_jax.step_jacobians(cell, params, xs)

    rs, linear, steps = jax.tree.map(
        lambda a: np.asarray(a, np.float64), run(skews, hs, params, xs)
    )
    for r, jac, scale in zip(rs, linear, scales.ravel(), strict=True):
        assert _orthogonality_error(r) < 1e-5, scale
        np.testing.assert_allclose(np.linalg.svd(jac, compute_uv=False), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.svd(steps, compute_uv=False), 1.0, atol=1e-5)


def test_exp_rnn_henaff_init():
    """``A - Aᵀ`` is block diagonal with 2×2 blocks ``[[0, s], [-s, 0]]``, so ``R`` rotates each
    pair of units by ``s``; the eigen-angles ``|s|`` spread over ``(0, π)``. He-normal kernel,
    modReLU bias in ``[-0.01, 0.01]``."""
    units, input_dim = 128, 400
    cell = cells.exp_rnn(units)
    params, prepared = jax.jit(lambda key: (p := cell.init(key, input_dim), cell.prepare(p)))(
        jax.random.PRNGKey(0)
    )
    params = jax.tree.map(np.asarray, params)
    r = np.asarray(prepared["recurrent_kernel"], np.float64)
    a = params["recurrent_skew"]
    s = a[np.arange(0, units, 2), np.arange(1, units, 2)]
    assert np.count_nonzero(a) == units // 2
    want = np.zeros((units, units))
    for k, angle in enumerate(s):
        want[2 * k : 2 * k + 2, 2 * k : 2 * k + 2] = [
            [np.cos(angle), np.sin(angle)],
            [-np.sin(angle), np.cos(angle)],
        ]
    np.testing.assert_allclose(r, want, atol=2e-6)
    angles = np.abs(np.angle(np.linalg.eigvals(r)))
    assert angles.min() > 0.0 and angles.max() < np.pi
    assert _ks_uniform(np.abs(s), 0.0, np.pi) < 1.63 / math.sqrt(len(s))
    kernel = params["kernel"]
    assert (
        abs(kernel.std() / math.sqrt(2.0 / input_dim) - 1.0) < 0.02 and abs(kernel.mean()) < 0.002
    )
    assert np.abs(params["bias"]).max() <= 0.01 and np.abs(params["bias"]).max() > 0.009


def test_exp_rnn_stays_orthogonal_under_rmsprop():
    """Plain RMSprop steps on ``A``: ``R`` stays orthogonal to 1e-5, ``A`` (off its diagonal,
    which does not enter ``R``) moves and the loss goes down."""
    cell = cells.exp_rnn(8)
    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.standard_normal((4, 10, 3)), jnp.float32)
    target = jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)
    opt = optax.rmsprop(0.05)

    def loss(params):
        _, ys = rnn_jax.unroll(cell, params, xs)
        return jnp.mean(jnp.square(ys - target))

    @jax.jit
    def train_step(params, opt_state):
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, value, cell.prepare(params)["recurrent_kernel"]

    params = cell.init(jax.random.PRNGKey(0), 3)
    start, opt_state, losses = params, opt.init(params), []
    for _ in range(8):
        params, opt_state, value, r = train_step(params, opt_state)
        losses.append(float(value))
        assert _orthogonality_error(r) < 1e-5
    moved = np.asarray(params["recurrent_skew"] != start["recurrent_skew"])
    assert moved[~np.eye(8, dtype=bool)].all() and not moved[np.eye(8, dtype=bool)].any()
    assert losses[-1] < losses[0]


# --- Every tool runs every new cell --------------------------------------------------------------

V, TIME, UNITS = 7, 6, 5


@pytest.mark.parametrize("variant", TOOLS)
def test_probes(variant):
    """unroll on tokens equals unroll on their one-hot rows; ``carry_gradient_norms`` reads the
    loss of ``unroll``'s output (``‖∂L/∂h_T‖ = ‖h_T‖`` for ``L = ‖h_T‖²/2``); ``jacobian_norms``'
    last step norm is the top singular value of ``jax.jacfwd`` of ``cell.step`` there (which
    prepares the params itself); ``saturation`` names the cell's activations (none for
    ReLU/modReLU)."""
    factory, _, lstm_like = VARIANTS[variant]
    cell = factory(UNITS)
    params = to_jax(random_params(cell, V, np.random.default_rng(3)), jnp.float32)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, V, (3, TIME)), jnp.int32)

    def unroll_to_last(params, tokens):
        carry, _ = rnn_jax.unroll(cell, params, tokens[:1, :-1])
        return jax.tree.map(lambda c: c[0], carry)

    def last_step(carry):
        new, _ = cell.step(params, jax.tree.map(lambda c: c[None], carry), tokens[:1, -1])
        return jax.tree.map(lambda c: c[0], new)

    @jax.jit
    def probes(params, tokens):
        loss_fn = lambda ys: 0.5 * jnp.sum(ys**2, axis=-1)
        return (
            rnn_jax.unroll(cell, params, tokens),
            rnn_jax.unroll(cell, params, jax.nn.one_hot(tokens, V)),
            rnn_jax.carry_gradient_norms(cell, params, tokens, loss_fn),
            jax.jacfwd(last_step)(unroll_to_last(params, tokens)),
            rnn_jax.jacobian_norms(cell, params, tokens),
            rnn_jax.saturation(cell, params, tokens),
        )

    by_tokens, by_rows, (loss, norms), jacobian, jac_norms, sat = probes(params, tokens)
    _close(by_tokens, by_rows, 1e-5)
    _, y = by_tokens
    np.testing.assert_allclose(loss, 0.5 * np.sum(np.asarray(y) ** 2, axis=-1), rtol=1e-5)
    h_norms = cell.hidden(norms)
    assert h_norms.shape == (3, TIME) and np.all(np.isfinite(np.asarray(h_norms)))
    np.testing.assert_allclose(h_norms[:, -1], np.linalg.norm(np.asarray(y), axis=-1), rtol=1e-5)
    # The carry flattened h then c, as jacobian_norms does.
    blocks = (
        [[jacobian.h.h, jacobian.h.c], [jacobian.c.h, jacobian.c.c]] if lstm_like else [[jacobian]]
    )
    top = np.linalg.svd(np.block(jax.tree.map(np.asarray, blocks)), compute_uv=False)[0]
    assert jac_norms["step_norm"].shape == (3, TIME)
    np.testing.assert_allclose(jac_norms["step_norm"][0, -1], top, rtol=1e-4)
    # J_t = diag(active) Rᵀ for expRNN (modReLU' is 0 or 1), diag(active ⊙ u) for IndRNN.
    step_bound = {"exp_rnn": 1.0 + 1e-5, "indrnn": BOUND * (1 + 1e-6)}.get(variant, np.inf)
    assert np.all(np.asarray(jac_norms["step_norm"]) <= step_bound)
    if lstm_like:
        want = ["candidate", "cell_tanh", "forget_gate", "gates", "input_gate", "output_gate"]
        assert sorted(sat) == [*want, "tanh_units"]
        assert all(float(s.min()) >= 0.0 and float(s.max()) <= 1.0 for s in sat.values())
        assert 0.0 < float(jnp.mean(sat["gates"])) < 1.0
    else:
        assert sat == {}


@pytest.mark.parametrize("variant", TOOLS)
def test_sampler_matches_rolling_window(variant):
    """``make_sampler`` on ``sequence_classifier(cell, V, V)``: the tokens of re-running the
    model on each rolled window (the tutorial's loop)."""
    factory, _, _ = VARIANTS[variant]
    cell = factory(16)
    model = rnn_jax.sequence_classifier(cell, V, V)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    rng = np.random.default_rng(6)
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), jnp.float32), shapes)
    params["rnn"]["kernel"] = 4.0 * params["rnn"]["kernel"]  # the greedy path moves around
    params["dense"] = {"kernel": 3.0 * params["dense"]["kernel"], "bias": jnp.zeros(V)}
    seeds = jnp.asarray(rng.integers(0, V, (3, 4)))
    out = np.asarray(rnn_jax.make_sampler(cell, 10)(params, seeds))
    predict = jax.jit(lambda window: model.apply(params, window[None])[0])
    for seed, got in zip(np.asarray(seeds), out, strict=True):
        want = ref.greedy_rolling(lambda w: np.asarray(predict(jnp.asarray(w))), seed.tolist(), 10)
        assert got.tolist() == want
    assert len(set(out.ravel().tolist())) > 2


@pytest.mark.parametrize("variant", TOOLS)
def test_train_epoch_and_linen(variant):
    """One ``make_train_step`` update of a token classifier moves every param (expRNN: ``A``
    off its diagonal, which does not enter ``R``; IndRNN: but for units silent on the whole
    batch); ``linen.RNN(cell=...)`` draws the cell's params and computes ``unroll``."""
    factory, _, _ = VARIANTS[variant]
    cell = factory(UNITS)
    rng = np.random.default_rng(9)
    data = (
        jnp.asarray(rng.integers(0, V, (12, TIME)), jnp.int32),
        jnp.asarray(rng.integers(0, V, (12,)), jnp.int32),
    )
    model = rnn_jax.sequence_classifier(cell, V, V)

    def loss_fn(params, batch):
        xs, labels = batch
        return rnn_jax.softmax_cross_entropy(model.apply(params, xs), labels), {}

    opt = rnn_jax.rmsprop(1e-2)
    step = rnn_jax.make_train_step(loss_fn, opt)
    params = jax.jit(model.init)(jax.random.PRNGKey(0))
    state, metrics = step(rnn_jax.create_train_state(params, opt, jax.random.PRNGKey(1)), data)
    assert bool(metrics["finite"]) and int(state.step) == 1
    for name, before in params["rnn"].items():
        moved = np.asarray(before != state.params["rnn"][name])
        if name == "recurrent_skew":
            moved = moved[~np.eye(UNITS, dtype=bool)]
        # A ReLU unit silent on every example of the batch gets no gradient: most move.
        assert moved.mean() > (0.6 if variant == "indrnn" else 0.99), name

    layer = RNN(cell=cell, input_dim=V, return_sequences=True)

    @jax.jit
    def linen(tokens):
        variables = layer.init(jax.random.PRNGKey(2), tokens)
        _, want = rnn_jax.unroll(cell, variables["params"], tokens, return_sequences=True)
        return variables["params"], layer.apply(variables, tokens), want

    drawn, got, want = linen(data[0])
    assert jax.tree.map(jnp.shape, drawn) == jax.tree.map(jnp.shape, params["rnn"])
    _close(got, want, 1e-6)


# --- Gradients against finite differences (float64) ----------------------------------------------


@pytest.mark.parametrize("variant", ["exp_rnn"])
def test_gradients_match_finite_differences(variant):
    """Reverse mode through ``unroll`` (lengths, a given carry, reverse) and through ``prepare``
    (the matrix exponential) against central differences in random directions."""
    factory, _, _ = VARIANTS[variant]
    cell = factory(3)
    rng = np.random.default_rng(4)
    params0 = random_params(cell, 2, rng)
    xs0 = rng.standard_normal((2, 4, 2))
    lengths = np.array([4, 2])
    carry0 = jax.tree.map(lambda c: np.asarray(c) + 0.5, cell.initial_carry(2))
    with jax.enable_x64(True):
        primals = (to_jax(params0), to_jax(xs0), to_jax(carry0))

        def loss(params, xs, carry0):
            carry, ys = rnn_jax.unroll(
                cell, params, xs, carry0, lengths=lengths, reverse=True, return_sequences=True
            )
            return jnp.sum(jnp.sin(ys)) + sum(jnp.sum(c**2) for c in jax.tree.leaves(carry))

        grads = ref.assert_directional_derivatives(loss, primals, eps=1e-6, rtol=1e-6, atol=1e-8)
        assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads[0]))
