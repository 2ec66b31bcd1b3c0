"""Ways to damage a saved checkpoint step, as a crash, a bad disk or a careless hand would:
shared by tests/test_checkpoint.py (the library) and tests/test_faults.py (the command line)."""

import os
import pathlib
import shutil


def data_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    """The OCDBT data files that hold the arrays' bytes: the largest file of each ``d/``
    directory of the step's ``state/``. Orbax writes one database per process
    (``ocdbt.process_0/``) and merges it into the step's root; which copy a read goes through
    depends on its version and the state's size, so a fault is dealt to both."""
    found = []
    for directory in {p.parent for p in (step_dir / "state").rglob("*") if p.parent.name == "d"}:
        found.append(max((p for p in directory.iterdir() if p.is_file()), key=os.path.getsize))
    assert found, f"{step_dir} has no OCDBT data file"
    return sorted(found)


def flip(step_dir):
    for path in data_files(step_dir):
        data = bytearray(path.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 10] = bytes(b ^ 0xFF for b in data[middle : middle + 10])
        path.write_bytes(bytes(data))


def truncate(step_dir):
    for path in data_files(step_dir):
        os.truncate(path, path.stat().st_size // 2)


def zero(step_dir):
    for path in data_files(step_dir):
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
    "garbage_meta": (garbage_meta, "/3/meta/metadata': UnicodeDecodeError"),
}
