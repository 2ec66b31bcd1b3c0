"""minGRU, minLSTM and LRU against float64 NumPy written from DESIGN.md §6; the associative scan
against the sequential one (values and derivatives); the probes, sampler and trainer on them."""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest
from jax.test_util import check_grads

import rnn_jax
from rnn_jax import gradients, linear

NAMES = ["min_gru", "min_lstm", "lru"]
BATCH, TIME, INPUT_DIM, UNITS, STATE = 3, 9, 4, 5, 6
SEQUENTIAL, ASSOCIATIVE = rnn_jax.ScanType.SEQUENTIAL, rnn_jax.ScanType.ASSOCIATIVE


def _cell(name):
    if name == "lru":
        return linear.lru(UNITS, state_size=STATE)
    return getattr(linear, name)(UNITS)


# --- float64 NumPy references, from the equations ----------------------------------------------


def np_min_gru_step(p, h, x):
    """``z = σ(x W_z + b_z)``, ``h̃ = x W_h + b_h``, ``h = (1 − z) h + z h̃``."""
    a = x @ p["kernel"] + p["bias"]
    z, candidate = ref.sigmoid(a[:, :UNITS]), a[:, UNITS:]
    h = (1.0 - z) * h + z * candidate
    return h, h


def np_min_lstm_step(p, h, x):
    """``f, i = σ(·)``, ``h̃ = x W_h + b_h``, ``h = f/(f+i) h + i/(f+i) h̃``."""
    a = x @ p["kernel"] + p["bias"]
    f, i = ref.sigmoid(a[:, :UNITS]), ref.sigmoid(a[:, UNITS : 2 * UNITS])
    h = f / (f + i) * h + i / (f + i) * a[:, 2 * UNITS :]
    return h, h


def np_lru_parts(p):
    """``λ = exp(−exp(ν) + i exp(θ))``, ``γ = sqrt(1 − |λ|²)``, ``B``, ``C``, ``D`` (complex)."""
    lam = np.exp(-np.exp(p["nu_log"]) + 1j * np.exp(p["theta_log"]))
    gamma = np.sqrt(1.0 - np.abs(lam) ** 2)
    w = p["kernel"]
    b = w[:, :STATE] + 1j * w[:, STATE : 2 * STATE]
    c = p["output_kernel"][:STATE] + 1j * p["output_kernel"][STATE:]
    return lam, gamma, b, c, w[:, 2 * STATE :]


def np_lru_step(p, h, x):
    """``h = λ h + γ (x B)``, ``y = Re(h C) + x D``; ``h`` complex."""
    lam, gamma, b, c, d = np_lru_parts(p)
    h = lam * h + gamma * (x @ b)
    return h, np.real(h @ c) + x @ d


NP_STEPS = {"min_gru": np_min_gru_step, "min_lstm": np_min_lstm_step, "lru": np_lru_step}


def _np_carry(name, carry):
    return carry.re + 1j * carry.im if name == "lru" else carry


def _jax_carry(name, h):
    return (np.real(h), np.imag(h)) if name == "lru" else h


# --- helpers -----------------------------------------------------------------------------------


def _random_params(cell, rng, dtype=np.float32, scale=0.7):
    shapes = jax.eval_shape(lambda k: cell.init(k, INPUT_DIM), jax.random.PRNGKey(0))
    return jax.tree.map(lambda s: (scale * rng.standard_normal(s.shape)).astype(dtype), shapes)


def _random_carry(cell, rng, dtype=np.float32):
    shapes = jax.eval_shape(lambda: cell.initial_carry(BATCH))
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(dtype), shapes)


def _close(got, want, tol, where=""):
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got) == len(want), where
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol, err_msg=where)


