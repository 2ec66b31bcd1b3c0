"""Every experiment has the one shape: importable together, flags only from its Config."""

import dataclasses
import importlib
import inspect
import pkgutil

import pytest
from absl import flags

import experiments
from experiments import cli

# Every module of experiments/ but the command-line helper is an experiment.
NAMES = tuple(sorted(m.name for m in pkgutil.iter_modules(experiments.__path__) if m.name != "cli"))

# These run with every default (``python -m experiments.<name>`` alone); others, such as a
# comparison of earlier runs, may require a flag.
DEFAULT_RUNS = ("char_lm", "topologies", "long_range", "gradient_flow")


def test_the_experiments_are_found():
    assert set(DEFAULT_RUNS) <= set(NAMES)


@pytest.fixture(scope="module")
def modules():
    """Every experiment module, imported into this one process."""
    return {name: importlib.import_module(f"experiments.{name}") for name in NAMES}


def test_importing_every_experiment_defines_no_flags(modules):
    """Flags exist only under ``python -m``: importing a module defines none of its fields."""
    for name, module in modules.items():
        fields = {f.name for f in dataclasses.fields(module.Config)}
        defined = fields & set(flags.FLAGS)
        assert not defined, f"experiments.{name} defines {sorted(defined)} at import"


@pytest.mark.parametrize("name", NAMES)
def test_flags_from_config_round_trip(modules, name):
    """Each Config defines its flags into a FlagValues of its own, the flags' defaults parse
    back to ``Config()`` (where every field has a usable default), and ``run`` takes
    ``(config, workdir)``."""
    module = modules[name]
    assert dataclasses.is_dataclass(module.Config)
    assert module.Config.__dataclass_params__.frozen
    values = flags.FlagValues()
    cli.define_flags(module.Config, values)
    launch = getattr(module, "Launch", None)
    if launch is not None:  # process-level flags beside the config's, as cli.main defines them
        cli.define_flags(launch, values)
    assert "workdir" not in values  # cli.main defines --workdir beside them
    values(["prog"])
    if name in DEFAULT_RUNS:
        assert cli.config_from_flags(module.Config, values) == module.Config()
    assert list(inspect.signature(module.run).parameters)[:2] == ["config", "workdir"]


def test_every_flag_has_help(modules):
    for name, module in modules.items():
        for f in dataclasses.fields(module.Config):
            assert f.metadata.get("help"), f"experiments.{name}: Config.{f.name} has no help"


def test_compilation_cache_on_off_and_empty(tmp_path):
    """The persistent cache every experiment's command line turns on (``--compilation_cache``),
    restored afterwards: this process's tests do not use one."""
    import jax

    names = (
        "jax_enable_compilation_cache",
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    saved = {name: getattr(jax.config, name) for name in names}
    try:
        cli.use_compilation_cache(str(tmp_path / "cache"))
        assert jax.config.jax_enable_compilation_cache
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
        cli.use_compilation_cache("none")
        assert not jax.config.jax_enable_compilation_cache
        with pytest.raises(ValueError, match="compilation_cache='' is empty"):
            cli.use_compilation_cache("")
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)


def test_docstrings_survive_absl_help(modules):
    """absl prints a script's module docstring in --help after ``doc % ((argv[0],) * n)``
    (absl/app.py, ``usage``): a ``% s`` (as in ``10-90 % spread``) would come out as the
    program's path."""
    for name, module in modules.items():
        doc = module.__doc__ or ""
        specifiers = doc.count("%") - 2 * doc.count("%%")
        try:
            shown = doc % (("<PROGRAM>",) * specifiers)
        except (OverflowError, TypeError, ValueError):
            shown = doc  # absl shows it as it is
        assert "<PROGRAM>" not in shown, f"experiments.{name}"
