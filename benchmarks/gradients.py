"""Gradient tools against the naive ways: the one-pass probe at T=1000; 8 seeds vmapped vs loops.

Run (pinned to one core, single-threaded XLA, as in benchmarks/GRADIENTS.md):
  taskset -c 0 env XLA_FLAGS=--xla_cpu_multi_thread_eigen=false \
    .venv/bin/python -m benchmarks.gradients
(~4 min here). Contenders run in the same process, interleaved, each compiled and warmed up
and checked to agree first; the table gives the min and median of --repeats calls, in wall
seconds and in CPU seconds of this process (the machine is shared: CPU time is what other
jobs disturb least), and the speed-up over each later contender. Results also go to
benchmarks/out/gradients.json.

1. ``‖∂L/∂h_t‖`` for all t of an LSTM(32) over T=1000 steps (batch 4, loss on the last
   output): :func:`rnn_jax.gradients.carry_gradient_norms` (one backward pass through the
   zero perturbations) against one backward pass per step (``jax.grad`` of the loss with
   respect to ``h_t``, the T passes mapped over t inside one compiled program; each pass runs the
   full-length scan with the steps before t masked, O(T²) in all; a pass that ran only the
   suffix would halve that).
2. The adding problem (T=50, LSTM(32), 200 Adam steps, batch 32 and 8), 8 seeds: in one
   ``jax.vmap``-ed program (:func:`rnn_jax.sweep.make_task_trainer`); a Python loop calling the
   single-seed compiled program (the whole run one ``lax.scan``) once per seed; and a Python
   loop over seeds and steps calling a jitted train step (:func:`rnn_jax.make_train_step`).
   Throughput in seed-steps per CPU second.
"""

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

from rnn_jax import cells, gradients
from rnn_jax.models import dense, dense_init
from rnn_jax.optim import clipped
from rnn_jax.sweep import make_task_trainer
from rnn_jax.synthetic import adding_batch, adding_problem
from rnn_jax.train import create_train_state, make_train_step

