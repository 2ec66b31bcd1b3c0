"""Orbax checkpoints of a TrainState with its JSON metadata (vocabulary, config) beside it, each
step carrying a digest of its contents so that a damaged one is reported, never used."""

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from rnn_jax.workdir import storage_problem

# The key of the saved meta that holds the step's digests; callers' meta may not use it.
DIGEST_KEY = "_digest"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used; the message says what to do."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, read-only); its partial files are removed
    and the previous checkpoints are intact. The message says which and what to do."""


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


class Intact(NamedTuple):
    """What :func:`newest_intact` found.

    Attributes:
      step: the newest step that reads back and matches its digest; None if there is none.
      skipped: one line per newer step that is damaged, newest first, e.g. ``checkpoint 5 in
        '/run/checkpoints/5' is damaged (...); skipped``.
    """

    step: int | None
    skipped: list[str]


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


_ORBAX_DIR = os.path.dirname(os.path.dirname(os.path.abspath(ocp.__file__)))


class _DropOrbaxRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.pathname.startswith(_ORBAX_DIR)


_AFTER_A_FAILED_WRITE = _DropOrbaxRecords()  # one instance: adding it again is a no-op


@contextlib.contextmanager
def _orbax_quiet():
    """Drops orbax's own log records while reading: on a damaged step it logs warnings and
    errors to stderr on its way to the exception that our one-line error replaces."""
    logger, drop = absl_logging.get_absl_logger(), _DropOrbaxRecords()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _step_path(directory: str, step: int) -> str:
    return os.path.join(os.path.abspath(directory), str(step))


def _reason(e: BaseException) -> str:
    """The first line of the exception at the root of ``e``'s causes (orbax wraps
    tensorstore's in a bare Exception), without tensorstore's spec (kilobytes of JSON)."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).split("\n", 1)[0].split(" [tensorstore_spec=", 1)[0]
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{type(e).__name__}: {text}"


def _damaged(directory: str, step: int, why: str) -> DamagedCheckpointError:
    return DamagedCheckpointError(step, _step_path(directory, step), why)


_ASYNCIO_DIR = os.path.dirname(os.path.abspath(asyncio.__file__))
# How tensorstore ends the text of every error it raises (orbax is its only user here).
_TENSORSTORE_SPEC = "[tensorstore_spec="


def _is_orbax_orphan(unraisable) -> bool:
    """Whether ``unraisable`` comes from the reads that orbax leaves behind when one array's
    read fails: it closes its event loop with the others in flight. Each such read, once
    tensorstore finishes it, calls back into the closed loop from a tensorstore thread
    (``RuntimeError: Event loop is closed``, no Python caller); and its coroutine, once
    collected, turns GeneratorExit into an ``Exception`` (``Exception ignored in: <coroutine
    object _read_array_index_and_device_put>``, with kilobytes of tensorstore spec)."""
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None:
        return code.co_filename.startswith(_ORBAX_DIR) and isinstance(
            getattr(unraisable.exc_value, "__cause__", None), GeneratorExit
        )
    frames = traceback.extract_tb(unraisable.exc_traceback)
    return (
        unraisable.object is None
        and isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"
        and bool(frames)
        and all(f.filename.startswith(_ASYNCIO_DIR) for f in frames)
    )


def _silence_orbax_orphans():
    """Drops, from now on, the errors of orbax's orphaned reads (:func:`_is_orbax_orphan`),
    which would reach stderr at any later time, long after the one-line error; every other
    unraisable error goes on to the hook that was in place."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_orbax_orphans", False):
        return

    def hook(unraisable):
        if not _is_orbax_orphan(unraisable):
            previous(unraisable)

    hook.drops_orbax_orphans = True
    sys.unraisablehook = hook
    # A failed write leaves its sibling writes' exceptions unretrieved: asyncio logs each one
    # ("Task exception was never retrieved") when the task is collected.
    logging.getLogger("asyncio").addFilter(_drop_orbax_task_errors)


def _drop_orbax_task_errors(record: logging.LogRecord) -> bool:
    """False (drop) for asyncio's report of an orbax task or future whose exception nobody
    retrieved: a Task names orbax's coroutine in the message, a ``_GatheringFuture`` only in
    the traceback of its exception, and a plain ``Future`` that tensorstore failed (a sibling
    read of a damaged step) only in its error's text, tensorstore's ``[tensorstore_spec=...]``:
    its traceback is empty, set from C++."""
    message = record.getMessage()
    if "exception was never retrieved" not in message:
        return True
    if _ORBAX_DIR in message:
        return False
    error = record.exc_info[1] if record.exc_info else None
    if _TENSORSTORE_SPEC in message or (error is not None and _TENSORSTORE_SPEC in str(error)):
        return False
    frames = traceback.extract_tb(error.__traceback__) if error is not None else []
    return not any(f.filename.startswith(_ORBAX_DIR) for f in frames)


def _attempt(read: Callable[[], Any], directory: str, step: int, what: str) -> Any:
    """``read()``, or a DamagedCheckpointError saying that ``what`` cannot be read, and why.

    Any exception counts: orbax raises bare ``Exception``s around tensorstore's ValueErrors,
    and KeyError, OSError, JSONDecodeError and UnicodeDecodeError as they come. The cause is
    summed up in the message, not chained: its traceback is orbax's and tensorstore's.
    """
    _silence_orbax_orphans()  # a failed read's orphans may call back before it raises
    try:
        return read()
    except Exception as e:
        raise _damaged(directory, step, f"cannot read {what}: {_reason(e)}") from None


def _path_name(key) -> str | int:
    for attr in ("name", "key", "idx"):  # GetAttrKey, DictKey, SequenceKey
        if hasattr(key, attr):
            return getattr(key, attr)
    return str(key)


def _leaves(tree) -> list[tuple[tuple, Any]]:
    """``[(path, leaf)]``, each path element reduced to its name or index, so that a
    TrainState and the dicts and lists orbax stores it as compare equal."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return [(tuple(_path_name(k) for k in path), x) for path, x in leaves]


def _leaf_specs(tree) -> dict:
    """``{path: (shape, dtype)}`` of every array in ``tree``."""
    return {path: (tuple(x.shape), str(x.dtype)) for path, x in _leaves(tree)}


def _state_digest(state) -> str:
    """sha256 over every array's path, dtype, shape and bytes, in the order of the paths (a
    TrainState's fields and orbax's sorted dict keys then agree)."""
    named = [("/".join(map(str, path)), x) for path, x in _leaves(state)]
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


def _set_aside(path: str) -> str:
    """Renames ``path`` to the first free ``path.replaced``, ``path.replaced-2``, ...; orbax
    ignores names that are not step numbers."""
    target, n = f"{path}.replaced", 1
    while os.path.exists(target):
        n += 1
        target = f"{path}.replaced-{n}"
    os.rename(path, target)
    return target


def save_checkpoint(directory: str, step: int, state: Any, meta: dict, max_to_keep: int = 3):
    """Writes ``state`` (any pytree of arrays) and JSON ``meta`` as checkpoint ``step``.

    The saved meta also holds, under the key ``"_digest"``, what every restore checks:
    ``state_sha256``, the sha256 over ``state``'s arrays in the order of their paths (names
    and indices joined by ``/``, e.g. ``params/rnn/kernel``), each fed as
    ``f"{path}\\0{dtype}\\0{shape}\\0"`` and then its bytes in C order; and ``meta_sha256``, the
    sha256 of ``json.dumps(meta, sort_keys=True, separators=(",", ":"))``. Both cost well
    under a millisecond for a char model's state.

    Orbax writes to a temporary directory and renames it when complete, so a run killed while
    saving leaves the previous checkpoint intact; the ``max_to_keep`` newest are kept. A step
    directory that already exists (a damaged step that a resumed run skipped) is first renamed
    to ``<step>.replaced`` and kept for inspection.
    """
    if DIGEST_KEY in meta:
        raise ValueError(f"meta has the key {DIGEST_KEY!r}, reserved for the checkpoint's digest")
    digest = {"state_sha256": _state_digest(state), "meta_sha256": _meta_digest(meta)}
    existing = _step_path(directory, step)
    if jax.process_index() == 0 and os.path.isdir(existing):  # orbax refuses to overwrite it
        moved = _set_aside(existing)
        absl_logging.warning("checkpoint %d existed; moved it to %s", step, moved)
    if jax.process_count() > 1:  # the others save once it is gone
        ocp.multihost.sync_global_processes(f"rnn_jax_set_aside_{step}")
    _silence_orbax_orphans()  # a failed write's orphans call back while it fails
    threads_before = set(threading.enumerate())
    try:
        with _orbax_quiet(), _manager(directory, max_to_keep) as mngr:
            mngr.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    meta=ocp.args.JsonSave({**meta, DIGEST_KEY: digest}),
                ),
                force=True,
            )
            mngr.wait_until_finished()
    except Exception as e:
        problem = storage_problem(e)
        if problem is None:
            raise
        # Orbax's other writer threads of this save may still be failing after it returned:
        # their reports ("_SignalingThread.run() raised an exception", a traceback) would
        # follow our one line. Orbax's log records are dropped for the rest of the process.
        absl_logging.get_absl_logger().addFilter(_AFTER_A_FAILED_WRITE)
        _join_orbax_threads(threads_before)
        _remove_temporaries(directory, step)
        steps = _steps(directory)
        kept = (
            f"the previous checkpoints are intact (newest: step {steps[0]})"
            if steps
            else "no checkpoint had been written before"
        )
        raise CheckpointWriteError(
            f"cannot write checkpoint {step} in {directory!r}: {problem}; its partial files are "
            f"removed and {kept}. Free space (or make the directory writable) and rerun the "
            "same command to resume"
        ) from None


