"""A user builds a cell from init, initial_carry and step alone (``rnn_jax.custom_cell``), and
every tool accepts it: unroll, the gradient probes, the sampler, the trainer, the linen layer,
``jit``/``vmap``/``grad``.

Two cells written here as a user would: an Elman cell that reads float features or integer
tokens in its own step (its numbers must be the built-in ``simple_rnn``'s, given the same
params), and a cell whose carry has two parts (a slow memory and a fast state, the hidden state
it names with ``hidden=``: not the carry's first part, not called ``h``).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest

import rnn_jax
from rnn_jax.linen import RNN

UNITS, V, TIME = 5, 7, 6
SEQUENTIAL = rnn_jax.ScanType.SEQUENTIAL


def elman(units):
    """``h_t = tanh(x_t W + h_{t-1} U + b)``, params under Keras's names."""

    def init(key, input_dim):
        k_w, k_u = jax.random.split(key)
        return {
            "kernel": jax.random.normal(k_w, (input_dim, units)) / np.sqrt(input_dim),
            "recurrent_kernel": jax.random.normal(k_u, (units, units)) / np.sqrt(units),
            "bias": jnp.zeros((units,)),
        }

    def pre_activation(params, h, x):
        if jnp.issubdtype(x.dtype, jnp.integer):
            zx = params["kernel"][x]  # a token reads its row: the one-hot product
        else:
            zx = x @ params["kernel"]
        return zx + h @ params["recurrent_kernel"] + params["bias"][None, :]

    def step(params, h, x):
        h = jnp.tanh(pre_activation(params, h, x))
        return h, h

    def activations(params, h, x):
        return {"gates": {}, "tanh": {"tanh": step(params, h, x)[0]}}

    return rnn_jax.custom_cell(
        init, lambda batch: jnp.zeros((batch, units)), step, activations=activations
    )


class Memory(NamedTuple):
    """A slow memory ``s`` and a fast state ``h`` (the output, the hidden state)."""

    slow: jax.Array
    fast: jax.Array


def leaky_memory(units):
    """``a = σ(x W_a + h U_a + b_a)``, ``s_t = (1 - a) ⊙ s + a ⊙ h``,
    ``h_t = tanh(x W_h + s_t U_h + b_h)``; the output is ``h_t``, the carry ``Memory(s, h)``."""

    def init(key, input_dim):
        k_w, k_u = jax.random.split(key)
        return {
            "kernel": jax.random.normal(k_w, (input_dim, 2 * units)) / np.sqrt(input_dim),
            "recurrent_kernel": jax.random.normal(k_u, (units, 2 * units)) / np.sqrt(units),
            "bias": jnp.zeros((2 * units,)),
        }

    def parts(params, carry, x):
        w_a, w_h = jnp.split(params["kernel"], 2, axis=-1)
        u_a, u_h = jnp.split(params["recurrent_kernel"], 2, axis=-1)
        b_a, b_h = jnp.split(params["bias"], 2)
        rate = jax.nn.sigmoid(x @ w_a + carry.fast @ u_a + b_a[None, :])
        s = (1.0 - rate) * carry.slow + rate * carry.fast
        h = jnp.tanh(x @ w_h + s @ u_h + b_h[None, :])
        return Memory(s, h), {"gates": {"rate": rate}, "tanh": {"fast": h}}

    def step(params, carry, x):
        carry, _ = parts(params, carry, x)
        return carry, carry.fast

    def initial_carry(batch):
        return Memory(jnp.zeros((batch, units)), jnp.zeros((batch, units)))

    return rnn_jax.custom_cell(
        init,
        initial_carry,
        step,
        hidden=lambda carry: carry.fast,
        activations=lambda p, c, x: parts(p, c, x)[1],
    )


