"""A run's directory as one object: its lock, its record of whose run it is, its metrics log, its
checkpoints, the position a resumed run starts from and the check of what a resumed run may
change; opened once per run, the newest checkpoint read once."""

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging

from rnn_jax.checkpoint import CheckpointError, Checkpoints, Saved, as_state
from rnn_jax.workdir import (
    WorkdirError,
    append_log,
    append_text,
    lock_workdir,
    read_log,
    replace_file,
    rewrite_log,
)

CHECKPOINTS = "checkpoints"
# The state of the iteration with the best score (fit's ``best``), one step, its row as meta.
BEST = "best"
METRICS = "metrics.jsonl"
# Whose run the directory holds: the meta of the run that made it (experiment, configuration).
RUN_RECORD = "run.json"
# The key of a checkpoint's meta that holds the position it was written at.
PROGRESS_KEY = "_progress"


class Interrupted(Exception):
    """A run asked to stop (``fit``'s ``interrupted``) stopped at a call boundary, its position
    checkpointed at ``step`` (None where it writes nothing): rerunning resumes there."""

    def __init__(self, step: int | None):
        super().__init__(f"interrupted at step {step}; rerun the same command to resume")
        self.step = step


class Position(NamedTuple):
    """Where a run stands: ``iteration`` iterations done, then ``epoch`` epochs and ``steps``
    steps of the next, with that epoch's metric ``sums`` so far (host arrays) and
    ``seconds``."""

    iteration: int
    epoch: int = 0
    steps: int = 0
    sums: dict | None = None
    seconds: float = 0.0

    def to_json(self) -> dict:
        """The position as JSON, exactly: float32 sums are exact as Python floats."""
        sums = None
        if self.sums is not None:
            sums = {
                k: {"dtype": str(np.asarray(v).dtype), "value": np.asarray(v).tolist()}
                for k, v in self.sums.items()
            }
        return {**self._asdict(), "sums": sums}

    @classmethod
    def from_meta(cls, meta: dict, step: int) -> "Position":
        """The position a checkpoint's meta records (a step written before positions were
        recorded is indexed by its iteration)."""
        progress = meta.get(PROGRESS_KEY)
        if progress is None:
            return cls(iteration=step)
        sums = progress.get("sums")
        if sums is not None:
            sums = {k: np.asarray(v["value"], dtype=v["dtype"]) for k, v in sums.items()}
        return cls(
            progress["iteration"], progress["epoch"], progress["steps"], sums, progress["seconds"]
        )


def differences(saved: dict, meta: dict) -> list[str]:
    """What a run with ``meta`` changes of the run that wrote ``saved`` (a checkpoint's meta or
    a run record), one phrase each; none means it may resume there.

    ``meta["config"]`` is compared field by field, and a field whose value is a dict entry by
    entry; an entry that ``saved`` lacks (written before it existed) is not held against it.
    """
    problems = []
    for key, value in meta.items():
        if key == "experiment" and key not in saved:
            continue  # a checkpoint written before runs named their experiment
        if key not in saved:
            problems.append(f"{key}: missing in the earlier run")
        elif key == "config":
            for name in sorted(set(value) | set(saved[key])):
                old, new = saved[key].get(name), value.get(name)
                if isinstance(old, dict) and isinstance(new, dict):
                    problems += [
                        f"{name}=...: {k} {new[k]!r} differs from the earlier {old[k]!r}"
                        for k in sorted(set(old) & set(new))
                        if old[k] != new[k]
                    ]
                    problems += [
                        f"{name}=...: {k} missing in this run" for k in sorted(set(old) - set(new))
                    ]
                elif old != new:
                    problems.append(f"{name}={new!r} differs from the earlier {old!r}")
        elif saved[key] != value:
            problems.append(f"{key}: the earlier run has {saved[key]!r}, this run {value!r}")
    return problems


def _as_json(meta: dict) -> dict:
    """``meta`` as it reads back from JSON (tuples as lists)."""
    return json.loads(json.dumps(meta))


