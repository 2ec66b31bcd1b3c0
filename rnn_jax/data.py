"""Text: the shipped corpus, the tutorial's cleaning, a sorted vocabulary, windows as indices,
contiguous streams for stateful training, and the truecasing labels of the synced topology
experiment."""

import hashlib
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
ALICE_FILENAME = "alice_in_wonderland.txt"
# Project Gutenberg #11 without its licence header and footer (data/README.md). Gutenberg
# revises its copies; another revision changes the vocabulary and every loss.
ALICE_SHA256 = "f17aa0bf7466424a8b357b688678666bad7a0148963ef349016a3098faa6bd1e"


class TextError(ValueError):
    """A text file that cannot be used as a corpus; the message says what to do."""


# clean_text works through the text in pieces of about this many bytes, cut at line ends, so
# that the per-line Python objects of a 100 MB corpus never exist all at once.
_CLEAN_CHUNK = 1 << 23


def clean_text(raw: bytes) -> str:
    """The tutorial's cleanup: per line strip, lower-case, drop non-ASCII; drop empty lines; join.

    Lines are split as a file read in binary mode yields them (on ``b"\\n"``). The order matters
    and follows the tutorial: whitespace is stripped *before* non-ASCII bytes are dropped.
    Memory beyond ``raw`` and the result stays at a few times ``_CLEAN_CHUNK``.
    """
    pieces, start = [], 0
    while start < len(raw):
        end = raw.find(b"\n", min(start + _CLEAN_CHUNK, len(raw)))
        end = len(raw) if end == -1 else end
        lines = raw[start:end].split(b"\n")
        cleaned = (line.strip().lower().decode("ascii", "ignore") for line in lines)
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


def load_text(path: str, min_length: int = 2, *, name: str = "path") -> str:
    """Reads and cleans a text file, with errors that say what to do.

    Args:
      path: a plain text file (any encoding; non-ASCII bytes are dropped, as in the tutorial).
      min_length: the cleaned text must have at least this many characters (``seq_len + 1``
        for one training window).
      name: what the errors call ``path`` (``name=...``): a caller passes its own parameter's
        name, e.g. an experiment's ``text``.

    Raises:
      TextError: the file is missing, unreadable, empty, UTF-16/UTF-32 (named, with the
        command that converts it), binary or too short after cleaning.
    """
    if not os.path.exists(path):
        raise TextError(f"{name}={path!r} does not exist; pass an existing text file")
    if os.path.isdir(path):
        raise TextError(f"{name}={path!r} is a directory; pass a text file")
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
    text = clean_text(raw)
    if len(text) < min_length:
        raise TextError(
            f"{name}={path!r} has {len(text)} characters after cleaning, fewer than "
            f"min_length={min_length}; pass a longer text"
        )
    return text


def alice_path(data_dir: str = DATA_DIR) -> str:
    """The path of the default corpus, "Alice's Adventures in Wonderland", checked by sha256.

    The one place that locates the corpus: experiments, benchmarks and tests all call it.

    Raises:
      TextError: the file is missing or is not the shipped revision.
    """
    path = os.path.join(data_dir, ALICE_FILENAME)
    if not os.path.isfile(path):
        raise TextError(
            f"the default corpus {path!r} is missing; restore it from the repository "
            "(git checkout data/) or pass a text path"
        )
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != ALICE_SHA256:
        raise TextError(
            f"{path!r} has sha256 {digest}, not the shipped revision's {ALICE_SHA256}; restore "
            "it (git checkout data/) or pass your text as a path of its own"
        )
    return path


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
    """``(train, val)``: the last ``val_fraction`` of the text held out, contiguous."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    if val_fraction == 0.0:
        return tokens, None
    cut = round(len(tokens) * (1.0 - val_fraction))
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


def load_cased_text(path: str, *, name: str = "path") -> str:
    """The tutorial's cleanup (DESIGN.md §1) without lower-casing: strip, ASCII, join lines.

    ``load_cased_text(p).lower() == rnn_jax.data.load_text(p)``.

    Raises:
      TextError: the file is missing, unreadable, empty or binary (``name`` as in
        :func:`load_text`).
    """
    load_text(path, name=name)  # the checks and their messages
    with open(path, "rb") as f:
        raw = f.read()
    lines = (line.strip().decode("ascii", "ignore") for line in raw.split(b"\n"))
    return " ".join(line for line in lines if line)


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
