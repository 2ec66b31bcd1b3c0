"""Strict numerics for every test: silent rank promotion is an error."""

import os

import jax
import pytest

ALICE = os.environ.get(
    "RNN_JAX_ALICE",
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "alice_in_wonderland.txt"),
)

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def alice_path():
    """The shared Alice text (CI lays ../shared beside the clone); skipped with a reason if absent."""
    if not os.path.exists(ALICE):
        pytest.skip(f"Alice corpus not found at {ALICE}; set RNN_JAX_ALICE")
    return ALICE
