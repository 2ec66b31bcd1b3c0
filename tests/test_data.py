"""The tutorial's text preparation, vocabulary, windows, and the shipped corpus."""

import hashlib
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest

from rnn_jax import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Jitted: one compilation per shape rather than one per primitive and shape.
_window_batch = jax.jit(data.get_window_batch, static_argnums=2)


def test_the_sky_was_falling_windows():
    """The tutorial's own example: 10-char windows with step 1 and the next char as label."""
    text = data.clean_text(b"The sky was falling\n")
    assert text == "the sky was falling"
    vocab = data.Vocabulary.from_text(text)
    windows = data.make_windows(vocab.encode(text), seq_len=10, step=1)
    n = int(windows.starts.shape[0])
    inputs, labels = _window_batch(windows, jnp.arange(n), 10)
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
    inputs, labels = _window_batch(windows, idx, seq_len)
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


def test_load_text_errors_name_the_path(tmp_path):
    cases = []
    missing = str(tmp_path / "missing.txt")
    cases.append((missing, 2, "does not exist"))
    cases.append((str(tmp_path), 2, "is a directory"))
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    cases.append((str(empty), 2, "is empty"))
    blank = tmp_path / "blank.txt"
    blank.write_bytes(b"  \n\n\t \n")
    cases.append((str(blank), 2, "is empty"))
    binary = tmp_path / "model.bin"
    binary.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    cases.append((str(binary), 2, "binary"))
    short = tmp_path / "short.txt"
    short.write_bytes(b"Hello\n")
    cases.append((str(short), 11, "min_length=11"))
    for path, min_length, what in cases:
        with pytest.raises(data.TextError, match=what) as err:
            data.load_text(path, min_length=min_length)
        assert f"path={path!r}" in str(err.value)  # the library names its parameter
        assert "pass " in str(err.value)  # and says what to do
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
    with pytest.raises(data.TextError, match=r"cannot be read.*Permission denied") as err:
        data.load_text(str(path))
    assert f"path={str(path)!r}" in str(err.value)


def test_make_windows_and_split_errors():
    tokens = np.arange(5, dtype=np.int32)
    with pytest.raises(ValueError, match="seq_len"):
        data.make_windows(tokens, 5, 1)  # needs seq_len + 1 = 6
    assert data.make_windows(tokens, 4, 1).starts.tolist() == [0]
    with pytest.raises(ValueError, match="seq_len"):
        data.make_windows(tokens, 0, 1)
    with pytest.raises(ValueError, match="step"):
        data.make_windows(tokens, 2, 0)
    train, val = data.split_tokens(np.arange(100), 0.2, 10)
    assert train.tolist() == list(range(80)) and val.tolist() == list(range(80, 100))
    assert data.split_tokens(np.arange(100), 0.0, 10)[1] is None
    with pytest.raises(ValueError, match=r"val_fraction=0\.95"):
        data.split_tokens(np.arange(100), 0.95, 10)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="val_fraction"):
            data.split_tokens(np.arange(100), bad, 10)


# --- the shipped corpus -----------------------------------------------------------------------


def _sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_alice_path_is_the_committed_checked_file():
    path = data.alice_path()
    assert path == os.path.join(ROOT, "data", "alice_in_wonderland.txt") and os.path.isfile(path)
    assert _sha256(path) == data.ALICE_SHA256
    text = data.load_text(path)
    # Project Gutenberg #11 without its licence: the book itself, first line to last (the
    # curly apostrophe of "Alice's" is not ASCII, so the cleaning drops it).
    assert text.startswith("[illustration] alices adventures in wonderland by lewis carroll")
    assert text.endswith("and the happy summer days. the end")
    assert "gutenberg" not in text


def test_alice_path_in_another_directory(tmp_path):
    shutil.copy(data.alice_path(), tmp_path / data.ALICE_FILENAME)
    assert data.alice_path(str(tmp_path)) == str(tmp_path / data.ALICE_FILENAME)


def test_alice_path_missing_or_modified_says_what_to_do(tmp_path):
    missing = tmp_path / data.ALICE_FILENAME
    with pytest.raises(data.TextError, match="missing") as err:
        data.alice_path(str(tmp_path))
    assert repr(str(missing)) in str(err.value) and "git checkout data/" in str(err.value)

    with open(data.alice_path(), "rb") as f:
        raw = bytearray(f.read())
    raw[100] ^= 1  # one bit of another revision
    missing.write_bytes(bytes(raw))
    with pytest.raises(data.TextError, match="sha256") as err:
        data.alice_path(str(tmp_path))
    message = str(err.value)
    assert repr(str(missing)) in message and "git checkout data/" in message
    assert _sha256(missing) in message and data.ALICE_SHA256 in message


@pytest.mark.parametrize(
    "encoding,named,iconv",
    [
        ("utf-16", "UTF-16 (little-endian)", "UTF-16LE"),  # with a byte-order mark
        ("utf-16-le", "UTF-16 (little-endian)", "UTF-16LE"),  # without: NULs every other byte
        ("utf-16-be", "UTF-16 (big-endian)", "UTF-16BE"),
        ("utf-32", "UTF-32 (little-endian)", "UTF-32LE"),
    ],
)
def test_wide_encodings_are_named_with_the_command_that_converts_them(
    tmp_path, encoding, named, iconv
):
    path = tmp_path / "story.txt"
    path.write_bytes("Alice was beginning to get very tired.\n".encode(encoding) * 20)
    with pytest.raises(data.TextError) as err:
        data.load_text(str(path), name="text")
    message = str(err.value)
    assert message.startswith(f"text={str(path)!r} is {named} text")
    assert f"iconv -f {iconv} -t UTF-8 {path} > {tmp_path / 'story'}.utf8.txt" in message


def test_utf8_and_latin1_are_read_as_bytes_keeping_ascii(tmp_path):
    for encoding in ("utf-8", "latin-1"):
        path = tmp_path / f"{encoding}.txt"
        path.write_bytes("Caf\u00e9 au lait, said Alice.\n".encode(encoding) * 3)
        assert data.load_text(str(path)) == " ".join(["caf au lait, said alice."] * 3)
