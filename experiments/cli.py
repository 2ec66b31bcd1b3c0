"""Command lines derived from an experiment's frozen Config dataclass: each field written once.

Every experiment has one shape: ``Config`` (defaults, help and validation, written once) and
``run(config, workdir)``, which returns its results and defines no flags, so experiments import
into one process and tests call them with tiny configs. Only ``python -m experiments.<name>``
defines flags, through :func:`main`: one flat flag per field (``--units=64``; tuples are
comma-separated lists, ``--lengths=100,200``; a field whose default is None is unset unless
given, and ``--clip_norm=none`` unsets a number whose default is set) plus ``--workdir``.
Errors become one line on stderr and exit status 1; a library error that names a parameter as
``name=value`` is shown with the flag, ``--name=value``.
"""

import asyncio
import dataclasses
import logging as std_logging
import os
import re
import signal
import sys
import tempfile
import threading
import traceback
import types
import typing
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging

from rnn_jax.checkpoint import CheckpointError
from rnn_jax.data import TextError
from rnn_jax.loop import NonFiniteLossError
from rnn_jax.rundir import Interrupted

# The flags main() defines belong to the script that calls it (so --helpshort lists them).
flags.disclaim_key_flags()

# What a bad input raises anywhere below run(): shown as one line, never a traceback.
USER_ERRORS = (ValueError, TextError, CheckpointError, NonFiniteLossError)


def field(default: Any, help: str, *, choices: tuple | None = None, check=None):
    """A Config field: its default, its help and (optionally) its allowed values.

    Args:
      default: the default value (tuples for list-valued fields).
      help: one line for ``--help``.
      choices: the allowed values of a string field.
      check: ``value -> problem or None``, e.g. :func:`positive`; None passes anything.
    """
    metadata = {"help": help, "choices": choices, "check": check}
    return dataclasses.field(default=default, metadata=metadata)


def positive(value) -> str | None:
    """A finite number > 0."""
    return None if _finite(value) and value > 0 else "must be finite and > 0"


_FLOAT32_TINY = float(np.finfo(np.float32).tiny)


def positive_float32(value) -> str | None:
    """A finite number > 0 that float32 holds as a normal number: a learning rate, epsilon or
    clipping norm below ~1.2e-38 underflows, and the parameters never move."""
    if positive(value):
        return positive(value)
    if value < _FLOAT32_TINY:
        return (
            f"is below {_FLOAT32_TINY:.3g}: float32 cannot hold it (the parameters would "
            "never move)"
        )
    return None


def non_negative(value) -> str | None:
    """A finite number >= 0."""
    return None if _finite(value) and value >= 0 else "must be finite and >= 0"


def fraction(value) -> str | None:
    """A number in [0, 1)."""
    return None if _finite(value) and 0 <= value < 1 else "must be in [0, 1)"


def optional(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    """``check`` for a field that may also be None (unset)."""
    return lambda value: None if value is None else check(value)


def non_empty(value) -> str | None:
    """A non-empty string."""
    return None if value else "must not be empty"


optional_positive = optional(positive)


def all_positive(values) -> str | None:
    """A non-empty tuple of numbers > 0."""
    if not values or any(positive(v) for v in values):
        return "must be a non-empty list of numbers > 0"
    return None


def clip_norm(default: float | None = None):
    """The one ``clip_norm`` field: the same meaning in every experiment."""
    return field(
        default,
        "Clip the gradient to this global norm (unset: no clipping). Must be finite and > 0.",
        check=optional(positive_float32),
    )


def _finite(value) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and abs(value) < float("inf")
    )


def _is(value, kind) -> bool:
    """``isinstance`` as a config reads it: an int is a float, a bool is not an int."""
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


# Integers the arrays can hold: JAX's PRNG seeds and sizes are at most 64-bit.
_INT_LIMIT = 2**63


def _type_problem(value, annotation) -> str | None:
    kind, optional_ = _base_type(annotation)
    if value is None:
        return None if optional_ else "must be set"
    if kind is int and _is(value, int) and not -_INT_LIMIT <= value < _INT_LIMIT:
        return "must be an integer of at most 63 bits (|value| < 2**63)"
    if typing.get_origin(kind) is tuple:
        element = typing.get_args(kind)[0]
        if isinstance(value, tuple) and all(_is(v, element) for v in value):
            return None
        return f"must be a tuple of {element.__name__}"
    return None if _is(value, kind) else f"must be of type {kind.__name__}"


def validate(config) -> None:
    """Checks every field of a Config against its type, its ``choices`` and its ``check``.

    Raises:
      ValueError: naming the first bad field as ``name=value``.
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        problem = _type_problem(value, hints[f.name])
        if problem:
            raise ValueError(f"{f.name}={value!r} {problem}")
        choices, check = f.metadata.get("choices"), f.metadata.get("check")
        if choices is not None and value is not None:
            bad = [v for v in (value if isinstance(value, tuple) else (value,)) if v not in choices]
            if bad:
                raise ValueError(f"{f.name}={value!r}: {bad[0]!r} is not one of {list(choices)}")
        problem = check(value) if check is not None else None
        if problem:
            raise ValueError(f"{f.name}={value!r} {problem}")


def _base_type(annotation) -> tuple[type, bool]:
    """``(type, optional)`` of a field annotation: ``float | None`` -> ``(float, True)``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


