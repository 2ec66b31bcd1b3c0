"""Text: the named corpora (where each comes from, its digest, how it is read), the cleanings, a
sorted vocabulary, windows as indices, contiguous streams for stateful training, and the
truecasing labels of the synced topology experiment."""

import dataclasses
import hashlib
import os
import stat
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging


class TextError(ValueError):
    """A text file that cannot be used as a corpus; the message says what to do."""


# The largest text file read: a corpus is read into memory whole, and its tokens with it.
MAX_TEXT_BYTES = 8 * 2**30

# clean_text works through the text in pieces of about this many bytes, cut at line ends, so
# that the per-line Python objects of a 100 MB corpus never exist all at once.
_CLEAN_CHUNK = 1 << 23


CLEANINGS = ("tutorial", "cased", "none")


def clean_text(raw: bytes, cleaning: str = "tutorial") -> str:
    """A file's bytes as the text a model reads.

    Args:
      raw: the file's bytes.
      cleaning: ``"tutorial"``, the tutorial's (DESIGN.md §1): per line strip, lower-case,
        drop non-ASCII; drop empty lines; join with one space. ``"cased"``: the same with the
        case kept (``clean_text(r, "cased").lower() == clean_text(r)``). ``"none"``: every
        character as it is (UTF-8; a leading byte-order mark dropped), as nanoGPT and
        char-rnn read tiny Shakespeare.

    Lines are split as a file read in binary mode yields them (on ``b"\\n"``). The order matters
    and follows the tutorial: whitespace is stripped *before* non-ASCII bytes are dropped.
    Memory beyond ``raw`` and the result stays at a few times ``_CLEAN_CHUNK``.

    Raises:
      ValueError: an unknown ``cleaning``, or ``"none"`` of bytes that are not UTF-8.
    """
    if cleaning not in CLEANINGS:
        raise ValueError(f"cleaning={cleaning!r} is not one of {list(CLEANINGS)}")
    if cleaning == "none":
        return raw.decode("utf-8").removeprefix("\ufeff")
    pieces, start = [], 0
    while start < len(raw):
        end = raw.find(b"\n", min(start + _CLEAN_CHUNK, len(raw)))
        end = len(raw) if end == -1 else end
        lines = raw[start:end].split(b"\n")
        if cleaning == "tutorial":
            lines = (line.strip().lower() for line in lines)
        else:
            lines = (line.strip() for line in lines)
        cleaned = (line.decode("ascii", "ignore") for line in lines)
        piece = " ".join(line for line in cleaned if line)
        if piece:
            pieces.append(piece)
        start = end + 1
    return " ".join(pieces)


def _wide_encoding(raw: bytes) -> str | None:
    """``"UTF-16"``/``"UTF-32"`` (with byte order) when ``raw`` looks like one, else None:
    a byte-order mark, or NULs in every other byte as UTF-16 gives ASCII text."""
    boms = (
        (b"\xff\xfe\x00\x00", "UTF-32 (little-endian)"),
        (b"\x00\x00\xfe\xff", "UTF-32 (big-endian)"),
        (b"\xff\xfe", "UTF-16 (little-endian)"),
        (b"\xfe\xff", "UTF-16 (big-endian)"),
    )
    for bom, encoding in boms:
        if raw.startswith(bom):
            return encoding
    head = raw[:65536]
    if len(head) >= 4:
        even, odd = head[0::2], head[1::2]
        if odd.count(0) > 0.9 * len(odd) and even.count(0) < 0.1 * len(even):
            return "UTF-16 (little-endian)"
        if even.count(0) > 0.9 * len(even) and odd.count(0) < 0.1 * len(odd):
            return "UTF-16 (big-endian)"
    return None


def _looks_binary(raw: bytes) -> bool:
    head = raw[:65536]
    if b"\x00" in head:
        return True
    control = sum(1 for b in head if b < 32 and b not in (9, 10, 12, 13))
    return control > 0.01 * len(head)


