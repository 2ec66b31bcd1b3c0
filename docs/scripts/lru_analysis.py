"""One-off analysis behind docs/gradients.md (not part of the library or its tests).

Run from the repository root: PYTHONPATH=. python docs/scripts/lru_analysis.py WORKDIR...

LRU after the copy T=500 runs: how many modes can carry a symbol across the delay, and which
parameters carry the gradient norm (the clip sees the whole of it)."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments import long_range as lr
from rnn_jax.gradients import global_norm
from rnn_jax.synthetic import TASKS

out = {}
for workdir in sys.argv[1:]:
    with open(f"{workdir}/results.json") as f:
        saved = json.load(f)
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in saved["config"].items()}
    config = lr.Config(**fields)
    (T,) = config.lengths
    task = TASKS[config.task](T)
    cell = lr.build_cell(config, "lru", task.length)
    model, _, initial, _, _ = lr.prepare(task, cell, config, steps=config.eval_every)
    trained = jax.tree.map(
        lambda a: a[-1], lr.load_params(lr.params_path(workdir, "lru", T), initial)
    )
    xs, ys = task.sample(jax.random.PRNGKey(123), 64)
    row = {}
    for phase, params in (("init", initial), ("trained", trained)):
        nu = np.asarray(params["rnn"]["nu_log"])  # (seeds, N)
        theta = np.asarray(params["rnn"]["theta_log"])
        modulus = np.exp(-np.exp(nu))
        keep = modulus**task.length  # what is left of a symbol after the whole sequence
        per_leaf = []
        for s in range(config.seeds):
            p = jax.tree.map(lambda a: a[s], params)
            g = jax.grad(lambda p: jnp.mean(task.loss(model.apply(p, xs), ys)))(p)
            per_leaf.append(
                {k: float(global_norm(v)) for k, v in g["rnn"].items()}
                | {"dense": float(global_norm(g["dense"])), "total": float(global_norm(g))}
            )
        row[phase] = {
            "modes_keeping_a_tenth": np.sum(keep > 0.1, axis=1).tolist(),
            "max_modulus": modulus.max(axis=1).round(5).tolist(),
            "median_phase": np.median(np.exp(theta), axis=1).round(3).tolist(),
            "grad_norms": {k: float(np.median([d[k] for d in per_leaf])) for k in per_leaf[0]},
        }
    out[workdir] = row
    print(workdir, json.dumps(row, indent=1))
os.makedirs("runs/memory_b", exist_ok=True)
with open("runs/memory_b/lru_analysis.json", "w") as f:
    json.dump(out, f, indent=1)
