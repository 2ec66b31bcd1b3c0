"""Orbax checkpoints of a TrainState with its JSON metadata beside it: one ``CheckpointManager``
per run (retention, atomic steps, clean-up of a failed save's temporary directory are orbax's),
each step carrying a sha256 digest of its contents so that a damaged one is named and skipped,
never used. Nothing here changes the process: no hooks, no logger filters, no thread joins."""

import hashlib
import json
import os
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from rnn_jax.trees import named_leaves
from rnn_jax.workdir import storage_problem

# The key of the saved meta that holds the step's digests; callers' meta may not use it.
DIGEST_KEY = "_digest"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used; the message says what to do."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, read-only); the previous checkpoints are
    intact and what the failed save left is removed when the directory is next opened. The
    message says which and what to do."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint step whose files are missing, unreadable or differ from their digest.

    Attributes:
      step: the step.
      path: its directory.
      why: what is wrong, e.g. ``its arrays do not match their digest``.
    """

    def __init__(self, step: int, path: str, why: str):
        super().__init__(
            f"checkpoint {step} in {path!r} is damaged ({why}); restore an older step, or "
            "delete this one"
        )
        self.step, self.path, self.why = step, path, why


class Saved(NamedTuple):
    """A step read back as it was saved and checked against its digest.

    Attributes:
      step: the step.
      arrays: the saved state as orbax returns it (nested dicts and lists of arrays).
      meta: the JSON metadata saved with it (without the digest).
    """

    step: int
    arrays: Any
    meta: dict


class Intact(NamedTuple):
    """What :meth:`Checkpoints.newest_intact` found.

    Attributes:
      saved: the newest step that reads back and matches its digest, read; None if none.
      skipped: one line per newer step that is damaged, newest first, e.g. ``checkpoint 5 in
        '/run/checkpoints/5' is damaged (...); skipped``.
    """

    saved: Saved | None
    skipped: list[str]

    @property
    def step(self) -> int | None:
        return None if self.saved is None else self.saved.step


# --- digests -------------------------------------------------------------------------------------


def _leaf_specs(tree) -> dict:
    """``{path: (shape, dtype)}`` of every array in ``tree``."""
    return {path: (tuple(x.shape), str(x.dtype)) for path, x in named_leaves(tree)}


def _state_digest(state) -> str:
    """sha256 over every array's path, dtype, shape and bytes, in the order of the paths (a
    TrainState's fields and orbax's sorted dict keys then agree)."""
    named = [("/".join(map(str, path)), x) for path, x in named_leaves(state)]
    named.sort(key=lambda item: item[0])
    arrays = jax.device_get([x for _, x in named])
    sha = hashlib.sha256()
    for (path, _), x in zip(named, arrays, strict=True):
        x = np.asarray(x)
        sha.update(f"{path}\0{x.dtype}\0{x.shape}\0".encode())
        sha.update(x.tobytes())
    return sha.hexdigest()


def _meta_digest(meta: dict) -> str:
    """sha256 of ``meta``'s canonical JSON (sorted keys, as it reads back: tuples as lists)."""
    canonical = json.dumps(json.loads(json.dumps(meta)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _reason(e: BaseException) -> str:
    """The first line of the exception at the root of ``e``'s causes (orbax wraps
    tensorstore's in a bare Exception), without tensorstore's spec (kilobytes of JSON)."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).split("\n", 1)[0].split(" [tensorstore_spec=", 1)[0]
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{type(e).__name__}: {text}"


def _set_aside(path: str) -> str:
    """Renames ``path`` to the first free ``path.replaced``, ``path.replaced-2``, ...; orbax
    ignores names that are not step numbers."""
    target, n = f"{path}.replaced", 1
    while os.path.exists(target):
        n += 1
        target = f"{path}.replaced-{n}"
    os.rename(path, target)
    return target


# --- one run's checkpoints -----------------------------------------------------------------------


class Checkpoints:
    """The checkpoints of one run: one orbax ``CheckpointManager`` over ``directory``.

    Orbax writes each step to a temporary directory and renames it when complete (a run killed
    while saving leaves the previous steps intact), keeps the ``max_to_keep`` newest, and
    removes the temporary directories of failed or killed saves when the directory is opened
    for writing. On top of that every step's meta holds, under ``"_digest"``, what every read
    checks: ``state_sha256``, the sha256 over the state's arrays in the order of their paths
    (names and indices joined by ``/``, e.g. ``params/rnn/kernel``), each fed as
    ``f"{path}\\0{dtype}\\0{shape}\\0"`` and then its bytes in C order; and ``meta_sha256``, the
    sha256 of ``json.dumps(meta, sort_keys=True, separators=(",", ":"))`` (orbax checks neither
    bytes nor JSON). Both cost well under a millisecond for a char model's state.

    Use as a context manager (or call :meth:`close`). ``writable=False`` reads only (the manager
    is never asked to save): nothing is created or deleted, and a missing directory holds no
    steps.

    Raises:
      CheckpointError: ``directory`` is a file.
    """

    def __init__(self, directory: str, *, max_to_keep: int | None = 3, writable: bool = True):
        self.directory = os.path.abspath(directory)
        if writable and os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointError(
                f"directory={directory!r} is a file, not a directory; pass a directory"
            )
        self._manager = None
        if writable or os.path.isdir(self.directory):
            options = ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=writable,
                cleanup_tmp_directories=writable,
                enable_async_checkpointing=False,
            )
            handlers = {
                "state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            }
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_handlers=handlers
            )

    def __enter__(self) -> "Checkpoints":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None

    def step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def steps(self) -> list[int]:
        """The complete steps, newest first (whether intact or not)."""
        if self._manager is None:
            return []
        self._manager.reload()
        return sorted(self._manager.all_steps(), reverse=True)

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Writes ``state`` (any pytree of arrays) and JSON ``meta`` as step ``step``.

        A step directory that already exists (a damaged step that a resumed run skipped) is
        first renamed to ``<step>.replaced`` and kept for inspection.

        Raises:
          CheckpointWriteError: the disk is full, read-only or refuses the write.
        """
        if DIGEST_KEY in meta:
            raise ValueError(f"meta has the key {DIGEST_KEY!r}, reserved for the step's digest")
        digest = {"state_sha256": _state_digest(state), "meta_sha256": _meta_digest(meta)}
        existing = self.step_path(step)
        if jax.process_index() == 0 and os.path.isdir(existing):  # orbax refuses to overwrite
            moved = _set_aside(existing)
            logging.warning("checkpoint %d existed; moved it to %s", step, moved)
            self._manager.reload()
        if jax.process_count() > 1:  # the others save once it is gone
            ocp.multihost.sync_global_processes(f"rnn_jax_set_aside_{step}")
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave({**meta, DIGEST_KEY: digest}),
        )
        try:
            self._manager.save(step, args=args, force=True)
            self._manager.wait_until_finished()
        except Exception as e:
            problem = storage_problem(e)
            if problem is None:
                raise
            steps = [s for s in self.steps() if s != step]
            kept = (
                f"the previous checkpoints are intact (newest: step {steps[0]})"
                if steps
                else "no checkpoint had been written before"
            )
            raise CheckpointWriteError(
                f"cannot write checkpoint {step} in {self.directory!r}: {problem}; {kept}, and "
                "what the failed save left is removed when the run resumes. Free space (or make "
                "the directory writable) and rerun the same command to resume"
            ) from None

    def _damaged(self, step: int, why: str) -> DamagedCheckpointError:
        return DamagedCheckpointError(step, self.step_path(step), why)

    def _attempt(self, read, step: int, what: str):
        """``read()``, or a DamagedCheckpointError saying that ``what`` cannot be read, and why.

        Any exception counts: orbax raises bare ``Exception``s around tensorstore's
        ValueErrors, and KeyError, OSError, JSONDecodeError and UnicodeDecodeError as they
        come. The cause is summed up in the message, not chained: its traceback is orbax's.
        """
        try:
            return read()
        except Exception as e:
            raise self._damaged(step, f"cannot read {what}: {_reason(e)}") from None

    def _require(self, step: int) -> None:
        if self._manager is None or not os.path.isdir(self.step_path(step)):
            raise CheckpointError(
                f"there is no checkpoint step={step} in directory={self.directory!r}; pass the "
                "directory of an existing run"
            )

    def read_meta(self, step: int) -> tuple[dict, dict | None]:
        """``(meta, digests)`` of ``step``; ``digests`` is None for a step saved before them.

        Raises:
          CheckpointError: there is no such step; DamagedCheckpointError: its meta is missing,
            not a JSON object or differs from its digest.
        """
        self._require(step)
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        meta = self._attempt(
            lambda: self._manager.restore(step, args=args)["meta"], step, "its meta"
        )
        if not isinstance(meta, dict):
            raise self._damaged(step, "its meta holds no JSON object")
        meta = dict(meta)
        digests = meta.pop(DIGEST_KEY, None)
        if digests is not None and (
            not isinstance(digests, dict) or digests.get("meta_sha256") != _meta_digest(meta)
        ):
            raise self._damaged(step, "its meta does not match its digest")
        return meta, digests

    def _saved_tree(self, step: int):
        """The saved state's tree of array metadata (shape, dtype)."""
        arrays = os.path.join(self.step_path(step), "state")  # the item's own directory
        if not os.path.isdir(arrays):
            raise self._damaged(step, f"its array directory {arrays!r} is missing")
        tree = self._attempt(
            lambda: self._manager.item_metadata(step)["state"], step, "its array metadata"
        )
        if tree is None or not named_leaves(tree):
            raise self._damaged(step, "its array metadata is missing")
        return tree

    def _read_arrays(self, step: int, abstract, digests: dict | None):
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        arrays = self._attempt(
            lambda: self._manager.restore(step, args=args)["state"], step, "its arrays"
        )
        if digests is None:
            logging.warning(
                "checkpoint %d in %s has no digest (saved before digests); its arrays are "
                "unchecked",
                step,
                self.step_path(step),
            )
        elif digests.get("state_sha256") != _state_digest(arrays):
            raise self._damaged(step, "its arrays do not match their digest")
        return arrays

    def read(self, step: int) -> Saved:
        """Step ``step`` read as it was saved, checked against its digest.

        A step saved before digests existed has none to check: it is accepted when it reads
        back (it resumes runs begun before then), and its next save writes one.

        Raises:
          CheckpointError: there is no such step; DamagedCheckpointError: a file of it is
            missing or unreadable, or differs from the digest.
        """
        meta, digests = self.read_meta(step)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
            self._saved_tree(step),
            is_leaf=lambda x: hasattr(x, "shape"),
        )
        return Saved(step, self._read_arrays(step, abstract, digests), meta)

    def newest_intact(self) -> Intact:
        """The newest step that reads back and matches its digest (read, once), and a line for
        each newer, damaged step it skipped.

        Only integrity is checked (each step is read as it was saved): whether it fits the
        model at hand is for :func:`as_state` to say. No steps: ``Intact(None, [])``; damaged
        steps only: ``Intact(None, [one line per step])``.
        """
        skipped = []
        for step in self.steps():
            try:
                return Intact(self.read(step), skipped)
            except DamagedCheckpointError as e:
                skipped.append(f"checkpoint {step} in {e.path!r} is damaged ({e.why}); skipped")
        return Intact(None, skipped)

    def restore(self, step: int, like: Any) -> tuple[Any, dict]:
        """``(state, meta)`` of step ``step`` in the structure of ``like``, digest-checked.

        Raises:
          CheckpointError: there is no such step, or it holds another model or optimiser.
          DamagedCheckpointError: a file of it is missing or unreadable, or differs from the
            digest.
        """
        saved = self.read(step)
        return as_state(saved, like, self.directory), saved.meta


