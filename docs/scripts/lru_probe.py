"""One-off experiment behind docs/gradients.md (not part of the library or its tests): does a
smaller learning rate for LRU's nu/theta (or a smaller initial phase) stop the clipping?

Run from the repository root: PYTHONPATH=. python docs/scripts/lru_probe.py [STEPS]
"""

import dataclasses
import json
import math
import os
import sys
import time

import numpy as np

from experiments import long_range as lr
from rnn_jax.linear import lru
from rnn_jax.synthetic import TASKS

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 200
out = []
for task_name, T in [("adding", 1000), ("copy", 500)]:
    base = lr.Config(
        task=task_name,
        cells=("lru",),
        lengths=(T,),
        seeds=3,
        steps=steps,
        eval_every=50,
        test_size=256,
        clip_norm=1.0,
        compare_unclipped=False,
        learning_rate=0.01,
    )
    task = TASKS[task_name](T)
    for label, factors, phase in [
        ("base", (), 2 * math.pi),
        ("lr0.5", ("nu_log=0.5", "theta_log=0.5"), 2 * math.pi),
        ("lr0.1", ("nu_log=0.1", "theta_log=0.1"), 2 * math.pi),
        ("phase_pi/10", (), math.pi / 10),
        ("phase_pi/10+lr0.5", ("nu_log=0.5", "theta_log=0.5"), math.pi / 10),
    ]:
        config = dataclasses.replace(base, lr_factors=factors)
        tic = time.perf_counter()
        params, curves = lr.train_seeds(task, lru(32, max_phase=phase), config)
        g = np.asarray(curves.grad_norm[-1])
        t = np.asarray(curves.test_loss[-1])
        row = dict(
            task=task_name,
            T=T,
            config=label,
            steps=steps,
            grad_median=float(np.median(g)),
            frac_above_clip=float(np.mean(g > 1.0)),
            test_final=np.median(t[:, -1]).item(),
            test_curve_median=np.median(t, 0).round(4).tolist(),
            baseline=task.baseline,
            seconds=time.perf_counter() - tic,
        )
        print(json.dumps(row), flush=True)
        out.append(row)
os.makedirs("runs/memory_b", exist_ok=True)
with open("runs/memory_b/lru_probe.json", "w") as f:
    json.dump(out, f)