# --- the cells against NumPy -------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_cells_match_numpy(name):
    """Every output and the final carry, float64: zero and given carries, reverse, lengths,
    both scans; integer tokens are one-hot rows."""
    cell, rng = _cell(name), np.random.default_rng(0)
    lengths = np.array([TIME, 4, 1])
    with jax.enable_x64(True):
        params = _random_params(cell, rng, np.float64)
        xs = rng.standard_normal((BATCH, TIME, INPUT_DIM))
        carry0 = _random_carry(cell, rng, np.float64)
        tokens = rng.integers(0, INPUT_DIM, (BATCH, TIME))

        @jax.jit
        def run(params, xs, carry0, tokens):
            out = {}
            for scan in (SEQUENTIAL, ASSOCIATIVE):
                kw = {"scan": scan, "return_sequences": True}
                for reverse in (False, True):
                    out[f"{scan} {reverse}"] = rnn_jax.unroll(
                        cell, params, xs, carry0, reverse=reverse, **kw
                    )
                out[f"{scan} zeros"] = rnn_jax.unroll(cell, params, xs, **kw)
                out[f"{scan} lengths"] = rnn_jax.unroll(cell, params, xs, lengths=lengths, **kw)
                out[f"{scan} tokens"] = (
                    rnn_jax.unroll(cell, params, tokens, **kw),
                    rnn_jax.unroll(cell, params, jax.nn.one_hot(tokens, INPUT_DIM), **kw),
                )
            return out

        out = run(params, xs, carry0, tokens)

    step = lambda h, x: NP_STEPS[name](params, h, x)
    h0 = _np_carry(name, carry0)
    zero = np.zeros((BATCH, STATE if name == "lru" else UNITS))
    for scan in (SEQUENTIAL, ASSOCIATIVE):
        for reverse in (False, True):
            h, ys = ref.run(step, h0, xs, reverse=reverse)
            _close(out[f"{scan} {reverse}"], (_jax_carry(name, h), ys), 1e-10, f"{scan}")
        h, ys = ref.run(step, zero, xs)
        _close(out[f"{scan} zeros"], (_jax_carry(name, h), ys), 1e-10)
        final, ys = out[f"{scan} lengths"]
        for b, n in enumerate(lengths):
            h, want = ref.run(step, zero[b : b + 1], xs[b : b + 1, :n])
            _close(jax.tree.map(lambda c, b=b: c[b : b + 1], final), _jax_carry(name, h), 1e-10)
            _close(ys[b : b + 1, :n], want, 1e-10)
            np.testing.assert_array_equal(ys[b, n:], 0.0)
        _close(*out[f"{scan} tokens"], 1e-12)


def test_min_lstm_ratio_stays_finite_where_both_gates_underflow():
    """Gate logits of −200: σ is 0 in float32 for both gates, ``f/(f+i)`` would be 0/0."""
    cell = linear.min_lstm(2)
    z = jnp.array([[-200.0, -200.0, -200.0, -100.0, 3.0, 4.0]])
    a, b = cell.recur.coefficients({}, z)
    np.testing.assert_allclose(a, [[0.5, np.exp(-100.0)]], rtol=1e-6, atol=1e-37)
    np.testing.assert_allclose(b, [[1.5, 4.0 / (1 + np.exp(-100))]], rtol=1e-6)


# --- the associative scan against the sequential one -------------------------------------------

CONFIGS = [  # (reverse, lengths, return_sequences, given initial carry)
    (True, True, True, True),
    (False, True, False, True),
    (False, False, True, False),
    (True, False, False, False),
]


@pytest.mark.parametrize("name", ["min_gru", "lru"])
def test_associative_equals_sequential(name):
    """float32, to 1e-5: outputs and final carries of every configuration (lengths with an
    empty sequence, reverse, every/last output, given/zero carry) and the gradient of their
    summed losses with respect to params, inputs and the initial carry; ``jvp`` agrees with
    reverse mode, ``vmap`` over parameter sets with single calls. (minLSTM shares minGRU's
    real-valued scan; LRU runs it on complex arrays.)"""
    cell, rng = _cell(name), np.random.default_rng(1)
    params, carry0 = _random_params(cell, rng), _random_carry(cell, rng)
    xs = rng.standard_normal((BATCH, TIME, INPUT_DIM)).astype(np.float32)
    lengths = jnp.array([TIME, 5, 0])
    weights = jnp.asarray(rng.standard_normal((len(CONFIGS), TIME, UNITS)), jnp.float32)

    def loss(scan, params, xs, carry0):
        total, outputs = 0.0, []
        for (reverse, use_lengths, every, given), w in zip(CONFIGS, weights, strict=True):
            final, ys = rnn_jax.unroll(
                cell,
                params,
                xs,
                carry0 if given else None,
                lengths=lengths if use_lengths else None,
                reverse=reverse,
                return_sequences=every,
                scan=scan,
            )
            read = ys * w[None] if every else ys * w[-1][None]
            total += jnp.sum(jnp.sin(read)) + sum(jnp.sum(c**2) for c in jax.tree.leaves(final))
            outputs.append((final, ys))
        return total, outputs

    @jax.jit
    def run(params, xs, carry0):
        both = [
            jax.grad(lambda *a, s=s: loss(s, *a), argnums=(0, 1, 2), has_aux=True)(
                params, xs, carry0
            )
            for s in (SEQUENTIAL, ASSOCIATIVE)
        ]
        f = lambda p: loss(ASSOCIATIVE, p, xs, carry0)[0]
        direction = jax.tree.map(jnp.cos, params)
        tangent = jax.jvp(f, (params,), (direction,))[1]
        leaves = zip(jax.tree.leaves(both[1][0][0]), jax.tree.leaves(direction), strict=True)
        dot = sum(jnp.vdot(g, d) for g, d in leaves)
        one = lambda p: rnn_jax.unroll(cell, p, xs, return_sequences=True, scan=ASSOCIATIVE)[1]
        halved = jax.tree.map(lambda p: 0.5 * p, params)
        stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), params, halved)
        return both, (tangent, dot), (jax.vmap(one)(stacked), [one(params), one(halved)])

    (sequential, associative), (tangent, dot), (batched, singles) = run(params, xs, carry0)
    for config, got, want in zip(CONFIGS, associative[1], sequential[1], strict=True):
        _close(got, want, 1e-5, where=str(config))
    _close(associative[0], sequential[0], 1e-5, where="gradients")
    assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(sequential[0]))
    np.testing.assert_allclose(tangent, dot, rtol=1e-5)
    _close(list(batched), singles, 1e-6)