def load_text(
    path: str, min_length: int = 2, *, name: str = "path", cleaning: str = "tutorial"
) -> str:
    """Reads and cleans a text file, with errors that say what to do.

    Args:
      path: a plain text file (any encoding with the tutorial's cleaning, which drops
        non-ASCII bytes; UTF-8 with ``cleaning="none"``).
      min_length: the cleaned text must have at least this many characters (``seq_len + 1``
        for one training window).
      name: what the errors call ``path`` (``name=...``): a caller passes its own parameter's
        name, e.g. an experiment's ``text``.
      cleaning: one of :data:`CLEANINGS` (see :func:`clean_text`).

    Raises:
      TextError: the file is missing, unreadable, empty, UTF-16/UTF-32 (named, with the
        command that converts it), binary, not UTF-8 (``cleaning="none"``) or too short after
        cleaning.
    """
    if not os.path.exists(path):
        raise TextError(f"{name}={path!r} does not exist; pass an existing text file")
    if os.path.isdir(path):
        raise TextError(f"{name}={path!r} is a directory; pass a text file")
    try:
        info = os.stat(path)
    except OSError as e:
        raise TextError(f"{name}={path!r} cannot be read ({e.strerror}); pass another file") from e
    if not stat.S_ISREG(info.st_mode):  # a device or a FIFO would be read forever, or wait
        raise TextError(
            f"{name}={path!r} is not a regular file (a device, FIFO or socket); pass a text file"
        )
    if info.st_size > MAX_TEXT_BYTES:
        raise TextError(
            f"{name}={path!r} has {info.st_size / 2**30:.1f} GiB, more than the "
            f"{MAX_TEXT_BYTES / 2**30:.0f} GiB a corpus may have (it is read into memory "
            "whole); pass a smaller file"
        )
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise TextError(
            f"{name}={path!r} cannot be read ({e.strerror}); check its permissions or pass "
            "another file"
        ) from e
    if not raw or raw.isspace():  # raw.strip() would copy a large file
        raise TextError(f"{name}={path!r} is empty; pass a non-empty text file")
    encoding = _wide_encoding(raw)
    if encoding is not None:
        family = encoding.split()[0] + ("LE" if "little" in encoding else "BE")
        raise TextError(
            f"{name}={path!r} is {encoding} text; the corpus is read as bytes, ASCII kept "
            f"(UTF-8 and Latin-1 work as they are): convert it first, e.g. "
            f"`iconv -f {family} -t UTF-8 {path} > {os.path.splitext(path)[0]}.utf8.txt`, "
            "and pass that file"
        )
    if _looks_binary(raw):
        raise TextError(
            f"{name}={path!r} looks like a binary file, not text; pass a plain text file"
        )
    try:
        text = clean_text(raw, cleaning)
    except UnicodeDecodeError as e:
        raise TextError(
            f"{name}={path!r} is not UTF-8 (byte {e.start}), which cleaning='none' reads; "
            "convert it, or read it with cleaning='tutorial' or 'cased' (ASCII kept)"
        ) from None
    if len(text) < min_length:
        raise TextError(
            f"{name}={path!r} has {len(text)} characters after cleaning, fewer than "
            f"min_length={min_length}; pass a longer text"
        )
    return text