_T = flags.DEFINE_integer("time", 1000, "Sequence length for the probe benchmark.")
_UNITS = flags.DEFINE_integer("units", 32, "LSTM units.")
_SEEDS = flags.DEFINE_integer("seeds", 8, "Seeds in the sweep benchmark.")
_STEPS = flags.DEFINE_integer("steps", 200, "Training steps in the sweep benchmark.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["32", "8"], "Batch sizes of the sweep benchmark.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per contender.")
_OUT = flags.DEFINE_string("out", "benchmarks/out/gradients.json", "Where results are written.")


def naive_norms(cell, params, xs, loss_fn):
    """``‖∂L/∂h_t‖`` by one backward pass per step t: ``(time, batch)`` (h part of the carry)."""
    zs = cell.project(params, jnp.swapaxes(xs, 0, 1))
    time_steps = zs.shape[0]
    steps = jnp.arange(time_steps)

    def forward(carry, z):
        carry, _ = cell.recur(params, carry, z)
        return carry, carry

    _, after = jax.lax.scan(forward, cell.initial_carry(xs.shape[0]), zs)

    def norm_at(t):
        def rest(h_t):
            def body(carry, inputs):
                s, z = inputs
                new, _ = cell.recur(params, carry, z)
                return jax.tree.map(lambda n, o: jnp.where(s > t, n, o), new, carry), None

            final, _ = jax.lax.scan(body, h_t, (steps, zs))
            return jnp.sum(loss_fn(cell.hidden(final)))

        grad = jax.grad(rest)(jax.tree.map(lambda c: c[t], after))
        return gradients.norm(cell.hidden(grad))

    return jax.lax.map(norm_at, steps)


def _timed(fn, *args):
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - wall, time.process_time() - cpu


def _interleaved(contenders, repeats):
    """``{name: [(wall, cpu), ...]}``, the contenders called in turn ``repeats`` times."""
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, (fn, args) in contenders.items():
            times[name].append(_timed(fn, *args))
    return times


def probe_benchmark(length, units, repeats):
    cell = cells.lstm(units)
    key = jax.random.PRNGKey(0)
    params = cell.init(key, 2)
    head = dense_init(jax.random.PRNGKey(1), units, 1)
    xs, targets = adding_batch(jax.random.PRNGKey(2), 4, length)

    def loss_fn(y):
        return (dense(head, y)[:, 0] - targets) ** 2

    probe = jax.jit(
        lambda p, x: cell.hidden(gradients.carry_gradient_norms(cell, p, x, loss_fn)[1])
    )
    naive = jax.jit(lambda p, x: naive_norms(cell, p, x, loss_fn))
    fast, slow = probe(params, xs), naive(params, xs)  # compile, warm up, and agree
    np.testing.assert_allclose(fast, slow.T, rtol=1e-4, atol=1e-30)
    times = _interleaved(
        {
            "probe (one pass)": (probe, (params, xs)),
            "naive (one pass per step)": (naive, (params, xs)),
        },
        repeats,
    )
    return times, f"LSTM({units}), T={length}, batch 4", length, "gradient norms/s"


def sweep_benchmark(seeds, steps, batch_size, repeats):
    """The three ways to train ``seeds`` seeds; the last is the reference for the speed-up."""
    task = adding_problem(50)
    cell = cells.lstm(32)
    model, train = make_task_trainer(
        cell,
        task,
        optimizer=optax.adam(1e-2),
        num_steps=steps,
        eval_every=steps,
        batch_size=batch_size,
    )
    params = jax.vmap(model.init)(jax.random.split(jax.random.PRNGKey(0), seeds))
    keys = jax.random.split(jax.random.PRNGKey(1), seeds)
    test = task.sample(jax.random.PRNGKey(2), 256)
    vmapped = jax.jit(jax.vmap(train, in_axes=(0, 0, None, None, None)))
    one = jax.jit(train)
    rows = [jax.tree.map(lambda a: a[s], params) for s in range(seeds)]

    def loop(params_list, keys):
        return [one(p, k, 1.0, *test) for p, k in zip(params_list, keys)]

    # What a user writes without the fused trainer: a jitted step called from Python, the
    # same updates on the same batches. The trainer runs its steps as one call of
    # rnn_jax.train.scan_updates (eval_every = steps), which splits the key into (next key,
    # plan key) and draws step i's batch from split(plan key, steps)[i].
    optimizer = clipped(optax.adam(1e-2), 1.0)

    def loss_fn(p, batch):
        return task.loss(model.apply(p, batch[0]), batch[1]), {}

    train_step = make_train_step(loss_fn, optimizer)
    sample = jax.jit(task.sample, static_argnums=1)
    test_loss = jax.jit(lambda p: jnp.mean(task.loss(model.apply(p, test[0]), test[1])))

    def step_loop(params_list, keys):
        finals = []
        for p, key in zip(params_list, keys):
            _, plan_key = jax.random.split(key)
            state = create_train_state(p, optimizer, key)
            first = test_loss(p)  # the trainer's two test evaluations, for equal work
            for batch_key in jax.random.split(plan_key, steps):
                state, _ = train_step(state, sample(batch_key, batch_size))
            finals.append((state.params, first, test_loss(state.params)))
        return finals

    together = vmapped(params, keys, 1.0, *test)
    apart = loop(rows, keys)
    stepped = step_loop(rows, keys)
    for s in range(seeds):  # the same runs, up to float rounding
        np.testing.assert_allclose(together[1].test_loss[s], apart[s][1].test_loss, rtol=1e-3)
        np.testing.assert_allclose(
            apart[s][0]["dense"]["kernel"], stepped[s][0]["dense"]["kernel"], rtol=1e-3, atol=1e-5
        )
    times = _interleaved(
        {
            f"{seeds} seeds in one vmap": (vmapped, (params, keys, 1.0, *test)),
            "Python loop over seeds, each one compiled scan": (loop, (rows, keys)),
            "Python loop over seeds and steps (jitted step)": (step_loop, (rows, keys)),
        },
        repeats,
    )
    what = f"adding T=50, LSTM(32), batch {batch_size}, {steps} Adam steps × {seeds} seeds"
    return times, what, seeds * steps, "seed-steps/s"


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # JAX's INFO lines would interleave the table
    pinned = {
        "affinity": sorted(os.sched_getaffinity(0)),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
    }
    if len(pinned["affinity"]) != 1 or "multi_thread_eigen=false" not in pinned["XLA_FLAGS"]:
        print(
            "warning: not pinned; run under `taskset -c 0 env "
            "XLA_FLAGS=--xla_cpu_multi_thread_eigen=false` for comparable numbers"
        )
    results = {"pinned": pinned, "jax": jax.__version__}
    lines = [
        "| benchmark | contender | wall min / median s | CPU min / median s "
        "| throughput (CPU median) | speed-up (CPU median) |",
        "|---|---|---|---|---|---|",
    ]
    runs = [("probe", probe_benchmark(_T.value, _UNITS.value, _REPEATS.value))]
    for batch_size in _BATCH_SIZES.value:
        runs.append(
            ("sweep", sweep_benchmark(_SEEDS.value, _STEPS.value, int(batch_size), _REPEATS.value))
        )
    for label, (times, what, work, unit) in runs:
        names = list(times)
        cpu = {n: statistics.median(c for _, c in times[n]) for n in names}
        for name in names:
            walls = [w for w, _ in times[name]]
            cpus = [c for _, c in times[name]]
            lines.append(
                f"| {label}: {what} | {name} | {min(walls):.3f} / {statistics.median(walls):.3f} "
                f"| {min(cpus):.3f} / {cpu[name]:.3f} | {work / cpu[name]:.0f} {unit} "
                f"| {' / '.join(f'{cpu[ref] / cpu[name]:.2f}×' for ref in names[1:])} |"
            )
        results.setdefault(label, []).append({"what": what, "times": times})
    table = "\n".join(lines)
    print(table)
    results["table"] = table
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)
