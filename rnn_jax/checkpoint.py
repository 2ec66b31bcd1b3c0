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
            f"checkpoint path {directory!r} is a file, not a directory; pass another --workdir"
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
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
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
            f"there is no checkpoint {step} in {directory!r}; pass the --workdir of an existing run"
        )


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
            "use the flags it was written with, or a new --workdir"
        ) from e
    return restored["state"], restored["meta"]
