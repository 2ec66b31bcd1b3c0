"""What the command line does as the owner of its process: orbax's reports kept off stderr
(and nothing else), integers and float32 values checked before any work, the compilation cache
checked once at start-up."""

import asyncio
import dataclasses
import gc
import logging
import os
import sys
import types

import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import cli


def _unraisable(obj, exc):
    return types.SimpleNamespace(
        object=obj, exc_value=exc, exc_type=type(exc), exc_traceback=exc.__traceback__, err_msg=None
    )


def test_orbax_orphans_are_recognised_and_nothing_else():
    """When one array fails to read, orbax closes its event loop with the other reads in
    flight; later those report to ``sys.unraisablehook``: a tensorstore thread calls into the
    closed loop, and each read's coroutine, collected, turns GeneratorExit into an Exception.
    Both are orbax's; their look-alikes from elsewhere are not."""
    orbax_file = os.path.join(os.path.dirname(os.path.dirname(ocp.__file__)), "x.py")
    orbax_read = types.SimpleNamespace(cr_code=compile("", orbax_file, "exec"))
    closed_by_orbax = Exception("Encountered error while reading array index")
    closed_by_orbax.__cause__ = GeneratorExit()
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as e:
        from_python = e  # called from this test's frame
    from_thread = RuntimeError("Event loop is closed").with_traceback(
        from_python.__traceback__.tb_next  # as from a tensorstore thread: asyncio's frames only
    )
    assert cli.is_orbax_orphan(_unraisable(orbax_read, closed_by_orbax))
    assert cli.is_orbax_orphan(_unraisable(None, from_thread))
    assert not cli.is_orbax_orphan(_unraisable(None, from_python))
    assert not cli.is_orbax_orphan(_unraisable(lambda: None, closed_by_orbax))
    assert not cli.is_orbax_orphan(_unraisable(orbax_read, RuntimeError("other")))


def test_quiet_orbax_drops_orbax_and_passes_everything_else(monkeypatch):
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    absl_logger = cli.logging.get_absl_logger()
    asyncio_logger = logging.getLogger("asyncio")
    monkeypatch.setattr(absl_logger, "filters", list(absl_logger.filters))
    monkeypatch.setattr(asyncio_logger, "filters", list(asyncio_logger.filters))
    cli.quiet_orbax()
    orbax_file = os.path.join(os.path.dirname(os.path.dirname(ocp.__file__)), "x.py")
    closed = Exception("read")
    closed.__cause__ = GeneratorExit()
    sys.unraisablehook(
        _unraisable(types.SimpleNamespace(cr_code=compile("", orbax_file, "exec")), closed)
    )
    assert reported == []

    async def unrelated():
        try:
            await asyncio.sleep(0)
        except GeneratorExit as e:
            raise RuntimeError("not orbax's") from e

    coroutine = unrelated()
    coroutine.send(None)  # suspended in the sleep
    del coroutine  # its close raises: an unraisable error that is not orbax's
    gc.collect()
    assert [str(r.exc_value) for r in reported] == ["not orbax's"]

    def record(pathname, message="a warning"):
        return logging.LogRecord("absl", logging.WARNING, pathname, 1, message, None, None)

    assert not absl_logger.filter(record(orbax_file))
    assert absl_logger.filter(record(__file__))
    task = logging.LogRecord(
        "asyncio",
        logging.ERROR,
        __file__,
        1,
        f"Task exception was never retrieved\nfuture: <Task coro=<w() defined at {orbax_file}:1>>",
        None,
        None,
    )
    assert not asyncio_logger.filter(task)


def test_asyncio_reports_of_orbax_tasks_are_dropped_and_others_kept():
    def record(message):
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None, None)

    orbax_task = (
        "Task exception was never retrieved\nfuture: <Task finished coro=<write_fragment() "
        f"done, defined at {cli._ORBAX_DIR}/checkpoint/_src/serialization.py:188>>"
    )
    assert not cli.keeps_asyncio_record(record(orbax_task))
    assert cli.keeps_asyncio_record(record("Task exception was never retrieved: mine"))


def test_asyncio_reports_of_tensorstore_futures_are_dropped_and_others_kept():
    """A plain Future that tensorstore failed (a sibling read of a damaged step) has no
    traceback: its error's tensorstore spec is what names it."""

    def record(error):
        message = (
            f"Future exception was never retrieved\nfuture: <Future finished exception={error!r}>"
        )
        info = (type(error), error, None)
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None, info)

    tensorstore = ValueError(
        'DATA_LOSS: Error opening "zarr" driver: CRC-32C checksum verification failed '
        '[tensorstore_spec=\'{"driver":"zarr"}\']'
    )
    assert not cli.keeps_asyncio_record(record(tensorstore))
    assert cli.keeps_asyncio_record(record(ValueError("DATA_LOSS: mine")))


def test_asyncio_reports_of_orbax_gathering_futures_are_dropped_and_others_kept():
    """A ``_GatheringFuture`` names no coroutine: orbax is only in its exception's traceback."""
    import orbax.checkpoint._src.serialization.serialization as orbax_serialization

    def raised_in(filename):
        source = "def fail():\n    raise ValueError('RESOURCE_EXHAUSTED')\n"
        namespace = {}
        exec(compile(source, filename, "exec"), namespace)
        try:
            namespace["fail"]()
        except ValueError as e:
            return e

    def record(error):
        message = "_GatheringFuture exception was never retrieved\nfuture: <_GatheringFuture>"
        info = (type(error), error, error.__traceback__)
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None, info)

    assert not cli.keeps_asyncio_record(record(raised_in(orbax_serialization.__file__)))
    assert cli.keeps_asyncio_record(record(raised_in(__file__)))


@dataclasses.dataclass(frozen=True)
class _Config:
    seed: int = cli.field(0, "A seed.")
    learning_rate: float = cli.field(1e-3, "A rate.", check=cli.positive_float32)
    clip_norm: float | None = cli.clip_norm()

    def __post_init__(self):
        cli.validate(self)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            dict(seed=99999999999999999999),
            "seed=99999999999999999999 must be an integer of at most",
        ),
        (dict(seed=-(2**63) - 1), "seed=-9223372036854775809 must be an integer of at most"),
        (dict(learning_rate=1e-50), "learning_rate=1e-50 is below 1.18e-38: float32 cannot"),
        (dict(clip_norm=1e-40), "clip_norm=1e-40 is below 1.18e-38: float32 cannot"),
        (dict(learning_rate=-1.0), "learning_rate=-1.0 must be finite and > 0"),
    ],
)
def test_values_the_arrays_cannot_hold_are_refused(kwargs, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(".", r"\.")):
        _Config(**kwargs)
    assert _Config(seed=2**63 - 1, learning_rate=float(np.finfo(np.float32).tiny)).seed > 0


def test_an_unwritable_compilation_cache_is_one_line_and_the_run_goes_on(tmp_path, read_only_dir):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for where in (a_file, read_only_dir / "cache"):
        line = cli.use_compilation_cache(str(where))
        assert line.startswith(f"running without the compilation cache: {str(where)!r} cannot")
        assert "\n" not in line
        assert not cli.jax.config.jax_enable_compilation_cache
    assert os.listdir(read_only_dir) == [] and a_file.read_text() == "x"
    assert cli.use_compilation_cache(str(tmp_path / "cache")) is None
    assert cli.jax.config.jax_enable_compilation_cache
    assert cli.use_compilation_cache("none") is None
    assert not cli.jax.config.jax_enable_compilation_cache
