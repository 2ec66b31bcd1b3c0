"""The char-RNN experiment end to end, in process: the recipe's defaults, exact resume, every
bad input, Alice; and its command line (one bad flag, --helpshort) in a subprocess."""

import dataclasses
import math
import os
import re
import shutil

import jax
import numpy as np
import pytest
from helpers import assert_bit_identical, snapshot, tiny_text

from experiments import char_lm, cli
from rnn_jax import checkpoint, loop, rundir, train
from rnn_jax.data import TextError, clean_text, read_corpus
from rnn_jax.workdir import WorkdirError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The project's reference facts, in the repository (docs/DESIGN.md); the copy beside the
# checkout, where there is one, must state the same recipe.
DESIGN = os.path.join(ROOT, "docs", "DESIGN.md")
SHARED_DESIGN = os.path.join(ROOT, "..", "shared", "DESIGN.md")
TINY = dict(units=8, batch_size=64, num_preds=12)


@pytest.fixture(scope="module")
def text_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_text(tiny_text())
    return str(path)


def _quiet(*_):
    pass


def _strip_timing(history):
    return [
        {
            k: v
            for k, v in h.items()
            if k not in ("seconds", "compile_seconds", "examples_per_second")
        }
        for h in history
    ]


# --- The defaults are the tutorial's recipe, as DESIGN.md §1-2 states it ----------------------

# Where §1-2 state each default: (pattern, its value from the match); \s+ where a line may
# break. Rewording the document or changing a default breaks the test.
RECIPE = {
    "cell": (r"Model:\s+`(SimpleRNN)\(\d+\)`", lambda m: {"SimpleRNN": "simple_rnn"}[m[1]]),
    "units": (r"Model:\s+`SimpleRNN\((\d+)\)`", lambda m: int(m[1])),
    "seq_len": (r"`SEQLEN\s+=\s+(\d+)`", lambda m: int(m[1])),
    "step": (r"`STEP\s+=\s+(\d+)`", lambda m: int(m[1])),
    "batch_size": (r"with\s+batch\s+(\d+)", lambda m: int(m[1])),
    "iterations": (r"Training:\s+(\d+)\s+iterations", lambda m: int(m[1])),
    "epochs_per_iteration": (r"each\s+`fit`\s+for\s+(\d+)\s+epoch", lambda m: int(m[1])),
    "num_preds": (r"(\d+)\s+times:\s+predict", lambda m: int(m[1])),
    "temperature": (r"take\s+the\s+argmax\s+\((greedy)\)", lambda m: 0.0),
    "learning_rate": (r"RMSprop:\s+learning\s+rate\s+([0-9.e-]+),", lambda m: float(m[1])),
    "rho": (r"`rho\s+=\s+([0-9.]+)`", lambda m: float(m[1])),
    "epsilon": (r"`epsilon\s+=\s+([0-9.e-]+)`", lambda m: float(m[1])),
    "eps_in_sqrt": (
        r"Keras\s+3\s+adds\s+epsilon\s+\*\*(inside|outside)\*\*[\s\S]*defaulting\s+to\s+(Keras\s+3)",
        lambda m: m[1] == "inside",
    ),
}
RECIPE_VALUES = dict(
    cell="simple_rnn",
    units=128,
    seq_len=10,
    step=1,
    batch_size=128,
    iterations=25,
    epochs_per_iteration=1,
    num_preds=100,
    temperature=0.0,
    learning_rate=1e-3,
    rho=0.9,
    epsilon=1e-7,
    eps_in_sqrt=True,
)


