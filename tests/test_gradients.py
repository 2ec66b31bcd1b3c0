"""BPTT probes against jax.jacrev chains, finite differences and float64 NumPy cells."""

import csv
import dataclasses
import functools
import inspect
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import rnn_jax
from experiments import gradient_flow, long_range
from rnn_jax import cells, gradients, registry
from rnn_jax.synthetic import adding_problem, copy_batch
from rnn_jax.workdir import WorkdirError

CELLS = ["simple_rnn", "lstm", "gru"]
BATCH, TIME, INPUT_DIM, UNITS = 2, 5, 2, 3


@pytest.fixture(scope="module", autouse=True)
def bad_flag(start_experiment):
    """The one command-line test of experiments.gradient_flow, started with the module so that
    its interpreter start-up overlaps the in-process tests: clip_norm=-1 (gradient ascent) is
    refused in one line on stderr, exit status 1."""
    return start_experiment("gradient_flow", "--clip_norm=-1", "--workdir=unused")


def _setup(name, scale=1.0, **kwargs):
    """float64 params (scaled so the cell leaves its linear regime), inputs, a readout."""
    cell = cells.CELLS[name](UNITS, **kwargs)
    params = cell.init(jax.random.PRNGKey(1), INPUT_DIM)
    params = jax.tree.map(lambda a: np.asarray(a, np.float64) * scale, params)
    rng = np.random.default_rng(0)
    if name == "lstm":
        params["bias"] = params["bias"] + rng.normal(size=params["bias"].shape)
    xs = rng.normal(size=(BATCH, TIME, INPUT_DIM))
    readout = rng.normal(size=(TIME, UNITS))
    return cell, params, xs, readout


def _loss_last(readout):
    return lambda y: jnp.sin(y @ readout[-1]) + jnp.sum(y**2, axis=-1)


def _loss_every(readout):
    return lambda ys: jnp.sum(jnp.tanh(ys * readout[None]) ** 2, axis=(1, 2))


def _stepwise(cell, params, xs):
    """Carries before/after every step and every output, by a Python loop over ``cell.step``."""
    carry = cell.initial_carry(BATCH)
    befores, ys = [], []
    for t in range(TIME):
        befores.append(carry)
        carry, y = cell.step(params, carry, jnp.asarray(xs[:, t]))
        ys.append(y)
    return befores, jnp.stack(ys, axis=1)


def _row(carry, b):
    return jax.tree.map(lambda c: c[b], carry)


@functools.partial(jax.jit, static_argnums=0)
def _flat_step(cell, params, row, x_row):
    """One example's next carry, flattened (h, then c for LSTM), by ``cell.step``."""
    new, _ = cell.step(params, jax.tree.map(lambda c: c[None], row), x_row[None])
    return ravel_pytree(jax.tree.map(lambda c: c[0], new))[0]


@functools.partial(jax.jit, static_argnums=0)
def _jacrev(cell, params, row, x_row):
    flat, unravel = ravel_pytree(row)
    return jax.jacrev(lambda v: _flat_step(cell, params, unravel(v), x_row))(flat)


def _jacrev_chain(cell, params, xs, loss_fn, every, carry_size):
    """``(‖∂L/∂h_t‖, ‖∂L/∂c_t‖)``, each ``(batch, time)``: ``∂L/∂y`` from ``jax.grad``, carried
    back by explicit ``jax.jacrev`` Jacobians of ``cell.step`` (``c``: the carry past ``h``)."""
    befores, ys = _stepwise(cell, params, xs)

    def total(ys):
        return jnp.sum(loss_fn(ys if every else ys[:, -1]))

    dy = np.asarray(jax.grad(total)(ys))
    expected_h = np.zeros((BATCH, TIME))
    expected_c = np.zeros((BATCH, TIME))
    for b in range(BATCH):
        g = None
        for t in reversed(range(TIME)):
            direct = np.zeros(carry_size)
            direct[:UNITS] = dy[b, t]
            if g is None:
                g = direct
            else:
                jac = _jacrev(cell, params, _row(befores[t + 1], b), xs[b, t + 1])
                g = g @ np.asarray(jac) + direct
            expected_h[b, t] = np.linalg.norm(g[:UNITS])
            expected_c[b, t] = np.linalg.norm(g[UNITS:])
    return expected_h, expected_c