def test_associative_runs_no_sequential_loop_and_auto_picks_the_scan_on_cpu():
    cell = linear.min_gru(UNITS)
    params = cell.init(jax.random.PRNGKey(0), INPUT_DIM)
    xs = jnp.ones((2, TIME, INPUT_DIM))
    text = lambda **scan: str(jax.make_jaxpr(lambda p: rnn_jax.unroll(cell, p, xs, **scan))(params))
    assert "scan" not in text(scan=ASSOCIATIVE)
    assert "scan[" in text(scan=SEQUENTIAL)
    assert text() == text(scan=SEQUENTIAL if jax.default_backend() == "cpu" else ASSOCIATIVE)
    assert rnn_jax.ScanType.FUSED not in rnn_jax.scan.available_scans(cell)
    with pytest.raises(ValueError, match=r"scan=ScanType.FUSED needs.*available here"):
        rnn_jax.unroll(cell, params, xs, scan=rnn_jax.ScanType.FUSED)


def test_associative_refuses_a_nonlinear_cell():
    cell = rnn_jax.gru(UNITS)
    params = cell.init(jax.random.PRNGKey(0), INPUT_DIM)
    message = (
        r"scan=ScanType.ASSOCIATIVE needs.*LinearRecurrence.*this cell's recur is Recurrence: "
        r"available here ScanType.AUTO, ScanType.SEQUENTIAL, ScanType.FUSED$"
    )
    with pytest.raises(ValueError, match=message):
        rnn_jax.unroll(cell, params, jnp.ones((2, 3, INPUT_DIM)), scan=ASSOCIATIVE)


def test_hidden_of_an_lru_carry_is_the_modulus_of_its_complex_state():
    """``cell.hidden`` of LRU's carry after a sequence is ``|h|`` of the float64 NumPy LRU's
    complex state, unit by unit, and stays finite and exact at float32's extremes."""
    cell, rng = _cell("lru"), np.random.default_rng(5)
    with jax.enable_x64(True):
        params = _random_params(cell, rng, np.float64)
        xs = rng.standard_normal((BATCH, TIME, INPUT_DIM))
        carry, _ = jax.jit(lambda p, x: rnn_jax.unroll(cell, p, x))(params, xs)
        got = np.asarray(cell.hidden(carry))
    h, _ = ref.run(lambda h, x: np_lru_step(params, h, x), np.zeros((BATCH, STATE)), xs)
    assert got.shape == (BATCH, STATE) and np.isrealobj(got)
    np.testing.assert_allclose(got, np.abs(h), rtol=1e-12)
    assert np.all(np.abs(h) > 1e-3)  # a real test: no unit is trivially zero

    # float32: squares of 1e30 overflow and of 1e-30 flush to zero; the modulus does neither.
    re = jnp.array([3e30, 3e-30, 0.0, -3.0], jnp.float32)
    im = jnp.array([4e30, -4e-30, 0.0, 4.0], jnp.float32)
    np.testing.assert_allclose(
        cell.hidden(linear.LRUCarry(re, im)), [5e30, 5e-30, 0.0, 5.0], rtol=1e-6
    )