def _recipe(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read().split("## 3.")[0]  # §1-2


def test_defaults_are_the_recipe_of_design_md():
    config = char_lm.Config()
    want = dict(RECIPE_VALUES)
    recipe = _recipe(DESIGN)
    if os.path.exists(SHARED_DESIGN):
        assert _recipe(SHARED_DESIGN) == recipe, "docs/DESIGN.md §1-2 differ from the reference"
    stated = {}
    for name, (pattern, value) in RECIPE.items():
        match = re.search(pattern, recipe)
        assert match, f"docs/DESIGN.md §1-2 no longer states {name} as {pattern!r}"
        stated[name] = value(match)
    assert stated == want  # the regexes read what the document says
    got = {name: getattr(config, name) for name in want}
    assert got == want
    for name in ("eps_in_sqrt",):  # a bool must stay a bool, not 1
        assert type(getattr(config, name)) is bool
    assert config.text is None and config.clip_norm is None and config.seed_text is None


# --- Config: every bad value is a ValueError naming name=value, before anything runs ----------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(cell="transformer"), "cell='transformer'"),
        (dict(units=0), "units=0 "),
        (dict(units=1.5), "units=1.5 "),
        (dict(seq_len=0), "seq_len=0 "),
        (dict(step=-1), "step=-1 "),
        (dict(batch_size=0), "batch_size=0 "),
        (dict(iterations=0), "iterations=0 "),
        (dict(epochs_per_iteration=0), "epochs_per_iteration=0 "),
        (dict(num_preds=0), "num_preds=0 "),
        (dict(learning_rate=0.0), "learning_rate=0.0 "),
        (dict(learning_rate=float("nan")), "learning_rate=nan "),
        (dict(rho=1.0), "rho=1.0 "),
        (dict(epsilon=float("inf")), "epsilon=inf "),
        (dict(epsilon=0.0), "epsilon=0.0 "),
        (dict(eps_in_sqrt=1), "eps_in_sqrt=1 "),
        (dict(clip_norm=-1.0), "clip_norm=-1.0 "),
        (dict(clip_norm=0.0), "clip_norm=0.0 "),
        (dict(clip_norm=float("inf")), "clip_norm=inf "),
        (dict(seed=0.5), "seed=0.5 "),
        (dict(val_fraction=1.5), "val_fraction=1.5 "),
        (dict(corpus="shakespeare"), "corpus='shakespeare': 'shakespeare' is not one of"),
        (dict(cleaning="upper"), "cleaning='upper': 'upper' is not one of"),
        (dict(temperature=-0.5), "temperature=-0.5 "),
        (dict(temperature=float("nan")), "temperature=nan "),
        (dict(unroll=-1), "unroll=-1 "),
        (dict(num_devices=-2), "num_devices=-2 "),
        (dict(compute_dtype="float16"), "compute_dtype='float16'"),
        (dict(text=""), "text='' "),
        (dict(seed_text="abc"), "seed_text='abc' has 3 characters.*seq_len=10"),
        (dict(optimizer="sgd"), "optimizer='sgd': 'sgd' is not one of"),
        (dict(weight_decay=0.1), "weight_decay=0.1 needs optimizer='adamw'"),
        (dict(warmup_steps=5, decay_steps=5), "decay_steps=5 must be larger than warmup_steps=5"),
        (dict(beta2=1.0), "beta2=1.0 "),
        (dict(steps_per_iteration=0), "steps_per_iteration=0 "),
        (
            dict(steps_per_iteration=10, epochs_per_iteration=2),
            "steps_per_iteration=10 and epochs_per_iteration=2 both set",
        ),
        (dict(max_train_seconds=0.0), "max_train_seconds=0.0 "),
        (dict(val_block=64), "val_block=64 needs mode='stateful'"),
        (dict(keep_best=True, val_fraction=0.0), "keep_best=True needs a held-out text"),
        (dict(sample_temperatures=(0.5, 0.0)), "sample_temperatures=(0.5, 0.0) "),
    ],
)
def test_bad_config_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match="^" + re.escape(message).replace(r"\.\*", ".*")):
        char_lm.Config(**kwargs)


def test_resume_key_leaves_the_new_fields_out_at_their_defaults():
    """A checkpoint written before the optimiser, schedule and iteration-length fields existed
    holds a key without them: the defaults' key is that key, so it resumes; set, they are in
    it (a change is refused), and the fields of the optimiser not in use are left out."""
    added = {"optimizer", "weight_decay", "warmup_steps", "decay_steps", "final_lr_fraction"}
    added |= {"steps_per_iteration", "beta1", "beta2", "max_train_seconds", "val_block"}
    added |= {"keep_best", "sample_chars", "sample_temperatures", "weight_drop"}
    assert not added & set(char_lm.Config().resume_key())
    assert {"rho", "eps_in_sqrt"} <= set(char_lm.Config().resume_key())
    adamw = char_lm.Config(
        mode="stateful", optimizer="adamw", weight_decay=0.1, warmup_steps=2, decay_steps=9
    ).resume_key()
    assert {k: adamw[k] for k in ("optimizer", "weight_decay", "warmup_steps", "decay_steps")} == {
        "optimizer": "adamw",
        "weight_decay": 0.1,
        "warmup_steps": 2,
        "decay_steps": 9,
    }
    assert {"beta1", "beta2", "final_lr_fraction"} <= set(adamw)
    assert not {"rho", "eps_in_sqrt"} & set(adamw)
    # Dropout between layers is new for two layers: such a run's key says so.
    two = char_lm.Config(mode="stateful", layers=2, dropout=0.25).resume_key()
    assert two["dropout"] == {"rate": 0.25, "between_layers": True}
    assert char_lm.Config(mode="stateful", weight_drop=0.3).resume_key()["weight_drop"] == 0.3