class _NoneOr(flags.ArgumentParser):
    """Parses ``none`` (any case) or an empty value as None, anything else with ``inner``."""

    def __init__(self, inner: flags.ArgumentParser):
        self.inner = inner

    def parse(self, argument):
        if argument is None or (isinstance(argument, str) and argument.lower() in ("", "none")):
            return None
        return self.inner.parse(argument)

    def flag_type(self) -> str:
        return f"{self.inner.flag_type()} or none"


_PARSERS = {int: flags.IntegerParser, float: flags.FloatParser}


def define_flags(config_cls, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """One flag per field of ``config_cls``, named as the field, with its default and help.

    A number field that may be None (``clip_norm: float | None``) takes ``--name=none`` for
    None, so a default of 1.0 can still be turned off from the command line.
    """
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        kind, optional_ = _base_type(hints[f.name])
        help_ = f.metadata.get("help", f.name)
        choices = f.metadata.get("choices")
        if typing.get_origin(kind) is tuple:
            default = None if f.default is None else [str(v) for v in f.default]
            flags.DEFINE_list(f.name, default, help_, flag_values=flag_values)
        elif kind is bool:
            flags.DEFINE_bool(f.name, f.default, help_, flag_values=flag_values)
        elif kind in _PARSERS:
            parser = _NoneOr(_PARSERS[kind]()) if optional_ else _PARSERS[kind]()
            serializer = flags.ArgumentSerializer()
            flags.DEFINE(parser, f.name, f.default, help_, flag_values, serializer)
        elif choices is not None:
            flags.DEFINE_enum(f.name, f.default, list(choices), help_, flag_values=flag_values)
        else:
            flags.DEFINE_string(f.name, f.default, help_, flag_values=flag_values)


def config_from_flags(config_cls, flag_values: flags.FlagValues = flags.FLAGS):
    """The Config the parsed flags describe (its own validation runs on construction)."""
    hints = typing.get_type_hints(config_cls)
    values = {}
    for f in dataclasses.fields(config_cls):
        value = flag_values[f.name].value
        kind, _ = _base_type(hints[f.name])
        if typing.get_origin(kind) is tuple and value is not None:
            element = typing.get_args(kind)[0]
            try:
                value = tuple(element(v) for v in value)
            except ValueError:
                raise ValueError(
                    f"{f.name}={','.join(value)} must be a list of {element.__name__}"
                ) from None
        values[f.name] = value
    return config_cls(**values)


def resume_key(config, may_change) -> dict:
    """The fields of ``config`` a resumed run must share with the run it resumes: all but the
    names in ``may_change`` (how long to train, what to print, where to run). The one shape of
    that rule; :func:`rnn_jax.rundir.open_run` compares it with the earlier run's."""
    unknown = set(may_change) - {f.name for f in dataclasses.fields(config)}
    if unknown:
        raise ValueError(f"may_change names {sorted(unknown)}, which are not fields of the config")
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in may_change}


def as_flags(message: str, names) -> str:
    """``message`` with every ``name=`` of a known parameter written as the flag ``--name=``."""
    pattern = "|".join(sorted(map(re.escape, names), key=len, reverse=True))
    return re.sub(rf"(?<![\w-])({pattern})=", r"--\1=", message) if pattern else message


# --- orbax's reports, kept off the terminal of a command-line run ------------------------------
# A damaged step or a failed save is reported by rnn_jax in one line. On the way, orbax and
# tensorstore log warnings, and leave reads and writes behind that report later through
# sys.unraisablehook and asyncio's logger. The command line owns its process and keeps them off
# stderr; the library changes nothing of the process.

_ORBAX_DIR = os.path.dirname(os.path.dirname(os.path.abspath(ocp.__file__)))
_ASYNCIO_DIR = os.path.dirname(os.path.abspath(asyncio.__file__))
# How tensorstore ends the text of every error it raises (orbax is its only user here).
_TENSORSTORE_SPEC = "[tensorstore_spec="


def _not_orbax(record: std_logging.LogRecord) -> bool:
    return not record.pathname.startswith(_ORBAX_DIR)


def is_orbax_orphan(unraisable) -> bool:
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


def keeps_asyncio_record(record: std_logging.LogRecord) -> bool:
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


def quiet_orbax() -> None:
    """Keeps orbax's log records, its orphaned reads' unraisable errors and asyncio's reports
    of its unretrieved tasks off stderr for the rest of this process; everything else passes."""
    logging.get_absl_logger().addFilter(_not_orbax)
    std_logging.getLogger("asyncio").addFilter(keeps_asyncio_record)
    previous = sys.unraisablehook

    def hook(unraisable):
        if not is_orbax_orphan(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook


DEFAULT_COMPILATION_CACHE = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
    os.path.expanduser("~"), ".cache", "rnn_jax", "jax"
)