# --- named corpora: where each comes from, its digest, how it is read ----------------------------


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A named corpus: where it is obtained, how it is checked and how experiments read it.

    Attributes:
      name: its name in :data:`CORPORA` (``--corpus=NAME``).
      title: what the text is.
      licence: the text's licence, and what travels with it.
      filename: its file's name in the cache directory (:func:`cache_dir`).
      sha256: of the file as obtained (it is checked on every use).
      cleaning: how the experiments read it, one of :data:`CLEANINGS`.
      text_sha256: of the text that ``cleaning`` makes of it (UTF-8), which every number the
        project quotes on this corpus was measured on.
      val_fraction: the held-out tail its results quote.
      package: the pip requirement whose source distribution ships the file, with ``member``
        its path inside that archive; or None.
      url: where the file is published, when no package ships it.
      gutenberg: read only the book, the lines between Project Gutenberg's ``*** START`` and
        ``*** END`` markers, not the header and licence around it.
    """

    name: str
    title: str
    licence: str
    filename: str
    sha256: str
    cleaning: str
    text_sha256: str
    val_fraction: float
    package: str | None = None
    member: str | None = None
    url: str | None = None
    gutenberg: bool = False

    @property
    def source(self) -> str:
        """Where the file comes from, in words."""
        if self.package is not None:
            return f"the source distribution of {self.package} on the package index, {self.member}"
        return str(self.url)


CORPORA = {
    c.name: c
    for c in (
        Corpus(
            name="alice",
            title="Alice's Adventures in Wonderland, Lewis Carroll: Project Gutenberg eBook #11 "
            "(Millennium Fulcrum Edition 3.0), with its Gutenberg header and licence",
            licence="public domain in the United States; the Project Gutenberg licence travels "
            "with the file (examples/alice_license.txt beside it in the archive)",
            filename="alice.txt",
            sha256="f00b287e63f5ae3442dc5b9c4bf18650adaf3b7f5034f7be5460089b934a0752",
            cleaning="tutorial",
            text_sha256="87e70643049665beff3c975aeb2926cd84d187617a51eb4e6be1d1e1321b7597",
            val_fraction=0.05,
            package="wordcloud==1.9.6",
            member="wordcloud-1.9.6/examples/alice.txt",
            gutenberg=True,
        ),
        Corpus(
            name="tiny_shakespeare",
            title="tiny Shakespeare: 40,000 lines of Shakespeare's plays, the corpus of char-rnn "
            "and nanoGPT's shakespeare_char (1,115,394 characters, 65 symbols)",
            licence="Shakespeare's text is in the public domain; the selection is char-rnn's "
            "(MIT licence)",
            filename="tiny_shakespeare.txt",
            sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            cleaning="none",
            text_sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            val_fraction=0.1,
            url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/"
            "input.txt",
        ),
    )
}
DEFAULT_CORPUS = "alice"
# The command that runs pip: this interpreter's.
PIP = (sys.executable, "-m", "pip")


def cache_dir() -> str:
    """Where obtained corpora are kept: ``$RNN_JAX_DATA`` when set, else
    ``$XDG_CACHE_HOME/rnn_jax/data``, else ``~/.cache/rnn_jax/data``."""
    if os.environ.get("RNN_JAX_DATA"):
        return os.path.expanduser(os.environ["RNN_JAX_DATA"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "rnn_jax", "data")


def _corpus(corpus: "Corpus | str") -> Corpus:
    if isinstance(corpus, Corpus):
        return corpus
    if corpus not in CORPORA:
        raise ValueError(f"corpus={corpus!r} is not one of {sorted(CORPORA)}")
    return CORPORA[corpus]


def _sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _read_bytes(path: str) -> bytes | None:
    """The file's bytes, or None where it is not a readable regular file."""
    try:
        if not os.path.isfile(path):
            return None
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def corpus_path(
    corpus: "Corpus | str",
    *,
    path: str | None = None,
    directory: str | None = None,
    pip: tuple[str, ...] = PIP,
    log: Callable[[str], None] | None = None,
) -> str:
    """The path of a named corpus's file, its sha256 checked: the one place corpora are found.

    A cached copy in ``directory`` is used when its digest is right; otherwise the file is
    obtained (the package's source distribution through ``pip download``, or the URL), its
    digest checked, and cached, with one line to ``log`` saying what is being done. The cache
    is written whole or not at all.

    Args:
      corpus: a name of :data:`CORPORA`, or a :class:`Corpus`.
      path: a copy the caller holds: checked and returned, nothing fetched.
      directory: the cache (None: :func:`cache_dir`).
      pip: the command that runs pip.
      log: where the one line about fetching goes (None: absl logging).

    Raises:
      TextError: ``path`` is not the corpus, or it cannot be obtained (offline, pip failing,
        a damaged or changed download, a cache that cannot be written); the message says
        how to obtain it by hand, and that ``text=PATH`` trains on any file.
    """
    return _verified(_corpus(corpus), path, directory, pip, log)[0]