def numpy_leaky_memory(p, carry, x):
    """:func:`leaky_memory`'s step in float64 NumPy, from its equations: ``carry = (s, h)``."""
    s, h = carry
    w_a, w_h = np.split(p["kernel"], 2, axis=-1)
    u_a, u_h = np.split(p["recurrent_kernel"], 2, axis=-1)
    b_a, b_h = np.split(p["bias"], 2)
    rate = ref.sigmoid(x @ w_a + h @ u_a + b_a)
    s = (1.0 - rate) * s + rate * h
    h = np.tanh(x @ w_h + s @ u_h + b_h)
    return (s, h), h


def _random(tree, rng, scale=0.6):
    return jax.tree.map(
        lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), jnp.float32), tree
    )


def _params(cell, input_dim, seed=0):
    """Random params of the cell's shapes, biases included, so zeros hide nothing."""
    shapes = jax.eval_shape(lambda key: cell.init(key, input_dim), jax.random.PRNGKey(0))
    return _random(shapes, np.random.default_rng(seed))


def _loop(cell, params, xs, carry, reverse=False):
    """A Python loop over the user's step: ``(final carry, ys (batch, time, units))``."""
    ys = [None] * xs.shape[1]
    for t in reversed(range(xs.shape[1])) if reverse else range(xs.shape[1]):
        carry, ys[t] = cell.step(params, carry, xs[:, t])
    return carry, jnp.stack(ys, axis=1)


def _close(got, want, tol=1e-5, where=""):
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got) == len(want), where
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol, err_msg=where)


def _inputs(kind, batch=3, seed=1):
    rng = np.random.default_rng(seed)
    if kind == "tokens":
        return jnp.asarray(rng.integers(0, V, (batch, TIME)), jnp.int32)
    return jnp.asarray(rng.standard_normal((batch, TIME, V)), jnp.float32)


def test_custom_cell_fields():
    """The user's three functions fill a Cell: ``project`` passes ``x`` through, ``recur`` is
    ``step``, ``hidden`` is the user's (the carry itself for a one-array carry), ``units`` is
    read from the hidden state unless given."""
    cell = leaky_memory(UNITS)
    assert isinstance(cell, rnn_jax.Cell)
    assert cell.units == UNITS and elman(4).units == 4
    wide = rnn_jax.custom_cell(
        cell.init,
        lambda batch: Memory(jnp.zeros((batch, 3)), jnp.zeros((batch, 8))),
        cell.step,
        hidden=lambda carry: carry.fast,
    )
    assert wide.units == 8  # the hidden part's width, not the first part's
    given = rnn_jax.custom_cell(
        cell.init, cell.initial_carry, cell.step, hidden=cell.hidden, units=9
    )
    assert given.units == 9
    params = _params(cell, 3)
    carry = _random(jax.eval_shape(lambda: cell.initial_carry(2)), np.random.default_rng(3))
    x = _inputs("features", batch=2)[:, 0, :3]
    assert cell.project(params, x) is x
    _close(cell.recur(params, carry, x), cell.step(params, carry, x), 0.0)
    assert cell.hidden(carry) is carry.fast and elman(4).hidden(x) is x


@pytest.mark.parametrize(
    "carry",
    [
        lambda batch: Memory(jnp.zeros((batch, UNITS)), jnp.zeros((batch, UNITS))),
        lambda batch: (jnp.zeros((batch, UNITS)), jnp.zeros((batch, UNITS))),
        lambda batch: {"state": jnp.zeros((batch, UNITS))},
    ],
    ids=["NamedTuple", "tuple", "dict"],
)
def test_a_structured_carry_needs_hidden(carry):
    """Which part of a structured carry is the hidden state is never guessed: without
    ``hidden=`` the cell is refused when it is built."""
    cell = leaky_memory(UNITS)
    with pytest.raises(ValueError, match=r"not one array.*pass hidden="):
        rnn_jax.custom_cell(cell.init, carry, cell.step)