class RunDir:
    """One run's directory, opened by :func:`open_run`; ``path`` None is a run that writes
    nothing (every method a no-op, nothing resumed).

    Attributes:
      path: the directory, or None.
      meta: what this run is (JSON: ``experiment``, ``config``, ...), saved with every
        checkpoint and in ``run.json``.
      history: the metrics rows of the iterations up to the resumed checkpoint (a row logged
        after it, whose iteration is trained again, is dropped from the log).
      position: where training resumes (``Position(0)``: from the start).
      resumed: the checkpoint step resumed from, or None.
      last_saved: the newest step saved or resumed from, or None.
    """

    def __init__(self, path: str | None, meta: dict, checkpoints: Checkpoints | None = None):
        self.path, self.meta, self._checkpoints = path, meta, checkpoints
        self.history: list[dict] = []
        self.position = Position(0)
        self.resumed: int | None = None
        self.last_saved: int | None = None
        self._saved: Saved | None = None
        self._primary = jax.process_index() == 0  # multi-host: one process writes the files
        self._recorded = False

    def file(self, name: str) -> str | None:
        return None if self.path is None else os.path.join(self.path, name)

    @property
    def checkpoint_dir(self) -> str | None:
        return self.file(CHECKPOINTS)

    def record(self) -> None:
        """Writes ``run.json`` (atomically), once: done before the run's first file by every
        method here; a run writing a file of its own calls it first. A run that stops before
        writing anything leaves no record."""
        if self._recorded or self.path is None or not self._primary:
            return
        self._recorded = True
        data = (json.dumps(_as_json(self.meta), indent=1) + "\n").encode()
        replace_file(self.file(RUN_RECORD), data)

    def restore(self, like: Any) -> Any:
        """The resumed checkpoint's state in the structure of ``like`` (``like`` itself when
        nothing is resumed), from the arrays read when the directory was opened.

        Raises:
          CheckpointError: the checkpoint holds another model or optimiser.
        """
        if self._saved is None:
            return like
        state = as_state(self._saved, like, self.checkpoint_dir)
        self._saved = None  # its host copy is not needed again
        return state

    def save(self, state: Any, position: Position) -> None:
        """Checkpoints ``state`` (indexed by ``state.step``) at ``position``."""
        if self._checkpoints is None:
            return
        step = int(state.step)
        self.record()
        self._checkpoints.save(step, state, {**self.meta, PROGRESS_KEY: position.to_json()})
        self.last_saved = step

    def save_best(self, state: Any, row: dict) -> None:
        """Keeps ``state`` in ``best/`` as the best so far, its metrics ``row`` beside it (one
        step kept; a step already there, saved before a kill and trained again bit for bit,
        is left as it is)."""
        if self._checkpoints is None:
            return
        self.record()
        with Checkpoints(self.file(BEST), max_to_keep=1) as best:
            if int(state.step) not in best.steps():
                best.save(int(state.step), state, {**self.meta, "row": _as_json(row)})

    def restore_best(self, like: Any) -> tuple[Any, dict] | None:
        """``(state, row)`` of the best iteration kept by :meth:`save_best`, in the structure
        of ``like``; None when there is none (no workdir, or nothing kept yet).

        Raises:
          CheckpointError: the kept step is damaged or holds another model.
        """
        if self.path is None or not os.path.isdir(self.file(BEST)):
            return None
        with Checkpoints(self.file(BEST), writable=False) as best:
            intact = best.newest_intact()
            if intact.saved is None:
                if intact.skipped:
                    raise CheckpointError(intact.skipped[0])
                return None
            return as_state(intact.saved, like, best.directory), intact.saved.meta["row"]

    def log(self, row: dict) -> dict:
        """Appends ``row`` to the metrics log (durable before it returns) and to ``history``;
        returns it as it reads back (string keys, lists)."""
        row = _as_json(row)
        self.history.append(row)
        if self.path is not None and self._primary:
            self.record()
            append_log(self.file(METRICS), row)
        return row

    def append(self, name: str, text: str) -> None:
        """Appends ``text`` to the file ``name`` of the directory (e.g. generated samples),
        durable before it returns; never rewritten."""
        if self.path is not None and self._primary:
            self.record()
            append_text(self.file(name), text)

    def write(self, name: str, data: bytes) -> None:
        """Replaces the file ``name`` atomically (a kill leaves the old or the new one)."""
        if self.path is not None and self._primary:
            self.record()
            replace_file(self.file(name), data)

    def _check_owner(self) -> None:
        """Refuses a directory that holds another experiment's or configuration's run."""
        path = self.file(RUN_RECORD)
        if not os.path.exists(path):
            return
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            raise WorkdirError(
                f"workdir={self.path!r}: its {RUN_RECORD} cannot be read ({e}); move it away or "
                "pass another workdir"
            ) from None
        if not isinstance(saved, dict):
            raise WorkdirError(
                f"workdir={self.path!r}: its {RUN_RECORD} holds no JSON object; move it away or "
                "pass another workdir"
            )
        theirs, ours = saved.get("experiment"), self.meta.get("experiment")
        if theirs != ours:
            raise WorkdirError(
                f"workdir={self.path!r} holds the results of {theirs}, not of {ours}; pass "
                "another workdir"
            )
        problems = differences(saved, _as_json(self.meta))
        if problems:
            what = saved.get("experiment", "another run")
            raise WorkdirError(
                f"workdir={self.path!r} holds the results of {what} with another configuration ("
                + "; ".join(problems or ["an unreadable record"])
                + "); pass another workdir, or the same flags to resume it"
            )

    def _resume(self) -> None:
        intact = self._checkpoints.newest_intact()
        if intact.step is None and intact.skipped:
            raise CheckpointError(
                f"no intact checkpoint in {self.checkpoint_dir!r}: all {len(intact.skipped)} are "
                f"damaged, the newest as follows: {intact.skipped[0]}. Delete them to start "
                "afresh, or use a new workdir"
            )
        for line in intact.skipped:
            logging.warning(line)
        if intact.saved is not None:
            problems = differences(intact.saved.meta, _as_json(self.meta))
            if problems:
                raise CheckpointError(
                    f"the checkpoint in {self.checkpoint_dir!r} (step {intact.step}) was written "
                    "by a different run: "
                    + "; ".join(problems)
                    + ". Resume it with the configuration it was written with, or use a new "
                    "workdir."
                )
            self._saved, self.resumed = intact.saved, intact.step
            self.last_saved = intact.step
            self.position = Position.from_meta(intact.saved.meta, intact.step)
        # The last row of each iteration up to the checkpoint's: rows of iterations that were
        # logged but not checkpointed are trained again.
        rows = read_log(self.file(METRICS), repair=self._primary)
        by_iteration = {
            r["iteration"]: r for r in rows if r["iteration"] <= self.position.iteration
        }
        self.history = [by_iteration[i] for i in sorted(by_iteration)]
        if self._primary and rows != self.history:
            rewrite_log(self.file(METRICS), self.history)