def _verified(corpus: Corpus, path, directory, pip, log) -> tuple[str, bytes]:
    """``(path, bytes)`` of the corpus's file, checked (see :func:`corpus_path`): its bytes are
    read once, for the digest and for whoever reads the text."""
    if path is not None:
        raw = _read_bytes(path)
        if raw is None:
            raise TextError(f"path={path!r} is not a readable file; pass a copy of {corpus.name}")
        if _sha256(raw) != corpus.sha256:
            raise TextError(
                f"path={path!r} has sha256 {_sha256(raw)}, not {corpus.name}'s {corpus.sha256}; "
                f"pass the file of {corpus.source}"
            )
        return path, raw
    directory = cache_dir() if directory is None else directory
    cached = os.path.join(directory, corpus.filename)
    raw = _read_bytes(cached)
    if raw is not None and _sha256(raw) == corpus.sha256:
        return cached, raw
    log = log or logging.info
    if raw is not None:
        log(f"{cached} has sha256 {_sha256(raw)}, not {corpus.sha256}: replacing it")
    raw = _obtain(corpus, cached, log, pip)
    _store(raw, cached, corpus)
    return cached, raw


def _unobtainable(corpus: Corpus, cached: str, why: str) -> TextError:
    if corpus.package is not None:
        how = (
            f"`pip download --no-deps --no-binary {corpus.package.split('==')[0]} "
            f"{corpus.package} -d DIR` and extract {corpus.member}"
        )
    else:
        how = f"download {corpus.url}"
    return TextError(
        f"cannot obtain the corpus {corpus.name!r}: {why}; on a machine that can, {how} "
        f"(sha256 {corpus.sha256}) to {cached}, or train on any text file with text=PATH"
    )


def _obtain(corpus: Corpus, cached: str, log, pip) -> bytes:
    """The corpus's file, fetched and its digest checked."""
    with tempfile.TemporaryDirectory(prefix="rnn_jax-corpus-") as tmp:
        if corpus.package is not None:
            name = corpus.package.split("==")[0]
            args = ["download", "--no-deps", "--no-binary", name, corpus.package, "-d", tmp]
            log(
                f"fetching the corpus {corpus.name!r} once: pip {' '.join(args[:-2])} (about "
                f"30 MB), then {os.path.basename(corpus.member)} kept in {cached}"
            )
            try:
                done = subprocess.run(
                    [*pip, *args, "-q", "--disable-pip-version-check"],
                    capture_output=True,
                    text=True,
                    timeout=900,
                )
            except (OSError, subprocess.SubprocessError) as e:
                raise _unobtainable(corpus, cached, f"pip could not run ({e})") from None
            if done.returncode != 0:
                lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
                why = lines[-1] if lines else f"exit status {done.returncode}"
                raise _unobtainable(corpus, cached, f"pip download failed ({why})")
            archives = sorted(os.listdir(tmp))
            if not archives:
                raise _unobtainable(corpus, cached, "pip download saved no archive")
            raw = _archive_member(os.path.join(tmp, archives[0]), corpus, cached)
        else:
            log(f"fetching the corpus {corpus.name!r} once from {corpus.url} into {cached}")
            try:
                with urllib.request.urlopen(corpus.url, timeout=120) as response:
                    raw = response.read()
            except (OSError, ValueError) as e:
                raise _unobtainable(corpus, cached, f"the download failed ({e})") from None
    if _sha256(raw) != corpus.sha256:
        raise _unobtainable(
            corpus,
            cached,
            f"the file obtained has sha256 {_sha256(raw)}, not {corpus.sha256}",
        )
    return raw


def _archive_member(archive: str, corpus: Corpus, cached: str) -> bytes:
    try:
        with tarfile.open(archive, "r:*") as tar:
            try:
                member = tar.extractfile(corpus.member)
            except KeyError:
                member = None
            if member is None:
                raise _unobtainable(
                    corpus, cached, f"{os.path.basename(archive)} holds no {corpus.member}"
                )
            return member.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise _unobtainable(
            corpus, cached, f"{os.path.basename(archive)} is damaged or truncated ({e})"
        ) from None


