"""The tutorial's text preparation, vocabulary, windows, shuffling, and the corpus download."""

import io
import os
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest

from rnn_jax import data
from rnn_jax.train import _batch_indices


def test_the_sky_was_falling_windows():
    """The tutorial's own example: 10-char windows with step 1 and the next char as label."""
    text = data.clean_text(b"The sky was falling\n")
    assert text == "the sky was falling"
    vocab = data.Vocabulary.from_text(text)
    windows = data.make_windows(vocab.encode(text), seq_len=10, step=1)
    n = int(windows.starts.shape[0])
    inputs, labels = data.get_window_batch(windows, jnp.arange(n), 10)
    got_inputs = [vocab.decode(row) for row in np.asarray(inputs)]
    got_labels = vocab.decode(labels)
    assert got_inputs == [
        "the sky wa",
        "he sky was",
        "e sky was ",
        " sky was f",
        "sky was fa",
        "ky was fal",
        "y was fall",
        " was falli",
        "was fallin",
    ]
    assert got_labels == "s falling"
    assert (got_inputs, list(got_labels)) == ref.tutorial_windows(text, 10, 1)


@pytest.mark.parametrize("seq_len,step", [(3, 1), (4, 3), (5, 7), (1, 1)])
def test_windows_match_tutorial_loop(seq_len, step):
    text = "alice was beginning to get very tired"
    vocab = data.Vocabulary.from_text(text)
    windows = data.make_windows(vocab.encode(text), seq_len, step)
    idx = jnp.arange(windows.starts.shape[0])
    inputs, labels = data.get_window_batch(windows, idx, seq_len)
    want_inputs, want_labels = ref.tutorial_windows(text, seq_len, step)
    assert [vocab.decode(r) for r in np.asarray(inputs)] == want_inputs
    assert list(vocab.decode(labels)) == want_labels
    assert inputs.dtype == jnp.int32 and inputs.shape == (len(want_inputs), seq_len)


def test_clean_text_order_strip_lower_ascii():
    # Strip runs before the non-ASCII bytes are dropped, so the space after a curly quote stays.
    assert data.clean_text("\u201c Hi\n".encode()) == " hi"
    # Inner non-ASCII bytes vanish, whitespace around them stays; CRLF and tabs are stripped.
    assert data.clean_text(b"  Hello \xe2\x80\x94 World\t\r\n") == "hello  world"
    # Lines that are empty (or only non-ASCII) are dropped; the rest joined by one space.
    raw = b"CHAPTER I.\r\n\r\n\xe2\x80\x94\n   \nDown the Rabbit-Hole\n\xc3\xa9t\xc3\xa9"
    assert data.clean_text(raw) == "chapter i. down the rabbit-hole t"
    assert data.clean_text(raw) == ref.tutorial_clean(raw)
    rng = np.random.default_rng(0)
    noisy = bytes(rng.choice(list(b"aB \t\r\n\xe2\x80\x9c\xc3z."), size=2000))
    assert data.clean_text(noisy) == ref.tutorial_clean(noisy)


def test_vocabulary_sorted_and_round_trip():
    vocab = data.Vocabulary.from_text("banana bread")
    assert vocab.chars == " abdenr" and vocab.size == 7
    assert data.Vocabulary.from_text("bread banana") == vocab
    tokens = vocab.encode("bean")
    assert tokens.dtype == np.int32 and list(tokens) == [2, 4, 1, 5]
    assert vocab.decode(tokens) == "bean"
    with pytest.raises(ValueError, match="'xz'"):
        vocab.encode("zebra x")


