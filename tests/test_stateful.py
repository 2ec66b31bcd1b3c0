"""Stateful truncated BPTT (DESIGN.md §7) against independent references.

Streams cover the text's pairs once, in order (rebuilt from every window); windows read with
the carry passed equal one long unroll (and a float64 NumPy one); the gradient of a window is
the long unroll's with the carry cut at the window's edge, and differs from the uncut one;
the carry is zero at the start of every epoch and passed within one (a loop of single updates
with the carry set by hand, float64 losses along it); a run interrupted after a mid-epoch
checkpoint resumes bit-identical, the carry being in the checkpoint; stateful generation
equals re-reading the whole prefix; held-out bits per char of both modes equal a float64 hand
computation over the same characters; dropout drops what the head reads, in training only, with
keys that come from the state's key per window; layers > 1 outside stateful mode is refused;
two (virtual CPU) devices train as one, and a state moves from one device to two.
"""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import optax
import pytest
from helpers import assert_bit_identical, tiny_text

from experiments import char_lm
from rnn_jax import cells, checkpoint, optim, parallel, rundir, train
from rnn_jax.batches import in_order, with_replacement
from rnn_jax.data import block_batch, make_blocks, make_streams, stream_batch
from rnn_jax.models import inverted_dropout, language_model, recurrent, stacked
from rnn_jax.registry import named_cell
from rnn_jax.sample import make_stateful_sampler

CELLS = {"simple_rnn": cells.simple_rnn, "lstm": cells.lstm}


def _quiet(*_):
    pass


def _assert_trees_close(a, b, rtol, atol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _model(kinds, units, vocab):
    """A language model: one recurrent layer per entry of ``kinds``, stacked when several."""
    layers = [recurrent(CELLS[k](u)) for k, u in zip(kinds, units, strict=True)]
    return language_model(layers[0] if len(layers) == 1 else stacked(layers), vocab)


def _layer_params(kinds, params):
    """The per-layer cell params of a language_model's ``params["rnn"]``."""
    if len(kinds) == 1:
        return [params["rnn"]]
    return [params["rnn"][f"layer_{i}"] for i in range(len(kinds))]


def _carry_list(kinds, carry):
    """A language_model carry as a list of per-layer carries (LSTM: ``(h, c)``)."""
    carries = [carry] if len(kinds) == 1 else list(carry)
    return [tuple(c) if k == "lstm" else c for k, c in zip(kinds, carries, strict=True)]


# --- float64 NumPy language model (tests/numpy_reference.py's cell equations) ------------------


def _np_lm(kinds, params, tokens, vocab, carries=None):
    """``(carries, logits (B, T, V))`` in float64 from the equations: each layer a Python loop
    of ``numpy_reference`` steps over one-hot tokens (layer 0) or the layer below's ``h``."""
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    tokens = np.asarray(tokens)
    xs = np.eye(vocab)[tokens]
    batch = tokens.shape[0]
    out = []
    for i, (kind, p) in enumerate(zip(kinds, _layer_params(kinds, params), strict=True)):
        units = p["recurrent_kernel"].shape[0]
        carry = ref.keras_initial_carry(kind, batch, units) if carries is None else carries[i]
        carry = jax.tree.map(lambda a: np.asarray(a, np.float64), carry)
        carry, xs = ref.run(lambda c, x, kind=kind, p=p: ref.keras_step(kind, p, c, x), carry, xs)
        out.append(carry)
    return out, ref.dense(params["dense"], xs)


def _np_mean_ce(logits, targets, mask):
    """Mean cross-entropy (nats) over the scored positions of the whole batch, float64."""
    ce = -np.take_along_axis(ref.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
    return float(np.sum(ce * mask) / np.sum(mask))


def _random_params(model, seed, scale=0.5):
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    return jax.tree.map(
        lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), jnp.float32), shapes
    )


# --- 1. streams cover every pair once, in order --------------------------------------------------


def _scored_pairs(streams, num_windows, bptt):
    """Per stream, the (input, target) pairs its windows score, in window order; also checks
    that each window's weights count its scored pairs and targets are inputs shifted by one."""
    per_stream = [[] for _ in range(streams.num_streams)]
    for k in range(num_windows):
        (inputs, targets, mask), weights = jax.device_get(stream_batch(streams, k, bptt))
        assert inputs.shape == targets.shape == mask.shape == (streams.num_streams, bptt)
        assert set(np.unique(mask)) <= {0.0, 1.0}
        np.testing.assert_array_equal(weights, mask.sum(axis=1))
        for b in range(streams.num_streams):
            per_stream[b] += [
                (int(i), int(t)) for i, t, m in zip(inputs[b], targets[b], mask[b]) if m
            ]
    return per_stream