def _check_kinds(path: str, files: tuple[str, ...]) -> None:
    """One line for a file of the directory that is a directory, or the other way round."""
    kinds = [(METRICS, False), (RUN_RECORD, False), (CHECKPOINTS, True), (BEST, True)]
    for name, directory in kinds + [(name, False) for name in files]:
        where = os.path.join(path, name)
        if os.path.exists(where) and os.path.isdir(where) != directory:
            kind = "a directory" if not directory else "a file"
            raise WorkdirError(
                f"workdir={path!r}: {name} is {kind}, where the run keeps its "
                f"{'checkpoints' if directory else name}; move it away or pass another workdir"
            )


@contextlib.contextmanager
def open_run(
    path: str | None,
    meta: dict,
    *,
    max_to_keep: int = 3,
    checkpoints: bool = True,
    files: tuple[str, ...] = (),
) -> Iterator[RunDir]:
    """Opens a run's directory for the body: the one place a run touches its workdir.

    In order: the directory's lock (:func:`rnn_jax.workdir.lock_workdir`, held to the end;
    process 0 of a multi-host run); its ``run.json``, which must describe the same run (an
    experiment's results are never overwritten by another experiment's or configuration's:
    one line naming both); the newest intact checkpoint, read once (a damaged newer one named
    and skipped) and its meta checked against ``meta`` (a mismatch names what differs); the
    metrics log, repaired and cut to the iterations that checkpoint holds. ``run.json`` is
    written (atomically) before the run's first file, so a run stopped before it wrote anything
    leaves no record.

    Args:
      path: the run's directory (created if missing), or None for a run that writes nothing.
      meta: JSON describing the run: at least ``experiment`` and ``config`` (the fields a
        resumed run must share).
      max_to_keep: the checkpoints kept (the newest).
      checkpoints: False for an experiment that keeps no checkpoints (its results, log and
        record only).
      files: the names of the other files the run writes there (e.g. ``samples.txt``),
        checked to be files.

    Raises:
      WorkdirError: the directory cannot be used (busy, a file, read-only, another run's).
      CheckpointError: every checkpoint is damaged, or they belong to another configuration.
    """
    if path is None:
        yield RunDir(None, meta)
        return
    primary = jax.process_index() == 0
    with lock_workdir(path) if primary else contextlib.nullcontext():
        _check_kinds(path, files)
        run = RunDir(path, meta)
        run._check_owner()  # before anything is created there
        store = None
        if checkpoints:
            store = Checkpoints(os.path.join(path, CHECKPOINTS), max_to_keep=max_to_keep)
            run._checkpoints = store
        try:
            if store is not None:
                run._resume()
            else:
                run.history = read_log(run.file(METRICS), repair=primary)
            yield run
        finally:
            if store is not None:
                store.close()


def read_history(workdir: str) -> list[dict]:
    """The rows of ``workdir/metrics.jsonl``, one per iteration (read only: a torn last line is
    left out, not repaired; :func:`open_run` repairs it under the lock)."""
    return read_log(os.path.join(workdir, METRICS), repair=False)