def test_load_text_errors(tmp_path):
    with pytest.raises(data.TextError, match="--text"):
        data.load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(data.TextError, match="directory.*--text"):
        data.load_text(str(tmp_path))
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(data.TextError, match="empty.*--text"):
        data.load_text(str(empty))
    blank = tmp_path / "blank.txt"
    blank.write_bytes(b"  \n\n\t \n")
    with pytest.raises(data.TextError, match="empty"):
        data.load_text(str(blank))
    binary = tmp_path / "model.bin"
    binary.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(data.TextError, match="binary.*--text"):
        data.load_text(str(binary))
    short = tmp_path / "short.txt"
    short.write_bytes(b"Hello\n")
    with pytest.raises(data.TextError, match="--seq_len"):
        data.load_text(str(short), min_length=11)
    assert data.load_text(str(short), min_length=5) == "hello"


def test_load_text_unreadable(tmp_path, monkeypatch):
    path = tmp_path / "secret.txt"
    path.write_text("some text here")
    real_open = open

    def denied(file, *args, **kwargs):
        # chmod 000 does not stop root (CI runs as root), so the OS refusal is simulated.
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(data.TextError, match="cannot read.*--text"):
        data.load_text(str(path))


def test_make_windows_and_split_errors():
    tokens = np.arange(5, dtype=np.int32)
    with pytest.raises(ValueError, match="seq_len"):
        data.make_windows(tokens, 5, 1)  # needs seq_len + 1 = 6
    assert data.make_windows(tokens, 4, 1).starts.tolist() == [0]
    with pytest.raises(ValueError):
        data.make_windows(tokens, 0, 1)
    with pytest.raises(ValueError):
        data.make_windows(tokens, 2, 0)
    train, val = data.split_tokens(np.arange(100), 0.2, 10)
    assert train.tolist() == list(range(80)) and val.tolist() == list(range(80, 100))
    assert data.split_tokens(np.arange(100), 0.0, 10)[1] is None
    with pytest.raises(ValueError, match="--val_fraction"):
        data.split_tokens(np.arange(100), 0.95, 10)


def test_shuffle_is_a_deterministic_permutation_with_last_batch_kept():
    key = jax.random.PRNGKey(7)
    idx, w = _batch_indices(key, 10, 4, True)
    assert idx.shape == (3, 4) and w.tolist() == [[1] * 4, [1] * 4, [1, 1, 0, 0]]
    real = np.asarray(idx)[np.asarray(w) > 0]
    assert sorted(real.tolist()) == list(range(10))  # every example exactly once
    idx2, _ = _batch_indices(jax.random.PRNGKey(7), 10, 4, True)
    np.testing.assert_array_equal(idx, idx2)
    idx3, _ = _batch_indices(jax.random.PRNGKey(8), 10, 4, True)
    assert not np.array_equal(
        np.asarray(idx)[np.asarray(w) > 0], np.asarray(idx3)[np.asarray(w) > 0]
    )
    ordered, _ = _batch_indices(key, 10, 4, False)
    assert np.asarray(ordered)[np.asarray(w) > 0].tolist() == list(range(10))


class _Response(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_fetch_alice_offline_names_text_flag(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(data.TextError, match="--text"):
        data.fetch_alice(str(tmp_path / "data"))
    assert not (tmp_path / "data" / data.ALICE_FILENAME).exists()
    assert not any(p.name.endswith(".part") for p in tmp_path.rglob("*"))


def test_fetch_alice_download_strips_gutenberg_header(tmp_path, monkeypatch):
    body = (
        b"The Project Gutenberg eBook\r\n*** START OF THE PROJECT GUTENBERG EBOOK 11 ***\r\n"
        b"Alice was beginning\r\n*** END OF THE PROJECT GUTENBERG EBOOK 11 ***\r\nlicence"
    )
    calls = []

    def fake(url, timeout=None):
        calls.append(url)
        return _Response(body)

    monkeypatch.setattr(urllib.request, "urlopen", fake)
    path = data.fetch_alice(str(tmp_path))
    with open(path, "rb") as f:
        saved = f.read()
    assert b"Alice was beginning" in saved
    assert b"START OF" not in saved and b"licence" not in saved
    assert data.fetch_alice(str(tmp_path)) == path and len(calls) == 1  # present: no download
