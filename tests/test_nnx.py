"""The NNX modules: every cell inside nnx.RNN and nnx.Bidirectional, params moved between the
pure functions, NNX, linen, Keras and PyTorch, the probes, checkpoints, the NNX char-LM."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import assert_bit_identical

import rnn_jax
from rnn_jax import cells, convert, gradients, linen
from rnn_jax import nnx as rnx
from rnn_jax.registry import NAMES, named_cell
from rnn_jax.scan import ScanType, unroll

UNITS, DIM, TIME, LENGTH = 5, 4, 6, 6
GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "keras_torch.npz")


def _custom_cell() -> rnn_jax.Cell:
    """A leaky tanh RNN of our own with nested params and a two-part carry."""

    def init(key, input_dim):
        k_w, k_u = jax.random.split(key)
        return {
            "w": {"x": jax.random.normal(k_w, (input_dim, UNITS)) / 2},
            "u": cells.orthogonal(k_u, (UNITS, UNITS)),
        }

    def step(params, carry, x):
        h, steps = carry
        h = 0.5 * h + 0.5 * jnp.tanh(x @ params["w"]["x"] + h @ params["u"])
        return (h, steps + 1.0), h

    return rnn_jax.custom_cell(
        init,
        lambda batch: (jnp.zeros((batch, UNITS)), jnp.zeros((batch, 1))),
        step,
        hidden=lambda carry: carry[0],
    )


# Every registry cell, GRU in its reset-before form, and a cell of the user's own.
CASES = (*NAMES, "gru_reset_before", "custom")


def _pure_cell(case: str) -> rnn_jax.Cell:
    if case == "gru_reset_before":
        return cells.gru(UNITS, reset_after=False)
    if case == "custom":
        return _custom_cell()
    return named_cell(case, UNITS, LENGTH)


def _module(case: str, seed: int = 0, in_features: int = DIM) -> rnx.RNNCell:
    if case in NAMES:
        return rnx.RNNCell(case, in_features, units=UNITS, length=LENGTH, rngs=nnx.Rngs(seed))
    return rnx.RNNCell(_pure_cell(case), in_features, rngs=nnx.Rngs(seed))


def _xs(batch=3, time=TIME, dim=DIM, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, time, dim)), jnp.float32)


def _close(a, b, tol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


def _reference(cell, params, xs, carry=None, **kwargs):
    """The readable scan of the pure cell: what every path is checked against."""
    return unroll(cell, params, xs, carry, scan=ScanType.SEQUENTIAL, **kwargs)


def _nonzero_carry(module, batch=3):
    carry = module.initialize_carry((batch, DIM))
    return jax.tree.map(lambda c: c + 0.3, carry)


@pytest.mark.parametrize("case", CASES)
def test_params_are_the_pure_cells_drawn_from_the_same_key(case):
    module = _module(case, seed=7)
    cell = _pure_cell(case)
    want = cell.init(nnx.Rngs(7).params(), DIM)
    assert_bit_identical(module.params, want)
    assert_bit_identical(nnx.to_pure_dict(nnx.state(module, nnx.Param)), want)
    assert module.param_names == tuple(want)
    for name in want:
        assert isinstance(getattr(module, name), (nnx.Param, nnx.Dict))
    other = _module(case, seed=8).params
    assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(want)))


def _step_scan(cell, params, xs, carry):
    """The pure ``cell.step`` scanned as written, one step at a time: what ``nnx.RNN`` runs."""
    carry, ys = jax.lax.scan(lambda c, x: cell.step(params, c, x), carry, jnp.swapaxes(xs, 0, 1))
    return carry, jnp.swapaxes(ys, 0, 1)


@nnx.jit
def _every_path(module, xs, carry0, lengths):
    """``(got, want, tolerance)``: nnx.RNN, our layer and the linen layer against the pure
    cell."""
    cell, params = module.pure, module.params
    rnn = nnx.RNN(module, return_carry=True)
    forward = _reference(cell, params, xs, carry0, return_sequences=True)
    got_rnn = rnn(xs, initial_carry=carry0)
    linen_layer = linen.RNN(cell=cell, return_sequences=True, return_state=True)
    pairs = {
        "nnx.RNN": (got_rnn, _step_scan(cell, params, xs, carry0), 1e-6),
        # nnx.RNN projects and prepares at every step, unroll once for all steps: the same
        # arithmetic in another order, equal up to float32 rounding.
        "nnx.RNN vs unroll": (got_rnn, forward, 1e-5),
        # nnx.RNN selects each sequence's last carry (its outputs past a length run on).
        "nnx.RNN lengths": (
            rnn(xs, initial_carry=carry0, seq_lengths=lengths)[0],
            _reference(cell, params, xs, carry0, lengths=lengths)[0],
            1e-6,
        ),
        "linen": (linen_layer.apply({"params": params}, xs, carry0), forward, 1e-6),
        "Recurrent last": (
            rnx.Recurrent(module, return_sequences=False)(xs, initial_carry=carry0),
            forward[1][:, -1],
            1e-6,
        ),
    }
    for reverse in (False, True):
        layer = rnx.Recurrent(module, return_carry=True, reverse=reverse)
        want = _reference(
            cell, params, xs, carry0, lengths=lengths, reverse=reverse, return_sequences=True
        )
        got = layer(xs, initial_carry=carry0, seq_lengths=lengths)
        pairs[f"Recurrent reverse={reverse}"] = (got, want, 1e-6)
    return pairs


@pytest.mark.parametrize("case", CASES)
def test_every_path_equals_the_pure_cell(case):
    """nnx.RNN, our layer (masked, reversed) and linen, from params moved in by set_params."""
    cell = _pure_cell(case)
    params = cell.init(jax.random.PRNGKey(3), DIM)
    module = _module(case)
    rnx.set_params(module, params)
    assert_bit_identical(nnx.to_pure_dict(nnx.state(module, nnx.Param)), params)
    xs, carry0 = _xs(), _nonzero_carry(module)
    pairs = _every_path(module, xs, carry0, jnp.array([6, 2, 4]))
    for got, want, tol in pairs.values():
        _close(got, want, tol)

    # linen -> NNX: a linen layer's own init, written into a fresh module.
    layer = linen.RNN(cell=cell, return_sequences=True)
    drawn = layer.init(jax.random.PRNGKey(5), xs)["params"]
    assert jax.tree.map(jnp.shape, drawn) == jax.tree.map(jnp.shape, module.params)
    fresh = _module(case, seed=1)
    rnx.set_params(fresh, drawn)
    assert_bit_identical(fresh.params, drawn)


_KERAS = {
    "keras_simple_rnn": cells.simple_rnn,
    "keras_lstm": cells.lstm,
    "keras_gru_reset_after": cells.gru,
    "keras_gru_reset_before": lambda units: cells.gru(units, reset_after=False),
}
_TORCH = {"torch_rnn": "simple_rnn", "torch_lstm": "lstm", "torch_gru": "gru"}


def _golden(case: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as golden:
        return {k[len(case) + 1 :]: golden[k] for k in golden.files if k.startswith(case + "/")}


@pytest.mark.parametrize("case", sorted(_KERAS) + sorted(_TORCH))
def test_keras_and_torch_weights_give_their_libraries_outputs(case):
    """Weights saved from Keras 3 and PyTorch layers, loaded into the NNX cell (through
    rnn_jax.convert for PyTorch), give the outputs those libraries recorded."""
    data = _golden(case)
    weights = {k[len("w/") :]: v for k, v in data.items() if k.startswith("w/")}
    units = data["out"].shape[-1]
    if case in _KERAS:
        cell, params = _KERAS[case](units), weights
    else:
        cell = cells.CELLS[_TORCH[case]](units)
        params = convert.from_torch(weights, _TORCH[case])["layer_0"]
    module = rnx.RNNCell(cell, data["x"].shape[-1], rngs=nnx.Rngs(0))
    rnx.set_params(module, params)
    h0 = data["h0"].reshape(-1, units)
    carry = cells.LSTMCarry(h0, data["c0"].reshape(-1, units)) if "c0" in data else h0
    final, ys = _run_rnn(module, jnp.asarray(data["x"]), carry)
    np.testing.assert_allclose(ys, data["out"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        final.h if "c0" in data else final, data["h"].reshape(-1, units), rtol=1e-5, atol=1e-5
    )


@nnx.jit
def _run_rnn(module, xs, carry):
    return nnx.RNN(module, return_carry=True)(xs, initial_carry=carry)


@pytest.mark.parametrize("name", ["simple_rnn", "lstm", "gru"])
def test_nnx_params_to_torch_and_back(name):
    module = _module(name, seed=4)
    state_dict = convert.to_torch({"layer_0": module.params}, name)
    assert sorted(state_dict) == ["bias_hh_l0", "bias_ih_l0", "weight_hh_l0", "weight_ih_l0"]
    fresh = _module(name, seed=5)
    rnx.set_params(fresh, convert.from_torch(state_dict, name)["layer_0"])
    assert_bit_identical(fresh.params, module.params)
    if name == "gru":
        with pytest.raises(ValueError, match="reset-after"):
            convert.to_torch({"layer_0": _module("gru_reset_before").params}, "gru")


def test_bidirectional_equals_the_pure_layer():
    forward, backward = _module("lstm", seed=0), _module("gru", seed=1)
    pure = rnn_jax.bidirectional(cells.lstm(UNITS), cells.gru(UNITS))
    params = {"forward": forward.params, "backward": backward.params}
    xs, lengths = _xs(), jnp.array([6, 3, 5])

    @nnx.jit
    def both(forward, backward, xs, lengths):
        flax_rnns = nnx.Bidirectional(nnx.RNN(forward), nnx.RNN(backward))
        ours = nnx.Bidirectional(rnx.Recurrent(forward), rnx.Recurrent(backward), return_carry=True)
        return (
            (flax_rnns(xs), pure.apply(params, xs, return_sequences=True)[1]),
            # Ours mask past each length as the pure layer does: equal everywhere.
            (
                ours(xs, seq_lengths=lengths),
                pure.apply(params, xs, lengths=lengths, return_sequences=True),
            ),
        )

    for got, want in both(forward, backward, xs, lengths):
        _close(got, want)


def test_recurrent_options():
    module, lstm = _module("min_gru"), _module("lstm", in_features=7)
    xs, lengths = _xs(), jnp.array([6, 2, 4])
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 7, (2, 5)), jnp.int32)

    @nnx.jit
    def outputs(module, lstm, xs, lengths, tokens):
        cell, params = module.pure, module.params
        reverse = lambda **kw: rnx.Recurrent(module, reverse=True, **kw)(xs, seq_lengths=lengths)
        steps, carry = [], lstm.initialize_carry((2, 7))
        for t in range(tokens.shape[1]):
            carry, y = lstm(carry, tokens[:, t])
            steps.append(y)
        return {
            "want": _reference(
                cell, params, xs, lengths=lengths, reverse=True, return_sequences=True
            )[1],
            "sequential": reverse(scan=ScanType.SEQUENTIAL),
            "associative": reverse(scan=ScanType.ASSOCIATIVE),
            "flipped": reverse(keep_order=False),
            "flax_flipped": nnx.RNN(module, reverse=True)(xs, seq_lengths=lengths),
            "time_major": rnx.Recurrent(module, time_major=True)(jnp.swapaxes(xs, 0, 1)),
            "forward": _reference(cell, params, xs, return_sequences=True)[1],
            "tokens": rnx.Recurrent(lstm)(tokens),
            "steps": jnp.stack(steps, axis=1),
            "onehot": _reference(
                lstm.pure, lstm.params, jax.nn.one_hot(tokens, 7), return_sequences=True
            )[1],
        }

    out = outputs(module, lstm, xs, lengths, tokens)
    _close(out["sequential"], out["want"])
    _close(out["associative"], out["want"])
    # keep_order=False: each sequence's outputs in the order read, as nnx.RNN gives them.
    for b, n in enumerate(np.asarray(lengths)):
        _close(out["flipped"][b, :n], out["want"][b, :n][::-1])
        _close(out["flipped"][b, :n], out["flax_flipped"][b, :n])
        np.testing.assert_array_equal(out["flipped"][b, n:], 0.0)
    _close(jnp.swapaxes(out["time_major"], 0, 1), out["forward"])
    # Integer tokens: read as one-hot rows, by the layer and by the step.
    _close(out["tokens"], out["onehot"])
    _close(out["steps"], out["onehot"])


def test_initialize_carry_shapes_and_initialiser():
    module = _module("lru")
    carry = module.initialize_carry((2, 3, DIM))
    assert isinstance(carry, rnn_jax.LRUCarry)
    assert carry.re.shape == (2, 3, UNITS) and not np.any(carry.re)
    drawn = module.initialize_carry((4, DIM), nnx.Rngs(carry=0), nnx.initializers.ones)
    np.testing.assert_array_equal(drawn.im, np.ones((4, UNITS)))
    with pytest.raises(ValueError, match="rngs"):
        module.initialize_carry((4, DIM), None, nnx.initializers.ones)
    assert module.num_feature_axes == 1


def test_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match="'transformer'"):
        rnx.RNNCell("transformer", DIM, units=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="units"):
        rnx.RNNCell("lstm", DIM, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="chrono"):
        rnx.RNNCell("lstm_chrono", DIM, units=3, rngs=nnx.Rngs(0))
    clash = rnn_jax.custom_cell(
        lambda key, d: {"pure": jnp.zeros((d, 2))}, lambda b: jnp.zeros((b, 2)), None
    )
    with pytest.raises(ValueError, match="'pure'"):
        rnx.RNNCell(clash, DIM, rngs=nnx.Rngs(0))
    module = _module("gru")
    with pytest.raises(ValueError, match=r"'bias' has shape \(15,\).*\(2, 15\)"):
        rnx.set_params(module, cells.gru(UNITS, reset_after=False).init(jax.random.PRNGKey(0), DIM))
    with pytest.raises(ValueError, match="'bias' of the module is missing from the params"):
        rnx.set_params(module, {"kernel": module.params["kernel"]})
    extra = {**module.params, "gain": jnp.ones(3)}
    with pytest.raises(ValueError, match="'gain' of the params is missing from the module"):
        rnx.set_params(module, extra)
    with pytest.raises(ValueError, match="Linear"):
        rnx.pure(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))


class _Tagger(nnx.Module):
    """A user's model: a layer of ours, dropout, a Flax Dense head on every step."""

    def __init__(self, cell: str, *, rngs: nnx.Rngs):
        self.rnn = rnx.Recurrent(rnx.RNNCell(cell, DIM, units=UNITS, length=TIME, rngs=rngs))
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(UNITS, 3, rngs=rngs)

    def __call__(self, xs):
        return self.head(self.dropout(self.rnn(xs)))