def _store(raw: bytes, cached: str, corpus: Corpus) -> None:
    """Writes ``cached`` whole (a temporary file renamed over it) or not at all."""
    directory = os.path.dirname(cached) or "."
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{corpus.filename}.", dir=directory)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep it from the machine's other users
        os.replace(tmp, cached)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        raise TextError(
            f"cannot write the corpus cache {directory!r} ({e.strerror or e}); set RNN_JAX_DATA "
            "to a writable directory, or train on any text file with text=PATH"
        ) from None


def gutenberg_body(raw: bytes) -> bytes:
    """The book of a Project Gutenberg file: the lines between its ``*** START`` and
    ``*** END`` markers, without them or the "End of Project Gutenberg's ..." line that
    closes the book.

    Raises:
      TextError: the markers are not there.
    """
    lines = raw.split(b"\n")
    starts = [i for i, line in enumerate(lines) if line.startswith(b"*** START OF")]
    ends = [i for i, line in enumerate(lines) if line.startswith(b"*** END OF")]
    if not starts or not ends or ends[0] <= starts[0]:
        raise TextError("no Project Gutenberg '*** START OF' / '*** END OF' markers in the text")
    body = lines[starts[0] + 1 : ends[0]]
    closing = [i for i, line in enumerate(body) if line.lower().startswith(b"end of project")]
    return b"\n".join(body[: closing[-1]] if closing else body)


def read_corpus(
    corpus: "Corpus | str",
    cleaning: str | None = None,
    *,
    path: str | None = None,
    directory: str | None = None,
    pip: tuple[str, ...] = PIP,
    log: Callable[[str], None] | None = None,
) -> str:
    """The text of a named corpus as experiments read it.

    Args:
      corpus: a name of :data:`CORPORA`, or a :class:`Corpus`.
      cleaning: one of :data:`CLEANINGS` (None: the corpus's own, whose result is checked
        against ``text_sha256``).
      path, directory, pip, log: as :func:`corpus_path` takes them.
    """
    corpus = _corpus(corpus)
    _, raw = _verified(corpus, path, directory, pip, log)
    if corpus.gutenberg:
        raw = gutenberg_body(raw)
    text = clean_text(raw, corpus.cleaning if cleaning is None else cleaning)
    if cleaning in (None, corpus.cleaning) and _sha256(text.encode()) != corpus.text_sha256:
        raise TextError(
            f"the {corpus.cleaning} cleaning of {corpus.name} has sha256 "
            f"{_sha256(text.encode())}, not {corpus.text_sha256}: the cleaning changed, and "
            "with it every number measured on this corpus"
        )
    return text


def _byte_counts(codes: np.ndarray) -> np.ndarray:
    """How often each of the 128 ASCII codes occurs in ``codes`` (uint8), in bounded memory."""
    step = 1 << 22  # np.bincount makes an intp copy of its input: count a slice at a time
    counts = np.zeros(128, np.int64)
    for start in range(0, len(codes), step):
        counts += np.bincount(codes[start : start + step], minlength=128)[:128]
    return counts


class Vocabulary(NamedTuple):
    """Characters in sorted order; a token is an index into ``chars``."""

    chars: str

    @classmethod
    def from_text(cls, text: str) -> "Vocabulary":
        if text.isascii():  # every cleaned text: count bytes with NumPy, not a Python set
            counts = _byte_counts(np.frombuffer(text.encode("ascii"), np.uint8))
            return cls("".join(map(chr, np.flatnonzero(counts))))
        return cls("".join(sorted(set(text))))

    @property
    def size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """int32 tokens of ``text``; characters outside the vocabulary raise a ``ValueError``."""
        if text.isascii() and self.chars.isascii():
            # A 128-entry lookup table applied to the bytes: one vectorised pass, no Python loop.
            table = np.full(128, -1, np.int32)
            table[np.frombuffer(self.chars.encode("ascii"), np.uint8)] = np.arange(self.size)
            codes = np.frombuffer(text.encode("ascii"), np.uint8)
            present = _byte_counts(codes) > 0
            unknown = [chr(c) for c in np.flatnonzero(present & (table < 0))]
            tokens = None if unknown else table[codes]
        else:
            index = {c: i for i, c in enumerate(self.chars)}
            unknown = sorted({c for c in text if c not in index})
            tokens = None if unknown else np.fromiter((index[c] for c in text), np.int32, len(text))
        if unknown:
            raise ValueError(
                f"characters {''.join(unknown)!r} are not in the vocabulary {self.chars!r}; "
                "use only characters of the training text"
            )
        return tokens

    def decode(self, tokens) -> str:
        return "".join(self.chars[int(t)] for t in np.asarray(tokens).reshape(-1))


