"""Topologies: bidirectional and stacked layers, greedy decoding, masked losses, the experiments."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import topologies as topo
from rnn_jax.cells import CELLS, LSTMCarry

CELL_NAMES = sorted(CELLS)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scramble(params, key, scale=1.0):
    """Random params of the same shapes, large enough for argmax decisions to vary."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    )


def _explicit_scan(step, carry, params, xs):
    """Final carry and outputs (time, units) of one unpadded sequence (time, in), step by step."""
    ys = []
    for x in xs:
        carry, y = step(params, carry, x[None])
        ys.append(y[0])
    return carry, np.stack(ys)


@pytest.mark.parametrize("name", CELL_NAMES)
def test_bidirectional_with_lengths_equals_two_explicit_scans(name):
    cell = CELLS[name](3)
    layer = topo.bidirectional(cell, CELLS[name](3))
    batch, time, input_dim = 3, 5, 2
    lengths = np.array([5, 3, 1])
    params = layer.init(jax.random.PRNGKey(0), input_dim)
    xs = jax.random.normal(jax.random.PRNGKey(1), (batch, time, input_dim))
    apply = jax.jit(layer.apply, static_argnames="return_sequences")
    (carry_f, carry_b), ys = apply(params, xs, lengths=lengths, return_sequences=True)
    _, last = apply(params, xs, lengths=lengths)
    assert ys.shape == (batch, time, 6) and last.shape == (batch, 6)

    step, zero = jax.jit(cell.step), cell.initial_carry(1)
    for b, n in enumerate(lengths):
        seq = xs[b, :n]
        cf, yf = _explicit_scan(step, zero, params["forward"], seq)
        cb, yb_flipped = _explicit_scan(step, zero, params["backward"], seq[::-1])
        yb = yb_flipped[::-1]  # back in input order: step t has read x_{n-1} .. x_t
        np.testing.assert_allclose(ys[b, :n], np.concatenate([yf, yb], -1), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(ys[b, n:], 0.0)
        np.testing.assert_allclose(last[b], np.concatenate([yf[-1], yb[0]]), rtol=1e-5, atol=1e-6)
        for got, want in zip(jax.tree.leaves((carry_f, carry_b)), jax.tree.leaves((cf, cb))):
            np.testing.assert_allclose(got[b], want[0], rtol=1e-5, atol=1e-6)

    # The padding's values reach nothing.
    noise = jax.random.normal(jax.random.PRNGKey(2), xs.shape)
    valid = (np.arange(time)[None, :] < lengths[:, None])[..., None]
    _, ys2 = apply(params, jnp.where(valid, xs, noise), lengths=lengths, return_sequences=True)
    np.testing.assert_array_equal(ys, ys2)


def test_bidirectional_sum_merge_and_bad_merge():
    cell = CELLS["gru"](4)
    concat = topo.bidirectional(cell)
    summed = topo.bidirectional(cell, merge="sum")
    params = concat.init(jax.random.PRNGKey(0), 3)
    xs = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 3))
    _, ys_c = jax.jit(concat.apply, static_argnames="return_sequences")(
        params, xs, return_sequences=True)
    _, ys_s = jax.jit(summed.apply, static_argnames="return_sequences")(
        params, xs, return_sequences=True)
    np.testing.assert_allclose(ys_s, ys_c[..., :4] + ys_c[..., 4:], rtol=1e-6)
    assert summed.units == 4 and concat.units == 8
    with pytest.raises(ValueError, match="merge"):
        topo.bidirectional(cell, merge="mean")
    with pytest.raises(ValueError, match="concat"):
        topo.bidirectional(cell, CELLS["gru"](5), merge="sum")


