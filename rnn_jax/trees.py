"""A parameter's name from its pytree path: ``("rnn", "kernel")`` for ``p["rnn"]["kernel"]``."""

from typing import Any

import jax

Names = tuple[str | int, ...]


def path_names(path) -> Names:
    """Each key of a ``jax.tree_util`` key path as it is written in the tree: a NamedTuple's
    field name, a dict's key, a list's index (``GetAttrKey``, ``DictKey``, ``SequenceKey``)."""
    return tuple(_key_name(key) for key in path)


def _key_name(key) -> str | int:
    for attr in ("name", "key", "idx"):  # GetAttrKey, DictKey, SequenceKey
        if hasattr(key, attr):
            return getattr(key, attr)
    return str(key)


def leaf_name(path) -> str | int:
    """A parameter's own name, the last of :func:`path_names` (``"kernel"``); use it in
    ``jax.tree_util.tree_map_with_path``."""
    return _key_name(path[-1])


def named_leaves(tree: Any) -> list[tuple[Names, Any]]:
    """``[(path_names, leaf)]`` of ``tree`` in its leaf order. Anything with a ``shape`` is a
    leaf (an array, a ``jax.ShapeDtypeStruct``, orbax's array metadata), so a ``TrainState``
    and the nested dicts and lists orbax stores it as give the same names."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return [(path_names(path), leaf) for path, leaf in leaves]