class Windows(NamedTuple):
    """Examples as indices: input ``tokens[s : s + seq_len]``, label ``tokens[s + seq_len]``.

    A pytree of device arrays; nothing of size ``examples × seq_len`` (let alone one-hot) is
    ever built: :func:`get_window_batch` gathers a batch on device.
    """

    tokens: jax.Array  # (text_length,) int32
    starts: jax.Array  # (num_examples,) int32


def make_windows(tokens: np.ndarray, seq_len: int, step: int) -> Windows:
    """The tutorial's ``for i in range(0, len(text) - seq_len, step)`` windows."""
    if seq_len < 1 or step < 1:
        raise ValueError(f"seq_len={seq_len} and step={step} must be positive")
    if len(tokens) < seq_len + 1:
        raise ValueError(f"the text has {len(tokens)} characters, fewer than seq_len={seq_len} + 1")
    # An iota made on device: jnp.arange(start, stop, step) would build it in NumPy and copy it.
    starts = jnp.arange(len(range(0, len(tokens) - seq_len, step)), dtype=jnp.int32)
    # device_put copies once; jnp.asarray here was measured to hold two copies at its peak.
    tokens = jax.device_put(np.asarray(tokens, np.int32))
    return Windows(tokens, starts * step if step > 1 else starts)


def get_window_batch(windows: Windows, indices: jax.Array, seq_len: int):
    """``(inputs (batch, seq_len) int32, labels (batch,) int32)`` for examples ``indices``."""
    starts = windows.starts[indices]
    inputs = windows.tokens[starts[:, None] + jnp.arange(seq_len)[None, :]]
    return inputs, windows.tokens[starts + seq_len]


