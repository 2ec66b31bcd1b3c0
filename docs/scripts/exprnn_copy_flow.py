"""The figure of docs/gradients.md's expRNN copy probes: ‖∂L/∂h_t‖ / ‖∂L/∂h_T‖ against t, L the
recall's cross-entropy, for expRNN at initialisation and trained with its paper's recipe or with
the comparison's (Adam 1e-2, clip 1), from experiments.gradient_flow workdirs (--trained_from a
copy sweep). Run from the repository root after the commands in docs/gradients.md:

    python docs/scripts/exprnn_copy_flow.py runs/memory_c docs/figures/exprnn_copy_flow.png
"""

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

# (workdir under the runs folder, phase, label, colour)
LINES = [
    ("flow_copy500_exprnn_paper", "init", "T=500, init", "0.6"),
    ("flow_copy500_exprnn_paper", "trained", "T=500, paper recipe (solved)", "tab:blue"),
    ("flow_copy500_exprnn_adam", "trained", "T=500, Adam 1e-2 + clip 1 (baseline)", "tab:red"),
    ("flow_copy1000_exprnn_paper", "trained", "T=1000, paper recipe (solved)", "tab:green"),
]


def main(runs: str, out: str):
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for workdir, phase, label, colour in LINES:
        with open(os.path.join(runs, workdir, "results.json")) as f:
            curves = json.load(f)["curves"]
        (c,) = [c for c in curves if c["phase"] == phase]
        rel = c["log10_grad_rel"]
        t = np.arange(len(rel["median"]))
        ax.plot(t, 10.0 ** np.asarray(rel["median"]), color=colour, lw=1.2, label=label)
        ax.fill_between(
            t,
            10.0 ** np.asarray(rel["p10"]),
            10.0 ** np.asarray(rel["p90"]),
            color=colour,
            alpha=0.15,
            lw=0,
        )
    ax.set_yscale("log")
    ax.set_xlabel("t (the 10 symbols are read at t < 10; the recall is the last 10 steps)")
    ax.set_ylabel("‖∂L/∂h_t‖ / ‖∂L/∂h_T‖")
    ax.set_title(
        "expRNN, 128 units, copy: the recall's gradient (median, p10-p90 of 3 seeds)", fontsize=9
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