@pytest.mark.parametrize("name", CELLS)
def test_carry_gradient_norms_equal_jacrev_chain(name):
    with jax.enable_x64(True):
        cell, params, xs, readout = _setup(name)
        _, ys = _stepwise(cell, params, xs)
        for every, loss_fn in ((False, _loss_last(readout)), (True, _loss_every(readout))):
            carry_size = UNITS * (2 if name == "lstm" else 1)
            expected_h, expected_c = _jacrev_chain(cell, params, xs, loss_fn, every, carry_size)
            losses, norms = jax.jit(
                lambda p, x: gradients.carry_gradient_norms(
                    cell, p, x, loss_fn, return_sequences=every
                )
            )(params, xs)
            assert losses.dtype == jnp.float64 and losses.shape == (BATCH,)
            np.testing.assert_allclose(losses, loss_fn(ys if every else ys[:, -1]), rtol=1e-12)
            if name == "lstm":
                np.testing.assert_allclose(norms.h, expected_h, rtol=1e-9)
                np.testing.assert_allclose(norms.c, expected_c, rtol=1e-9)
            else:
                np.testing.assert_allclose(norms, expected_h, rtol=1e-9)


@pytest.mark.parametrize("name", CELLS)
def test_step_jacobians_and_their_norms(name):
    with jax.enable_x64(True):
        cell, params, xs, readout = _setup(name, scale=2.0)
        befores, _ = _stepwise(cell, params, xs)
        jac = np.asarray(jax.jit(functools.partial(gradients.step_jacobians, cell))(params, xs))
        n = UNITS * (2 if name == "lstm" else 1)
        assert jac.shape == (BATCH, TIME, n, n)
        eps = 1e-6
        for b in range(BATCH):
            for t in range(TIME):
                flat, unravel = ravel_pytree(_row(befores[t], b))

                def f(v):
                    return _flat_step(cell, params, unravel(v), xs[b, t])

                fd = np.stack(
                    [(f(flat + eps * e) - f(flat - eps * e)) / (2 * eps) for e in np.eye(n)],
                    axis=1,
                )
                np.testing.assert_allclose(jac[b, t], fd, atol=1e-8)

        out = jax.jit(functools.partial(gradients.jacobian_norms, cell, spectrum=True))(params, xs)
        for b in range(BATCH):
            prod = np.eye(n)
            for t in reversed(range(TIME)):
                # ‖J_{T-1} ⋯ J_{t+1}‖₂, then fold in J_t for the step before.
                np.testing.assert_allclose(
                    out["log_product_norm"][b, t], np.log(np.linalg.norm(prod, 2)), atol=1e-10
                )
                prod = prod @ jac[b, t]
                sv = np.linalg.svd(jac[b, t], compute_uv=False)
                np.testing.assert_allclose(out["singular_values"][b, t], sv, atol=1e-12)
                np.testing.assert_allclose(out["step_norm"][b, t], sv[0], rtol=1e-12)
        # Pascanu et al.'s bound: ‖∂L/∂h_t‖ ≤ ‖∂L/∂h_{T-1}‖ · ‖J_{T-1} ⋯ J_{t+1}‖₂ (whole carry).
        probe = functools.partial(gradients.carry_gradient_norms, cell, loss_fn=_loss_last(readout))
        _, norms = jax.jit(probe)(params, xs)
        full = np.hypot(norms.h, norms.c) if name == "lstm" else np.asarray(norms)
        bound = full[:, -1:] * np.exp(out["log_product_norm"])
        assert np.all(full <= bound * (1 + 1e-9))
        assert np.any(full[:, :-1] < 0.9 * bound[:, :-1])  # a bound, not an identity


def test_probes_float32_under_jit_and_vmap_over_seeds():
    # The probes treat every cell alike; LSTM's two-part carry is the most structured case.
    cell = cells.lstm(UNITS)
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    stacked = jax.vmap(lambda k: cell.init(k, INPUT_DIM))(keys)
    xs = jax.random.normal(jax.random.PRNGKey(4), (BATCH, TIME, INPUT_DIM))
    loss_fn = lambda y: jnp.sum(y, axis=-1)

    def probe(params):
        _, norms = gradients.carry_gradient_norms(cell, params, xs, loss_fn)
        return norms, gradients.jacobian_norms(cell, params, xs)

    batched = jax.jit(jax.vmap(probe))(stacked)
    probe_one = jax.jit(probe)
    for s in range(len(keys)):
        one = probe_one(jax.tree.map(lambda a: a[s], stacked))
        jax.tree.map(
            lambda v, o: np.testing.assert_allclose(v[s], o, rtol=2e-5, atol=1e-6), batched, one
        )
        assert jax.tree.leaves(one)[0].dtype == jnp.float32
        with jax.enable_x64(True):
            p64 = jax.tree.map(lambda a: np.asarray(a[s], np.float64), stacked)
            _, n64 = jax.jit(gradients.carry_gradient_norms, static_argnums=(0, 3))(
                cell, p64, np.asarray(xs, np.float64), loss_fn
            )
            assert jax.tree.leaves(n64)[0].dtype == jnp.float64
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4), one[0], n64)