def split_tokens(tokens: np.ndarray, val_fraction: float, seq_len: int):
    """``(train, val)``: the last ``val_fraction`` of the text held out, contiguous, cut where
    nanoGPT cuts (``train = tokens[: int(n * (1 - val_fraction))]``)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    if val_fraction == 0.0:
        return tokens, None
    cut = int(len(tokens) * (1.0 - val_fraction))
    if cut < seq_len + 1 or len(tokens) - cut < seq_len + 1:
        raise ValueError(
            f"val_fraction={val_fraction} leaves fewer than seq_len={seq_len} + 1 "
            "characters on one side; change val_fraction"
        )
    return tokens[:cut], tokens[cut:]


class Streams(NamedTuple):
    """A token sequence cut into contiguous streams for stateful training (DESIGN.md §7).

    Stream ``b`` holds the (input, target) pairs ``(t[i], t[i+1])`` for ``i`` in
    ``[starts[b], starts[b] + lengths[b])``: the streams cover every pair of the text once, in
    order, without overlap. Row ``b`` of ``tokens`` is ``t[starts[b] :]`` padded with zeros;
    :func:`stream_batch` cuts it into windows of ``bptt`` pairs. A pytree of device arrays.

    Attributes:
      tokens: ``(num_streams, num_windows · bptt + 1)`` int32.
      lengths: ``(num_streams,)`` int32, pairs per stream (they differ by at most one).
      scored_from: ``(num_streams,)`` int32: pairs before it are read (the carry warms up on
        them) but not scored; 0 in training.
    """

    tokens: jax.Array
    lengths: jax.Array
    scored_from: jax.Array

    @property
    def num_streams(self) -> int:
        return int(self.tokens.shape[0])


def make_streams(
    tokens: np.ndarray, num_streams: int, bptt: int, *, scored_from: int = 0
) -> tuple[Streams, int]:
    """``(streams, num_windows)``: ``tokens`` cut into ``num_streams`` contiguous streams.

    DESIGN.md §7 drops the remainder to make the streams equal; here stream ``b`` starts at
    pair ``⌊b·P/B⌋`` (``P = len(tokens) - 1`` pairs) and runs to the next one's start, so
    no pair is lost and lengths differ by at most one; the positions past a stream's end in
    its last window are masked out of the loss (:func:`stream_batch`).

    Args:
      tokens: ``(n,)`` ints.
      num_streams: ``B``, the batch of a stateful update.
      bptt: pairs per window (the truncation length).
      scored_from: pairs at the start of every stream that are read but not scored (held-out
        evaluation reads the first ``seq_len - 1`` to score the characters the windowed mode
        scores).
    """
    num_pairs = len(tokens) - 1
    if num_streams < 1 or bptt < 1:
        raise ValueError(f"batch_size={num_streams} and bptt={bptt} must be positive")
    if num_pairs < num_streams:
        raise ValueError(
            f"the text has {len(tokens)} characters: too few for batch_size={num_streams} "
            "streams of at least one character each; lower batch_size or use a longer text"
        )
    starts = np.arange(num_streams + 1, dtype=np.int64) * num_pairs // num_streams
    lengths = np.diff(starts)
    num_windows = -(-int(lengths.max()) // bptt)
    width = num_windows * bptt + 1
    padded = np.zeros(int(starts[-2]) + width, np.int32)  # a row per stream, no index array
    padded[: len(tokens)] = tokens
    rows = np.stack([padded[s : s + width] for s in starts[:-1]])
    streams = Streams(
        jax.device_put(rows),
        jax.device_put(lengths.astype(np.int32)),
        jax.device_put(np.full((num_streams,), scored_from, np.int32)),
    )
    return streams, num_windows


def make_blocks(tokens: np.ndarray, block: int, num_streams: int) -> tuple[Streams, int]:
    """``(streams, num_windows)``: ``tokens``' pairs cut into consecutive blocks of ``block``
    (the last one shorter), laid out as ``num_streams`` streams of whole blocks, so that
    window ``k`` of stream ``b`` (:func:`stream_batch` with ``bptt = block``) is block
    ``b · num_windows + k``: pairs ``[block · (b · num_windows + k), ...)``. Read each window
    from a zero carry and every pair is scored once, with the context of its own block alone:
    nanoGPT's evaluation of a ``block``-character model (its first pair predicts ``t[1]`` from
    ``t[0]``). Streams past the last block have length 0 (no pair scored)."""
    num_pairs = len(tokens) - 1
    if block < 1 or num_streams < 1:
        raise ValueError(f"block={block} and num_streams={num_streams} must be positive")
    if num_pairs < 1:
        raise ValueError(f"the text has {len(tokens)} characters: too few to score a block")
    num_blocks = -(-num_pairs // block)
    num_windows = -(-num_blocks // num_streams)
    span = num_windows * block
    starts = np.arange(num_streams, dtype=np.int64) * span
    lengths = np.clip(num_pairs - starts, 0, span)
    padded = np.zeros(num_streams * span + 1, np.int32)
    padded[: len(tokens)] = tokens
    rows = np.stack([padded[s : s + span + 1] for s in starts])
    streams = Streams(
        jax.device_put(rows),
        jax.device_put(lengths.astype(np.int32)),
        jax.device_put(np.zeros((num_streams,), np.int32)),
    )
    return streams, num_windows


def stream_batch(streams: Streams, k: jax.Array, bptt: int):
    """Window ``k`` of every stream: ``((inputs, targets, mask), weights)``.

    ``inputs`` and ``targets`` are ``(B, bptt)`` int32 (``targets`` one ahead), ``mask`` is 1
    where a pair is scored, and ``weights (B,)`` counts each row's scored pairs, so that a
    per-row mean loss weighted by it is the mean over every scored character (the engine's
    ``examples`` are then characters). ``k`` may be traced.
    """
    window = jax.lax.dynamic_slice_in_dim(streams.tokens, k * bptt, bptt + 1, axis=1)
    position = k * bptt + jnp.arange(bptt)[None, :]
    mask = (position < streams.lengths[:, None]) & (position >= streams.scored_from[:, None])
    mask = mask.astype(jnp.float32)
    return (window[:, :-1], window[:, 1:], mask), jnp.sum(mask, axis=1)


def block_batch(tokens: jax.Array, starts: jax.Array, bptt: int):
    """Blocks of ``bptt`` pairs of one token sequence at ``starts``, as :func:`stream_batch`
    gives windows: ``((inputs, targets, mask), weights)``, inputs ``tokens[s : s + bptt]``,
    targets one ahead, every pair scored (``weights`` = ``bptt`` per row). ``starts`` lie in
    ``[0, len(tokens) - bptt - 1]``; drawn uniformly (:func:`rnn_jax.batches.with_replacement`
    over ``len(tokens) - bptt`` starts) they are nanoGPT's ``get_batch``. May be traced."""
    window = jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(tokens, s, bptt + 1))(starts)
    mask = jnp.ones((starts.shape[0], bptt), jnp.float32)
    return (window[:, :-1], window[:, 1:], mask), jnp.full(starts.shape, float(bptt))