def test_probes_read_the_named_hidden_state():
    """``carry_gradients`` of the two-part carry (hidden part ``fast``, second, not ``h``)
    against central differences of the float64 NumPy cell: the loss reads every output
    ``y_t = h_t``, the derivative with respect to each part of every step's carry."""
    cell, rng = leaky_memory(UNITS), np.random.default_rng(11)
    batch, time, eps = 2, 4, 1e-6
    params = jax.tree.map(np.asarray, _params(cell, V, seed=12))
    params = jax.tree.map(lambda a: a.astype(np.float64), params)
    xs = rng.standard_normal((batch, time, V))
    weights = rng.standard_normal((time, UNITS))

    def numpy_losses(perturb_at=None, part=None, unit=None, sign=0.0):
        """Per-example ``Σ_t sin(y_t) · w_t``, the carry after step ``perturb_at`` moved."""
        carry, total = (np.zeros((batch, UNITS)), np.zeros((batch, UNITS))), np.zeros(batch)
        for t in range(time):
            carry, _ = numpy_leaky_memory(params, carry, xs[:, t])
            if t == perturb_at:
                carry = list(carry)
                carry[part] = carry[part] + sign * eps * np.eye(UNITS)[unit]
                carry = tuple(carry)
            total = total + np.sin(carry[1]) @ weights[t]
        return total

    want = np.zeros((2, batch, time, UNITS))  # (part, batch, time, unit)
    for t in range(time):
        for part in range(2):
            for unit in range(UNITS):
                up, down = (numpy_losses(t, part, unit, sign) for sign in (1.0, -1.0))
                want[part, :, t, unit] = (up - down) / (2 * eps)

    with jax.enable_x64(True):
        loss_fn = lambda ys: jnp.sum(jnp.sin(ys) * weights[None], axis=(1, 2))
        losses, grads = jax.jit(
            lambda p, x: rnn_jax.carry_gradients(cell, p, x, loss_fn, return_sequences=True)
        )(jax.tree.map(jnp.asarray, params), jnp.asarray(xs))
    assert isinstance(grads, Memory)
    np.testing.assert_allclose(losses, numpy_losses(), rtol=1e-12)
    np.testing.assert_allclose(grads.slow, want[0], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(grads.fast, want[1], rtol=1e-6, atol=1e-8)
    assert np.all(np.abs(want[0, :, :-1]) > 1e-6)  # the slow part matters, but for the last step


@pytest.mark.parametrize(
    "name,kind", [("elman", "tokens"), ("elman", "features"), ("leaky_memory", "features")]
)
def test_unroll_equals_python_loop_over_step(name, kind):
    """Zero and given carries, reverse, lengths (each sequence cut at its own length)."""
    cell = {"elman": elman, "leaky_memory": leaky_memory}[name](UNITS)
    params, xs = _params(cell, V), _inputs(kind)
    carry0 = _random(jax.eval_shape(lambda: cell.initial_carry(3)), np.random.default_rng(2))
    lengths = (TIME, 3, 1)

    @jax.jit
    def run(params, xs, carry0):
        out = {}
        for reverse in (False, True):
            for carry in (None, carry0):
                start = cell.initial_carry(3) if carry is None else carry
                key = f"reverse={reverse}, carry={'zeros' if carry is None else 'given'}"
                out[key] = (
                    unroll_both(params, xs, carry, reverse=reverse),
                    _loop(cell, params, xs, start, reverse),
                )
            got = unroll_both(params, xs, None, reverse=reverse, lengths=jnp.array(lengths))
            cut = [
                _loop(cell, params, xs[b : b + 1, :n], cell.initial_carry(1), reverse)
                for b, n in enumerate(lengths)
            ]
            out[f"reverse={reverse}, lengths"] = (got, cut)
        return out

    def unroll_both(params, xs, carry, **kwargs):
        final, ys = rnn_jax.unroll(cell, params, xs, carry, return_sequences=True, **kwargs)
        return final, ys, rnn_jax.unroll(cell, params, xs, carry, **kwargs)[1]

    for where, (got, want) in run(params, xs, carry0).items():
        reverse = where.startswith("reverse=True")
        final, ys, last = got
        if "lengths" not in where:
            _close((final, ys), want, where=where)
            assert type(final) is type(want[0])
            _close(last, want[1][:, 0] if reverse else want[1][:, -1], where=where)
            continue
        for b, (n, (want_final, want_ys)) in enumerate(zip(lengths, want, strict=True)):
            _close(jax.tree.map(lambda c, b=b: c[b : b + 1], final), want_final, where=where)
            _close(ys[b : b + 1, :n], want_ys, where=where)
            np.testing.assert_array_equal(ys[b, n:], 0.0)
            _close(last[b], want_ys[0, 0] if reverse else want_ys[0, n - 1], where=where)


def test_elman_equals_builtin_simple_rnn():
    """Same params, same numbers as ``rnn_jax.simple_rnn`` (its default, the fused path without
    lengths, and its readable scan), tokens and features, values and gradients; under ``vmap``
    over parameter sets."""
    mine, builtin = elman(UNITS), rnn_jax.simple_rnn(UNITS)
    params = _params(builtin, V)
    tokens, features = _inputs("tokens"), _inputs("features")

    def loss(cell, params, xs, **kwargs):
        final, ys = rnn_jax.unroll(cell, params, xs, return_sequences=True, **kwargs)
        return jnp.sum(jnp.sin(ys)) + jnp.sum(final**2)

    @jax.jit
    def run(params, tokens, features):
        out = []
        for xs in (tokens, features):
            for kwargs in ({}, {"reverse": True, "lengths": jnp.array([TIME, 2, 4])}):
                for cell, options in ((mine, {}), (builtin, {}), (builtin, {"scan": SEQUENTIAL})):
                    grad = jax.value_and_grad(
                        lambda p, c=cell, k={**kwargs, **options}: loss(c, p, xs, **k)
                    )
                    out.append(grad(params))
        stacked = jax.tree.map(lambda p: jnp.stack([p, 0.5 * p]), params)
        for cell in (mine, builtin):
            out.append(jax.vmap(lambda p, c=cell: rnn_jax.unroll(c, p, tokens)[1])(stacked))
        return out

    out = run(params, tokens, features)
    for i in range(0, 12, 3):
        _close(out[i], out[i + 1], where=f"configuration {i // 3}, fast path")
        _close(out[i], out[i + 2], where=f"configuration {i // 3}, readable scan")
    _close(out[12], out[13], where="vmap")


def test_probes_equal_builtin_simple_rnn():
    """carry_gradient_norms, jacobian_norms and saturation (from the user's ``activations``)
    give the built-in simple_rnn's numbers, for features and for tokens."""
    mine, builtin = elman(UNITS), rnn_jax.simple_rnn(UNITS)
    params = _params(builtin, V, seed=4)
    params = dict(params, kernel=3.0 * params["kernel"])  # some units saturate

    @jax.jit
    def probes(params, tokens, features):
        out = []
        for cell in (mine, builtin):
            for xs in (tokens, features):
                out.append(
                    (
                        rnn_jax.carry_gradient_norms(
                            cell, params, xs, lambda ys: jnp.sum(ys**2, axis=-1)
                        ),
                        rnn_jax.jacobian_norms(cell, params, xs),
                        rnn_jax.saturation(cell, params, xs),
                    )
                )
        return out

    out = probes(params, _inputs("tokens"), _inputs("features"))
    for got, want, kind in zip(out[:2], out[2:], ("tokens", "features"), strict=True):
        (_, norms), _, sat = got
        assert norms.shape == (3, TIME) and np.all(np.asarray(norms[:, -1]) > 0)
        assert sorted(sat) == ["tanh", "tanh_units"]
        assert 0.0 < float(jnp.mean(sat["tanh"])) < 1.0
        _close(got, want, where=kind)


def test_probes_on_a_two_part_carry():
    """The probes read a pytree carry: norms per part, Jacobians over the flattened carry
    (``slow`` then ``fast``; checked against ``jax.jacfwd`` of the user's step), the user's named
    activations."""
    cell = leaky_memory(UNITS)
    params, xs = _params(cell, V, seed=5), _inputs("features", batch=2)
    t, b = 3, 1  # the step and example whose Jacobian is rebuilt from the user's step

    @jax.jit
    def probes(params, xs):
        carry, _ = _loop(cell, params, xs[b : b + 1, :t], cell.initial_carry(1))

        def flat_step(vec):
            new, _ = cell.step(
                params, Memory(vec[None, :UNITS], vec[None, UNITS:]), xs[b : b + 1, t]
            )
            return jnp.concatenate([new.slow[0], new.fast[0]])

        return (
            rnn_jax.carry_gradient_norms(cell, params, xs, lambda h: jnp.sum(h**2, axis=-1)),
            rnn_jax.step_jacobians(cell, params, xs),
            rnn_jax.jacobian_norms(cell, params, xs),
            rnn_jax.saturation(cell, params, xs),
            _loop(cell, params, xs, cell.initial_carry(2))[1],
            jax.jacfwd(flat_step)(jnp.concatenate([carry.slow[0], carry.fast[0]])),
        )

    (loss, norms), jacobians, jac_norms, sat, hs, want = probes(params, xs)
    assert isinstance(norms, Memory) and norms.slow.shape == (2, TIME)
    assert np.all(np.asarray(norms.fast[:, -1]) > 0)
    assert np.all(np.asarray(norms.slow[:, -1]) == 0)
    np.testing.assert_allclose(loss, np.sum(np.asarray(hs[:, -1]) ** 2, axis=-1), rtol=1e-6)
    assert sorted(sat) == ["fast", "gates", "rate", "tanh_units"]
    np.testing.assert_array_equal(sat["gates"], sat["rate"])
    np.testing.assert_allclose(jacobians[b, t], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        jac_norms["step_norm"][b, t],
        np.linalg.svd(np.asarray(want), compute_uv=False)[0],
        rtol=1e-5,
    )


def test_sampler_gives_the_builtin_tokens():
    """``make_sampler`` on ``sequence_classifier(custom, V, V)`` params: the built-in's tokens."""
    mine, builtin = elman(16), rnn_jax.simple_rnn(16)
    shapes = jax.eval_shape(rnn_jax.sequence_classifier(builtin, V, V).init, jax.random.PRNGKey(0))
    params = _random(shapes, np.random.default_rng(6), scale=1.0)
    params["rnn"]["kernel"] = 4.0 * params["rnn"]["kernel"]  # the greedy path moves around
    params["dense"]["kernel"] = 3.0 * params["dense"]["kernel"]
    seeds = jnp.asarray(np.random.default_rng(7).integers(0, V, (4, 5)))
    got, want = (
        np.asarray(rnn_jax.make_sampler(cell, 12)(params, seeds)) for cell in (mine, builtin)
    )
    np.testing.assert_array_equal(got, want)
    assert len(set(got.ravel().tolist())) > 2


def test_trainer_moves_every_param():
    """One ``make_trainer(shuffled_epoch)`` epoch of a token classifier on the user's cell
    (its gradients are the built-in's: test_elman_equals_builtin_simple_rnn)."""
    rng = np.random.default_rng(9)
    data = (
        jnp.asarray(rng.integers(0, V, (10, TIME)), jnp.int32),
        jnp.asarray(rng.integers(0, V, (10,)), jnp.int32),
    )
    assert set(np.asarray(data[0]).ravel().tolist()) == set(range(V))  # every kernel row is read

    def get_batch(data, indices):
        return jax.tree.map(lambda a: a[indices], data)

    model = rnn_jax.sequence_classifier(elman(UNITS), V, V)

    def loss_fn(params, batch):
        xs, labels = batch
        return rnn_jax.softmax_cross_entropy(model.apply(params, xs), labels), {}

    opt = rnn_jax.rmsprop(1e-2)
    run = rnn_jax.make_trainer(loss_fn, opt, rnn_jax.shuffled_epoch(get_batch, 10, 4))
    params = model.init(jax.random.PRNGKey(0))
    state, metrics = run(rnn_jax.create_train_state(params, opt, jax.random.PRNGKey(1)), data)
    assert bool(metrics["finite"]) and int(state.step) == 3
    moved = jax.tree.map(
        lambda a, b: bool(np.all(np.asarray(a) != np.asarray(b))), params, state.params
    )
    assert all(jax.tree.leaves(moved)), moved


def test_linen_layer_runs_a_custom_cell():
    """``rnn_jax.linen.RNN(cell=custom)``: params from the user's init, the numbers of
    ``unroll``; tokens (``input_dim``) and a two-part carry (``return_state``)."""
    tokens = _inputs("tokens", batch=2)
    features = _inputs("features", batch=2)
    for cell, xs, kwargs in (
        (elman(UNITS), tokens, {"input_dim": V, "return_sequences": True}),
        (leaky_memory(UNITS), features, {"return_state": True, "reverse": True}),
    ):
        layer = RNN(cell=cell, **kwargs)

        @jax.jit
        def both(xs, layer=layer, cell=cell, kwargs=kwargs):
            variables = layer.init(jax.random.PRNGKey(0), xs)
            params = variables["params"]
            final, ys = rnn_jax.unroll(
                cell,
                params,
                xs,
                reverse=kwargs.get("reverse", False),
                return_sequences=kwargs.get("return_sequences", False),
            )
            want = (final, ys) if kwargs.get("return_state") else ys
            return params, layer.apply(variables, xs), want

        params, got, want = both(xs)
        drawn = jax.eval_shape(lambda: cell.init(jax.random.PRNGKey(0), V))
        assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, drawn)
        np.testing.assert_array_equal(params["bias"], 0.0)  # the user's init drew them
        assert np.all(np.asarray(params["kernel"]) != 0.0)
        _close(got, want)
        assert (
            type(got[0]) is Memory if kwargs.get("return_state") else got.shape == (2, TIME, UNITS)
        )