# float64 NumPy cells from the equations of DESIGN.md §3, with their bounded activations by the
# names the library documents (rnn_jax.cells): {"gates": {name: σ}, "tanh": {name: tanh}}.
def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _numpy_step(name, p, carry, x):
    w, u, bias = p["kernel"], p["recurrent_kernel"], p["bias"]
    if name in ("simple_rnn", "irnn"):
        z = x @ w + carry @ u + bias
        if name == "irnn":
            return np.maximum(z, 0.0), {"gates": {}, "tanh": {}}  # relu does not saturate
        h = np.tanh(z)
        return h, {"gates": {}, "tanh": {"tanh": h}}
    if name == "lstm":
        h, c = carry
        z = x @ w + h @ u + bias
        i, f, g, o = np.split(z, 4, axis=-1)
        i, f, g, o = _sigmoid(i), _sigmoid(f), np.tanh(g), _sigmoid(o)
        c = f * c + i * g
        h = o * np.tanh(c)
        gates = {"input_gate": i, "forget_gate": f, "output_gate": o}
        return (h, c), {"gates": gates, "tanh": {"candidate": g, "cell_tanh": np.tanh(c)}}
    a = x @ w + (bias[0] if bias.ndim == 2 else 0.0)
    a_z, a_r, a_h = np.split(a, 3, axis=-1)
    if name == "gru":
        r_z, r_r, r_h = np.split(carry @ u + bias[1], 3, axis=-1)
        z, r = _sigmoid(a_z + r_z), _sigmoid(a_r + r_r)
        n = np.tanh(a_h + r * r_h)
    else:  # reset before the product, one bias (Cho et al. 2014)
        b_z, b_r, b_h = np.split(bias, 3)
        u_z, u_r, u_h = np.split(u, 3, axis=-1)
        z = _sigmoid(a_z + b_z + carry @ u_z)
        r = _sigmoid(a_r + b_r + carry @ u_r)
        n = np.tanh(a_h + b_h + (r * carry) @ u_h)
    h = z * carry + (1 - z) * n
    return h, {"gates": {"update_gate": z, "reset_gate": r}, "tanh": {"candidate": n}}


def _expected_saturation(step, carry, xs, margin=0.1):
    """``{name: (batch, time)}`` as :func:`rnn_jax.gradients.saturation` documents it, from a
    NumPy ``step(carry, x) -> (carry, activations)``; also the carries after every step."""
    stats, carries = {}, []
    for t in range(xs.shape[1]):
        carry, acts = step(carry, xs[:, t])
        carries.append(carry)
        gates = {k: (a < margin) | (a > 1 - margin) for k, a in acts["gates"].items()}
        tanhs = {k: np.abs(a) > 1 - margin for k, a in acts["tanh"].items()}
        row = {k: np.mean(f, axis=-1) for k, f in {**gates, **tanhs}.items()}
        if gates:
            row["gates"] = np.mean(np.concatenate(list(gates.values()), axis=-1), axis=-1)
        if tanhs:
            row["tanh_units"] = np.mean(np.concatenate(list(tanhs.values()), axis=-1), axis=-1)
        for k, v in row.items():
            stats.setdefault(k, []).append(v)
    return {k: np.stack(v, axis=1) for k, v in stats.items()}, carries


_SATURATION_CASES = {
    "simple_rnn": ("simple_rnn", {}),
    "irnn": ("simple_rnn", {"activation": "relu", "recurrent_init": "identity"}),
    "lstm": ("lstm", {}),
    "gru": ("gru", {}),
    "gru_reset_before": ("gru", {"reset_after": False}),
}


@pytest.mark.parametrize("name", list(_SATURATION_CASES))
def test_saturation_matches_numpy_cells(name):
    cell_name, kwargs = _SATURATION_CASES[name]
    with jax.enable_x64(True):
        cell, params, xs, _ = _setup(cell_name, scale=3.0, **kwargs)
        params = {k: np.asarray(v) for k, v in params.items()}
        sat = jax.jit(functools.partial(gradients.saturation, cell, margin=0.1))(params, xs)
        zeros = np.zeros((BATCH, UNITS))
        expected, carries = _expected_saturation(
            lambda c, x: _numpy_step(name, params, c, x),
            (zeros, zeros) if name == "lstm" else zeros,
            xs,
        )
        # The NumPy cell is the library's cell: the same hidden states.
        _, ys = _stepwise(cell, params, xs)
        for t, carry in enumerate(carries):
            np.testing.assert_allclose(carry[0] if name == "lstm" else carry, ys[:, t], atol=1e-12)
        # Exactly the documented entries: per activation, "gates" only for gated cells,
        # "tanh_units" only for cells with tanh units (the relu IRNN has neither: nothing).
        assert set(sat) == set(expected)
        for key, value in expected.items():
            assert sat[key].shape == (BATCH, TIME) and sat[key].dtype == jnp.float64
            np.testing.assert_allclose(sat[key], value, err_msg=key)
        if name == "irnn":
            assert sat == {}
        else:
            assert 0.0 < np.mean(sat["tanh_units"]) < 1.0  # the test can tell the stats apart
        assert ("gates" in sat) == (name not in ("simple_rnn", "irnn"))


