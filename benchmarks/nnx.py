"""The NNX char-LM's overhead: one training step and one epoch through Flax NNX against the pure
engine, for the stateful char-LM of ``experiments.char_lm`` (``mode="stateful", layers=2``).

Run (about 1 min here; prints a table, writes benchmarks/nnx.json):
  taskset -c 1 env XLA_FLAGS=--xla_cpu_multi_thread_eigen=false .venv/bin/python benchmarks/nnx.py

The model is ``experiments.nnx_char_lm.LanguageModel`` (two ``rnn_jax.nnx.Recurrent`` layers
and an ``nnx.Linear`` head) and, for the pure engine, ``rnn_jax.language_model`` over a stack
of the same cells; both start from the same params and take the same updates (RMSprop, the
masked cross-entropy of ``bptt`` windows of contiguous streams, the carry passed on).
Contenders, interleaved round by round, wall clock of a call including its result's transfer
(``block_until_ready``), min and median over ``--repeats`` rounds after one call each to
compile:

- step, pure: ``rnn_jax.train.make_train_step`` (one jitted update).
- step, nnx.jit: ``nnx.jit`` of ``experiments.nnx_char_lm.train_step`` over the modules.
- step, split/merge: ``nnx.split`` once outside, ``jax.jit`` of a function that merges, updates
  and returns the new state.
- epoch, pure: ``rnn_jax.train.make_trainer`` over ``rnn_jax.batches.in_order`` (one compiled
  scan of every update), as ``experiments.char_lm`` trains.
- epoch, split/merge: ``experiments.nnx_char_lm.make_epoch`` (one compiled scan whose body
  merges the modules), as ``experiments.nnx_char_lm`` trains.
- epoch, nnx.jit loop: one ``nnx.jit`` call per update from Python (the window cut inside).
"""

import json
import os
import statistics
import sys
import time

if __package__ in (None, ""):  # run as a file: the repository's packages are importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax
import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

import rnn_jax
from benchmarks._common import XLA_SINGLE_THREAD, cpu_name, read_text
from experiments import char_lm, nnx_char_lm
from rnn_jax import data, optim, train
from rnn_jax.batches import in_order
from rnn_jax.losses import masked_cross_entropy
from rnn_jax.registry import named_cell

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed rounds.", lower_bound=1)
_CELL = flags.DEFINE_string("cell", "simple_rnn", "Cell (rnn_jax.registry).")
_UNITS = flags.DEFINE_integer("units", 128, "Hidden units.")
_OUT = flags.DEFINE_string(
    "out", os.path.join(_ROOT, "benchmarks", "nnx.json"), "Results file ('' none)."
)


def _pure_loss(model):
    """The stateful loss of ``experiments.char_lm``: per-stream masked cross-entropy."""

    def loss_fn(params, batch, carry):
        inputs, targets, mask = batch
        carry, logits = model.apply(params, inputs, carry)
        return masked_cross_entropy(logits, targets, mask), {}, carry

    return loss_fn


