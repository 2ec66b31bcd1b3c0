"""rnn_jax.trees: parameters named by their pytree paths."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rnn_jax.trees import leaf_name, named_leaves, path_names


class State(NamedTuple):
    params: dict
    opt_state: list
    step: jax.Array


def test_names_are_the_keys_fields_and_indices_as_written():
    """A NamedTuple's field, a dict's key and a list's index, in the tree's leaf order; the
    nested dicts and lists orbax stores the NamedTuple as give the same names."""
    state = State(
        params={"rnn": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}},
        opt_state=[jnp.full((2,), 7.0), {"nu": jnp.arange(3.0)}],
        step=jnp.int32(5),
    )
    names = [(path, np.asarray(x).tolist()) for path, x in named_leaves(state)]
    assert names == [
        (("params", "rnn", "bias"), [0.0, 0.0, 0.0]),
        (("params", "rnn", "kernel"), [[1.0] * 3] * 2),
        (("opt_state", 0), [7.0, 7.0]),
        (("opt_state", 1, "nu"), [0.0, 1.0, 2.0]),
        (("step",), 5),
    ]
    as_stored = {"params": state.params, "opt_state": list(state.opt_state), "step": state.step}
    assert sorted(path for path, _ in named_leaves(as_stored)) == sorted(p for p, _ in names)
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert [path_names(p) for p in paths] == [p for p, _ in names]


def test_anything_with_a_shape_is_a_leaf():
    """A ShapeDtypeStruct (and orbax's array metadata) is one leaf, however it flattens."""
    tree = {"a": jax.ShapeDtypeStruct((2, 3), jnp.float32), "b": [np.zeros(4)]}
    (a, spec), (b, array) = named_leaves(tree)
    assert (a, spec.shape, b, array.shape) == (("a",), (2, 3), ("b", 0), (4,))


def test_leaf_name_labels_parameters_by_their_own_name():
    """``tree_map_with_path`` with leaf_name: the label of every ``kernel``, at any depth."""
    params = {"rnn": {"kernel": 1.0, "bias": 2.0}, "dense": {"kernel": 3.0}, "extra": [4.0]}
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "kernel" if leaf_name(path) == "kernel" else "rest", params
    )
    assert labels == {
        "rnn": {"kernel": "kernel", "bias": "rest"},
        "dense": {"kernel": "kernel"},
        "extra": ["rest"],
    }
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    assert [leaf_name(p) for p in paths] == ["kernel", 0, "bias", "kernel"]  # sorted keys