def test_stacked_feeds_each_layer_the_sequence_below():
    cells = [CELLS["lstm"](4), CELLS["simple_rnn"](3)]
    layer = topo.stacked([topo.recurrent(c) for c in cells])
    params = layer.init(jax.random.PRNGKey(0), 2)
    tokens = jnp.array([[0, 1, 1, 0], [1, 0, 0, 0]])  # int tokens, read as one-hot rows
    lengths = jnp.array([4, 2])
    carries, last = jax.jit(layer.apply)(params, tokens, lengths=lengths)
    xs = np.eye(2, dtype=np.float32)[tokens]
    steps = [jax.jit(c.step) for c in cells]
    for b, n in enumerate([4, 2]):
        c0, h0 = _explicit_scan(steps[0], cells[0].initial_carry(1), params["layer_0"], xs[b, :n])
        c1, h1 = _explicit_scan(steps[1], cells[1].initial_carry(1), params["layer_1"], h0)
        np.testing.assert_allclose(last[b], h1[-1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(carries[0].c[b], c0.c[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(carries[1][b], c1[0], rtol=1e-5, atol=1e-6)


def _reference_encoder(cells, params, tokens, n, reverse):
    """Per-layer final carries of one sequence, stepping each layer by hand."""
    xs = tokens[:n]
    if reverse:
        xs = xs[::-1]
    carries = []
    for i, cell in enumerate(cells):
        carry, xs = _explicit_scan(_jitted_step(cell), cell.initial_carry(1),
                                   params[f"layer_{i}"], xs)
        carries.append(carry)
    return carries


_STEPS = {}  # keyed by the cell itself (kept alive), so each step compiles once per shape


def _jitted_step(cell):
    if cell not in _STEPS:
        _STEPS[cell] = jax.jit(cell.step)
    return _STEPS[cell]


def _reference_greedy(cells, params, carries, out_len, go):
    """Tokens and logits of greedy decoding, one example, one step and one layer at a time."""
    token, tokens, logits = go, [], []
    for _ in range(out_len):
        x = jnp.array([token])
        for i, cell in enumerate(cells):
            carries[i], x = _jitted_step(cell)(params[f"layer_{i}"], carries[i], x)
        h = np.asarray(x[0], np.float64)
        step_logits = h @ np.asarray(params["dense"]["kernel"], np.float64) + np.asarray(
            params["dense"]["bias"], np.float64)
        token = int(np.argmax(step_logits))
        tokens.append(token)
        logits.append(step_logits)
    return np.array(tokens), np.array(logits)


@pytest.mark.parametrize("name", CELL_NAMES)
def test_encoder_decoder_greedy_matches_step_by_step_reference(name):
    input_dim, num_outputs, out_len = 5, 4, 6
    cell = CELLS[name](4)  # one set of functions; every layer has its own params
    enc = dec = [cell, cell]
    model = topo.encoder_decoder(enc, dec, input_dim, num_outputs, out_len, reverse_input=True)
    params = _scramble(model.init(jax.random.PRNGKey(0)), jax.random.PRNGKey(1), 1.5)
    tokens = np.array([[1, 2, 3, 4, 0], [4, 4, 1, 0, 0], [2, 0, 0, 0, 0]], np.int32)
    lengths = np.array([5, 3, 1], np.int32)

    greedy = np.asarray(model.generate(params, jnp.asarray(tokens), jnp.asarray(lengths)))
    assert greedy.shape == (3, out_len) and greedy.dtype == np.int32
    forced = jax.jit(model.apply)(params, jnp.asarray(tokens), jnp.asarray(greedy),
                                  jnp.asarray(lengths))
    for b in range(3):
        carries = _reference_encoder(enc, params["encoder"], tokens[b], lengths[b], True)
        want_tokens, want_logits = _reference_greedy(dec, params["decoder"], carries, out_len,
                                                     num_outputs)
        np.testing.assert_array_equal(greedy[b], want_tokens)
        # Teacher forcing on the greedy tokens reproduces the greedy logits.
        np.testing.assert_allclose(forced[b], want_logits, rtol=1e-4, atol=1e-5)
    assert len(set(greedy.reshape(-1).tolist())) > 1  # the test decodes something non-trivial


def test_one_to_many_greedy_matches_reference():
    input_dim, num_outputs, out_len = 6, 5, 7
    cells = [CELLS["lstm"](4)]
    model = topo.one_to_many(cells, input_dim, num_outputs, out_len)
    params = _scramble(model.init(jax.random.PRNGKey(0)), jax.random.PRNGKey(3), 1.5)
    vectors = jax.random.normal(jax.random.PRNGKey(4), (3, input_dim))
    greedy = np.asarray(model.generate(params, vectors))
    for b in range(3):
        v = np.asarray(vectors[b], np.float64)
        h, c = (np.tanh(v @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"]))
                for p in params["bridge"][0])
        carries = [LSTMCarry(jnp.asarray(h[None], jnp.float32), jnp.asarray(c[None], jnp.float32))]
        want, _ = _reference_greedy(cells, params["decoder"], carries, out_len, num_outputs)
        np.testing.assert_array_equal(greedy[b], want)


def test_encoder_decoder_needs_matching_layer_counts():
    with pytest.raises(ValueError, match="as many"):
        topo.encoder_decoder([CELLS["gru"](3)], [CELLS["gru"](3)] * 2, 4, 3, 2)


def _log_softmax64(logits):
    z = logits - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_masked_cross_entropy_ignores_padding():
    batch, time, classes = 3, 5, 4
    logits = jax.random.normal(jax.random.PRNGKey(0), (batch, time, classes))
    labels = jax.random.randint(jax.random.PRNGKey(1), (batch, time), 0, classes)
    lengths = jnp.array([5, 2, 1])
    mask = topo.sequence_mask(lengths, time)
    np.testing.assert_array_equal(mask, np.arange(time)[None] < np.array([5, 2, 1])[:, None])

    loss = jax.jit(topo.masked_cross_entropy)
    got = loss(logits, labels, mask)
    logp = _log_softmax64(np.asarray(logits, np.float64))
    nll = -np.take_along_axis(logp, np.asarray(labels)[..., None], -1)[..., 0]
    want = [nll[b, :n].mean() for b, n in enumerate([5, 2, 1])]
    np.testing.assert_allclose(got, want, rtol=1e-5)

    # Other values (even NaN logits, out-of-range labels) at padded steps change nothing.
    pad = ~np.asarray(mask)
    logits2 = jnp.where(pad[..., None], jnp.nan, logits)
    labels2 = jnp.where(pad, 99, labels)

    grad = jax.jit(jax.grad(lambda lg, lb: jnp.sum(topo.masked_cross_entropy(lg, lb, mask))))
    np.testing.assert_array_equal(loss(logits2, labels2, mask), got)
    g1, g2 = grad(logits, labels), grad(logits2, labels2)
    np.testing.assert_array_equal(g1, g2)
    np.testing.assert_array_equal(np.asarray(g1)[pad], 0.0)

    predictions = jnp.where(pad, 99, labels)
    np.testing.assert_array_equal(topo.exact_match(predictions, labels, mask), [1, 1, 1])
    np.testing.assert_array_equal(topo.masked_accuracy(predictions, labels, mask), [1, 1, 1])
    wrong_first = predictions.at[:, 0].set(99)
    np.testing.assert_array_equal(topo.exact_match(wrong_first, labels, mask), [0, 0, 0])
    np.testing.assert_allclose(topo.masked_accuracy(wrong_first, labels, mask), [0.8, 0.5, 0.0])


def test_tagger_and_classifier_ignore_padded_tokens():
    layer = topo.stacked([topo.bidirectional(CELLS["gru"](3)), topo.recurrent(CELLS["lstm"](2))])
    tagger = topo.sequence_tagger(layer, 4, 3)
    classifier = topo.sequence_classifier(layer, 4, 2)
    tokens = jnp.array([[1, 2, 3, 0], [3, 3, 0, 0]])
    other = jnp.array([[1, 2, 3, 2], [3, 3, 1, 2]])
    lengths = jnp.array([3, 2])
    p_t = tagger.init(jax.random.PRNGKey(0))
    p_c = classifier.init(jax.random.PRNGKey(0))
    tag, classify = jax.jit(tagger.apply), jax.jit(classifier.apply)
    a, b = tag(p_t, tokens, lengths), tag(p_t, other, lengths)
    assert a.shape == (2, 4, 3)
    mask = np.asarray(topo.sequence_mask(lengths, 4))
    np.testing.assert_array_equal(np.asarray(a)[mask], np.asarray(b)[mask])
    np.testing.assert_array_equal(classify(p_c, tokens, lengths), classify(p_c, other, lengths))


# --- the experiments, end to end (tiny sizes, in subprocesses: absl flags are process-global) --

_TINY = ["--units=8", "--steps=4", "--eval_every=2", "--batch_size=8", "--digits=2",
         "--train_examples=200", "--test_examples=50", "--count_per_length=8",
         "--train_max_len=4", "--test_max_len=8", "--seq_len=16", "--window_step=16"]


def _launch(args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-m", "experiments.topologies", *args], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc):
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


def test_every_topology_runs_end_to_end_and_resumes(tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text("Alice was beginning to get very tired.\nThe Queen said: Off with her head!\n"
                    * 8)
    cells = {"many_to_one": "simple_rnn", "one_to_many": "lstm", "seq2seq": "gru",
             "synced": "lstm"}
    procs = {t: _launch([f"--topology={t}", f"--cell={c}", f"--workdir={tmp_path / t}",
                         f"--text={text}", *_TINY], tmp_path) for t, c in cells.items()}
    missing = _launch(["--topology=synced", f"--text={tmp_path / 'nope.txt'}",
                       f"--workdir={tmp_path / 'bad'}"], tmp_path)
    for topology, proc in procs.items():
        _finish(proc)
        work = tmp_path / topology
        rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [2, 4]
        assert all(np.isfinite(r["loss"]) and r["cell"] == cells[topology] for r in rows)
        assert (work / "learning_curve.png").stat().st_size < 200_000
        assert sorted(os.listdir(work / "checkpoints")) == ["1", "2"]
        if topology == "many_to_one":  # resume it while the others finish
            resumed = _launch(["--topology=many_to_one", "--cell=simple_rnn",
                               f"--workdir={work}", *_TINY, "--steps=6"], tmp_path)

    _finish(resumed)
    rows = [json.loads(line)
            for line in (tmp_path / "many_to_one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert rows[2]["elapsed_seconds"] > rows[1]["elapsed_seconds"]
    out, _ = missing.communicate(timeout=600)
    assert missing.returncode == 1 and "--text" in out and "Traceback" not in out