def as_state(saved: Saved, like: Any, directory: str = "") -> Any:
    """The arrays of ``saved`` in the structure of ``like`` (a pytree of the same arrays: the
    same paths, shapes and dtypes), each placed as ``like``'s leaf is.

    Raises:
      CheckpointError: the step holds another model or optimiser (naming the first array that
        differs).
    """
    saved_arrays = dict(named_leaves(saved.arrays))
    wanted = _leaf_specs(like)
    stored = {path: (tuple(x.shape), str(x.dtype)) for path, x in saved_arrays.items()}
    if stored != wanted:
        differ = sorted(
            (p for p in stored.keys() | wanted.keys() if stored.get(p) != wanted.get(p)), key=str
        )
        first = differ[0]
        raise CheckpointError(
            f"checkpoint {saved.step} in {directory!r} does not match this model and optimiser "
            f"({len(differ)} arrays differ, e.g. {'/'.join(map(str, first))}: saved "
            f"{stored.get(first)}, this run {wanted.get(first)}); use the configuration it was "
            "written with, or a new workdir"
        )
    treedef = jax.tree.structure(like, is_leaf=lambda x: hasattr(x, "shape"))

    def place(path, leaf):
        array = saved_arrays[path]
        sharding = getattr(leaf, "sharding", None)
        return jax.device_put(array, sharding) if sharding is not None else jax.numpy.asarray(array)

    return jax.tree.unflatten(treedef, [place(p, x) for p, x in named_leaves(like)])