# A user's own cell: the minimal gated unit (Zhou et al. 2016), one forget gate f,
#   f = σ(x W_f + h U_f + b_f),  n = tanh(x W_n + (f ⊙ h) U_n + b_n),  h' = (1 - f) ⊙ h + f ⊙ n,
# built with rnn_jax.custom_cell from three functions (and its activations).
def _mgu_init(key, input_dim):
    k_w, k_f, k_n = jax.random.split(key, 3)
    return {
        "w": jax.random.normal(k_w, (input_dim, 2 * UNITS)),
        "u_f": jax.random.normal(k_f, (UNITS, UNITS)),
        "u_n": jax.random.normal(k_n, (UNITS, UNITS)),
        "b": jnp.linspace(-1.0, 1.0, 2 * UNITS),
    }


def _mgu(params, h, x):
    a_f, a_n = jnp.split(x @ params["w"] + params["b"][None], 2, axis=-1)
    f = jax.nn.sigmoid(a_f + h @ params["u_f"])
    n = jnp.tanh(a_n + (f * h) @ params["u_n"])
    return (1.0 - f) * h + f * n, {"gates": {"forget": f}, "tanh": {"candidate": n}}


def _mgu_step(params, h, x):
    h, _ = _mgu(params, h, x)
    return h, h


def _numpy_mgu(p, h, x):
    a_f, a_n = np.split(x @ p["w"] + p["b"], 2, axis=-1)
    f = _sigmoid(a_f + h @ p["u_f"])
    n = np.tanh(a_n + (f * h) @ p["u_n"])
    return (1 - f) * h + f * n, {"gates": {"forget": f}, "tanh": {"candidate": n}}


def _mgu_cell(with_activations=True):
    return rnn_jax.custom_cell(
        _mgu_init,
        lambda batch: jnp.zeros((batch, UNITS)),
        _mgu_step,
        activations=(lambda p, h, x: _mgu(p, h, x)[1]) if with_activations else None,
    )


def test_custom_cell_with_every_probe():
    cell = _mgu_cell()
    with jax.enable_x64(True):
        params = jax.tree.map(
            lambda a: np.asarray(a, np.float64), cell.init(jax.random.PRNGKey(2), INPUT_DIM)
        )
        rng = np.random.default_rng(1)
        xs = 2.0 * rng.normal(size=(BATCH, TIME, INPUT_DIM))
        readout = rng.normal(size=(TIME, UNITS))

        sat = jax.jit(functools.partial(gradients.saturation, cell))(params, xs)
        expected, carries = _expected_saturation(
            lambda h, x: _numpy_mgu(params, h, x), np.zeros((BATCH, UNITS)), xs
        )
        _, ys = _stepwise(cell, params, xs)
        np.testing.assert_allclose(np.stack(carries, axis=1), ys, atol=1e-12)
        assert set(sat) == {"forget", "candidate", "gates", "tanh_units"}
        for key, value in expected.items():
            np.testing.assert_allclose(sat[key], value, err_msg=key)
        np.testing.assert_allclose(sat["gates"], sat["forget"])  # the only gate
        assert 0.0 < np.mean(sat["tanh_units"]) < 1.0 and 0.0 < np.mean(sat["gates"]) < 1.0

        # ‖∂L/∂h_t‖ against a jax.jacrev chain through the cell's own step, for a loss on the
        # last output and on every output.
        for every, loss_fn in ((False, _loss_last(readout)), (True, _loss_every(readout))):
            expected_h, _ = _jacrev_chain(cell, params, xs, loss_fn, every, carry_size=UNITS)
            # (The probes do not read the activations: a cell without them probes the same.)
            for probed in (cell,) if every else (cell, _mgu_cell(with_activations=False)):
                _, norms = gradients.carry_gradient_norms(
                    probed, params, xs, loss_fn, return_sequences=every
                )
                np.testing.assert_allclose(norms, expected_h, rtol=1e-9)

        # Step Jacobians and the norms of their products, against jax.jacrev per step.
        befores, _ = _stepwise(cell, params, xs)
        out = gradients.jacobian_norms(cell, params, xs, spectrum=True)
        for b in range(BATCH):
            prod = np.eye(UNITS)
            for t in reversed(range(TIME)):
                np.testing.assert_allclose(
                    out["log_product_norm"][b, t], np.log(np.linalg.norm(prod, 2)), atol=1e-10
                )
                jac = np.asarray(_jacrev(cell, params, _row(befores[t], b), xs[b, t]))
                prod = prod @ jac
                sv = np.linalg.svd(jac, compute_uv=False)
                np.testing.assert_allclose(out["singular_values"][b, t], sv, atol=1e-12)
                np.testing.assert_allclose(out["step_norm"][b, t], sv[0], rtol=1e-12)