def _join_orbax_threads(before: set, timeout: float = 60.0):
    """Waits (at most ``timeout`` seconds in all) for the orbax threads started since
    ``before``: when one writer of a save fails, orbax returns while its other writer threads
    still run, and each may create files and directories in the step's temporary directory
    after we removed it (CI found ``<step>.orbax-checkpoint-tmp`` left behind that way)."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread not in before and type(thread).__module__.startswith("orbax"):
            # threading.Thread's own join: orbax's raises the thread's error, which the
            # caller's one line already reports.
            threading.Thread.join(thread, max(0.0, deadline - time.monotonic()))


def _remove_temporaries(directory: str, step: int, settle: float = 0.5, timeout: float = 30.0):
    """Deletes what orbax left of a failed save of ``step``: ``<step>.orbax-checkpoint-tmp*``.

    A writer outside Python (tensorstore's own threads) may still add to it while it goes, so
    it is removed again until nothing of it has come back for ``settle`` seconds (at most
    ``timeout`` seconds in all)."""
    prefix = f"{step}.orbax-checkpoint-tmp"

    def leftovers() -> list[str]:
        with contextlib.suppress(OSError):
            return [n for n in os.listdir(directory) if n.startswith(prefix)]
        return []

    deadline = time.monotonic() + timeout
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        names = leftovers()
        if names:
            for name in names:
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= settle:
            return
        time.sleep(0.05)


def latest_step(directory: str) -> int | None:
    """The newest complete checkpoint's step in ``directory``, or None (whether it is intact
    or not: see :func:`newest_intact`)."""
    if not os.path.isdir(directory):
        return None
    with _orbax_quiet(), _manager(directory) as mngr:
        return mngr.latest_step()


def _require_step(directory: str, step: int):
    # Checked before a manager is made: orbax would create a missing directory and raise
    # FileNotFoundError for a missing step.
    if not os.path.isdir(os.path.join(directory, str(step))):
        raise CheckpointError(
            f"there is no checkpoint step={step} in directory={directory!r}; pass the directory of "
            "an existing run"
        )


def _reader(directory: str) -> ocp.CheckpointManager:
    """A manager that only reads (no directory is created, nothing deleted)."""
    options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(
        os.path.abspath(directory), options=options, item_handlers=handlers
    )


def _saved_tree(mngr: ocp.CheckpointManager, directory: str, step: int):
    """The saved state's tree of array metadata (shape, dtype), read from its metadata files."""
    arrays = os.path.join(_step_path(directory, step), "state")
    if not os.path.isdir(arrays):
        raise _damaged(directory, step, f"its array directory {arrays!r} is missing")
    tree = _attempt(
        lambda: mngr.item_metadata(step)["state"], directory, step, "its array metadata"
    )
    if not _leaves(tree):
        raise _damaged(directory, step, "its array metadata is missing")
    return tree


