"""Orbax checkpoints of a TrainState with its JSON metadata (vocabulary, config) beside it."""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used; the message says what to do."""


def _manager(directory: str, max_to_keep: int | None = 3) -> ocp.CheckpointManager:
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CheckpointError(
            f"directory={directory!r} is a file, not a directory; pass a directory"
        )
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def save_checkpoint(directory: str, step: int, state: Any, meta: dict, max_to_keep: int = 3):
    """Writes ``state`` (any pytree of arrays) and JSON ``meta`` as checkpoint ``step``.

    Orbax writes to a temporary directory and renames it when complete, so a run killed while
    saving leaves the previous checkpoint intact; the ``max_to_keep`` newest are kept.
    """
    with _manager(directory, max_to_keep) as mngr:
        mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        mngr.wait_until_finished()


def latest_step(directory: str) -> int | None:
    """The newest complete checkpoint's step in ``directory``, or None."""
    if not os.path.isdir(directory):
        return None
    with _manager(directory) as mngr:
        return mngr.latest_step()


def _require_step(directory: str, step: int):
    # Checked before a manager is made: orbax would create a missing directory and raise
    # FileNotFoundError for a missing step.
    if not os.path.isdir(os.path.join(directory, str(step))):
        raise CheckpointError(
            f"there is no checkpoint step={step} in directory={directory!r}; pass the directory of "
            "an existing run"
        )


def _path_name(key) -> str | int:
    for attr in ("name", "key", "idx"):  # GetAttrKey, DictKey, SequenceKey
        if hasattr(key, attr):
            return getattr(key, attr)
    return str(key)


def _leaf_specs(tree) -> dict:
    """``{path: (shape, dtype)}``, each path element reduced to its name or index, so that a
    TrainState and the dicts and lists orbax stores it as compare equal."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {
        tuple(_path_name(k) for k in path): (tuple(x.shape), str(x.dtype)) for path, x in leaves
    }


def _saved_specs(directory: str, step: int) -> dict:
    options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    with ocp.CheckpointManager(
        os.path.abspath(directory), options=options, item_handlers=handlers
    ) as mngr:
        return _leaf_specs(mngr.item_metadata(step)["state"])


def restore_meta(directory: str, step: int) -> dict:
    """The JSON metadata saved with checkpoint ``step``."""
    _require_step(directory, step)
    with _manager(directory) as mngr:
        return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_checkpoint(directory: str, step: int, like: Any) -> tuple[Any, dict]:
    """``(state, meta)`` of checkpoint ``step``; ``like`` is a pytree of the same structure.

    Raises:
      CheckpointError: there is no checkpoint ``step`` in ``directory``, or the saved tree does
        not match ``like`` (another model or optimiser).
    """
    _require_step(directory, step)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    # Compared before orbax reads anything: a restore that fails part-way leaves orbax's reads
    # of the other arrays running after its event loop closed ("Event loop is closed").
    saved, wanted = _saved_specs(directory, step), _leaf_specs(abstract)
    if saved != wanted:
        differ = sorted(
            (p for p in saved.keys() | wanted.keys() if saved.get(p) != wanted.get(p)), key=str
        )
        first = differ[0]
        raise CheckpointError(
            f"checkpoint {step} in {directory!r} does not match this model and optimiser "
            f"({len(differ)} arrays differ, e.g. {'/'.join(map(str, first))}: saved "
            f"{saved.get(first)}, this run {wanted.get(first)}); use the configuration it was "
            "written with, or a new workdir"
        )
    try:
        with _manager(directory) as mngr:
            restored = mngr.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                ),
            )
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"checkpoint {step} in {directory!r} does not match this model and optimiser ({e}); "
            "use the configuration it was written with, or a new workdir"
        ) from e
    return restored["state"], restored["meta"]
