"""Ways to damage a saved checkpoint step, as a crash, a bad disk or a careless hand would:
shared by tests/test_checkpoint.py (the library) and tests/test_faults.py (the command line)."""

import os
import pathlib
import shutil


def data_files(step_dir: pathlib.Path, every: bool = False) -> list[pathlib.Path]:
    """The OCDBT data files to damage: the largest file of the step's ``state/`` (the one
    holding the kernels' bytes for a state of some size), or with ``every`` each file of every
    ``d/`` directory. Orbax keeps two databases, the merged root's ``state/d/`` and the
    process's ``state/ocdbt.process_0/d/``; for a tiny state their files have one size and
    which one a read goes through is orbax's business, so a test on a tiny state deals the
    fault to every file."""
    state = step_dir / "state"
    files = [p for p in state.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, f"{step_dir} has no OCDBT data file"
    if every:
        return sorted(files)
    path = max((p for p in state.rglob("*") if p.is_file()), key=os.path.getsize)
    assert path.parent.name == "d", f"{path} is not an OCDBT data file"
    return [path]


def flip(step_dir, every: bool = False):
    for path in data_files(step_dir, every):
        data = bytearray(path.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 10] = bytes(b ^ 0xFF for b in data[middle : middle + 10])
        path.write_bytes(bytes(data))


def truncate(step_dir, every: bool = False):
    for path in data_files(step_dir, every):
        os.truncate(path, path.stat().st_size // 2)


def zero(step_dir, every: bool = False):
    for path in data_files(step_dir, every):
        path.write_bytes(bytes(path.stat().st_size))


def delete_array_metadata(step_dir):
    (step_dir / "state" / "_METADATA").unlink()


def delete_arrays(step_dir):
    shutil.rmtree(step_dir / "state")


def garbage_meta(step_dir):
    (step_dir / "meta" / "metadata").write_bytes(b"\xff\xfe{not json\x00")


# fault -> what the message must say is wrong
FAULTS = {
    "flipped": (flip, "its arrays do not match their digest"),
    "truncated": (truncate, "cannot read its arrays"),
    "zeroed": (zero, "cannot read its arrays"),
    "no_array_metadata": (delete_array_metadata, "its array metadata is missing"),
    "no_arrays": (delete_arrays, "its array directory"),
    "garbage_meta": (garbage_meta, "cannot read its meta: UnicodeDecodeError"),
}