class Labelled(NamedTuple):
    """Variable-length token sequences with one label each (many-to-one).

    Attributes:
      tokens: ``(n, max_len)`` int32, padded with ``pad``.
      lengths: ``(n,)`` int32.
      labels: ``(n,)`` int32.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray


# --- truecasing: the synced topology experiment's labels ----------------------------------------


def truecasing(text: str) -> tuple[str, np.ndarray]:
    """``(text.lower(), labels)``: ``labels[i]`` is 1 where ``text[i].isupper()``, int32."""
    return text.lower(), np.fromiter((c.isupper() for c in text), np.int32, len(text))


def rule_truecasing(lower: str) -> np.ndarray:
    """A rule baseline's labels: upper-case the first letter of the text and of each sentence
    (after ``.``, ``!`` or ``?`` and spaces or quotes) and the word ``i``."""
    labels = np.zeros(len(lower), np.int32)
    sentence_start = True
    for k, c in enumerate(lower):
        if c.isalpha():
            alone = (k == 0 or not lower[k - 1].isalpha()) and (
                k + 1 == len(lower) or not lower[k + 1].isalpha()
            )
            if sentence_start or (c == "i" and alone):
                labels[k] = 1
            sentence_start = False
        elif c in ".!?":
            sentence_start = True
        elif c.isdigit():
            sentence_start = False
    return labels


def truecasing_split(text: str, val_fraction: float, seq_len: int):
    """Tokens and labels of the lower-cased text, split into a training head and a held-out tail.

    Returns:
      ``(vocabulary, (train_tokens, train_labels), (val_tokens, val_labels))``, int32 arrays;
      the vocabulary is the sorted characters of the whole lower-cased text.

    Raises:
      TextError: either side is shorter than ``seq_len``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    lower, labels = truecasing(text)
    vocab = Vocabulary.from_text(lower)
    tokens = vocab.encode(lower)
    cut = round(len(tokens) * (1.0 - val_fraction))
    if cut < seq_len + 1 or len(tokens) - cut < seq_len:
        raise TextError(
            f"{len(tokens)} characters split at {cut} leave fewer than seq_len={seq_len} on one "
            "side; use a longer text, a shorter seq_len or another val_fraction"
        )
    return vocab, (tokens[:cut], labels[:cut]), (tokens[cut:], labels[cut:])


def tile_windows(tokens: np.ndarray, labels: np.ndarray, seq_len: int) -> Labelled:
    """Consecutive non-overlapping windows covering every character once; the last one is
    shorter and padded (its ``lengths`` say so). ``Labelled.labels`` is ``(n, seq_len)``."""
    count = -(-len(tokens) // seq_len)
    pad = count * seq_len - len(tokens)
    lengths = np.full(count, seq_len, np.int32)
    lengths[-1] = seq_len - pad
    return Labelled(
        np.pad(tokens, (0, pad)).reshape(count, seq_len).astype(np.int32),
        lengths,
        np.pad(labels, (0, pad)).reshape(count, seq_len).astype(np.int32),
    )
