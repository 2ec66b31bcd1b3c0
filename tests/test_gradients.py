"""BPTT probes against jax.jacrev chains, finite differences and float64 NumPy cells."""

import csv
import functools
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from rnn_jax import cells, gradients

CELLS = ["simple_rnn", "lstm", "gru"]
BATCH, TIME, INPUT_DIM, UNITS = 2, 5, 2, 3


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


@pytest.mark.parametrize("name", CELLS)
def test_carry_gradient_norms_equal_jacrev_chain(name):
    with jax.enable_x64(True):
        cell, params, xs, readout = _setup(name)
        befores, ys = _stepwise(cell, params, xs)
        for every, loss_fn in ((False, _loss_last(readout)), (True, _loss_every(readout))):
            # dL/dy from jax.grad, carried back by explicit jacrev Jacobians of cell.step.
            def total(ys):
                return jnp.sum(loss_fn(ys if every else ys[:, -1]))

            dy = np.asarray(jax.grad(total)(ys))
            expected_h = np.zeros((BATCH, TIME))
            expected_c = np.zeros((BATCH, TIME))
            for b in range(BATCH):
                g = None
                for t in reversed(range(TIME)):
                    direct = np.zeros(UNITS * (2 if name == "lstm" else 1))
                    direct[:UNITS] = dy[b, t]
                    if g is None:
                        g = direct
                    else:
                        jac = _jacrev(cell, params, _row(befores[t + 1], b), xs[b, t + 1])
                        g = g @ np.asarray(jac) + direct
                    expected_h[b, t] = np.linalg.norm(g[:UNITS])
                    expected_c[b, t] = np.linalg.norm(g[UNITS:])

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
    loss_fn = lambda y: jnp.sum(y, axis=-1)  # noqa: E731

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


# float64 NumPy cells from the equations of DESIGN.md §3, with their gate activations.
def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _numpy_step(name, p, carry, x):
    w, u, bias = p["kernel"], p["recurrent_kernel"], p["bias"]
    if name == "simple_rnn":
        h = np.tanh(x @ w + carry @ u + bias)
        return h, {"tanh": [h]}
    if name == "lstm":
        h, c = carry
        z = x @ w + h @ u + bias
        i, f, g, o = np.split(z, 4, axis=-1)
        i, f, g, o = _sigmoid(i), _sigmoid(f), np.tanh(g), _sigmoid(o)
        c = f * c + i * g
        h = o * np.tanh(c)
        return (h, c), {"gates": [i, f, o], "tanh": [g, np.tanh(c)]}
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
    return h, {"gates": [z, r], "tanh": [n]}


@pytest.mark.parametrize("name", CELLS + ["gru_reset_before"])
def test_saturation_matches_numpy_cells(name):
    kwargs = {"reset_after": False} if name == "gru_reset_before" else {}
    with jax.enable_x64(True):
        cell, params, xs, _ = _setup(name.split("_reset")[0], scale=3.0, **kwargs)
        params = {k: np.asarray(v) for k, v in params.items()}
        sat = jax.jit(functools.partial(gradients.saturation, cell, margin=0.1))(params, xs)
        carry = (
            (np.zeros((BATCH, UNITS)),) * 2 if name == "lstm" else np.zeros((BATCH, UNITS))
        )
        _, ys = _stepwise(cell, params, xs)
        for t in range(TIME):
            carry, acts = _numpy_step(name, params, carry, xs[:, t])
            np.testing.assert_allclose(carry[0] if name == "lstm" else carry, ys[:, t], atol=1e-12)
            tanh = np.concatenate(acts["tanh"], axis=-1)
            np.testing.assert_allclose(sat["tanh_units"][:, t], np.mean(np.abs(tanh) > 0.9, -1))
            if "gates" in acts:
                gates = np.concatenate(acts["gates"], axis=-1)
                frac = np.mean((gates < 0.1) | (gates > 0.9), axis=-1)
                np.testing.assert_allclose(sat["gates"][:, t], frac)
        if name == "lstm":
            np.testing.assert_allclose(
                sat["forget_gate"][:, -1],
                np.mean((acts["gates"][1] < 0.1) | (acts["gates"][1] > 0.9), -1),
            )
        assert 0.0 < np.mean(sat["tanh_units"]) < 1.0  # the test can tell the stats apart


def test_saturation_rejects_unknown_cells():
    cell = cells.simple_rnn(UNITS)
    params = cell.init(jax.random.PRNGKey(0), INPUT_DIM)
    params["recurrent_kernel"] = jnp.zeros((UNITS, 2 * UNITS))
    with pytest.raises(ValueError, match="simple_rnn, lstm, gru"):
        gradients.saturation(cell, params, jnp.zeros((1, 2, INPUT_DIM)))


@pytest.fixture(scope="module", autouse=True)
def gradient_flow_run(tmp_path_factory):
    """A tiny ``experiments.gradient_flow`` run, started with this module so it overlaps the
    in-process tests; a subprocess because absl flags are process-global."""
    workdir = tmp_path_factory.mktemp("gradient_flow")
    args = ["--configs=rnn_g0.5,rnn_g3", "--lengths=5", "--seeds=2", "--units=3",
            "--train_steps=2", "--batch_size=4", "--probe_batch=3", "--jacobian_batch=2",
            f"--workdir={workdir}"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-m", "experiments.gradient_flow", *args], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc, workdir
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_gradient_flow_short_run_end_to_end(gradient_flow_run):
    proc, workdir = gradient_flow_run
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "| config |" in out
    saved = json.load(open(workdir / "results.json"))
    by = {(r["config"], r["phase"]): r for r in saved["rows"]}
    assert set(by) == {(c, p) for c in ("rnn_g0.5", "rnn_g3") for p in ("init", "trained")}
    # ‖J_t‖₂ ≤ gain for tanh(x W + h·gain·Q): the product over T-1 = 4 steps is ≤ 0.5⁴ at init.
    assert by[("rnn_g0.5", "init")]["log10_dhT_dh0"] <= 4 * math.log10(0.5) + 1e-9
    assert by[("rnn_g0.5", "init")]["jacobian_norm"] <= 0.5 + 1e-9
    assert by[("rnn_g3", "init")]["jacobian_norm"] <= 3.0 + 1e-9
    assert by[("rnn_g0.5", "init")]["log10_g0_over_gT"] < by[("rnn_g3", "init")]["log10_g0_over_gT"]
    assert by[("rnn_g3", "trained")]["inf_grad_steps"] == 0.0
    curve = next(c for c in saved["curves"] if (c["config"], c["phase"]) == ("rnn_g3", "init"))
    assert len(curve["log10_grad_h"]["median"]) == 5 and curve["log10_grad_rel"]["median"][-1] == 0
    with open(workdir / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    for png in ("grad_norms.png", "jacobians.png"):
        assert (workdir / png).stat().st_size > 1000


def test_norm_does_not_underflow_in_float32():
    x = jnp.array([[3e-20, 4e-20], [0.0, 0.0], [3.0, -4.0]], jnp.float32)
    np.testing.assert_allclose(gradients.norm(x), [5e-20, 0.0, 5.0], rtol=1e-6)
