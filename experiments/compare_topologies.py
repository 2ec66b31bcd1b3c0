"""Several runs of one topology in one figure: their headline metric against the step. No training.

Run (the figures of docs/topologies.md, after the runs it lists):
  python -m experiments.compare_topologies --workdir=docs/figures \
      --runs=runs/topo/seq2seq_simple_rnn,runs/topo/seq2seq_lstm,runs/topo/seq2seq_gru
writes docs/figures/topology_seq2seq.png (--figure names another file, relative to --workdir).
"""

import dataclasses
import os

from experiments import cli
from experiments.topologies import METRICS, plot_runs
from rnn_jax.rundir import read_history


def _non_empty(values) -> str | None:
    return None if values else "must list at least one run's workdir"


@dataclasses.dataclass(frozen=True)
class Config:
    """Which runs to plot, and the figure's file name."""

    runs: tuple[str, ...] = cli.field(
        (), "Workdirs of experiments.topologies runs of one topology.", check=_non_empty
    )
    figure: str | None = cli.field(
        None, "The PNG, relative to the workdir (unset: topology_<topology>.png)."
    )

    def __post_init__(self):
        cli.validate(self)


def run(config: Config, workdir: str, out=print) -> str:
    """Plots ``config.runs`` (their ``metrics.jsonl``) together; returns the figure's path.

    Raises:
      ValueError: a run has no metrics or is not a topologies run, or the runs are of
        different topologies.
    """
    histories = [read_history(d) for d in config.runs]
    missing = [d for d, rows in zip(config.runs, histories) if not rows]
    if missing:
        raise ValueError(f"runs={','.join(config.runs)}: no metrics.jsonl in {missing}")
    others = [d for d, rows in zip(config.runs, histories) if "topology" not in rows[-1]]
    if others:
        raise ValueError(
            f"runs={','.join(config.runs)}: {others[0]!r} is not a run of experiments.topologies "
            "(its metrics name no topology); pass the workdirs of topologies runs"
        )
    topologies = sorted({rows[-1]["topology"] for rows in histories})
    if len(topologies) > 1:
        raise ValueError(f"runs={','.join(config.runs)} mix the topologies {topologies}")
    topology = topologies[0]
    path = os.path.join(workdir, config.figure or f"topology_{topology}.png")
    plot_runs(histories, path, METRICS[topology], topology)
    out(f"wrote {path}")
    return path


if __name__ == "__main__":
    cli.main(Config, run, workdir=None)