@pytest.mark.parametrize("case", ["lstm", "lru"])
def test_probes_of_a_layer_inside_a_model_equal_the_pure_cells(case):
    model = _Tagger(case, rngs=nnx.Rngs(0))
    model.eval()
    xs, labels = _xs(), jnp.array([0, 2, 1])
    cell, params = _pure_cell(case), model.rnn.cell.params

    @nnx.jit
    def probes(model, xs):
        def loss_fn(ys):  # the last output through the model's head: per-example losses
            logits = model.head(ys)
            return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]

        square = lambda ys: jnp.sum(ys**2)
        module = model.rnn.cell
        # Independently: jacfwd of the NNX cell's own step, the first example, step by step.
        jacobians, carry = [], module.initialize_carry((1, DIM))
        for t in range(TIME):
            flat, unravel = jax.flatten_util.ravel_pytree(jax.tree.map(lambda c: c[0], carry))

            def step(v, t=t):
                new, _ = module(jax.tree.map(lambda c: c[None], unravel(v)), xs[:1, t])
                return jax.flatten_util.ravel_pytree(jax.tree.map(lambda c: c[0], new))[0]

            jacobians.append(jax.jacfwd(step)(flat))
            carry = module(carry, xs[:1, t])[0]
        last = rnx.Recurrent(module, return_sequences=False)(xs)
        return {
            "norms": rnx.carry_gradient_norms(model.rnn, xs, loss_fn),
            "want_norms": gradients.carry_gradient_norms(cell, module.params, xs, loss_fn),
            "last_grad": jax.grad(lambda y: jnp.sum(loss_fn(y)))(last),
            "grads": rnx.carry_gradients(module, xs, square, return_sequences=True),
            "want_grads": gradients.carry_gradients(
                cell, module.params, xs, square, return_sequences=True
            ),
            "jac": rnx.step_jacobians(model.rnn, xs),
            "want_jac": gradients.step_jacobians(cell, module.params, xs),
            "own_jac": jnp.stack(jacobians),
            "jac_norms": rnx.jacobian_norms(nnx.RNN(module), xs, spectrum=True),
            "want_jac_norms": gradients.jacobian_norms(cell, module.params, xs, spectrum=True),
        }

    out = probes(model, xs)
    for name in ("norms", "grads", "jac", "jac_norms"):
        _close(out[name], out[f"want_{name}"])
    np.testing.assert_allclose(out["jac"][0], out["own_jac"], rtol=1e-5, atol=1e-6)
    if case == "lstm":  # ∂L/∂h_{T-1} = ∂L/∂y_{T-1}: the last output is h
        norms = np.linalg.norm(out["last_grad"], axis=-1)
        np.testing.assert_allclose(out["norms"][1].h[:, -1], norms, rtol=1e-5)
        _close(rnx.saturation(model.rnn, xs), gradients.saturation(cell, params, xs))
    with pytest.raises(ValueError, match="Linear"):
        rnx.step_jacobians(model.head, xs)