def use_compilation_cache(directory: str | None) -> str | None:
    """Turns on JAX's persistent compilation cache in ``directory`` (None or ``"none"``: off);
    returns a line saying it runs without it where ``directory`` cannot be written, else None.

    Every compiled program is stored (the small ones add up), keyed by the program, the JAX and
    XLA versions and the device, so a rerun of an experiment (a resume, the same command
    again) loads them instead of compiling: the time to its first iteration falls several-fold
    (benchmarks/RESULTS.md). A stale or foreign entry is never used, only missed.
    """
    if directory is None or directory.lower() == "none":
        jax.config.update("jax_enable_compilation_cache", False)
        return
    if not directory:
        raise ValueError("compilation_cache='' is empty: pass a directory, or none")
    path = os.path.abspath(os.path.expanduser(directory))
    try:  # JAX would warn at every compile; one line here instead
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        jax.config.update("jax_enable_compilation_cache", False)
        return (
            f"running without the compilation cache: {directory!r} cannot be written "
            f"({e.strerror or e}); pass a writable directory, or none"
        )
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return None


# --- Ctrl-C and SIGTERM: stop at the next boundary, checkpoint, say how to resume -------------

STOP = threading.Event()  # set by the first SIGINT or SIGTERM of a command-line run
_EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}
_received: list[int] = []


def stop_requested() -> bool:
    """True once the process was asked to stop (``fit``'s ``interrupted``)."""
    return STOP.is_set()


class _Stopped(BaseException):
    """Raised by the signal handler where the run cannot stop at a boundary."""


def _stop_at_boundaries(interruptible: bool) -> None:
    """SIGINT and SIGTERM (a batch scheduler's) set :data:`STOP`, which an interruptible run
    reads at its next call boundary; a second signal, or one in a run without boundaries, stops
    at once."""

    def handler(signum, _frame):
        _received.append(signum)
        if STOP.is_set() or not interruptible:
            raise _Stopped
        STOP.set()

    for signum in _EXIT_STATUS:
        signal.signal(signum, handler)


def main(
    config_cls,
    run: Callable[[Any, str], Any],
    *,
    workdir: str | None,
    launch_cls=None,
    setup: Callable[[Any], None] | None = None,
    interruptible: bool = False,
) -> None:
    """Runs ``run(config_cls(**flags), flags.workdir)`` as a script (``if __name__ ...``).

    Args:
      config_cls: the experiment's frozen Config dataclass.
      run: ``(config, workdir) -> results``.
      workdir: the default of ``--workdir`` (None: the flag is required).
      launch_cls: optional dataclass of process-level flags (e.g. multi-host set-up) that are
        not part of the experiment's config; its instance is passed to ``setup`` first.
      setup: ``launch -> None``, run before ``run``.
      interruptible: ``run`` passes :func:`stop_requested` to ``fit`` (``interrupted``), so
        Ctrl-C and SIGTERM stop at the next call boundary with a checkpoint; otherwise they
        stop at once, keeping what was written before.
    """
    define_flags(config_cls)
    if launch_cls is not None:
        define_flags(launch_cls)
    flags.DEFINE_string("workdir", workdir, "Checkpoints, metrics and results; a rerun resumes.")
    flags.DEFINE_string(
        "compilation_cache",
        DEFAULT_COMPILATION_CACHE,
        "Directory of JAX's persistent compilation cache: a rerun loads its compiled programs "
        "instead of compiling them again ('none': off; $JAX_COMPILATION_CACHE_DIR, when set, "
        "is the default).",
    )
    names = [f.name for f in dataclasses.fields(config_cls)] + ["workdir", "compilation_cache"]
    if launch_cls is not None:
        names += [f.name for f in dataclasses.fields(launch_cls)]

    def entry(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
            quiet_orbax()
        _stop_at_boundaries(interruptible)
        try:
            without_cache = use_compilation_cache(flags.FLAGS.compilation_cache)
            if launch_cls is not None and setup is not None:
                setup(config_from_flags(launch_cls))
            config = config_from_flags(config_cls)
            if not flags.FLAGS.workdir:
                raise ValueError("workdir='' is empty: pass a directory for the results")
            if without_cache is not None:
                print(f"warning: {as_flags(without_cache, names)}", file=sys.stderr)
            run(config, flags.FLAGS.workdir)
        except USER_ERRORS as e:
            print(f"error: {as_flags(str(e), names)}", file=sys.stderr)
            sys.exit(1)
        except Interrupted as e:
            print(
                f"interrupted at step {e.step}; rerun the same command to resume", file=sys.stderr
            )
            sys.exit(_EXIT_STATUS[_received[0]])
        except (_Stopped, KeyboardInterrupt):
            print(
                "interrupted; what was written before is kept: rerun the same command to resume",
                file=sys.stderr,
            )
            sys.exit(_EXIT_STATUS[_received[0] if _received else signal.SIGINT])

    app.run(entry)
