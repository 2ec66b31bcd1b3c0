"""Text cleaning as in the tutorial, a sorted vocabulary, and windows as integer indices."""

import os
import urllib.error
import urllib.request
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

ALICE_URL = "https://www.gutenberg.org/cache/epub/11/pg11.txt"
ALICE_FILENAME = "alice_in_wonderland.txt"


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


def _looks_binary(raw: bytes) -> bool:
    head = raw[:65536]
    if b"\x00" in head:
        return True
    control = sum(1 for b in head if b < 32 and b not in (9, 10, 12, 13))
    return control > 0.01 * len(head)


def load_text(path: str, min_length: int = 2) -> str:
    """Reads and cleans a text file, with errors that say what to do.

    Args:
      path: a plain text file (any encoding; non-ASCII bytes are dropped, as in the tutorial).
      min_length: the cleaned text must have at least this many characters (``seq_len + 1``
        for one training window).

    Raises:
      TextError: the file is missing, unreadable, empty, binary or too short after cleaning.
    """
    if not os.path.exists(path):
        raise TextError(f"text file {path!r} does not exist; pass an existing file with --text")
    if os.path.isdir(path):
        raise TextError(f"{path!r} is a directory; pass a text file with --text")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise TextError(f"cannot read {path!r} ({e.strerror}); check its permissions or pass "
                        "another file with --text") from e
    if not raw or raw.isspace():  # raw.strip() would copy a large file
        raise TextError(f"text file {path!r} is empty; pass a non-empty text file with --text")
    if _looks_binary(raw):
        raise TextError(f"{path!r} looks like a binary file, not text; pass a plain text file "
                        "with --text")
    text = clean_text(raw)
    if len(text) < min_length:
        raise TextError(
            f"{path!r} has {len(text)} characters after cleaning, fewer than the {min_length} "
            "needed for one window (seq_len + 1); pass a longer text or lower --seq_len"
        )
    return text


def _strip_gutenberg(raw: bytes) -> bytes:
    start = raw.find(b"*** START OF")
    end = raw.find(b"*** END OF")
    if start != -1:
        raw = raw[raw.find(b"\n", start) + 1 :]
        end = raw.find(b"*** END OF")
    return raw[:end] if end != -1 else raw


def fetch_alice(data_dir: str, url: str = ALICE_URL, timeout: float = 30.0) -> str:
    """Path of the Alice corpus in ``data_dir``, downloaded from Project Gutenberg if missing.

    The Gutenberg licence header and footer are cut off. Offline, raises :class:`TextError`
    naming ``--text``.
    """
    path = os.path.join(data_dir, ALICE_FILENAME)
    if os.path.exists(path):
        return path
    logging.info("%s is missing: downloading Project Gutenberg eBook #11 from %s", path, url)
    print(f"Downloading 'Alice's Adventures in Wonderland' (Project Gutenberg #11) to {path}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            raw = response.read()
    except (urllib.error.URLError, OSError) as e:
        raise TextError(
            f"could not download the Alice corpus from {url} ({e}); you may be offline. Download "
            f"it by hand to {path}, or train on any local text file with --text=PATH"
        ) from e
    os.makedirs(data_dir, exist_ok=True)
    tmp = path + ".part"
    with open(tmp, "wb") as f:
        f.write(_strip_gutenberg(raw))
    os.replace(tmp, path)
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
    """Training examples as indices: input ``tokens[s : s + seq_len]``, label ``tokens[s + seq_len]``.

    A pytree of device arrays; nothing of size ``examples × seq_len`` (let alone one-hot) is
    ever built: :func:`get_window_batch` gathers a batch on device.
    """

    tokens: jax.Array  # (text_length,) int32
    starts: jax.Array  # (num_examples,) int32


def make_windows(tokens: np.ndarray, seq_len: int, step: int) -> Windows:
    """The tutorial's ``for i in range(0, len(text) - seq_len, step)`` windows."""
    if seq_len < 1 or step < 1:
        raise ValueError(f"seq_len and step must be positive, got {seq_len} and {step}")
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"the text has {len(tokens)} characters, fewer than seq_len + 1 = {seq_len + 1}"
        )
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
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0.0:
        return tokens, None
    cut = int(round(len(tokens) * (1.0 - val_fraction)))
    if cut < seq_len + 1 or len(tokens) - cut < seq_len + 1:
        raise ValueError(
            f"val_fraction={val_fraction} leaves fewer than seq_len + 1 = {seq_len + 1} "
            "characters on one side; change --val_fraction"
        )
    return tokens[:cut], tokens[cut:]
