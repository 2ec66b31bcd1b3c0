"""One run per workdir (an exclusive lock) and its metrics log, kept whole across kills."""

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator

from absl import logging

LOCK_NAME = ".lock"

# The workdirs this process holds, by (device, inode): a nested lock_workdir is a no-op.
_held: set[tuple[int, int]] = set()
_held_guard = threading.Lock()


class WorkdirError(ValueError):
    """A workdir that cannot be used; the message names it and says what to do."""


class WorkdirBusy(WorkdirError):
    """Another live process holds the workdir's lock; the message names its PID and host."""


# errno -> what a full, read-only or refused disk means, in words; from the exception's errno or
# its text (orbax and tensorstore re-raise OS errors as ValueError/Exception with the text).
_STORAGE_ERRORS = {
    errno.ENOSPC: ("the disk is full", "No space left on device"),
    errno.EDQUOT: ("the disk quota is exceeded", "Disk quota exceeded"),
    errno.EROFS: ("the filesystem is read-only", "Read-only file system"),
    errno.EACCES: ("permission is denied", "Permission denied"),
}


def storage_problem(e: BaseException) -> str | None:
    """``"the disk is full"`` (or quota, read-only, permission) when ``e`` or one of its causes
    is that OS error, else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code = getattr(e, "errno", None)
        for number, (words, text) in _STORAGE_ERRORS.items():
            if code == number or text in str(e) or f"os_error_code='{number}'" in str(e):
                return words
        e = e.__cause__ or e.__context__
    return None


def _storage_error(path: str, action: str, e: OSError) -> "WorkdirError":
    problem = storage_problem(e) or e.strerror or str(e)
    return WorkdirError(
        f"cannot {action} {path!r}: {problem}; nothing written before is lost. Free space (or "
        "make it writable) and rerun the same command to resume"
    )


def _record(content: bytes) -> dict | None:
    try:
        record = json.loads(content)
    except ValueError:
        return None
    return record if isinstance(record, dict) and {"pid", "host", "since"} <= set(record) else None


def _describe(record: dict | None) -> str:
    if record is None:
        # Taken a moment ago and not yet written, or written by something else.
        return "a process that has not written its PID yet"
    return f"pid {record['pid']} on host {record['host']} (since {record['since']})"


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks)


@contextlib.contextmanager
def lock_workdir(workdir: str) -> Iterator[str]:
    """Holds ``workdir/.lock`` exclusively for the body: one run per workdir.

    The workdir is created if missing and locked before anything else is written, so a run
    refused here leaves the workdir exactly as it found it. The lock is ``flock(LOCK_EX)`` on
    the open file: the kernel drops it when the holder exits however it exits, so the lock of
    a killed run (``kill -9``, OOM) is free at once and the next run takes it over, with a
    warning naming the gone holder. The file records the holder's PID, host and start time
    for the message a refused run prints; it is emptied on a clean release, never deleted
    (deleting would let two runs lock two different files of one name).

    Re-entrant within a process: a script may hold the lock around :func:`~rnn_jax.loop.fit`
    and what it writes afterwards, and fit's own ``lock_workdir`` inside is then a no-op.

    Filesystems: on local disks the lock is exact. On NFS, Linux emulates ``flock`` with
    POSIX byte-range locks through the server's lock manager, so runs on different hosts
    exclude each other too, and the lock of a crashed host is freed when the server's lease
    expires (NFSv4: about 90 s). An NFS mount with ``nolock`` keeps locks local to each host:
    two hosts are then NOT excluded. A filesystem that refuses locks raises
    :class:`WorkdirError`. ``flock`` is shared with forked children: a child that outlives the
    run keeps the workdir locked.

    Multi-host JAX: take the lock in one process (``jax.process_index() == 0``) only; the
    others belong to the same run.

    Args:
      workdir: the run's directory; created (with parents) if missing.

    Yields:
      The path of the lock file.

    Raises:
      WorkdirBusy: another live process holds the lock.
      WorkdirError: ``workdir`` is empty or a file, or it cannot be locked.
    """
    if not workdir:
        raise WorkdirError(f"workdir={workdir!r} is empty: pass a directory (created if missing)")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(
            f"workdir={workdir!r} is a file, not a directory; pass a directory (created if missing)"
        )
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise WorkdirError(
            f"workdir={workdir!r} cannot be created ({storage_problem(e) or e.strerror or e}); "
            "pass a directory you can write to"
        ) from None
    path = os.path.join(workdir, LOCK_NAME)
    stat = os.stat(workdir)
    key = (stat.st_dev, stat.st_ino)
    with _held_guard:
        nested = key in _held
    if nested:
        yield path
        return
    try:
        # No O_TRUNC: a refused run must not touch the holder's record.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise WorkdirError(
            f"workdir={workdir!r}: cannot open its lock file {path!r} ({e.strerror}); "
            "pass a workdir you can write to"
        ) from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_record(_read_all(fd)))
            raise WorkdirBusy(
                f"workdir={workdir!r} is in use by another run: {holder} holds {path!r}. "
                "Wait for it to finish or pass another workdir."
            ) from None
        except OSError as e:
            raise WorkdirError(
                f"workdir={workdir!r}: its filesystem cannot lock {path!r} ({e.strerror}); "
                "pass a workdir on a local disk"
            ) from e
        # A clean release empties the file, so a record left here is that of a killed run.
        left = _read_all(fd)
        if left.strip():
            logging.warning(
                "%s: took over the lock of a run that ended without releasing it: %s",
                workdir,
                _describe(_record(left)),
            )
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        except OSError as e:
            raise _storage_error(path, "write the lock record to", e) from e
        with _held_guard:
            _held.add(key)
        try:
            yield path
        finally:
            with _held_guard:
                _held.discard(key)
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _fsync_dir(directory: str):
    # Makes a rename or a new file's name durable, not only its bytes.
    fd = os.open(directory or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(path: str, data: bytes):
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(path))


def _encode(row: dict) -> bytes:
    # json escapes newlines inside strings, so one row is always one line.
    return (json.dumps(row) + "\n").encode()


def read_log(path: str, *, repair: bool = True) -> list[dict]:
    """The rows of a JSON-lines log such as ``metrics.jsonl``; ``[]`` if it does not exist.

    A last line without its newline is what a kill in the middle of :func:`append_log` leaves:
    if it is not a JSON object it is dropped, if it is one it is kept, and with ``repair`` the
    file is rewritten atomically to the rows returned (a warning says so either way). Repair
    only under :func:`lock_workdir`; ``repair=False`` reads without writing (the other
    processes of a multi-host run). Blank lines are skipped.

    Raises:
      ValueError: a complete line is not a JSON object; the message names the file, the
        line number and what to do.
    """
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    *lines, tail = data.split(b"\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode())
        except UnicodeDecodeError:
            error = "not UTF-8"
        except json.JSONDecodeError as e:
            error = f"{e.msg} at column {e.colno}"
        else:
            error = None if isinstance(row, dict) else f"a JSON {type(row).__name__}"
        if error is not None:
            shown = line[:80].decode(errors="replace")
            raise ValueError(
                f"{path!r} line {number} is not a JSON object ({error}): {shown!r}; fix or "
                "delete that line, or pass a new workdir"
            )
        rows.append(row)
    if tail:
        good = data[: len(data) - len(tail)]
        try:
            row = json.loads(tail.decode())
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
            good += tail + b"\n"
            logging.warning("%s: its last line has no newline", path)
        else:
            logging.warning(
                "%s: dropped a torn last line (a run killed while writing it): %r",
                path,
                tail[:80],
            )
        if repair:
            _replace(path, good)
            logging.warning("%s: repaired", path)
    return rows


def append_log(path: str, row: dict):
    """Appends ``row`` as one JSON line and makes it durable (flush + fsync) before returning;
    a part-written line is repaired by the next :func:`read_log`."""
    append_text(path, _encode(row).decode())


def append_text(path: str, text: str):
    """Appends ``text`` (UTF-8) to ``path`` and makes it durable before returning."""
    new = not os.path.exists(path)
    try:
        with open(path, "ab") as f:
            f.write(text.encode())
            f.flush()
            os.fsync(f.fileno())
        if new:
            _fsync_dir(os.path.dirname(path))
    except OSError as e:
        raise _storage_error(path, "append to", e) from e


def replace_file(path: str, data: bytes, action: str = "write"):
    """Replaces ``path`` with ``data`` atomically: a kill leaves the old file or the new one;
    a failure is one :class:`WorkdirError` saying ``cannot {action} ...``."""
    try:
        _replace(path, data)
    except OSError as e:
        raise _storage_error(path, action, e) from e


def rewrite_log(path: str, rows: list[dict]):
    """Replaces the log with ``rows`` atomically: a kill leaves the old file or the new one."""
    replace_file(path, b"".join(_encode(row) for row in rows), "rewrite")