@pytest.mark.parametrize(
    "n, num_streams, bptt",
    [
        (11, 3, 4),  # 10 pairs into 3 streams (3, 3, 4), windows not a divisor
        (50, 7, 6),  # 49 pairs into 7 streams of 7, one partial window each
        (9, 8, 3),  # one pair per stream
        (2, 1, 1),  # the shortest text
        (101, 4, 25),  # 100 pairs, 25 each: whole windows exactly
        (58, 5, 4),  # 57 pairs: lengths 11 and 12
    ],
)
def test_streams_cover_every_pair_once_in_order(n, num_streams, bptt):
    tokens = np.arange(n, dtype=np.int32) * 7 % 1009  # distinct: every pair identifiable
    streams, num_windows = make_streams(tokens, num_streams, bptt)
    pairs = [(int(tokens[i]), int(tokens[i + 1])) for i in range(n - 1)]
    per_stream = _scored_pairs(streams, num_windows, bptt)
    assert [p for s in per_stream for p in s] == pairs  # no pair lost, none twice, in order
    num_pairs = n - 1
    bounds = [b * num_pairs // num_streams for b in range(num_streams + 1)]
    for b, got in enumerate(per_stream):  # stream b holds pairs [⌊bP/B⌋, ⌊(b+1)P/B⌋)
        assert got == pairs[bounds[b] : bounds[b + 1]]
    lengths = [len(s) for s in per_stream]
    assert max(lengths) - min(lengths) <= 1
    np.testing.assert_array_equal(jax.device_get(streams.lengths), lengths)
    assert num_windows == math.ceil(max(lengths) / bptt)  # no window wholly unscored


@pytest.mark.parametrize("n, num_streams, bptt, scored_from", [(40, 1, 8, 9), (43, 3, 5, 2)])
def test_scored_from_leaves_exactly_the_first_pairs_of_each_stream_unscored(
    n, num_streams, bptt, scored_from
):
    rng = np.random.default_rng(n)
    tokens = rng.permutation(1000)[:n].astype(np.int32)
    everything, num_windows = make_streams(tokens, num_streams, bptt)
    skipped, windows = make_streams(tokens, num_streams, bptt, scored_from=scored_from)
    assert windows == num_windows
    full = _scored_pairs(everything, num_windows, bptt)
    part = _scored_pairs(skipped, num_windows, bptt)
    for a, b in zip(full, part, strict=True):
        assert b == a[scored_from:]
    if num_streams == 1:  # the held-out stream: n - 1 - scored_from characters scored
        assert len(part[0]) == n - 1 - scored_from


@pytest.mark.parametrize(
    "n, block, rows", [(58, 5, 4), (65, 64, 1), (65, 64, 3), (200, 7, 256), (2, 3, 2)]
)
def test_blocks_are_the_consecutive_blocks_of_the_pairs(n, block, rows):
    """Window k of stream b is block b·W + k: pairs [block·(b·W + k), ...) of the text, the
    last block shorter; every pair scored once; rows past the last block score nothing."""
    tokens = np.arange(n) % 97
    streams, windows = make_blocks(tokens, block, rows)
    seen = []
    for b in range(rows):
        for k in range(windows):
            (inputs, targets, mask), weights = stream_batch(streams, k, block)
            inputs, targets, mask = (np.asarray(a[b]) for a in (inputs, targets, mask))
            assert float(weights[b]) == mask.sum()
            start = block * (b * windows + k)
            count = int(mask.sum())
            assert count == max(0, min(block, n - 1 - start))
            assert mask[:count].all() and not mask[count:].any()
            np.testing.assert_array_equal(inputs[:count], tokens[start : start + count])
            np.testing.assert_array_equal(targets[:count], tokens[start + 1 : start + 1 + count])
            seen += range(start, start + count)
    assert seen == list(range(n - 1))


def test_too_short_text_for_the_streams_names_batch_size():
    with pytest.raises(ValueError, match=r"batch_size=5"):
        make_streams(np.arange(5, dtype=np.int32), 5, 3)  # 4 pairs for 5 streams
    make_streams(np.arange(6, dtype=np.int32), 5, 3)  # 5 pairs: one each
    with pytest.raises(ValueError, match=r"bptt=0"):
        make_streams(np.arange(6, dtype=np.int32), 2, 0)


# --- 2. carry passing is one long unroll; gradients are cut at window edges ----------------------

V = 6
SIMPLE, STACK = (("simple_rnn",), (5,)), (("lstm", "simple_rnn"), (4, 5))


def _capture_gradient():
    """An "optimiser" whose state after an update is that update's gradient (params kept)."""

    def init(params):
        return jax.tree.map(jnp.zeros_like, params)

    def update(grads, state, params=None):
        del state, params
        return jax.tree.map(jnp.zeros_like, grads), grads

    return optax.GradientTransformation(init, update)


def _directions(params, seed):
    """Random directions in parameter space: one over every leaf, then one per leaf."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(params)
    draws = [rng.standard_normal(np.shape(a)) for a in leaves]
    out = [jax.tree.unflatten(treedef, draws)]
    for i in range(len(leaves)):
        only = [d if j == i else np.zeros_like(d) for j, d in enumerate(draws)]
        out.append(jax.tree.unflatten(treedef, only))
    return out


def _along(loss, params, direction, eps=1e-6):
    """The central difference of the float64 ``loss`` along ``direction``."""
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    shift = lambda sign: jax.tree.map(lambda a, d: a + sign * eps * d, p64, direction)
    return (loss(shift(1.0)) - loss(shift(-1.0))) / (2 * eps)


def _dot(grads, direction):
    return sum(
        float(np.vdot(np.asarray(g, np.float64), d))
        for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True)
    )


@pytest.mark.parametrize("kinds, units", [SIMPLE, STACK], ids=["simple_rnn", "lstm+simple_rnn"])
def test_windows_with_the_carry_passed_are_one_long_unroll_with_cut_gradients(kinds, units):
    batch, bptt, num_windows = 3, 4, 3
    model = _model(kinds, units, V)
    params = _random_params(model, seed=len(kinds) + units[0])
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, V, (batch, num_windows * bptt + 1)).astype(np.int32)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    apply = jax.jit(model.apply)

    # Forward: windows read in turn with the carry passed == the long unroll (and float64).
    carry = char_lm.zero_carry(model, params, batch)
    carries, pieces = [carry], []
    for k in range(num_windows):
        carry, logits = apply(params, inputs[:, k * bptt : (k + 1) * bptt], carry)
        carries.append(carry)
        pieces.append(logits)
    windowed = np.concatenate([np.asarray(p) for p in pieces], axis=1)
    long_carry, long_logits = apply(params, inputs)
    np.testing.assert_allclose(windowed, long_logits, rtol=1e-6, atol=1e-6)
    _assert_trees_close(carry, long_carry, rtol=1e-6, atol=1e-6)
    np_carries, np_logits = _np_lm(kinds, params, inputs, V)
    np.testing.assert_allclose(windowed, np_logits, rtol=1e-5, atol=2e-6)
    _assert_trees_close(_carry_list(kinds, carry), np_carries, rtol=1e-5, atol=2e-6)

    # Window k's gradient the stateful way: apply_update from the carry entering window k.
    k = num_windows - 1
    window = slice(k * bptt, (k + 1) * bptt)
    mask = np.ones((batch, bptt))
    loss_fn = char_lm.make_stateful_loss(model)
    opt = _capture_gradient()
    state = train.create_train_state(params, opt, jax.random.PRNGKey(0), carry=carries[k])
    batch_k = (inputs[:, window], targets[:, window], mask.astype(np.float32))
    weights = jnp.full((batch,), float(bptt))  # stream_batch's: scored pairs per row
    new, sums = jax.jit(lambda s, b, w: train.apply_update(loss_fn, opt, s, b, w))(
        state, batch_k, weights
    )
    grads = new.opt_state
    _assert_trees_close(new.carry, carries[k + 1], rtol=1e-6, atol=1e-6)  # the model's carry
    assert int(new.step) == 1

    # Reference, float64: the long unroll over windows 0..k scored on window k, with the carry
    # entering window k held at its value (a stop_gradient of itself: it does not move with
    # the params), and the same uncut (the carry moves with them).
    held, _ = _np_lm(kinds, params, inputs[:, : k * bptt], V)

    def cut_loss(p):
        _, logits = _np_lm(kinds, p, inputs[:, window], V, carries=held)
        return _np_mean_ce(logits, targets[:, window], mask)

    def uncut_loss(p):
        _, logits = _np_lm(kinds, p, inputs[:, : (k + 1) * bptt], V)
        return _np_mean_ce(logits[:, window], targets[:, window], mask)

    assert float(sums["loss"]) / float(sums["examples"]) == pytest.approx(cut_loss(params), 1e-5)
    assert uncut_loss(params) == pytest.approx(cut_loss(params), rel=1e-12)  # same value
    scale = math.sqrt(sum(float(np.sum(np.square(g))) for g in jax.tree.leaves(grads)))
    gaps = []
    for d in _directions(params, seed=k):
        size = math.sqrt(sum(float(np.sum(np.square(x))) for x in jax.tree.leaves(d)))
        cut = _along(cut_loss, params, d)
        assert _dot(grads, d) == pytest.approx(cut, rel=1e-4, abs=1e-6 * scale * size)
        gaps.append(abs(_along(uncut_loss, params, d) - cut) / (scale * size))
    # Truncation really happens: the uncut gradient is another one (in the recurrent layers'
    # params; the head's gradient does not reach the carry either way).
    assert max(gaps) > 2e-3, gaps


# --- 3. the carry is zero at each epoch's start, passed within the epoch -------------------------


def test_carry_resets_each_epoch_and_passes_within_it():
    """Two epochs of in_order windows as one scan each, against a loop of apply_update whose
    carry is set by hand (zeros at each epoch's start, then passed on), and every step's loss
    against float64 from the equations with the carry so passed."""
    kinds, units, batch, bptt = ("simple_rnn",), (4,), 2, 5
    model = _model(kinds, units, V)
    params = _random_params(model, seed=11)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, V, 40).astype(np.int32)  # 39 pairs: streams of 19 and 20
    streams, num_windows = make_streams(tokens, batch, bptt)
    assert num_windows == 4
    opt = optax.sgd(0.5)
    loss_fn = char_lm.make_stateful_loss(model)
    steps = train.make_trainer(
        loss_fn, opt, in_order(lambda s, k: stream_batch(s, k, bptt), num_windows), trace=True
    )
    zeros = char_lm.zero_carry(model, params, batch)
    state = train.create_train_state(params, opt, jax.random.PRNGKey(0), carry=zeros)
    after_1, metrics_1 = steps(state, streams)
    after_2, metrics_2 = steps(after_1, streams)
    assert int(after_2.step) == 2 * num_windows
    got = np.concatenate([metrics_1["step_loss"], metrics_2["step_loss"]])

    # The loop: the carry by hand; float64 losses from the equations along it.
    windows = [jax.device_get(stream_batch(streams, k, bptt)) for k in range(num_windows)]
    update = jax.jit(lambda s, b, w: train.apply_update(loss_fn, opt, s, b, w))
    loop, losses, np_losses, params_at = state, [], [], []
    for _ in range(2):
        loop = loop._replace(carry=zeros)
        np_carry = None
        for (inp, tgt, mask), weights in windows:
            params_at.append(loop.params)
            np_next, logits = _np_lm(kinds, loop.params, inp, V, carries=np_carry)
            np_losses.append(_np_mean_ce(logits, tgt, mask))
            loop, sums = update(loop, (inp, tgt, mask), weights)
            losses.append(float(sums["loss"]) / float(sums["examples"]))
            np_carry = np_next
    np.testing.assert_allclose(got, losses, rtol=1e-6)
    np.testing.assert_allclose(got, np_losses, rtol=1e-5)
    _assert_trees_close(after_2.params, loop.params, rtol=1e-5, atol=1e-6)
    _assert_trees_close(after_2.carry, loop.carry, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after_2.carry, np_carry[0], rtol=1e-5, atol=2e-6)

    # Epoch 2's first window starts from zeros, not from the carry epoch 1 ended with.
    (inp, tgt, mask), _ = windows[0]
    _, logits = _np_lm(kinds, after_1.params, inp, V)
    from_zero = _np_mean_ce(logits, tgt, mask)
    _, logits = _np_lm(kinds, after_1.params, inp, V, carries=_carry_list(kinds, after_1.carry))
    from_end = _np_mean_ce(logits, tgt, mask)
    assert float(metrics_2["step_loss"][0]) == pytest.approx(from_zero, rel=1e-5)
    assert abs(from_end - from_zero) > 1e-3  # the reset is visible
    # Within an epoch, window 1 reads the carry window 0 left, not zeros.
    carry_0, _ = _np_lm(kinds, params_at[0], windows[0][0][0], V)
    (inp, tgt, mask), _ = windows[1]
    passed = _np_mean_ce(_np_lm(kinds, params_at[1], inp, V, carries=carry_0)[1], tgt, mask)
    fresh = _np_mean_ce(_np_lm(kinds, params_at[1], inp, V)[1], tgt, mask)
    assert float(metrics_1["step_loss"][1]) == pytest.approx(passed, rel=1e-5)
    assert abs(passed - fresh) > 1e-3

    # An epoch run as calls of two steps (fit's steps_per_call) passes the carry between them:
    # reset at the pass's step 0 only, not at each call's first step.
    part, _ = steps.run(after_1, streams, 0, 2)
    part, _ = steps.run(part, streams, 2, 2)
    _assert_trees_close(part, after_2, rtol=1e-5, atol=1e-6)


def test_dropout_scales_the_outputs_the_head_reads_in_training_only():
    """language_model's dropout, read through an identity head: each output is 0 or itself
    over (1 - rate), zeros at about the rate; without a key (evaluation) nothing is dropped."""
    units, rate = 6, 0.4
    model = language_model(recurrent(cells.simple_rnn(units)), units, dropout=rate)
    params = _random_params(model, seed=3)
    params["dense"] = {"kernel": jnp.eye(units), "bias": jnp.zeros((units,))}
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, units, (50, 20)), jnp.int32)
    _, clean = model.apply(params, tokens)
    carry, dropped = model.apply(params, tokens, None, jax.random.PRNGKey(1))
    clean, dropped = np.asarray(clean), np.asarray(dropped)
    zero = dropped == 0.0
    np.testing.assert_allclose(dropped[~zero], clean[~zero] / (1 - rate), rtol=1e-6)
    n = zero.size  # 6000 entries: the zero fraction within 5 standard deviations of the rate
    assert abs(zero.mean() - rate) < 5 * math.sqrt(rate * (1 - rate) / n)
    # The carry is left alone; another key drops other entries.
    _assert_trees_close(carry, model.apply(params, tokens)[0], rtol=0, atol=0)
    other = np.asarray(model.apply(params, tokens, None, jax.random.PRNGKey(2))[1]) == 0.0
    assert (other != zero).any()
    no_dropout = language_model(recurrent(cells.simple_rnn(units)), units)
    np.testing.assert_array_equal(no_dropout.apply(params, tokens)[1], clean)
    with pytest.raises(ValueError, match=r"^dropout=1.0 must be in \[0, 1\)"):
        language_model(recurrent(cells.simple_rnn(units)), units, dropout=1.0)
    with pytest.raises(ValueError, match=r"^dropout=0.5 needs mode='stateful'"):
        char_lm.Config(dropout=0.5)


def test_dropout_between_stacked_layers_drops_what_the_next_layer_reads():
    """stacked(layers, rate) with a key: layer 1 reads layer 0's outputs dropped out with
    fold_in(key, 1) (layer 1 recomputed by hand from them), the carries left alone; a
    language model passes fold_in(key, 1) to its layer and drops the head's inputs with the
    key itself. Without a key, nothing is dropped."""
    units, rate, vocab = 5, 0.3, 7
    layers = [recurrent(cells.gru(units)), recurrent(cells.gru(units))]
    layer = stacked(layers, rate)
    params = layer.init(jax.random.PRNGKey(0), vocab)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, vocab, (4, 9)), jnp.int32)
    key = jax.random.PRNGKey(5)
    _, ys0 = layers[0].apply(params["layer_0"], tokens, return_sequences=True)
    dropped = inverted_dropout(jax.random.fold_in(key, 1), rate, ys0)
    assert 0 < float(jnp.mean(dropped == 0.0)) < 1
    _, want = layers[1].apply(params["layer_1"], dropped, return_sequences=True)
    _, got = layer.apply(params, tokens, return_sequences=True, key=key)
    np.testing.assert_array_equal(got, want)
    _, clean = layer.apply(params, tokens, return_sequences=True)
    _, plain = stacked(layers).apply(params, tokens, return_sequences=True, key=key)
    np.testing.assert_array_equal(clean, plain)
    assert np.abs(np.asarray(clean) - np.asarray(got)).max() > 1e-3
    # The language model: the layer's key is fold_in(key, 1), the head's the key.
    model = language_model(layer, vocab, dropout=0.2)
    lm = {"rnn": params, "dense": {"kernel": jnp.ones((units, vocab)), "bias": jnp.zeros(vocab)}}
    _, logits = model.apply(lm, tokens, None, key)
    _, ys = layer.apply(params, tokens, return_sequences=True, key=jax.random.fold_in(key, 1))
    head = inverted_dropout(key, 0.2, ys)
    np.testing.assert_allclose(logits, head @ lm["dense"]["kernel"], rtol=1e-6)
    with pytest.raises(ValueError, match=r"^dropout=1.5 must be in \[0, 1\)"):
        stacked(layers, 1.5)


def _recovered_recurrent_kernel(params, xs, ys, t):
    """The recurrent kernel a tanh SimpleRNN read at step ``t``, solved from its outputs in
    float64: ``arctanh(y_t) - x_t W - b = y_{t-1} U`` over the batch (least squares)."""
    x, y = np.float64(xs), np.float64(ys)
    w, b = (np.float64(params[k]) for k in ("kernel", "bias"))
    pre = np.arctanh(y[:, t]) - x[:, t] @ w - b
    kernel, *_ = np.linalg.lstsq(y[:, t - 1], pre, rcond=None)
    return kernel


def test_weight_drop_drops_recurrent_kernel_entries_once_per_call():
    """recurrent(cell, weight_drop=p) with a key: the kernel each step reads, solved from the
    outputs in float64, is U with each entry 0 or U / (1 - p), zeros at about p, the same mask
    at every step and for every sequence; without a key it is U; another key, another mask; the
    gradient reaches only the kept entries. Stacked layers and a language model pass the key
    on (fold_in(key, n + i), fold_in(key, 1))."""
    units, rate, batch = 8, 0.5, 64
    cell = cells.simple_rnn(units)
    layer = recurrent(cell, weight_drop=rate)
    params = jax.tree.map(lambda a: 0.4 * a, cell.init(jax.random.PRNGKey(0), 3))
    params["recurrent_kernel"] = params["recurrent_kernel"] + 0.3  # no entry near zero
    xs = jnp.asarray(np.random.default_rng(2).normal(size=(batch, 5, 3)), jnp.float32)
    key = jax.random.PRNGKey(7)
    u = np.float64(params["recurrent_kernel"])

    _, ys = jax.jit(lambda p, k: layer.apply(p, xs, return_sequences=True, key=k))(params, key)
    seen = [_recovered_recurrent_kernel(params, xs, ys, t) for t in (1, 2, 4)]
    kept = np.abs(seen[0]) > 1e-3
    np.testing.assert_allclose(seen[0][kept], u[kept] / (1 - rate), rtol=2e-3)
    np.testing.assert_allclose(seen[0][~kept], 0.0, atol=2e-3)
    for other in seen[1:]:  # one mask for the whole call
        np.testing.assert_allclose(other, seen[0], rtol=2e-3, atol=2e-3)
    n = kept.size  # 64 entries: the dropped fraction within 5 standard deviations of the rate
    assert abs((~kept).mean() - rate) < 5 * math.sqrt(rate * (1 - rate) / n)

    _, clean = layer.apply(params, xs, return_sequences=True)
    np.testing.assert_allclose(_recovered_recurrent_kernel(params, xs, clean, 2), u, atol=2e-3)
    _, plain = recurrent(cell).apply(params, xs, return_sequences=True, key=key)
    np.testing.assert_array_equal(plain, clean)
    _, ys2 = layer.apply(params, xs, return_sequences=True, key=jax.random.PRNGKey(8))
    assert ((np.abs(_recovered_recurrent_kernel(params, xs, ys2, 2)) > 1e-3) != kept).any()

    grad = jax.grad(lambda p: jnp.sum(layer.apply(p, xs, return_sequences=True, key=key)[1]))
    g = np.asarray(grad(params)["recurrent_kernel"])
    assert (g[~kept] == 0.0).all() and (g[kept] != 0.0).all()

    # Through stacked layers and a language model the keys are passed on.
    stack = stacked([layer, layer])
    two = stack.init(jax.random.PRNGKey(1), 3)
    _, got = stack.apply(two, xs, return_sequences=True, key=key)
    _, h0 = layer.apply(two["layer_0"], xs, return_sequences=True, key=jax.random.fold_in(key, 2))
    _, want = layer.apply(two["layer_1"], h0, return_sequences=True, key=jax.random.fold_in(key, 3))
    np.testing.assert_array_equal(got, want)
    model = language_model(layer, 3)
    lm = model.init(jax.random.PRNGKey(4))
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 3, (4, 6)), jnp.int32)
    _, logits = model.apply(lm, tokens, None, key)
    _, hs = layer.apply(lm["rnn"], tokens, return_sequences=True, key=jax.random.fold_in(key, 1))
    head = np.asarray(hs) @ np.asarray(lm["dense"]["kernel"]) + np.asarray(lm["dense"]["bias"])
    np.testing.assert_allclose(logits, head, rtol=1e-5, atol=1e-6)

    with pytest.raises(ValueError, match=r"^weight_drop=1.0 must be in \[0, 1\)"):
        recurrent(cell, weight_drop=1.0)
    with pytest.raises(ValueError, match=r"^weight_drop=0.2 drops entries of a cell's "):
        recurrent(named_cell("min_gru", 4), weight_drop=0.2)
    with pytest.raises(ValueError, match=r"^weight_drop=0.2 needs mode='stateful'"):
        char_lm.Config(weight_drop=0.2)
    with pytest.raises(ValueError, match=r"this cell's params are \['bias', 'kernel'\]"):
        char_lm.Config(mode="stateful", cell="min_gru", weight_drop=0.2)


def test_dropout_keys_come_from_the_state_key_per_window():
    """With ``with_keys`` each window's key is the pass key folded with the window's index: an
    epoch run as calls equals one call, the next epoch draws other keys, evaluation none."""
    batch, bptt = 2, 5
    model = language_model(recurrent(CELLS["simple_rnn"](4)), V, dropout=0.5)
    params = _random_params(model, seed=12)
    tokens = np.random.default_rng(5).integers(0, V, 40).astype(np.int32)
    streams, num_windows = make_streams(tokens, batch, bptt)
    opt = optax.sgd(0.1)
    loss_fn = char_lm.make_stateful_loss(model)
    get_batch = lambda s, k: stream_batch(s, k, bptt)
    keyed = train.make_trainer(
        loss_fn, opt, in_order(get_batch, num_windows, with_keys=True), trace=True
    )
    plain = train.make_trainer(loss_fn, opt, in_order(get_batch, num_windows), trace=True)
    carry = char_lm.zero_carry(model, params, batch)
    state = train.create_train_state(params, opt, jax.random.PRNGKey(0), carry=carry)
    whole, m_keyed = keyed(state, streams)
    _, m_plain = plain(state, streams)
    assert not np.allclose(m_keyed["step_loss"], m_plain["step_loss"])  # dropout acted
    part, _ = keyed.run(state, streams, 0, 3)
    part, _ = keyed.run(part, streams, 3, num_windows - 3)
    assert_bit_identical(part, whole)
    # Window 0's loss by hand with the key the pass derives from state.key.
    _, pass_key = jax.random.split(state.key)
    (inp, tgt, mask), weights = stream_batch(streams, 0, bptt)
    losses, _, _ = loss_fn(params, ((inp, tgt, mask), jax.random.fold_in(pass_key, 0)), carry)
    want = float(jnp.sum(losses * weights) / jnp.sum(weights))
    assert float(m_keyed["step_loss"][0]) == pytest.approx(want, rel=1e-6)
    # The next epoch: other keys (the state's key moved on), so another loss on window 0
    # than the same params would give with the first epoch's key.
    _, m_next = keyed(whole, streams)
    losses, _, _ = loss_fn(whole.params, ((inp, tgt, mask), jax.random.fold_in(pass_key, 0)), carry)
    same_key = float(jnp.sum(losses * weights) / jnp.sum(weights))
    assert float(m_next["step_loss"][0]) != pytest.approx(same_key, rel=1e-6)


# --- 4. the experiment: a stateful run with mid-epoch checkpoints, interrupted and resumed -------


@pytest.fixture(scope="module")
def text_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_text(tiny_text(lines=12))
    return str(path)


SEQ_LEN, VAL_FRACTION = 8, 0.1
# ~583 characters, 58 held out; 4 streams of ~131 pairs in 6 windows of 25: calls of 2 steps,
# a checkpoint after every call (two inside each epoch).
STATEFUL = dict(
    mode="stateful",
    cell="lstm",
    layers=2,
    units=4,
    batch_size=4,
    bptt=25,
    dropout=0.25,  # keys drawn per window from the state's key: resumed runs draw the same
    weight_drop=0.2,
    seq_len=SEQ_LEN,
    val_fraction=VAL_FRACTION,
    iterations=2,
    num_preds=5,
    steps_per_call=2,
    checkpoint_every=1,
    progress_seconds=1e-9,  # a progress line after every call but an epoch's last
    unroll=1,
)


def _strip_timing(history):
    drop = ("seconds", "compile_seconds", "examples_per_second")
    return [{k: v for k, v in row.items() if k not in drop} for row in history]


class _Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def stateful_run(tmp_path_factory, text_path):
    """An uninterrupted 2-iteration stateful run: ``(workdir, result, lines, saved)``, where
    ``saved`` maps each checkpointed step to the state written (host copies)."""
    workdir = str(tmp_path_factory.mktemp("stateful") / "run")
    saved, lines = {}, []
    real = checkpoint.Checkpoints.save

    def spy(self, step, state, meta):
        saved[step] = jax.device_get(state)
        return real(self, step, state, meta)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint.Checkpoints, "save", spy)
        result = char_lm.run(char_lm.Config(text=text_path, **STATEFUL), workdir, out=lines.append)
    return workdir, result, lines, saved


def test_stateful_mid_epoch_resume_is_bit_identical(stateful_run, text_path, tmp_path):
    _, reference, _, saved = stateful_run
    val, _ = _held_out(text_path)
    train_pairs = len(ref.tutorial_clean(tiny_text(lines=12).encode())) - len(val) - 1
    assert math.ceil(math.ceil(train_pairs / 4) / 25) == 6  # windows per epoch
    assert int(reference.state.step) == 12
    assert sorted(saved) == [2, 4, 6, 8, 10, 12]  # mid-epoch (2, 4, 8, 10) and iteration ends

    workdir = str(tmp_path / "run")
    config = char_lm.Config(text=text_path, **STATEFUL)

    def interrupt(line):
        if line.startswith("iteration 2: 2/6 steps"):  # after the call's checkpoint, step 8
            raise _Interrupt

    with pytest.raises(_Interrupt):
        char_lm.run(config, workdir, out=interrupt)
    ckpt = os.path.join(workdir, "checkpoints")
    assert checkpoint.latest_step(ckpt) == 8
    progress = checkpoint.restore_meta(ckpt, 8)[rundir.PROGRESS_KEY]
    assert (progress["iteration"], progress["epoch"], progress["steps"]) == (1, 0, 2)

    # The carry is in the checkpoint: nonzero, the uninterrupted run's at that step.
    restored, _ = checkpoint.restore_checkpoint(ckpt, 8, reference.state)
    assert_bit_identical(restored, saved[8])
    assert all(np.abs(np.asarray(c)).max() > 1e-3 for c in jax.tree.leaves(restored.carry))
    # (and not the carry of the iteration's end, which the next epoch would reset anyway)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(restored.carry), jax.tree.leaves(saved[6].carry))
    )

    resumed_lines = []
    resumed = char_lm.run(config, workdir, out=resumed_lines.append)
    assert any(
        line.startswith("resuming from step 8 ") and "2 of 6 steps into the next" in line
        for line in resumed_lines
    ), resumed_lines
    assert "Iteration #: 1" not in resumed_lines and "Iteration #: 2" in resumed_lines
    assert_bit_identical(resumed.state, reference.state)  # params, opt_state, step, key, carry
    assert _strip_timing(resumed.history) == _strip_timing(reference.history)
    assert _strip_timing(rundir.read_history(workdir)) == _strip_timing(reference.history)


# --- 5. stateful generation equals re-reading the whole prefix ----------------------------------


def test_stateful_sampler_equals_rereading_the_prefix():
    kinds, units = STACK  # an LSTM under a SimpleRNN: a stack's carry, tuples in it
    num_chars, seed_len = 7, 4
    model = _model(kinds, units, V)
    params = _random_params(model, seed=5)
    params["dense"]["kernel"] = params["dense"]["kernel"] * 6.0  # decisive argmaxes
    rng = np.random.default_rng(3)
    seeds = rng.integers(0, V, (3, seed_len)).astype(np.int32)

    def last_logits(p, prefix):  # the whole prefix from a zero carry, float64
        return _np_lm(kinds, p, prefix, V)[1][:, -1]

    # Greedy: the argmax of the last logits appended, the whole prefix read again each time.
    prefix = seeds
    for _ in range(num_chars):
        nxt = np.argmax(last_logits(params, prefix), axis=-1)
        prefix = np.concatenate([prefix, nxt[:, None]], axis=1)
    greedy = make_stateful_sampler(model, num_chars)(params, jnp.asarray(seeds))
    assert greedy.shape == (3, num_chars)
    np.testing.assert_array_equal(greedy, prefix[:, seed_len:])

    # Temperature: row b's token t is categorical(fold_in(split(key, batch)[b], t), logits /
    # temperature), t = 0 .. num_chars - 1: a key per row (as make_sampler), folded per step,
    # so a row's text does not depend on the rows beside it.
    temperature = 0.8
    sample = make_stateful_sampler(model, num_chars, temperature)

    def drawn_by_hand(p, seeds, key):
        prefix = seeds
        for t in range(num_chars):
            logits = jnp.asarray(last_logits(p, prefix), jnp.float32)
            row_keys = jax.random.split(key, len(seeds))
            nxt = jnp.stack(
                [
                    jax.random.categorical(jax.random.fold_in(k, t), row / temperature)
                    for k, row in zip(row_keys, logits)
                ]
            )
            prefix = np.concatenate([prefix, np.asarray(nxt)[:, None]], axis=1)
        return prefix[:, seed_len:]

    key = jax.random.PRNGKey(42)
    drawn = sample(params, jnp.asarray(seeds), key)
    np.testing.assert_array_equal(drawn, drawn_by_hand(params, seeds, key))
    other = sample(params, jnp.asarray(seeds), jax.random.PRNGKey(7))
    np.testing.assert_array_equal(other, drawn_by_hand(params, seeds, jax.random.PRNGKey(7)))
    assert not np.array_equal(other, drawn)
    # Flat logits (a small head), three rows of one seed: the rows draw apart.
    flat = {**params, "dense": jax.tree.map(lambda a: a / 100.0, params["dense"])}
    same = np.repeat(seeds[:1], 3, axis=0)
    hot = sample(flat, jnp.asarray(same), key)
    np.testing.assert_array_equal(hot, drawn_by_hand(flat, same, key))
    assert len({tuple(r) for r in np.asarray(hot)}) > 1
    # A row drawn alone is the row drawn beside others.
    alone = sample(params, jnp.asarray(seeds[:1]), key)
    np.testing.assert_array_equal(alone, drawn[:1])


# --- 6. held-out bits per char, both modes, by hand ---------------------------------------------


def _held_out(text_path):
    """The held-out tokens and vocabulary size, from the definitions (not the library)."""
    with open(text_path, "rb") as f:
        text = ref.tutorial_clean(f.read())
    chars = sorted(set(text))
    tokens = np.array([chars.index(c) for c in text])
    cut = int(len(tokens) * (1 - VAL_FRACTION))  # nanoGPT's cut: the first int(0.9 n) train
    return tokens[cut:], len(chars)


def _bits(logits, labels):
    return ref.cross_entropy(logits, labels) / math.log(2)


def test_stateful_held_out_bpc_by_hand(stateful_run, text_path):
    _, result, _, _ = stateful_run
    val, vocab = _held_out(text_path)
    assert len(val) == 59
    kinds = ("lstm", "lstm")
    # One pass over the tail from a zero state; the first seq_len - 1 predictions unscored.
    _, logits = _np_lm(kinds, result.state.params, val[None, :-1], vocab)
    bits = _bits(logits[0], val[1:])[SEQ_LEN - 1 :]
    assert len(bits) == len(val) - SEQ_LEN  # characters val[seq_len:]
    want = float(np.mean(bits))
    assert result.history[-1]["val_bits_per_char"] == pytest.approx(want, rel=1e-5)
    # Scoring all characters is another number: one the check above would tell apart.
    assert float(np.mean(_bits(logits[0], val[1:]))) != pytest.approx(want, rel=1e-5)


def test_nanogpt_protocol_block_and_stream_scores_by_hand(text_path, tmp_path):
    """val_block: every held-out character after the first scored twice, in nats: as one
    stream from a zero carry, and in consecutive blocks of val_block pairs each from a zero
    carry (float64 hand computations over the same characters); the two differ, since the
    stream carries context across blocks. keep_best keeps the best iteration's state, whose
    final samples are drawn by hand again from it."""
    block = 5  # 58 pairs: 11 blocks of 5 and one of 3
    settings = {**STATEFUL, "dropout": 0.0, "checkpoint_every": None, "progress_seconds": None}
    config = char_lm.Config(
        text=text_path,
        **settings,
        val_block=block,
        keep_best=True,
        sample_chars=7,
        sample_temperatures=(0.5, 2.0),
    )
    workdir = str(tmp_path / "run")
    result = char_lm.run(config, workdir, out=_quiet)
    row = result.history[-1]
    val, vocab = _held_out(text_path)
    kinds = ("lstm", "lstm")
    params = result.state.params
    _, logits = _np_lm(kinds, params, val[None, :-1], vocab)
    stream = ref.cross_entropy(logits[0], val[1:])
    assert len(stream) == len(val) - 1
    blocks = []
    for start in range(0, len(val) - 1, block):
        chunk = val[start : start + block + 1]
        _, chunk_logits = _np_lm(kinds, params, chunk[None, :-1], vocab)
        blocks.append(ref.cross_entropy(chunk_logits[0], chunk[1:]))
    blocks = np.concatenate(blocks)
    assert len(blocks) == len(val) - 1
    assert row["val_loss"] == pytest.approx(float(np.mean(stream)), rel=1e-5)
    assert row["val_block_loss"] == pytest.approx(float(np.mean(blocks)), rel=1e-5)
    assert row["val_block_bits_per_char"] == pytest.approx(row["val_block_loss"] / math.log(2))
    assert abs(row["val_loss"] - row["val_block_loss"]) > 1e-4

    # The best state: the iteration with the lowest block loss, bit for bit.
    best_row = min(result.history, key=lambda r: r["val_block_loss"])
    with open(os.path.join(workdir, rundir.RUN_RECORD)) as f:
        meta = json.load(f)
    with rundir.open_run(workdir, meta) as run:
        best, kept_row = run.restore_best(result.state)
    assert kept_row["step"] == best_row["step"] == int(best.step)
    if best_row is row:
        assert_bit_identical(best.params, result.state.params)
    # The final samples: each temperature's, drawn again by hand from the best params.
    with open(os.path.join(workdir, char_lm.FINAL_SAMPLES)) as f:
        written = f.read()
    chars = result.vocabulary.chars
    model = char_lm.make_model(config, vocab)[1]
    for i, temperature in enumerate(config.sample_temperatures):
        header = f"# the best state (iteration {best_row['iteration']}, step {best_row['step']})"
        seed_text, sample = (
            written.split(f"{header}, temperature {temperature:g}\n")[1].split("\n\n")[0].split("|")
        )
        seed = np.asarray([chars.index(c) for c in seed_text])
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed + 2), i)
        drawn = make_stateful_sampler(model, 7, temperature)(best.params, seed[None], key)[0]
        assert sample == "".join(chars[t] for t in np.asarray(drawn))


def test_windowed_held_out_bpc_by_hand(text_path):
    config = char_lm.Config(
        text=text_path,
        units=4,
        seq_len=SEQ_LEN,
        batch_size=64,
        iterations=1,
        num_preds=5,
        val_fraction=VAL_FRACTION,
    )
    result = char_lm.run(config, None, out=_quiet)
    val, vocab = _held_out(text_path)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), result.state.params)
    # Every character from index seq_len on, from the seq_len before it, from a zero state.
    starts = np.arange(len(val) - SEQ_LEN)
    inputs = np.eye(vocab)[val[starts[:, None] + np.arange(SEQ_LEN)]]
    step = lambda h, x: ref.simple_rnn_step(p["rnn"], h, x)
    h, _ = ref.run(step, np.zeros((len(starts), 4)), inputs)
    bits = _bits(ref.dense(p["dense"], h), val[starts + SEQ_LEN])
    assert len(bits) == len(val) - SEQ_LEN  # the same characters as the stateful mode
    want = float(np.mean(bits))
    assert result.history[-1]["val_bits_per_char"] == pytest.approx(want, rel=1e-5)


# --- 7. configuration errors --------------------------------------------------------------------


def test_layers_need_stateful_mode(text_path, tmp_path, start_experiment):
    with pytest.raises(ValueError, match=r"^layers=2 needs mode='stateful'"):
        char_lm.Config(layers=2)
    char_lm.Config(layers=2, mode="stateful")  # accepted
    # Too few characters for the streams: named before anything is written.
    config = char_lm.Config(text=text_path, mode="stateful", batch_size=600, units=4)
    with pytest.raises(ValueError, match=r"batch_size=600"):
        char_lm.run(config, str(tmp_path / "short"), out=_quiet)
    assert not (tmp_path / "short").exists()
    # On the command line: one line on stderr, the flags as flags, nothing written.
    workdir = tmp_path / "run"
    proc = start_experiment("char_lm", f"--workdir={workdir}", "--layers=2")
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 1 and stdout == ""
    assert stderr.startswith("error: --layers=2 needs --mode='stateful'")
    assert stderr.count("\n") == 1 and stderr.endswith("\n")
    assert not workdir.exists()


# --- 8. data parallel: two virtual CPU devices train as one --------------------------------------

DEVICES = 2
two = pytest.mark.skipif(
    jax.device_count() < DEVICES,
    reason="needs 2 devices (tests/conftest.py asks JAX for 8 CPU devices)",
)


@two
def test_stateful_training_on_two_devices_equals_one():
    """3 streams (not a multiple of 2: a 4th row of weight 0 pads each window, and the carry a
    zero row within each step), 2 epochs: the same step losses, params and carry as on one
    device. The state keeps one carry row per stream on any device count, so a state trained
    on one device goes on on two (a checkpoint moves between machines)."""
    kinds, units, batch, bptt = ("lstm",), (4,), 3, 5
    model = _model(kinds, units, V)
    params = _random_params(model, seed=8)
    tokens = np.random.default_rng(4).integers(0, V, 47).astype(np.int32)
    streams, num_windows = make_streams(tokens, batch, bptt)
    opt = optim.rmsprop(1e-2)
    loss_fn = char_lm.make_stateful_loss(model)
    get_batch = lambda s, k: stream_batch(s, k, bptt)
    mesh = parallel.make_mesh(DEVICES)
    assert mesh.size == DEVICES
    assert parallel.padded_size(batch, mesh) == 4
    steps = {
        name: train.make_trainer(
            loss_fn, opt, in_order(get_batch, num_windows, mesh=m), mesh=m, trace=True
        )
        for name, m in (("one", None), ("two", mesh))
    }
    start = train.create_train_state(
        params, opt, jax.random.PRNGKey(0), carry=char_lm.zero_carry(model, params, batch)
    )
    runs = {}
    for name in ("one", "two"):
        state, losses = start, []
        for _ in range(2):
            state, metrics = steps[name](state, streams)
            losses.append(np.asarray(metrics["step_loss"]))
        assert all(c.shape[0] == batch for c in jax.tree.leaves(state.carry))
        runs[name] = (state, np.concatenate(losses))
    (one, loss_one), (two_, loss_two) = runs["one"], runs["two"]
    np.testing.assert_allclose(loss_two, loss_one, rtol=1e-5, atol=1e-6)
    _assert_trees_close(two_.params, one.params, rtol=1e-5, atol=1e-6)
    _assert_trees_close(two_.opt_state, one.opt_state, rtol=1e-5, atol=1e-6)
    _assert_trees_close(two_.carry, one.carry, rtol=1e-5, atol=1e-6)
    # Epoch 1 on one device, epoch 2 on two: where one device alone ends.
    moved, _ = steps["one"](start, streams)
    moved, _ = steps["two"](jax.device_get(moved), streams)
    _assert_trees_close(moved.params, one.params, rtol=1e-5, atol=1e-6)
    _assert_trees_close(moved.carry, one.carry, rtol=1e-5, atol=1e-6)


def test_reset_carry_trains_every_window_from_zeros(text_path):
    """reset_carry=True: the run's updates are those of a loss that reads every window from
    a zero carry (no carry in the state at all), and not those of the carry passed on."""
    settings = {
        **STATEFUL,
        "dropout": 0.0,
        "weight_drop": 0.0,
        "iterations": 1,
        "checkpoint_every": None,
    }
    config = char_lm.Config(text=text_path, **settings, reset_carry=True)
    result = char_lm.run(config, None, out=_quiet)
    passed = char_lm.run(dataclasses.replace(config, reset_carry=False), None, out=_quiet)

    with open(text_path, "rb") as f:
        tokens = result.vocabulary.encode(ref.tutorial_clean(f.read()))
    cut = int(len(tokens) * (1 - VAL_FRACTION))
    streams, windows = make_streams(tokens[:cut], config.batch_size, config.bptt)
    model = char_lm.make_model(config, result.vocabulary.size)[1]
    loss_fn = char_lm.make_stateful_loss(model)
    optimizer = config.optimizer_spec()
    init_key, train_key = char_lm.init_keys(config)
    state = train.create_train_state(model.init(init_key), optimizer, train_key)
    trainer = train.make_trainer(
        lambda params, batch: loss_fn(params, batch, None)[:2],
        optimizer,
        in_order(lambda s, k: stream_batch(s, k, config.bptt), windows),
    )
    by_hand, _ = trainer(state, streams)
    _assert_trees_close(result.state.params, by_hand.params, rtol=1e-5, atol=1e-6)
    differ = jax.tree.leaves(
        jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), passed.state.params, by_hand.params)
    )
    assert max(float(d) for d in differ) > 1e-4
    with pytest.raises(ValueError, match=r"^reset_carry=True needs mode='stateful'"):
        char_lm.Config(reset_carry=True)


def test_random_windows_train_on_uniform_blocks_and_resume_bit_identical(text_path, tmp_path):
    """random_windows=True: the run's updates are those of blocks of bptt pairs at uniform
    starts of the training text (with_replacement over len - bptt starts, block_batch, zero
    carry), as many updates an epoch as the streams' windows, not the streams' updates;
    interrupted mid-epoch and resumed, it ends bit for bit where the whole run ends (dropout
    and weight drop keys included). Without reset_carry, or on several devices, it is refused."""
    settings = {**STATEFUL, "reset_carry": True, "random_windows": True, "checkpoint_every": None}
    config = char_lm.Config(text=text_path, **settings)
    plain = dataclasses.replace(config, dropout=0.0, weight_drop=0.0, iterations=1)
    result = char_lm.run(plain, None, out=_quiet)
    streams_run = char_lm.run(dataclasses.replace(plain, random_windows=False), None, out=_quiet)

    with open(text_path, "rb") as f:
        tokens = result.vocabulary.encode(ref.tutorial_clean(f.read()))
    train_tokens = tokens[: int(len(tokens) * (1 - VAL_FRACTION))]
    _, windows = make_streams(train_tokens, config.batch_size, config.bptt)
    model = char_lm.make_model(plain, result.vocabulary.size)[1]
    loss_fn = char_lm.make_stateful_loss(model)
    optimizer = plain.optimizer_spec()
    init_key, train_key = char_lm.init_keys(plain)
    state = train.create_train_state(model.init(init_key), optimizer, train_key)
    draws = with_replacement(
        lambda t, starts: block_batch(t, starts, config.bptt),
        len(train_tokens) - config.bptt,
        config.batch_size,
        windows,
        weighted=True,
    )
    trainer = train.make_trainer(
        lambda params, batch: loss_fn(params, batch, None)[:2], optimizer, draws
    )
    by_hand, _ = trainer(state, jnp.asarray(train_tokens, jnp.int32))
    _assert_trees_close(result.state.params, by_hand.params, rtol=1e-5, atol=1e-6)
    assert int(result.state.step) == windows == 6
    assert result.history[-1]["examples"] == windows * config.batch_size * config.bptt
    differ = jax.tree.leaves(
        jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), streams_run.state.params, by_hand.params)
    )
    assert max(float(d) for d in differ) > 1e-4

    reference = char_lm.run(config, str(tmp_path / "whole"), out=_quiet)
    workdir = str(tmp_path / "cut")
    cut = dataclasses.replace(config, checkpoint_every=1)

    def interrupt(line):
        if line.startswith("iteration 2: 2/6 steps"):
            raise _Interrupt

    with pytest.raises(_Interrupt):
        char_lm.run(cut, workdir, out=interrupt)
    assert checkpoint.latest_step(os.path.join(workdir, "checkpoints")) == 8
    resumed = char_lm.run(cut, workdir, out=_quiet)
    assert_bit_identical(resumed.state, reference.state)
    assert _strip_timing(resumed.history) == _strip_timing(reference.history)

    with pytest.raises(ValueError, match=r"^random_windows=True reads windows at random offsets"):
        char_lm.Config(mode="stateful", random_windows=True)
    with pytest.raises(ValueError, match=r"^random_windows=True runs on one device"):
        char_lm.Config(mode="stateful", reset_carry=True, random_windows=True, num_devices=2)
    with pytest.raises(ValueError, match=r"^random_windows=True needs mode='stateful'"):
        char_lm.Config(random_windows=True)
