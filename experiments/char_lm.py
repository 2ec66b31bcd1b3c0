"""The tutorial's char-RNN on Alice in Wonderland, with greedy generation after each iteration.

Run: python -m experiments.char_lm --workdir=runs/char_lm
Defaults are the tutorial's recipe: SimpleRNN(128) over 10-char windows (step 1), Dense +
softmax, categorical cross-entropy, RMSprop (Keras 3 defaults), batch 128, 25 iterations of one
epoch, 100 greedy characters after each. On this 2-core CPU: about 0.85 s per epoch, about 30-40 s
for the whole run; the training loss falls to about 1.37 (2.0 bits/char) by iteration 25.
Rerun with the same --workdir to resume from the last finished iteration.
Several devices: --num_devices=0 (all); several hosts: --distributed, see docs/scaling.md.
"""

import os
import sys

import jax
from absl import app, flags, logging

from rnn_jax import char_lm
from rnn_jax.checkpoint import CheckpointError
from rnn_jax.data import TextError, fetch_alice
from rnn_jax.train import NonFiniteLossError

_DEFAULT = char_lm.Config()
_CELL = flags.DEFINE_enum("cell", _DEFAULT.cell, ["simple_rnn", "lstm", "gru"], "Recurrence.")
_UNITS = flags.DEFINE_integer("units", _DEFAULT.units, "Hidden units.", lower_bound=1)
_SEQ_LEN = flags.DEFINE_integer("seq_len", _DEFAULT.seq_len, "Input window.", lower_bound=1)
_STEP = flags.DEFINE_integer("step", _DEFAULT.step, "Stride between windows.", lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", _DEFAULT.batch_size, "Batch.", lower_bound=1)
_ITERATIONS = flags.DEFINE_integer(
    "iterations", _DEFAULT.iterations, "Train-then-generate iterations.", lower_bound=1)
_EPOCHS = flags.DEFINE_integer(
    "epochs_per_iteration", _DEFAULT.epochs_per_iteration, "Epochs per iteration.", lower_bound=1)
_NUM_PREDS = flags.DEFINE_integer(
    "num_preds", _DEFAULT.num_preds, "Characters generated per iteration.", lower_bound=1)
_LEARNING_RATE = flags.DEFINE_float(
    "learning_rate", _DEFAULT.learning_rate, "RMSprop learning rate.", lower_bound=0.0)
_RHO = flags.DEFINE_float("rho", _DEFAULT.rho, "RMSprop decay of the squared-gradient average.")
_EPSILON = flags.DEFINE_float("epsilon", _DEFAULT.epsilon, "RMSprop epsilon (Keras: 1e-7).")
_EPS_IN_SQRT = flags.DEFINE_bool(
    "eps_in_sqrt", _DEFAULT.eps_in_sqrt,
    "RMSprop epsilon inside the square root (Keras 3) or outside (Keras 2, PyTorch).")
_CLIP_NORM = flags.DEFINE_float(
    "clip_norm", None, "Clip gradients to this global norm (unset: no clipping).")
_SEED = flags.DEFINE_integer("seed", _DEFAULT.seed, "PRNG seed (init, shuffles, seeds).")
_VAL_FRACTION = flags.DEFINE_float(
    "val_fraction", _DEFAULT.val_fraction, "Held-out tail of the text for validation bpc.")
_TEMPERATURE = flags.DEFINE_float(
    "temperature", _DEFAULT.temperature, "0: greedy (the tutorial); > 0: sample.")
_SEED_TEXT = flags.DEFINE_string(
    "seed_text", None, "Generate from this text's last seq_len chars, lower-cased as the corpus is "
    "(default: a random training window).")
_UNROLL = flags.DEFINE_integer("unroll", 0, "lax.scan unroll factor (0: auto).", lower_bound=0)
_TEXT = flags.DEFINE_string(
    "text", None, "Text file to train on (default: Alice, downloaded into data/ if missing).")
_WORKDIR = flags.DEFINE_string(
    "workdir", "runs/char_lm", "Checkpoints, metrics.jsonl and samples.txt; reruns resume.")
_NUM_DEVICES = flags.DEFINE_integer(
    "num_devices", _DEFAULT.num_devices,
    "Data-parallel devices, the batch split over them (0: all, on every host).", lower_bound=0)
_COMPUTE_DTYPE = flags.DEFINE_enum(
    "compute_dtype", _DEFAULT.compute_dtype, sorted(char_lm.MATMUL_PRECISION),
    "bfloat16: matmul inputs rounded to bf16, float32 accumulation (GPU/TPU); params float32.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Multi-host: call jax.distributed.initialize first (with the three "
    "flags below, or detected on Cloud TPU, SLURM, Open MPI).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "With --distributed: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "With --distributed: how many processes.", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "With --distributed: this process's index.", lower_bound=0)

_DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


def _seed_text():
    # The corpus is lower-cased (DESIGN.md §1), so a seed is too.
    return None if _SEED_TEXT.value is None else _SEED_TEXT.value.lower()


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    if _DISTRIBUTED.value:
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    config = char_lm.Config(
        cell=_CELL.value, units=_UNITS.value, seq_len=_SEQ_LEN.value, step=_STEP.value,
        batch_size=_BATCH_SIZE.value, iterations=_ITERATIONS.value,
        epochs_per_iteration=_EPOCHS.value, num_preds=_NUM_PREDS.value,
        learning_rate=_LEARNING_RATE.value, rho=_RHO.value, epsilon=_EPSILON.value,
        eps_in_sqrt=_EPS_IN_SQRT.value,
        clip_norm=_CLIP_NORM.value, seed=_SEED.value, val_fraction=_VAL_FRACTION.value,
        temperature=_TEMPERATURE.value, seed_text=_seed_text(), unroll=_UNROLL.value,
        num_devices=_NUM_DEVICES.value, compute_dtype=_COMPUTE_DTYPE.value,
    )
    out = print if jax.process_index() == 0 else (lambda *args: None)
    try:
        text = _TEXT.value or fetch_alice(_DATA_DIR)
        char_lm.train_and_evaluate(config, _WORKDIR.value, text, out=out)
    except (TextError, CheckpointError, NonFiniteLossError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