def test_launch_flags():
    assert char_lm.Launch() == char_lm.Launch(False, None, None, None)
    char_lm.setup(char_lm.Launch())  # not distributed: nothing to join
    with pytest.raises(ValueError, match=r"^num_processes=2 is only used with distributed=True"):
        char_lm.Launch(num_processes=2)
    with pytest.raises(ValueError, match=r"^process_id=-1 "):
        char_lm.Launch(distributed=True, process_id=-1)


# --- The run end to end, in process -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, text_path):
    """Two iterations on the tiny text: ``(workdir, result, printed lines)``."""
    workdir = str(tmp_path_factory.mktemp("tiny") / "run")
    lines = []
    result = char_lm.run(
        char_lm.Config(text=text_path, iterations=2, **TINY), workdir, out=lines.append
    )
    return workdir, result, lines


def test_run_end_to_end(tiny_run):
    workdir, (state, history, vocab), lines = tiny_run
    text = clean_text(tiny_text().encode())
    assert vocab.chars == "".join(sorted(set(text)))
    assert [r["iteration"] for r in history] == [1, 2]
    assert "Iteration #: 1" in lines and "Iteration #: 2" in lines
    trained = int(len(text) * 0.95)  # a text file's default val_fraction holds out 5%
    steps_per_epoch = -(-(trained - 10) // 64)  # windows of 10 with step 1, batch 64
    assert int(state.step) == history[-1]["step"] == 2 * steps_per_epoch
    assert {"val_loss", "val_bits_per_char"} <= set(history[-1])
    for r in history:
        assert {
            "loss",
            "accuracy",
            "bits_per_char",
            "seconds",
            "examples_per_second",
            "seed",
            "generated",
            "grad_norm_max",
        } <= set(r)
        assert r["bits_per_char"] == pytest.approx(r["loss"] / math.log(2))
        assert len(r["seed"]) == 10 and len(r["generated"]) == 12
        assert f'Generating from seed: "{r["seed"]}"' in lines
        assert r["seed"] + r["generated"] in lines  # the tutorial's print: seed then generation
    assert history[1]["loss"] < history[0]["loss"] < math.log(vocab.size)
    assert rundir.read_history(workdir) == history
    with open(os.path.join(workdir, "samples.txt")) as f:
        assert f.read() == "".join(
            f"iteration {r['iteration']}  loss {r['loss']:.4f}\n{r['seed']}|{r['generated']}\n\n"
            for r in history
        )
    # Checkpoints are indexed by optimiser step.
    assert checkpoint.latest_step(os.path.join(workdir, "checkpoints")) == history[-1]["step"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, text_path):
    """An uninterrupted 3-iteration run."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    return char_lm.run(char_lm.Config(text=text_path, iterations=3, **TINY), workdir, out=_quiet)


def test_resumed_run_is_bit_identical(tiny_run, reference, text_path, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(tiny_run[0], workdir)
    lines = []
    state, history, _ = char_lm.run(
        char_lm.Config(text=text_path, iterations=3, **TINY), workdir, out=lines.append
    )
    assert "Iteration #: 3" in lines and "Iteration #: 2" not in lines  # only 3 was trained
    assert [h["iteration"] for h in history] == [1, 2, 3]  # the whole history comes back
    assert history[:2] == tiny_run[1].history
    assert_bit_identical(state, reference.state)
    assert _strip_timing(history) == _strip_timing(reference.history)
    with open(os.path.join(workdir, "samples.txt")) as f:
        assert f.read().count("iteration ") == 3  # samples.txt holds the resumed rows too


def _refused(tiny_run, tmp_path, config):
    workdir = str(tmp_path / "run")
    shutil.copytree(tiny_run[0], workdir)
    before = snapshot(workdir)
    with pytest.raises(WorkdirError) as e:  # its run.json records another configuration
        char_lm.run(config, workdir, out=_quiet)
    assert snapshot(workdir) == before, "the refused run changed the existing workdir"
    return cli.as_flags(str(e.value), [f.name for f in dataclasses.fields(char_lm.Config)])


def test_checkpoint_with_other_config_is_refused(tiny_run, text_path, tmp_path):
    config = char_lm.Config(text=text_path, iterations=3, **{**TINY, "units": 16})
    message = _refused(tiny_run, tmp_path, config)
    assert "--units=16 differs from the earlier 8" in message and "workdir" in message


def test_checkpoint_with_other_vocabulary_is_refused(tiny_run, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("Zebras quietly jump over the lazy fox. " * 40)
    message = _refused(tiny_run, tmp_path, char_lm.Config(text=str(other), iterations=3, **TINY))
    assert "--text=" in message and "vocabulary" in message, message


# --- Bad input at run time: a message naming the field, nothing written ------------------------


def test_bad_text_files_name_the_text(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    binary = tmp_path / "weights.bin"
    binary.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    short = tmp_path / "short.txt"
    short.write_text("Too short\n")
    cases = [
        (tmp_path / "missing.txt", "does not exist"),
        (tmp_path, "is a directory"),
        (empty, "is empty"),
        (binary, "binary"),
        (short, r"has 9 characters after cleaning, fewer than seq_len=10 \+ 1"),
    ]
    workdir = tmp_path / "run"
    for path, what in cases:
        with pytest.raises(TextError, match=f"^text={re.escape(repr(str(path)))} .*{what}"):
            char_lm.run(char_lm.Config(text=str(path), **TINY), str(workdir), out=_quiet)
    assert not workdir.exists()


def test_nan_loss_names_the_learning_rate(text_path, tmp_path):
    config = char_lm.Config(text=text_path, learning_rate=1e38, **TINY)
    with pytest.raises(loop.NonFiniteLossError, match=r"iteration 1: .*NaN.*learning_rate=1e\+38"):
        char_lm.run(config, str(tmp_path), out=_quiet)
    assert checkpoint.latest_step(os.path.join(tmp_path, "checkpoints")) is None


def test_seed_text_outside_vocabulary_names_the_field(text_path, tmp_path):
    config = char_lm.Config(text=text_path, seed_text="the sky was falling?", **TINY)
    with pytest.raises(ValueError, match=r"^seed_text='the sky was falling\?': .*'\?'"):
        char_lm.run(config, str(tmp_path / "run"), out=_quiet)
    assert not (tmp_path / "run").exists()


def test_seed_text_is_lower_cased_as_the_corpus(text_path):
    config = char_lm.Config(text=text_path, seed_text="Alice SAW the Rabbit", iterations=1, **TINY)
    (row,) = char_lm.run(config, None, out=_quiet).history
    assert row["seed"] == "the rabbit"  # the last seq_len characters, lower-cased


def test_workdir_that_is_a_file(text_path, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("my notes")
    with pytest.raises(WorkdirError, match=r"^workdir=.* is a file"):
        char_lm.run(char_lm.Config(text=text_path, **TINY), str(a_file), out=_quiet)
    assert a_file.read_text() == "my notes"


def test_nan_keeps_last_good_checkpoint_and_resume_recovers(
    reference, text_path, tmp_path, monkeypatch
):
    real = train.make_trainer

    def poisoned(*args, **kwargs):
        trainer, calls = real(*args, **kwargs), []
        run_part = trainer.run

        def run(state, data, first, count):
            calls.append(1)
            if len(calls) == 3:  # a parameter goes bad during iteration 3 (one call an epoch)
                params = jax.tree.map(lambda p: p.at[(0,) * p.ndim].set(np.nan), state.params)
                state = state._replace(params=params)
            return run_part(state, data, first, count)

        trainer.run = run
        return trainer

    workdir = str(tmp_path)
    config = char_lm.Config(text=text_path, iterations=3, **TINY)
    monkeypatch.setattr(train, "make_trainer", poisoned)
    with pytest.raises(loop.NonFiniteLossError, match=r"iteration 3.*last good checkpoint"):
        char_lm.run(config, workdir, out=_quiet)
    monkeypatch.setattr(train, "make_trainer", real)

    ckpt = os.path.join(workdir, "checkpoints")
    step_2 = 2 * int(reference.state.step) // 3  # the end of iteration 2
    assert checkpoint.latest_step(ckpt) == step_2
    restored, meta = checkpoint.restore_checkpoint(ckpt, step_2, reference.state)
    assert int(restored.step) == step_2
    assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(restored.params))
    assert meta["config"]["units"] == 8 and "text" in meta["config"]
    assert [r["iteration"] for r in rundir.read_history(workdir)] == [1, 2]

    state, history, _ = char_lm.run(config, workdir, out=_quiet)
    assert [h["iteration"] for h in history] == [1, 2, 3]
    assert_bit_identical(state, reference.state)
    assert _strip_timing(history) == _strip_timing(reference.history)


# --- What is read: a named corpus or a file, with its cleaning and held-out tail ---------------


def test_corpus_text_cleaning_and_held_out_tail_resolve(text_path, shakespeare_path):
    alice = char_lm.Config()
    assert (alice.source().name, alice.text_cleaning(), alice.held_out_fraction()) == (
        "alice",
        "tutorial",
        0.05,
    )
    own = char_lm.Config(text=text_path)
    assert (own.source(), own.text_cleaning(), own.held_out_fraction()) == (None, "tutorial", 0.05)
    plays = char_lm.Config(corpus="tiny_shakespeare", text=shakespeare_path)
    assert (plays.text_cleaning(), plays.held_out_fraction()) == ("none", 0.1)
    assert plays.resume_key()["val_fraction"] == 0.1 and "corpus" not in plays.resume_key()
    with open(shakespeare_path, encoding="utf-8") as f:
        assert char_lm.load_config_text(plays, _quiet) == f.read()
    with pytest.raises(TextError, match=r"^text='.*tiny\.txt' has sha256 [0-9a-f]{64}, not tiny"):
        char_lm.load_config_text(char_lm.Config(corpus="tiny_shakespeare", text=text_path))


def test_a_cased_text_is_read_and_seeded_cased(text_path):
    config = char_lm.Config(
        text=text_path, cleaning="cased", seed_text="Alice SAW the Rabbit", iterations=1, **TINY
    )
    _, history, vocab = char_lm.run(config, None, out=_quiet)
    with open(text_path, "rb") as f:
        assert vocab.chars == "".join(sorted(set(clean_text(f.read(), "cased"))))
    assert "A" in vocab.chars and "a" in vocab.chars
    assert history[0]["seed"] == "the Rabbit"


# --- The tutorial's recipe on the alice corpus (the default text) --------------------------------


@pytest.mark.usefixtures("alice_path")  # skips where the corpus cannot be obtained
def test_alice_loss_falls():
    lines = []
    _, history, vocab = char_lm.run(
        char_lm.Config(iterations=2, num_preds=20), None, out=lines.append
    )
    assert lines[0].startswith(f"{len(read_corpus('alice'))} characters")
    first, second = history[0]["loss"], history[1]["loss"]
    assert 40 <= vocab.size <= 70
    assert first < math.log(vocab.size)  # learned something during epoch 1
    assert second < first - 0.1
    assert second < 2.3
    assert "Iteration #: 2" in lines


# --- The command line: one bad flag, the flag list ------------------------------------------


def test_command_line(tmp_path, start_experiment):
    bad = start_experiment("char_lm", f"--workdir={tmp_path / 'run'}", "--clip_norm=-1")
    listed = start_experiment("char_lm", "--helpshort")
    bad.stdout, bad.stderr = bad.communicate(timeout=900)
    listed.stdout, listed.stderr = listed.communicate(timeout=900)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr == "error: --clip_norm=-1.0 must be finite and > 0\n"
    assert not (tmp_path / "run").exists()
    assert listed.stderr == ""  # absl's help exits with status 1
    listed_flags = set(re.findall(r"^\s+--(?:\[no\])?(\w+):", listed.stdout, re.MULTILINE))
    fields = dataclasses.fields(char_lm.Config) + dataclasses.fields(char_lm.Launch)
    missing = {f.name for f in fields} - listed_flags
    assert not missing, f"--helpshort does not list {sorted(missing)}:\n{listed.stdout}"
    assert "workdir" in listed_flags
