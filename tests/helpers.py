"""What several test files share: bit-for-bit tree comparison, a tiny corpus, a snapshot of a
directory's files."""

import pathlib

import jax
import numpy as np

WORDS = "the sky was falling and alice saw a white rabbit run down into the hole".split()


def assert_bit_identical(a, b) -> None:
    """The same tree structure, and every leaf of the same dtype, shape and bytes."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def tiny_text(seed: int = 0, lines: int = 40) -> str:
    """``lines`` capitalised sentences of 10 words drawn from :data:`WORDS`, one per line."""
    rng = np.random.default_rng(seed)
    sentences = [" ".join(rng.choice(WORDS, 10)).capitalize() + "." for _ in range(lines)]
    return "\n".join(sentences) + "\n"


def snapshot(directory) -> dict[str, bytes]:
    """Every file under ``directory`` with its bytes (the lock file aside: its record is the
    holder's)."""
    out = {}
    for path in sorted(pathlib.Path(directory).rglob("*")):
        if path.is_file() and path.name != ".lock":
            out[str(path.relative_to(directory))] = path.read_bytes()
    return out
