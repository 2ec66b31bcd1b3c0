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

import contextlib
import dataclasses
import os
import re
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

import jax
from absl import app, flags, logging

from rnn_jax.checkpoint import CheckpointError
from rnn_jax.data import TextError
from rnn_jax.train import NonFiniteLossError
from rnn_jax.workdir import lock_workdir

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
        check=optional_positive,
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


def _type_problem(value, annotation) -> str | None:
    kind, optional_ = _base_type(annotation)
    if value is None:
        return None if optional_ else "must be set"
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


def as_flags(message: str, names) -> str:
    """``message`` with every ``name=`` of a known parameter written as the flag ``--name=``."""
    pattern = "|".join(sorted(map(re.escape, names), key=len, reverse=True))
    return re.sub(rf"(?<![\w-])({pattern})=", r"--\1=", message) if pattern else message


DEFAULT_COMPILATION_CACHE = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
    os.path.expanduser("~"), ".cache", "rnn_jax", "jax"
)


def use_compilation_cache(directory: str | None) -> None:
    """Turns on JAX's persistent compilation cache in ``directory`` (None or ``"none"``: off).

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
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.expanduser(directory)))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(
    config_cls,
    run: Callable[[Any, str], Any],
    *,
    workdir: str | None,
    launch_cls=None,
    setup: Callable[[Any], None] | None = None,
) -> None:
    """Runs ``run(config_cls(**flags), flags.workdir)`` as a script (``if __name__ ...``).

    Args:
      config_cls: the experiment's frozen Config dataclass.
      run: ``(config, workdir) -> results``.
      workdir: the default of ``--workdir`` (None: the flag is required).
      launch_cls: optional dataclass of process-level flags (e.g. multi-host set-up) that are
        not part of the experiment's config; its instance is passed to ``setup`` first.
      setup: ``launch -> None``, run before ``run``.
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
        try:
            use_compilation_cache(flags.FLAGS.compilation_cache)
            if launch_cls is not None and setup is not None:
                setup(config_from_flags(launch_cls))
            config = config_from_flags(config_cls)
            if not flags.FLAGS.workdir:
                raise ValueError("workdir='' is empty: pass a directory for the results")
            # One run per workdir, for all it writes (fit's own lock inside is the same one);
            # in a multi-host run process 0 holds it, as it writes the shared files.
            primary = jax.process_index() == 0
            with lock_workdir(flags.FLAGS.workdir) if primary else contextlib.nullcontext():
                run(config, flags.FLAGS.workdir)
        except USER_ERRORS as e:
            print(f"error: {as_flags(str(e), names)}", file=sys.stderr)
            sys.exit(1)

    app.run(entry)