def _as_saved(tree):
    """An abstract target of the saved ``tree`` on this process's first device."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        tree,
        is_leaf=lambda x: hasattr(x, "shape"),
    )


def _read_meta(mngr: ocp.CheckpointManager, directory: str, step: int) -> tuple[dict, dict | None]:
    """``(meta, digests)`` of step ``step``; ``digests`` is None for a step saved before them."""
    path = os.path.join(_step_path(directory, step), "meta", "metadata")  # orbax's JSON file
    if not os.path.isfile(path):
        raise _damaged(directory, step, f"its meta file {path!r} is missing")
    args = ocp.args.Composite(meta=ocp.args.JsonRestore())
    meta = _attempt(
        lambda: mngr.restore(step, args=args)["meta"], directory, step, f"its meta file {path!r}"
    )
    if not isinstance(meta, dict):
        raise _damaged(directory, step, f"its meta file {path!r} holds no JSON object")
    meta = dict(meta)
    digests = meta.pop(DIGEST_KEY, None)
    if digests is not None and (
        not isinstance(digests, dict) or digests.get("meta_sha256") != _meta_digest(meta)
    ):
        raise _damaged(directory, step, f"its meta file {path!r} does not match its digest")
    return meta, digests


def _read(mngr: ocp.CheckpointManager, directory: str, step: int, abstract) -> tuple[Any, dict]:
    """``(state, meta)`` of step ``step`` read into ``abstract`` and checked against the digest.

    A step saved before digests existed has none to check: it is accepted when it reads back
    (it resumes runs begun before then), and its next save writes one.
    """
    meta, digests = _read_meta(mngr, directory, step)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    state = _attempt(lambda: mngr.restore(step, args=args)["state"], directory, step, "its arrays")
    if digests is None:
        absl_logging.warning(
            "checkpoint %d in %s has no digest (saved before digests); its arrays are unchecked",
            step,
            _step_path(directory, step),
        )
    elif digests.get("state_sha256") != _state_digest(state):
        raise _damaged(directory, step, "its arrays do not match their digest")
    return state, meta


def restore_meta(directory: str, step: int) -> dict:
    """The JSON metadata saved with checkpoint ``step``, checked against its digest.

    Raises:
      CheckpointError: there is no checkpoint ``step``, or (a :class:`DamagedCheckpointError`)
        its meta file is missing, not JSON or differs from its digest.
    """
    _require_step(directory, step)
    with _orbax_quiet(), _reader(directory) as mngr:
        return _read_meta(mngr, directory, step)[0]


def restore_checkpoint(directory: str, step: int, like: Any) -> tuple[Any, dict]:
    """``(state, meta)`` of checkpoint ``step``; ``like`` is a pytree of the same structure.

    The arrays and meta are checked against the digest saved with them. A step saved before
    digests existed is accepted when it reads back: refusing it would strand every run begun
    before then, and it holds nothing to check against.

    Raises:
      CheckpointError: there is no checkpoint ``step`` in ``directory``, or the saved tree does
        not match ``like`` (another model or optimiser).
      DamagedCheckpointError: a file of the step is missing or unreadable, or its contents
        differ from the digest; the message names the step's directory.
    """
    _require_step(directory, step)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    with _orbax_quiet(), _reader(directory) as mngr:
        # Compared before orbax reads anything: a restore into other shapes fails part-way,
        # leaving orbax's reads of the other arrays behind (see _is_orbax_orphan).
        tree = _saved_tree(mngr, directory, step)
        saved, wanted = _leaf_specs(tree), _leaf_specs(abstract)
        if saved != wanted:
            # Damaged metadata can look like another model: reading the step as saved and
            # checking its digest tells them apart, so only another model asks for another
            # configuration.
            _read(mngr, directory, step, _as_saved(tree))
            differ = sorted(
                (p for p in saved.keys() | wanted.keys() if saved.get(p) != wanted.get(p)), key=str
            )
            first = differ[0]
            raise CheckpointError(
                f"checkpoint {step} in {directory!r} does not match this model and optimiser "
                f"({len(differ)} arrays differ, e.g. {'/'.join(map(str, first))}: saved "
                f"{saved.get(first)}, this run {wanted.get(first)}); use the configuration it "
                "was written with, or a new workdir"
            )
        return _read(mngr, directory, step, abstract)


def _steps(directory: str) -> list[int]:
    """The step directories in ``directory``, newest first (orbax's in-progress ones are named
    ``<step>.orbax-checkpoint-tmp-...``, set-aside ones ``<step>.replaced``)."""
    if not os.path.isdir(directory):
        return []
    names = (n for n in os.listdir(directory) if n.isascii() and n.isdigit())
    return sorted(
        (int(n) for n in names if os.path.isdir(os.path.join(directory, n))), reverse=True
    )


def newest_intact(directory: str) -> Intact:
    """The newest step of ``directory`` that reads back and matches its digest, and a line
    for each newer, damaged step it skipped.

    Only integrity is checked (each step is read as it was saved): whether the step fits the
    model at hand is for :func:`restore_checkpoint` to say. A missing or empty ``directory``
    gives ``Intact(None, [])``; damaged steps only, ``Intact(None, [one line per step])``.
    """
    skipped = []
    steps = _steps(directory)
    if not steps:
        return Intact(None, skipped)
    with _orbax_quiet(), _reader(directory) as mngr:
        for step in steps:
            try:
                _read(mngr, directory, step, _as_saved(_saved_tree(mngr, directory, step)))
            except DamagedCheckpointError as e:
                skipped.append(f"checkpoint {step} in {e.path!r} is damaged ({e.why}); skipped")
            else:
                return Intact(step, skipped)
    return Intact(None, skipped)