def test_lru_with_a_dense_head_is_affine_in_its_inputs():
    """``y = Re(h C) + x D`` with ``h`` linear in ``x``: the LRU model of experiments.long_range
    (LRU + Dense) is affine in the whole input sequence, so it cannot form the adding
    problem's ``value × mask`` products (docs/gradients.md: the best affine predictor stays at
    the baseline). The minGRU model, whose gate multiplies two functions of ``x_t``, is not."""
    rng = np.random.default_rng(7)
    with jax.enable_x64(True):
        for name, affine in (("lru", True), ("min_gru", False)):
            model = rnn_jax.sequence_classifier(_cell(name), 2, 1)
            params = jax.tree.map(
                lambda a: jnp.asarray(a, jnp.float64), model.init(jax.random.PRNGKey(0))
            )
            x1, x2 = rng.standard_normal((2, BATCH, TIME, 2))
            a = 0.3
            mixed = np.asarray(model.apply(params, a * x1 + (1 - a) * x2))
            want = a * np.asarray(model.apply(params, x1)) + (1 - a) * np.asarray(
                model.apply(params, x2)
            )
            gap = np.max(np.abs(mixed - want))
            assert (gap < 1e-12) if affine else (gap > 1e-3), (name, gap)


# --- LRU's eigenvalues ------------------------------------------------------------------------


@pytest.mark.parametrize("x64", [False, True])
def test_lru_modulus_below_one_for_any_params(x64):
    """``|λ| < 1`` and ``0 < γ ≤ 1`` for large, tiny, negative and random ``ν``, ``θ``."""
    rng = np.random.default_rng(2)
    extremes = np.array([-1e30, -1e4, -100.0, -40.0, -17.0, -10.0, 0.0, 3.0, 50.0, 100.0, 1e4])
    with jax.enable_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        nu = np.concatenate([np.repeat(extremes, len(extremes)), 30 * rng.standard_normal(500)])
        theta = np.concatenate([np.tile(extremes, len(extremes)), 30 * rng.standard_normal(500)])
        lam, gamma = jax.jit(linear.lru_eigenvalues)(
            jnp.asarray(nu, dtype), jnp.asarray(theta, dtype)
        )
        modulus = np.abs(np.asarray(lam))
        assert np.all(np.isfinite(np.asarray(lam)))
        assert np.all(modulus < 1.0) and np.all(modulus >= 0.0)
        assert np.all(np.asarray(gamma) > 0.0) and np.all(np.asarray(gamma) <= 1.0)
        # Where exp(ν) is representable and above eps, the formula is exact.
        plain = (nu > -15) & (nu < 80) & (theta < 5)  # larger phases: float32 rounding
        want = np.exp(-np.exp(nu[plain]) + 1j * np.exp(theta[plain]))
        np.testing.assert_allclose(np.asarray(lam)[plain], want, rtol=1e-4, atol=1e-6)


def test_lru_init_on_the_ring():
    """``|λ|²`` uniform on ``[r_min², r_max²]`` (λ uniform on the ring's area), phase in
    ``(0, max_phase]``, ``γ = sqrt(1 − |λ|²)``; shapes of every param."""
    n = 8000
    cell = linear.lru(3, state_size=n, r_min=0.5, r_max=0.9, max_phase=np.pi / 10)
    params = jax.jit(lambda k: cell.init(k, 2))(jax.random.PRNGKey(0))
    assert {k: v.shape for k, v in params.items()} == {
        "kernel": (2, 2 * n + 3),
        "nu_log": (n,),
        "theta_log": (n,),
        "output_kernel": (2 * n, 3),
    }
    lam, gamma = linear.lru_eigenvalues(params["nu_log"], params["theta_log"])
    modulus, phase = np.abs(np.asarray(lam, np.complex128)), np.exp(params["theta_log"])
    assert modulus.min() >= 0.5 - 1e-6 and modulus.max() <= 0.9 + 1e-6
    assert phase.min() > 0 and phase.max() <= np.pi / 10 * (1 + 1e-6)
    u = (modulus**2 - 0.25) / (0.81 - 0.25)  # uniform on [0, 1] if the ring's area is
    counts = np.histogram(u, bins=10, range=(0, 1))[0]
    assert np.all(np.abs(counts - n / 10) < 5 * np.sqrt(n / 10)), counts
    np.testing.assert_allclose(gamma, np.sqrt(1 - modulus**2), rtol=1e-4)


# --- probes ------------------------------------------------------------------------------------


