"""Large corpora: memory proportional to the text, an O(batch) shuffle beyond 2**20 examples.

The 10 MB pipeline runs in a subprocess (this file run as a script) so that its peak RSS is
its own. The tutorial's one-hot arrays would need 10e6 x 10 x vocabulary bytes here (3 GB
for a 30-character vocabulary); the integer pipeline must stay within a few bytes per
character of text.
"""

import json
import os
import resource
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rnn_jax import batches, optim, train

MB = 10**6
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("n", [1, 2, 4097, (1 << 20) + 3])
def test_index_shuffle_is_a_permutation(n):
    """Sizes with 0, 1, 13 and 21 bits: 4097 walks the most (its Feistel domain is 4x larger)."""
    key = jax.random.PRNGKey(n)
    got = np.asarray(batches._index_shuffle(key, jnp.arange(n), n))
    np.testing.assert_array_equal(np.sort(got), np.arange(n))  # a bijection of 0..n-1
    if n >= 1000:  # and a shuffle: another key gives another order; no trace of the input order
        other = np.asarray(batches._index_shuffle(jax.random.PRNGKey(n + 1), jnp.arange(n), n))
        assert np.mean(got == other) < 0.01
        assert abs(np.corrcoef(np.arange(n), got)[0, 1]) < 0.1
        assert np.mean(got == np.arange(n)) < 0.01


def test_large_epoch_visits_every_example_once(monkeypatch):
    """The index-shuffle path (forced at n = 100): every example once per epoch, a new order.

    loss = -w[i] per example under SGD(1) adds 1 / (real examples in its batch) to ``w[i]`` each
    time example ``i`` is drawn: 96 examples in batches of 16 get 1/16, the last 4 get 1/4.
    """
    monkeypatch.setattr(batches, "_PERMUTATION_MAX", 0)
    n, batch_size = 100, 16

    def loss_fn(params, idx):
        return -params["w"][idx], {"idx": idx.astype(jnp.float32)}

    opt = optax.sgd(1.0)
    epoch = train.make_trainer(
        loss_fn, opt, batches.shuffled_epoch(lambda d, idx: idx, n, batch_size)
    )
    state = train.create_train_state({"w": jnp.zeros(n)}, opt, jax.random.PRNGKey(0))
    state, metrics = epoch(state, None)
    w = np.asarray(state.params["w"])
    np.testing.assert_allclose(np.sort(w), [1 / 16] * 96 + [1 / 4] * 4, rtol=1e-6)
    assert float(metrics["idx"]) == pytest.approx((n - 1) / 2)
    last = np.flatnonzero(w > 0.2)
    state2, _ = epoch(state, None)
    w2 = np.asarray(state2.params["w"]) - w
    np.testing.assert_allclose(np.sort(w2), np.sort(w - 0.0), rtol=1e-6)
    assert not np.array_equal(np.flatnonzero(w2 > 0.2), last)  # reshuffled


def _synthetic_text(path, size):
    """``size`` bytes of lines of random words, with capitals, tabs and some non-ASCII bytes."""
    rng = np.random.default_rng(0)
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJ     ,.;'\t\n\xc3\xa9", np.uint8)
    weights = np.ones(len(alphabet))
    weights[-3] = 6.0  # "\n": lines of about 60 bytes
    path.write_bytes(rng.choice(alphabet, size, p=weights / weights.sum()).tobytes())


def _peak_mb() -> float:
    """Peak RSS of this process image (VmHWM); ru_maxrss would include the parent's, on Linux."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure(path: str, num_batches: int) -> dict:
    """Child process: the char-LM pipeline and one (truncated) fused epoch; RSS in MB."""
    import psutil

    from experiments import char_lm
    from rnn_jax import data

    def rss():
        return psutil.Process().memory_info().rss / 2**20

    base = rss()
    text = data.load_text(path, min_length=11)
    vocab = data.Vocabulary.from_text(text)
    windows = data.make_windows(vocab.encode(text), 10, 1)
    num_examples = int(windows.starts.shape[0])
    config = char_lm.Config(units=32)
    _, model = char_lm.make_model(config, vocab.size)
    opt = optim.rmsprop()
    state = train.create_train_state(model.init(jax.random.PRNGKey(0)), opt, jax.random.PRNGKey(1))
    epoch_batches = batches.shuffled_epoch(
        lambda w, idx: data.get_window_batch(w, idx, 10),
        num_examples,
        128,
        num_batches=num_batches,
    )
    epoch = train.make_trainer(char_lm.make_loss(model), opt, epoch_batches)
    before_epoch = rss()
    state, metrics = epoch(state, windows)
    state, metrics = epoch(state, windows)
    peak = _peak_mb()
    return {
        "chars": len(text),
        "vocab": vocab.size,
        "examples": num_examples,
        "base": base,
        "before_epoch": before_epoch,
        "after_epoch": rss(),
        "peak": peak,
        "loss": float(metrics["loss"]),
    }


def test_ten_megabyte_corpus_memory_is_bounded(tmp_path):
    """1 MB, then 10 MB in the same child: the peak grows by a few bytes per extra character."""
    paths = []
    for size in (1 * MB, 10 * MB):
        paths.append(tmp_path / f"synthetic_{size}.txt")
        _synthetic_text(paths[-1], size)
    run = subprocess.run(
        [sys.executable, __file__, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT},
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    small, large = json.loads(run.stdout.strip().splitlines()[-1])
    print(small, large, sep="\n")
    assert large["chars"] > 8 * MB and large["examples"] > (1 << 20)  # the index-shuffle path
    assert np.isfinite(large["loss"])
    # Kept per character: the text (1 byte), tokens on host and on device and the window
    # starts (4 bytes each) = 13 bytes, plus transients (the file's bytes, encoding).
    # The one-hot arrays would be 10 x vocabulary = 320 bytes per character.
    per_char = (large["peak"] - small["peak"]) * 2**20 / (large["chars"] - small["chars"])
    assert per_char < 24, (per_char, small, large)  # measured 16.7
    # The epoch allocates nothing that grows with the corpus (its code and buffers are O(batch)).
    assert large["after_epoch"] - large["before_epoch"] < 100, large


if __name__ == "__main__":
    batches._PERMUTATION_MAX = 0  # the same program at every size: the index shuffle
    print(json.dumps([_measure(path, num_batches=20) for path in sys.argv[1:]]))