def _timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def main(_):
    config = char_lm.Config(mode="stateful", layers=2, cell=_CELL.value, units=_UNITS.value)
    text = read_text(None)
    vocab = data.Vocabulary.from_text(text)
    train_tokens, _ = data.split_tokens(
        vocab.encode(text), config.held_out_fraction(), config.seq_len
    )
    streams, num_windows = data.make_streams(train_tokens, config.batch_size, config.bptt)
    (batch, weights) = data.stream_batch(streams, jnp.asarray(0), config.bptt)
    tx = optim.rmsprop(config.learning_rate, config.rho, config.epsilon, config.eps_in_sqrt)

    # The pure engine, as experiments.char_lm builds it.
    cell = named_cell(config.cell, config.units, config.bptt)
    pure_model = rnn_jax.language_model(
        rnn_jax.stacked([rnn_jax.recurrent(cell) for _ in range(config.layers)]), vocab.size
    )
    params = nnx_char_lm.pure_init(config, vocab.size)
    zero = jax.tree.map(jnp.zeros_like, pure_model.apply(params, batch[0])[0])
    state = train.create_train_state(params, tx, jax.random.PRNGKey(1), carry=zero)
    loss_fn = _pure_loss(pure_model)
    pure_step = train.make_train_step(loss_fn, tx)
    get_batch = lambda s, k: data.stream_batch(s, k, config.bptt)
    pure_epoch = train.make_trainer(loss_fn, tx, in_order(get_batch, num_windows))

    # NNX: the modules, nnx.jit, and split/merge.
    model = nnx_char_lm.LanguageModel(
        config.cell, vocab.size, config.units, config.layers, config.bptt, rngs=nnx.Rngs(0)
    )
    nnx_char_lm.load_pure_params(model, params)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    carry0 = model.initial_carry(config.batch_size)
    nnx_step = nnx.jit(nnx_char_lm.train_step)
    graphdef, nnx_state = nnx.split((model, optimizer))

    @jax.jit
    def merged_step(nnx_state, carry, batch, weights):
        model, optimizer = nnx.merge(graphdef, nnx_state)
        carry, sums = nnx_char_lm.train_step(model, optimizer, carry, batch, weights)
        return nnx.state((model, optimizer)), carry, sums

    merged_epoch = nnx_char_lm.make_epoch(graphdef, num_windows, config.bptt)

    @nnx.jit
    def nnx_window_step(model, optimizer, carry, streams, k):
        batch, weights = data.stream_batch(streams, k, config.bptt)
        return nnx_char_lm.train_step(model, optimizer, carry, batch, weights)

    def nnx_loop_epoch():
        carry = carry0
        for k in range(num_windows):
            carry, sums = nnx_window_step(model, optimizer, carry, streams, k)
        return sums

    contenders = {
        "step, pure": lambda: pure_step(state, batch, weights)[1],
        "step, nnx.jit": lambda: nnx_step(model, optimizer, carry0, batch, weights)[1],
        "step, split/merge": lambda: merged_step(nnx_state, carry0, batch, weights)[2],
        "epoch, pure": lambda: pure_epoch(state, streams)[1],
        "epoch, split/merge": lambda: merged_epoch(nnx_state, streams, carry0)[2],
        "epoch, nnx.jit loop": nnx_loop_epoch,
    }
    # The same first update both ways (the NNX loss summed, the engine's averaged).
    pure_loss = float(pure_step(state, batch, weights)[1]["loss"])
    _, _, sums = merged_step(nnx_state, carry0, batch, weights)
    nnx_loss = float(sums["loss"] / sums["examples"])
    compile_seconds = {name: _timed(fn) for name, fn in contenders.items()}
    rounds = {name: [] for name in contenders}
    for _ in range(_REPEATS.value):
        for name, fn in contenders.items():
            rounds[name].append(_timed(fn))

    base = {"step": "step, pure", "epoch": "epoch, pure"}
    results = {}
    for name, seconds in rounds.items():
        ref = rounds[base[name.split(",")[0]]]
        results[name] = {
            "min_s": min(seconds),
            "median_s": statistics.median(seconds),
            "ratio_min": min(seconds) / min(ref),
            "ratio_median": statistics.median(seconds) / statistics.median(ref),
            "first_call_s": compile_seconds[name],
            "rounds_s": seconds,
        }
    print(
        f"char-LM, stateful, {config.layers} x {config.cell}({config.units}), batch "
        f"{config.batch_size}, bptt {config.bptt}, {num_windows} updates per epoch; "
        f"{cpu_name()}, {_REPEATS.value} rounds; first-update loss pure {pure_loss:.6f}, "
        f"NNX {nnx_loss:.6f}"
    )
    print(
        f"{'contender':22s} {'min s':>9s} {'median s':>9s} {'x pure (min)':>13s} "
        f"{'x pure (median)':>16s}"
    )
    for name, r in results.items():
        print(
            f"{name:22s} {r['min_s']:9.4f} {r['median_s']:9.4f} {r['ratio_min']:13.3f} "
            f"{r['ratio_median']:16.3f}"
        )
    if _OUT.value:
        record = {
            "command": "taskset -c 1 env XLA_FLAGS=--xla_cpu_multi_thread_eigen=false "
            ".venv/bin/python benchmarks/nnx.py",
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "single_threaded": XLA_SINGLE_THREAD in os.environ.get("XLA_FLAGS", ""),
            "affinity": sorted(os.sched_getaffinity(0)),
            "machine": cpu_name(),
            "jax": jax.__version__,
            "flax": flax.__version__,
            "config": {
                "cell": config.cell,
                "units": config.units,
                "layers": config.layers,
                "batch_size": config.batch_size,
                "bptt": config.bptt,
                "updates_per_epoch": num_windows,
            },
            "first_update_loss": {"pure": pure_loss, "nnx": nnx_loss},
            "repeats": _REPEATS.value,
            "results": results,
        }
        os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
        with open(_OUT.value, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