def test_saturation_needs_the_cells_activations():
    cell = _mgu_cell(with_activations=False)
    params = cell.init(jax.random.PRNGKey(0), INPUT_DIM)
    with pytest.raises(ValueError, match=r"cell\.activations is None.*custom_cell"):
        gradients.saturation(cell, params, jnp.zeros((1, 2, INPUT_DIM)))


TINY_FLOW = gradient_flow.Config(
    configs=("rnn_g0.5", "rnn_g3"),
    lengths=(5,),
    seeds=2,
    units=3,
    train_steps=2,
    batch_size=4,
    test_size=3,  # = probe_batch: one compilation of the adding batch generator
    probe_batch=3,
    jacobian_batch=2,
)


def test_gradient_flow_short_run_in_process(tmp_path):
    lines = []
    rows = gradient_flow.run(TINY_FLOW, str(tmp_path), out=lines.append)
    table = lines[-1]
    assert table.startswith("| config |")
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    assert saved["rows"] == json.loads(json.dumps(rows))
    assert saved["config"] == json.loads(json.dumps(dataclasses.asdict(TINY_FLOW)))
    by = {(r["config"], r["phase"]): r for r in rows}
    assert list(by) == [(c, p) for p in ("init", "trained") for c in TINY_FLOW.configs]
    # ‖J_t‖₂ ≤ gain for tanh(x W + h·gain·Q): the product over T-1 = 4 steps is ≤ 0.5⁴ at init.
    assert by[("rnn_g0.5", "init")]["log10_dhT_dh0"] <= 4 * math.log10(0.5) + 1e-9
    assert by[("rnn_g0.5", "init")]["jacobian_norm"] <= 0.5 + 1e-9
    assert by[("rnn_g3", "init")]["jacobian_norm"] <= 3.0 + 1e-9
    assert by[("rnn_g0.5", "init")]["log10_g0_over_gT"] < by[("rnn_g3", "init")]["log10_g0_over_gT"]
    assert by[("rnn_g3", "trained")]["inf_grad_steps"] == 0.0
    for phase in ("init", "trained"):  # tanh units, no gates
        assert 0.0 <= by[("rnn_g3", phase)]["sat_tanh"] <= 1.0
        assert by[("rnn_g3", phase)]["sat_gates"] is None
    for r in rows:
        assert r["nonfinite_test"] == "0/2" and r["test_mse"] > 0
    curve = next(c for c in saved["curves"] if (c["config"], c["phase"]) == ("rnn_g3", "init"))
    assert len(curve["log10_grad_h"]["median"]) == 5 and curve["log10_grad_rel"]["median"][-1] == 0
    assert "sat_tanh" in curve and "sat_gates" not in curve
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    for png in ("grad_norms.png", "jacobians.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_gradient_flow_probes_the_models_a_sweep_trained(tmp_path):
    """trained_from: the init and trained probes are of long_range's own models (LRU, whose
    carry is the real and imaginary halves of one complex state, its initial moduli on the
    sweep's own ring, lru_r_min), their MSEs the sweep's."""
    sweep = long_range.Config(
        cells=("lru",),
        lru_r_min=0.99,
        lr_factors=("nu_log=0.5", "theta_log=0.5"),
        lengths=(5,),
        seeds=2,
        steps=4,
        eval_every=2,
        batch_size=2,
        test_size=4,
        units=3,
        clip_norm=None,
        save_grad_norms=True,
    )
    long_range.run(sweep, str(tmp_path / "sweep"), out=lambda line: None)
    config = dataclasses.replace(
        TINY_FLOW, configs=("lru",), trained_from=str(tmp_path / "sweep"), seeds=5
    )
    # Probing into the sweep's own workdir is refused: its results are the sweep's.
    sweep_results = (tmp_path / "sweep" / "results.json").read_bytes()
    with pytest.raises(WorkdirError, match="holds the results of long_range, not of gradient_flow"):
        gradient_flow.run(config, str(tmp_path / "sweep"), out=lambda line: None)
    assert (tmp_path / "sweep" / "results.json").read_bytes() == sweep_results
    rows = gradient_flow.run(config, str(tmp_path / "flow"), out=lambda line: None)
    with open(tmp_path / "sweep" / "results.json") as f:
        test = np.asarray(json.load(f)["results"][0]["test_loss"][0])  # (seeds, evals)
    init, trained = rows
    assert (init["phase"], trained["phase"]) == ("init", "trained")
    assert init["nonfinite_test"] == "0/2"  # the sweep's 2 seeds, not config.seeds
    np.testing.assert_allclose(init["test_mse"], np.median(test[:, 0]), rtol=1e-6)
    np.testing.assert_allclose(trained["test_mse"], np.median(test[:, -1]), rtol=1e-6)
    assert trained["inf_grad_steps"] == 0.0  # the sweep's saved gradient norms
    # ‖J_t‖₂ = max |λ|: the sweep's ring [0.99, 0.999] (the registry's LRU starts at 0.9).
    assert 0.99 <= init["jacobian_norm"] <= 0.999
    assert np.isfinite(init["log10_g0_over_gT"]) and np.isfinite(trained["log10_dhT_dh0"])
    assert init["log10_dhT_dh0"] != trained["log10_dhT_dh0"]
    assert (tmp_path / "flow" / "grad_norms.png").stat().st_size > 1000


COPY_DELAY, COPY_LENGTH = 5, 10  # copy_task(5): 10 symbols, 4 blanks, the cue, 10 blanks


def _copy_reference(params, tokens, targets):
    """float64 NumPy: a SimpleRNN unrolled and back-propagated by hand. Per example: the recall
    loss L (the mean cross-entropy of the Dense head on the last COPY_LENGTH steps), the whole
    sequence's mean cross-entropy and ``‖∂L/∂h_t‖`` for every t, ``(batch, time)``."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    w, u, b = p["rnn"]["kernel"], p["rnn"]["recurrent_kernel"], p["rnn"]["bias"]
    k, c = p["dense"]["kernel"], p["dense"]["bias"]
    batch, time = tokens.shape
    h, prev = np.zeros((batch, time, UNITS)), np.zeros((batch, UNITS))
    for t in range(time):  # h_t = tanh(onehot(x_t) W + h_{t-1} U + b)
        h[:, t] = prev = np.tanh(w[tokens[:, t]] + prev @ u + b)
    logits = h @ k + c
    top = logits.max(axis=-1, keepdims=True)
    log_p = logits - top - np.log(np.sum(np.exp(logits - top), axis=-1, keepdims=True))
    nll = -np.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]  # (batch, time)
    # ∂L/∂h_t = (softmax - onehot(target)) Kᵀ / COPY_LENGTH at the recall steps, plus what comes
    # back from h_{t+1}: (∂L/∂h_{t+1} ⊙ (1 - h_{t+1}²)) Uᵀ.
    direct = (np.exp(log_p) - np.eye(k.shape[1])[targets]) @ k.T / COPY_LENGTH
    direct[:, :-COPY_LENGTH] = 0.0
    grad, later = np.zeros_like(h), np.zeros((batch, UNITS))
    for t in reversed(range(time)):
        grad[:, t] = direct[:, t] + later
        later = (grad[:, t] * (1.0 - h[:, t] ** 2)) @ u.T
    return nll[:, -COPY_LENGTH:].mean(axis=1), nll.mean(axis=1), np.linalg.norm(grad, axis=-1)


def test_gradient_flow_probes_a_copy_sweep(tmp_path, monkeypatch):
    """trained_from a copy sweep (SimpleRNN, delay 5: 25 steps, 3 seeds): the probed sequences
    are copy sequences drawn as the adding ones are; every seed's probed loss is the
    cross-entropy of the recall alone (not of all 25 steps) and its ‖∂L/∂h_t‖ (t < 10, the
    steps that read the symbols, included) a NumPy unroll's, also through the saved medians
    and spreads over seeds; the table's test_xent is the sweep's test cross-entropy."""
    sweep = long_range.Config(
        task="copy",
        cells=("simple_rnn",),
        lengths=(COPY_DELAY,),
        seeds=3,
        steps=2,
        eval_every=2,
        batch_size=2,
        test_size=4,
        units=UNITS,
        clip_norm=None,
        save_grad_norms=True,
    )
    long_range.run(sweep, str(tmp_path / "sweep"), out=lambda line: None)
    config = dataclasses.replace(
        TINY_FLOW,
        configs=("simple_rnn",),
        lengths=(COPY_DELAY,),
        trained_from=str(tmp_path / "sweep"),
        probe_batch=2,
        jacobian_batch=1,
    )
    probed, probe_models = [], gradient_flow.probe_models

    def spy(*args, **kwargs):  # what run probes (its arguments by name) and what comes back
        out = probe_models(*args, **kwargs)
        probed.append((inspect.signature(probe_models).bind(*args, **kwargs).arguments, out))
        return out

    monkeypatch.setattr(gradient_flow, "probe_models", spy)
    lines = []
    rows = gradient_flow.run(config, str(tmp_path / "flow"), out=lines.append)
    assert lines[0].startswith("copy task") and "last 10 outputs" in lines[0]
    assert lines[-1].startswith("| config | T | phase | test_xent |")
    with open(tmp_path / "sweep" / "results.json") as f:
        test = np.asarray(json.load(f)["results"][0]["test_loss"][-1])  # (seeds, evals)
    with open(tmp_path / "flow" / "results.json") as f:
        curves = {c["phase"]: c for c in json.load(f)["curves"]}
    with open(tmp_path / "flow" / "results.csv") as f:
        assert next(csv.reader(f))[3] == "test_xent"
    # The probed sequences: copy_batch's, from the key that draws the adding ones.
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), COPY_DELAY)
    xs, targets = map(np.asarray, copy_batch(jax.random.split(key, 4)[2], 2, COPY_DELAY))
    assert xs.shape == (2, COPY_DELAY + 2 * COPY_LENGTH)
    (init, init_out), (trained, trained_out) = probed
    # The trained params are the sweep's (its checkpoint of 2 steps, last clip setting); the
    # initial ones are what its 2 Adam steps (each under ~3 lr per entry) started from.
    directory = long_range.params_path(tmp_path / "sweep", "simple_rnn", COPY_DELAY)
    saved = rnn_jax.restore_checkpoint(
        directory, sweep.steps, jax.tree.map(lambda a: a[None], init["params"])
    )[0]
    for a, b in zip(jax.tree.leaves(trained["params"]), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(a, b[-1])
    moved = jax.tree.leaves(
        jax.tree.map(lambda a, b: np.max(np.abs(a - b)), init["params"], trained["params"])
    )
    assert 0.0 < max(moved) < 2 * 3 * sweep.learning_rate
    for phase, evaluation, args, out, row in zip(
        ("init", "trained"), (0, -1), (init, trained), (init_out, trained_out), rows, strict=True
    ):
        np.testing.assert_array_equal(args["xs"], xs)
        np.testing.assert_array_equal(args["targets"], targets)
        assert (row["T"], row["phase"], row["nonfinite_test"]) == (COPY_DELAY, phase, "0/3")
        assert "test_mse" not in row
        np.testing.assert_allclose(row["test_xent"], np.median(test[:, evaluation]), rtol=1e-6)
        losses, grads = [], []
        for seed in range(sweep.seeds):
            one = jax.tree.map(lambda a, s=seed: a[s], args["params"])
            recall, whole, norms = _copy_reference(one, xs, targets)
            assert np.all(np.abs(recall - whole) > 1e-3 * recall)  # the loss tells them apart
            assert np.all(norms[:, :COPY_LENGTH] > 0)
            losses.append(np.mean(recall))
            grads.append(np.median(np.log10(norms), axis=0))  # over the probed sequences
        np.testing.assert_allclose(out["loss"], losses, rtol=1e-10)
        np.testing.assert_allclose(
            10.0 ** out["log10_grad_h"], 10.0 ** np.asarray(grads), rtol=1e-8
        )
        for q, value in gradient_flow.summarize_curves(np.asarray(grads)).items():
            np.testing.assert_allclose(curves[phase]["log10_grad_h"][q], value, rtol=0, atol=1e-9)
        ratio = [g[0] - g[-1] for g in grads]
        np.testing.assert_allclose(row["log10_g0_over_gT"], np.median(ratio), atol=1e-9)
    assert rows[1]["inf_grad_steps"] == 0.0
    assert (tmp_path / "flow" / "grad_norms.png").stat().st_size > 1000


def test_gradient_flow_trained_from_refuses_what_it_cannot_probe(tmp_path):
    """A workdir of an unknown task, of other units, without a (config, T), without
    results.json: refused in one line by run, before anything runs or is written."""
    copy = long_range.Config(task="copy", cells=("simple_rnn",), lengths=(5,), units=UNITS)
    workdirs = {
        "parity": {"config": {"task": "parity", "units": UNITS}, "results": []},
        "copy": {
            "config": json.loads(json.dumps(dataclasses.asdict(copy))),
            "results": [{"cell": "simple_rnn", "T": 5}],
        },
    }
    for name, saved in workdirs.items():
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "results.json", "w") as f:
            json.dump(saved, f)
    config = dataclasses.replace(TINY_FLOW, configs=("simple_rnn",), lengths=(5,))
    parity, copy, empty = (repr(str(tmp_path / n)) for n in ("parity", "copy", "empty"))
    (tmp_path / "empty").mkdir()
    cases = [
        (
            {"trained_from": str(tmp_path / "parity")},
            f"trained_from={parity} trained task='parity', units={UNITS}: the probes need the "
            f"adding or copy task and units={UNITS}",
        ),
        (
            {"trained_from": str(tmp_path / "copy"), "units": 4},
            f"trained_from={copy} trained task='copy', units={UNITS}: the probes need the "
            "adding or copy task and units=4",
        ),
        (
            {"trained_from": str(tmp_path / "copy"), "lengths": (5, 7)},
            f"trained_from={copy} has no run of simple_rnn at T=7 (its copy runs: simple_rnn T=5)",
        ),
        (
            {"trained_from": str(tmp_path / "empty")},
            f"trained_from={empty} has no results.json: pass a workdir that "
            "experiments.long_range wrote",
        ),
    ]
    for changes, message in cases:
        with pytest.raises(ValueError) as error:
            gradient_flow.run(dataclasses.replace(config, **changes), str(tmp_path / "flow"))
        assert str(error.value) == message
        assert not (tmp_path / "flow").exists()


def test_gradient_flow_irnn_has_no_saturation_columns():
    # The probes of one configuration as run() takes them (without its training, tested above).
    task = adding_problem(5)
    xs, targets = task.sample(jax.random.PRNGKey(0), 3)
    ((cell_name, structure, members),) = gradient_flow.groups(["irnn"])
    cell = cells.CELLS[cell_name](UNITS, **structure)
    params = gradient_flow.init_models(
        task, cell_name, structure, members, UNITS, 2, jax.random.PRNGKey(1)
    )
    probe = gradient_flow.probe_models(cell, params, xs, targets, 2)
    # Relu units neither gate nor saturate: no saturation entries, reported as None and "-".
    assert "sat_tanh" not in probe and "sat_gates" not in probe
    row = gradient_flow.table_row("irnn", 5, "init", probe, probe["loss"])
    assert row["sat_tanh"] is None and row["sat_gates"] is None
    assert gradient_flow.format_table([row]).endswith("| - | - |")
    # IRNN at init: J_t = diag(relu'(z)) · I, so ‖J_t‖₂ ≤ 1, and the head's MSE is positive.
    assert 0.0 < row["jacobian_norm"] <= 1.0 + 1e-9 and row["test_mse"] > 0


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"clip_norm": 0.0}, "clip_norm=0.0 must be finite and > 0"),
        ({"clip_norm": -1.0}, "clip_norm=-1.0 must be finite and > 0"),  # gradient ascent
        ({"clip_norm": math.nan}, "clip_norm=nan must be finite and > 0"),
        ({"configs": ("rnn_g1", "tcn")}, "configs=('rnn_g1', 'tcn'): 'tcn' is not one of"),
        ({"configs": ()}, "configs=() must not be empty"),
        ({"configs": ("gru", "gru")}, "configs=('gru', 'gru') lists 'gru' more than once"),
        ({"lengths": (1, 5)}, "lengths=(1, 5): the adding problem needs T >= 2"),
        ({"jacobian_batch": 4}, "jacobian_batch=4 must not exceed probe_batch=3"),
        ({"train_steps": -1}, "train_steps=-1 must be finite and >= 0"),
        ({"seeds": 0}, "seeds=0 must be finite and > 0"),
        (
            {"configs": ("lru", "rnn_g1"), "trained_from": "runs/x"},
            "configs=('lru', 'rnn_g1'): 'rnn_g1' is not a cell that experiments.long_range",
        ),
    ],
)
def test_gradient_flow_config_rejects_bad_values(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        dataclasses.replace(TINY_FLOW, **changes)


def test_gradient_flow_config_accepts_no_clipping_and_no_training():
    assert dataclasses.replace(TINY_FLOW, clip_norm=None).clip_norm is None
    assert dataclasses.replace(TINY_FLOW, train_steps=0).train_steps == 0
    # A copy sweep's delay may be 1: with trained_from the sweep's lengths are checked by run.
    copy = dataclasses.replace(TINY_FLOW, configs=("gru",), lengths=(1,), trained_from="runs/x")
    assert copy.lengths == (1,)


def test_gradient_flow_bad_flag_is_one_line_and_exit_1(bad_flag):
    _, err = bad_flag.communicate(timeout=900)
    assert bad_flag.returncode == 1
    assert err.strip() == "error: --clip_norm=-1.0 must be finite and > 0", err


def test_each_cell_names_its_hidden_state():
    """``cell.hidden``: ``h`` of an LSTM carry (chrono and layer-normalised too), the array
    itself for the one-array carries, the modulus for LRU's (tested against NumPy in
    tests/test_linear.py), for every cell of the registry."""
    h, c = jnp.arange(6.0).reshape(2, 3), -jnp.ones((2, 3))
    lru_norms = rnn_jax.LRUCarry(jnp.array([[3.0, 0.0]]), jnp.array([[4.0, 2.0]]))
    for name in registry.NAMES:
        cell = registry.named_cell(name, 3, 10)
        if "lstm" in name and name != "min_lstm":
            np.testing.assert_array_equal(cell.hidden(cells.LSTMCarry(h, c)), h, err_msg=name)
        elif name == "lru":
            np.testing.assert_allclose(cell.hidden(lru_norms), [[5.0, 2.0]])
        else:
            assert cell.hidden(h) is h, name


def test_norm_does_not_underflow_in_float32():
    x = jnp.array([[3e-20, 4e-20], [0.0, 0.0], [3.0, -4.0]], jnp.float32)
    np.testing.assert_allclose(gradients.norm(x), [5e-20, 0.0, 5.0], rtol=1e-6)