def test_jit_vmap_grad_compose():
    """``jit(vmap(grad))`` over parameter sets equals per-set gradients, and ``jvp`` agrees
    with reverse mode, for the two-part carry."""
    cell = leaky_memory(UNITS)
    params, xs = _params(cell, V, seed=10), _inputs("features", batch=2)
    direction = jax.tree.map(jnp.cos, params)

    def loss(params):
        final, ys = rnn_jax.unroll(cell, params, xs, reverse=True, return_sequences=True)
        return jnp.sum(jnp.sin(ys)) + jnp.sum(final.slow**2)

    @jax.jit
    def run(params, direction):
        stacked = jax.tree.map(lambda p: jnp.stack([p, 0.5 * p, -p]), params)
        each = [jax.grad(loss)(jax.tree.map(lambda p, i=i: p[i], stacked)) for i in range(3)]
        return jax.vmap(jax.grad(loss))(stacked), each, jax.jvp(loss, (params,), (direction,))[1]

    batched, each, forward = run(params, direction)
    for i, grads in enumerate(each):
        _close(jax.tree.map(lambda g, i=i: g[i], batched), grads, where=f"set {i}")
    assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(each[0]))
    reverse = sum(
        jnp.vdot(g, d)
        for g, d in zip(jax.tree.leaves(each[0]), jax.tree.leaves(direction), strict=True)
    )
    np.testing.assert_allclose(forward, reverse, rtol=1e-5)