def _np_coefficients(name, params, xs):
    """``(a, b-free)`` pieces the probes' closed forms need: ``a (batch, time, n)`` (complex
    for LRU) and, for LRU, ``C``."""
    if name == "lru":
        lam, _, _, c, _ = np_lru_parts(params)
        return np.broadcast_to(lam, (BATCH, TIME, STATE)), c
    z = xs @ params["kernel"] + params["bias"]
    if name == "min_gru":
        return 1.0 - ref.sigmoid(z[..., :UNITS]), None
    f, i = ref.sigmoid(z[..., :UNITS]), ref.sigmoid(z[..., UNITS : 2 * UNITS])
    return f / (f + i), None


@pytest.mark.parametrize("name", NAMES)
def test_probes(name):
    """For a loss linear in the outputs, ``L = Σ_t y_t · w_t``, ``∂L/∂h_t = Σ_{s ≥ t}
    (Π_{t<r≤s} a_r) ⊙ (w_s C^T)`` in closed form (for LRU ``∂L/∂Re h = Re g``, ``∂L/∂Im h =
    −Im g``): the probes must read LRU's output through its readout, ``x_t D`` included.
    Jacobians are ``diag(a_t)`` (LRU: 2×2 rotation-scalings, singular values ``|λ|``);
    saturation reports the min cells' gates, nothing for LRU."""
    cell, rng = _cell(name), np.random.default_rng(3)
    with jax.enable_x64(True):
        params = _random_params(cell, rng, np.float64)
        xs = 2.0 * rng.standard_normal((BATCH, TIME, INPUT_DIM))
        w = rng.standard_normal((TIME, UNITS))

        @jax.jit
        def probes(params, xs):
            every = lambda ys: jnp.sum(ys * w[None], axis=(1, 2))
            last = lambda y: jnp.sum(y * w[-1][None], axis=-1)
            return (
                gradients.carry_gradients(cell, params, xs, every, return_sequences=True),
                gradients.carry_gradients(cell, params, xs, last),
                gradients.carry_gradient_norms(cell, params, xs, every, return_sequences=True),
                gradients.jacobian_norms(cell, params, xs),
                gradients.saturation(cell, params, xs),
                rnn_jax.unroll(cell, params, xs, return_sequences=True),
            )

        out = jax.device_get(probes(params, xs))  # float64 NumPy, usable outside x64
        (loss, grads), (_, grads_last), (_, norms), jac, sat, (_, ys) = out

    np.testing.assert_allclose(loss, np.sum(np.asarray(ys) * w[None], axis=(1, 2)), rtol=1e-12)
    a, c = _np_coefficients(name, params, xs)
    project = (lambda v: v @ c.T) if name == "lru" else (lambda v: v)
    want_every, want_last = np.zeros(a.shape, a.dtype), np.zeros(a.shape, a.dtype)
    g = np.zeros((BATCH,) + a.shape[2:], a.dtype)
    for t in reversed(range(TIME)):
        g = project(np.broadcast_to(w[t], (BATCH, UNITS))) + (
            a[:, t + 1] * g if t < TIME - 1 else 0
        )
        want_every[:, t] = g
        carried = project(np.broadcast_to(w[-1], (BATCH, UNITS)))
        for r in range(t + 1, TIME):
            carried = a[:, r] * carried
        want_last[:, t] = carried
    for got, want in ((grads, want_every), (grads_last, want_last)):
        _close(got, (np.real(want), -np.imag(want)) if name == "lru" else want, 1e-10)
    want_norms = jax.tree.map(lambda v: np.linalg.norm(v, axis=-1), _jax_carry(name, want_every))
    _close(norms, want_norms, 1e-10)
    # hidden of the per-part norms is ‖∂L/∂h_t‖ over the whole (complex, for LRU) state.
    with jax.enable_x64(True):
        state_norms = np.asarray(cell.hidden(norms))
    np.testing.assert_allclose(state_norms, np.linalg.norm(want_every, axis=-1), rtol=1e-10)

    modulus = np.abs(a)
    np.testing.assert_allclose(jac["step_norm"], modulus.max(axis=-1), rtol=1e-10)
    product = np.ones(modulus.shape[:1] + modulus.shape[2:])
    for t in reversed(range(TIME)):
        np.testing.assert_allclose(
            jac["log_product_norm"][:, t], np.log(product.max(axis=-1)), rtol=1e-9, atol=1e-12
        )
        product = product * modulus[:, t]

    if name == "lru":
        assert sat == {}
        return
    z = xs @ params["kernel"] + params["bias"]
    gates = {"min_gru": {"update_gate": 0}, "min_lstm": {"forget_gate": 0, "input_gate": 1}}
    assert set(sat) == set(gates[name]) | {"gates"}
    flags = []
    for gate, block in gates[name].items():
        value = ref.sigmoid(z[..., block * UNITS : (block + 1) * UNITS])
        flags.append((value < 0.1) | (value > 0.9))
        np.testing.assert_allclose(sat[gate], flags[-1].mean(axis=-1))
    np.testing.assert_allclose(sat["gates"], np.concatenate(flags, axis=-1).mean(axis=-1))
    assert 0.0 < np.mean(sat["gates"]) < 1.0


