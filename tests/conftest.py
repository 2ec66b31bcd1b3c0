"""Strict numerics for every test (silent rank promotion is an error) and the shipped corpus."""

import jax
import pytest

from rnn_jax.data import alice_path as _alice_path

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def alice_path() -> str:
    """The committed Alice corpus, sha256-checked (rnn_jax.data.alice_path)."""
    return _alice_path()