# --- one call each, for code outside a run -------------------------------------------------------


def save_checkpoint(
    directory: str, step: int, state: Any, meta: dict, max_to_keep: int | None = 3
) -> None:
    """Writes checkpoint ``step`` of ``state`` with ``meta`` (:meth:`Checkpoints.save`)."""
    with Checkpoints(directory, max_to_keep=max_to_keep) as checkpoints:
        checkpoints.save(step, state, meta)


def restore_checkpoint(directory: str, step: int, like: Any) -> tuple[Any, dict]:
    """``(state, meta)`` of checkpoint ``step``, in the structure of ``like``
    (:meth:`Checkpoints.restore`); reads only."""
    with Checkpoints(directory, writable=False) as checkpoints:
        return checkpoints.restore(step, like)


def restore_meta(directory: str, step: int) -> dict:
    """The JSON metadata saved with checkpoint ``step``, checked against its digest."""
    with Checkpoints(directory, writable=False) as checkpoints:
        return checkpoints.read_meta(step)[0]


def latest_step(directory: str) -> int | None:
    """The newest complete step in ``directory`` (intact or not), or None."""
    with Checkpoints(directory, writable=False) as checkpoints:
        steps = checkpoints.steps()
    return steps[0] if steps else None


def newest_intact(directory: str) -> Intact:
    """:meth:`Checkpoints.newest_intact` of ``directory``; reads only."""
    with Checkpoints(directory, writable=False) as checkpoints:
        return checkpoints.newest_intact()