# --- sampler, training, finite differences ----------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_sampler_matches_rolling_window(name):
    """``make_sampler`` on ``sequence_classifier(cell, V, V)`` against re-running the model on
    each rolled window (tokens read as kernel rows)."""
    vocab, seq_len, num_chars = 7, 4, 10
    cell = _cell(name)
    model = rnn_jax.sequence_classifier(cell, vocab, vocab)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    rng = np.random.default_rng(6)  # a seed whose greedy paths move around for every cell
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), jnp.float32), shapes)
    params["rnn"]["kernel"] = 3.0 * params["rnn"]["kernel"]
    params["dense"]["kernel"] = 3.0 * params["dense"]["kernel"]
    seeds = jnp.asarray(rng.integers(0, vocab, (3, seq_len)))
    out = np.asarray(rnn_jax.make_sampler(cell, num_chars)(params, seeds))
    predict = jax.jit(lambda window: model.apply(params, window[None])[0])
    for seed, got in zip(np.asarray(seeds), out, strict=True):
        want = ref.greedy_rolling(
            lambda w: np.asarray(predict(jnp.asarray(w))), seed.tolist(), num_chars
        )
        assert got.tolist() == want
    assert len(set(out.ravel().tolist())) > 2


def test_one_training_step_lowers_the_loss_and_moves_every_param():
    """One ``make_train_step`` (RMSprop) of a token classifier per cell on a fixed batch whose
    last tokens cover the vocabulary (LRU's skip ``D`` reaches the loss at the last step)."""
    vocab, rng = 7, np.random.default_rng(9)
    tokens = rng.integers(0, vocab, (vocab, TIME))
    tokens[:, -1] = np.arange(vocab)
    batch = (jnp.asarray(tokens, jnp.int32), jnp.asarray(rng.integers(0, vocab, (vocab,))))
    opt = rnn_jax.rmsprop(1e-3)
    for name in NAMES:
        model = rnn_jax.sequence_classifier(_cell(name), vocab, vocab)

        def loss_fn(params, batch, model=model):
            xs, labels = batch
            return rnn_jax.softmax_cross_entropy(model.apply(params, xs), labels), {}

        step = rnn_jax.make_train_step(loss_fn, opt)
        params = model.init(jax.random.PRNGKey(0))
        state = rnn_jax.create_train_state(params, opt, jax.random.PRNGKey(1))
        new, metrics = step(state, batch)
        _, after = step(new, batch)  # its loss is the loss at new.params, before the update
        assert bool(metrics["finite"]) and int(new.step) == 1, name
        moved = jax.tree.map(
            lambda a, b: bool(np.all(np.asarray(a) != np.asarray(b))), params, new.params
        )
        assert all(jax.tree.leaves(moved)), (name, moved)
        assert float(after["loss"]) < float(metrics["loss"]), name


def test_lru_gradients_against_finite_differences():
    """float64 ``check_grads`` (forward and reverse, first order) through the associative scan
    with lengths and reverse, with respect to params, inputs and the initial carry."""
    cell, rng = _cell("lru"), np.random.default_rng(5)
    with jax.enable_x64(True):
        params = _random_params(cell, rng, np.float64)
        carry0 = _random_carry(cell, rng, np.float64)
        xs = rng.standard_normal((BATCH, 5, INPUT_DIM))
        lengths = jnp.array([5, 2, 3])

        @jax.jit
        def loss(params, xs, carry):
            final, ys = rnn_jax.unroll(
                cell,
                params,
                xs,
                carry,
                lengths=lengths,
                reverse=True,
                return_sequences=True,
                scan=ASSOCIATIVE,
            )
            return jnp.sum(jnp.sin(ys)) + jnp.sum(final.re * final.im)

        check_grads(loss, (params, xs, carry0), order=1, modes=["fwd", "rev"], eps=1e-6)
