"""What several test files share: bit-for-bit tree comparison, a tiny corpus, a snapshot of a
directory's files, a small filesystem of its own (tmpfs)."""

import contextlib
import os
import pathlib
import subprocess
from collections.abc import Iterator

import jax
import numpy as np
import pytest

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


def mount_tmpfs(path, options: str) -> pathlib.Path:
    """Mounts a tmpfs with ``options`` (e.g. ``size=900k``, ``ro,size=64k``) on the new
    directory ``path``; skips the test, saying why, where this machine does not allow it.
    :func:`unmount` undoes it."""
    path = pathlib.Path(path)
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()})")
    return path


def unmount(path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def tmpfs(path, options: str) -> Iterator[pathlib.Path]:
    """:func:`mount_tmpfs` for the body."""
    try:
        yield mount_tmpfs(path, options)
    finally:
        if os.path.ismount(path):
            unmount(path)
