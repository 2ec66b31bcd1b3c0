"""The tutorial's char-RNN in Keras 3 (JAX backend): the reference that benchmarks/char_lm.py times.

Run (the whole tutorial run, timed):
  KERAS_BACKEND=jax taskset -c 0 env XLA_FLAGS=--xla_cpu_multi_thread_eigen=false \
      .venv/bin/python -m benchmarks.keras_reference
About 35 s here (25 iterations of one epoch, ~1.2 s each, plus 100 one-char predicts each).
With ``--worker`` it prepares the model and then waits for commands on stdin (``epoch``,
``generate``, ``quit``), answering each with one JSON line on stdout prefixed ``@@``: that is how
the benchmark interleaves Keras with its own contenders in one run.

The recipe is the tutorial's, written for Keras 3: the same text cleanup (shared with rnn_jax),
boolean one-hot arrays ``X (N, 10, V)`` and ``y (N, V)``, ``SimpleRNN(128, unroll=True)``,
``Dense(V)``, softmax, categorical cross-entropy, ``RMSprop()`` (Keras defaults), ``fit`` for
one epoch with batch 128 (shuffled), and generation by ``model.predict`` on the one-hot window,
one character at a time, greedy. ``verbose=0``: the progress bar is not part of the recipe.
"""

import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # after KERAS_BACKEND: the backend is chosen at import
import numpy as np
from absl import app, flags

from benchmarks._common import peak_rss_mb, read_text
from rnn_jax import data

_TEXT = flags.DEFINE_string(
    "text", None, "Text file (default: the alice corpus, read as the recipe reads it)."
)
_CELL = flags.DEFINE_enum("cell", "simple_rnn", ["simple_rnn", "lstm", "gru"], "Keras layer.")
_ITERATIONS = flags.DEFINE_integer("iterations", 25, "Fit-then-generate iterations.", lower_bound=1)
_NUM_PREDS = flags.DEFINE_integer("num_preds", 100, "Characters generated per iteration.")
_SEED = flags.DEFINE_integer("seed", 0, "Keras seed (init, shuffles) and generation seeds.")
_WORKER = flags.DEFINE_bool("worker", False, "Serve epoch/generate/quit commands on stdin.")

SEQ_LEN, UNITS, BATCH = 10, 128, 128
_LAYERS = {"simple_rnn": "SimpleRNN", "lstm": "LSTM", "gru": "GRU"}


def one_hot_windows(text: str):
    """The tutorial's boolean arrays ``X (N, SEQ_LEN, V)``, ``y (N, V)``, and the vocabulary."""
    vocab = data.Vocabulary.from_text(text)
    tokens = vocab.encode(text)
    starts = np.arange(len(tokens) - SEQ_LEN)
    windows = tokens[starts[:, None] + np.arange(SEQ_LEN)]
    x = np.zeros((len(starts), SEQ_LEN, vocab.size), bool)
    x[starts[:, None], np.arange(SEQ_LEN)[None, :], windows] = True
    y = np.zeros((len(starts), vocab.size), bool)
    y[starts, tokens[starts + SEQ_LEN]] = True
    return x, y, vocab


def build_model(cell: str, vocab_size: int):
    layer = getattr(keras.layers, _LAYERS[cell])(UNITS, unroll=True)
    model = keras.Sequential(
        [
            keras.Input((SEQ_LEN, vocab_size)),
            layer,
            keras.layers.Dense(vocab_size),
            keras.layers.Activation("softmax"),
        ]
    )
    model.compile(loss="categorical_crossentropy", optimizer=keras.optimizers.RMSprop())
    return model


def generate(model, x, vocab, rng, num_preds: int) -> str:
    """The tutorial's generation: greedy, one ``model.predict`` on the one-hot window per char."""
    window = x[rng.integers(len(x))].astype(np.float32)
    out = []
    for _ in range(num_preds):
        pred = int(np.argmax(model.predict(window[None], verbose=0)[0]))
        out.append(vocab.chars[pred])
        window = np.concatenate([window[1:], np.eye(vocab.size, dtype=np.float32)[pred][None]])
    return "".join(out)


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def _answer(obj):
    print("@@ " + json.dumps(obj), flush=True)


def main(argv):
    del argv
    if keras.backend.backend() != "jax":
        sys.exit(f"error: Keras runs on {keras.backend.backend()!r}; set KERAS_BACKEND=jax")
    tic = time.perf_counter()
    text = read_text(_TEXT.value, min_length=SEQ_LEN + 1)
    x, y, vocab = one_hot_windows(text)
    keras.utils.set_random_seed(_SEED.value)
    model = build_model(_CELL.value, vocab.size)
    rng = np.random.default_rng(_SEED.value)

    def epoch():
        return model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0).history["loss"][-1]

    if not _WORKER.value:
        for iteration in range(1, _ITERATIONS.value + 1):
            print("=" * 50 + f"\nIteration #: {iteration}", flush=True)
            loss = epoch()
            print(f"loss {loss:.4f}  {generate(model, x, vocab, rng, _NUM_PREDS.value)!r}")
        print(f"whole run: {time.perf_counter() - tic:.1f} s, peak RSS {peak_rss_mb():.0f} MB")
        return

    # Compile the train step for the full and the last partial batch, and predict.
    warm = BATCH + (len(x) % BATCH or BATCH)
    model.fit(x[:warm], y[:warm], batch_size=BATCH, epochs=1, verbose=0)
    generate(model, x, vocab, rng, 2)
    _answer(
        {
            "ready": True,
            "examples": len(x),
            "vocab": vocab.size,
            "setup_s": time.perf_counter() - tic,
        }
    )
    for line in sys.stdin:
        command = line.strip()
        if command == "epoch":
            loss, wall, cpu = _timed(epoch)
            _answer({"wall": wall, "cpu": cpu, "loss": loss})
        elif command == "generate":
            text_out, wall, cpu = _timed(lambda: generate(model, x, vocab, rng, _NUM_PREDS.value))
            _answer({"wall": wall, "cpu": cpu, "text": text_out})
        elif command == "quit":
            _answer({"peak_rss_mb": peak_rss_mb()})
            return
        else:
            _answer({"error": f"unknown command {command!r}"})


if __name__ == "__main__":
    app.run(main)