def _arrays(*modules):
    """Every variable's value, PRNG keys as their data (NumPy cannot read typed keys)."""
    values = nnx.to_pure_dict(nnx.state(modules))
    is_key = lambda x: jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    return jax.tree.map(lambda x: jax.random.key_data(x) if is_key(x) else x, values)


def test_checkpoint_resumes_model_and_optimizer_exactly(tmp_path):
    xs, labels = _xs(time=4), jnp.array([[0, 1, 2, 0], [1, 1, 0, 2], [2, 0, 0, 1]])

    @nnx.jit
    def update(model, optimizer):
        def loss_fn(model):
            logits = model(xs)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    def fresh(seed):
        model = _Tagger("lstm", rngs=nnx.Rngs(seed, dropout=seed + 10))
        return model, nnx.Optimizer(model, rnn_jax.rmsprop(1e-2), wrt=nnx.Param)

    model, optimizer = fresh(0)
    update(model, optimizer)
    rnx.save_checkpoint(str(tmp_path), 1, {"model": model, "optimizer": optimizer}, {"note": 1})

    resumed, resumed_optimizer = fresh(1)
    assert not np.array_equal(resumed.head.kernel[...], model.head.kernel[...])
    meta = rnx.restore_checkpoint(
        str(tmp_path), 1, {"model": resumed, "optimizer": resumed_optimizer}
    )
    assert meta == {"note": 1}
    assert_bit_identical(_arrays(resumed, resumed_optimizer), _arrays(model, optimizer))

    # The next update (dropout's draw included) is the same, bit for bit.
    assert float(update(model, optimizer)) == float(update(resumed, resumed_optimizer))
    assert_bit_identical(_arrays(resumed, resumed_optimizer), _arrays(model, optimizer))
    assert int(resumed_optimizer.step[...]) == 2

    other = _Tagger("gru", rngs=nnx.Rngs(0))
    with pytest.raises(rnn_jax.CheckpointError, match="does not match"):
        rnx.restore_checkpoint(str(tmp_path), 1, {"model": other, "optimizer": optimizer})


@pytest.mark.usefixtures("alice_path")  # skips where the corpus cannot be obtained
def test_nnx_char_lm_equals_the_pure_stateful_run():
    from experiments import char_lm, nnx_char_lm

    config = char_lm.Config(
        mode="stateful",
        layers=2,
        cell="lstm",
        units=8,
        batch_size=32,
        bptt=50,
        iterations=1,
        num_preds=2,
    )
    pure = char_lm.run(config, None, out=lambda line: None)
    ours = nnx_char_lm.run(config, None, out=lambda line: None)
    assert len(ours.history) == len(pure.history) == 1
    for got, want in zip(ours.history, pure.history, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
        assert got["val_bits_per_char"] == pytest.approx(want["val_bits_per_char"], rel=1e-6)
    pure_params = pure.state.params["rnn"]["layer_1"]
    _close(ours.model.layers[1].cell.params, pure_params, tol=1e-5)
    with pytest.raises(ValueError, match="mode"):
        nnx_char_lm.run(char_lm.Config(units=8, iterations=1), None)
