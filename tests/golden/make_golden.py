"""Writes ``keras_torch.npz``: Keras 3 and PyTorch recurrent layers on fixed inputs and weights.

CI never runs this script; it only reads what the script writes (``tests/test_golden.py``). Run it
where Keras 3 (JAX backend, set below) and PyTorch are installed, from the repository root::

    python3 -m venv /tmp/golden-venv
    /tmp/golden-venv/bin/pip install keras jax numpy \
        /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl  # CPU-only torch
    /tmp/golden-venv/bin/python tests/golden/make_golden.py

Every array is drawn as float64 from ``numpy.random.default_rng(SEED)`` and cast to float32.
Keys are ``"<case>/<name>"``: ``x`` the input ``(batch, time, input_dim)``, ``w/<weight>`` the
weights under the library's own names and layouts, ``h0`` (and ``c0``) the initial state,
``out`` all outputs ``(batch, time, units)``, ``h`` (and ``c``) the final state as the library
returns it (PyTorch keeps a leading ``num_layers`` axis), plus ``version/<package>`` strings.
"""

import os

os.environ["KERAS_BACKEND"] = "jax"

import keras
import numpy as np
import torch

SEED = 20240607
BATCH, TIME, INPUT_DIM, UNITS = 3, 7, 5, 4
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "keras_torch.npz")

rng = np.random.default_rng(SEED)


def draw(*shape: int, scale: float = 0.5) -> np.ndarray:
    """Uniform on ``[-scale, scale)``, drawn in float64 and returned as float32."""
    return rng.uniform(-scale, scale, shape).astype(np.float32)


def keras_case(layer: keras.layers.Layer, blocks: int, bias_shape: tuple[int, ...]) -> dict:
    """Runs ``layer`` (``return_sequences`` and ``return_state``) from a non-zero state."""
    x = draw(BATCH, TIME, INPUT_DIM, scale=1.0)
    layer.build((BATCH, TIME, INPUT_DIM))
    weights = {
        "kernel": draw(INPUT_DIM, blocks * UNITS),
        "recurrent_kernel": draw(UNITS, blocks * UNITS),
        "bias": draw(*bias_shape),
    }
    layer.set_weights(list(weights.values()))
    states = {"h0": draw(BATCH, UNITS)}
    if isinstance(layer, keras.layers.LSTM):
        states["c0"] = draw(BATCH, UNITS)
    out, *final = layer(x, initial_state=list(states.values()))
    case = {"x": x, **{f"w/{k}": v for k, v in weights.items()}, **states, "out": out}
    case.update(zip(["h", "c"], final))
    return case


def torch_case(module: torch.nn.RNNBase) -> dict:
    """Runs ``module`` (``batch_first``) with seeded weights and both biases, non-zero state."""
    x = draw(BATCH, TIME, INPUT_DIM, scale=1.0)
    weights = {name: draw(*p.shape) for name, p in module.state_dict().items()}
    module.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    states = {"h0": draw(1, BATCH, UNITS)}
    if isinstance(module, torch.nn.LSTM):
        states["c0"] = draw(1, BATCH, UNITS)
    init = [torch.from_numpy(s) for s in states.values()]
    with torch.no_grad():
        out, final = module(torch.from_numpy(x), tuple(init) if len(init) == 2 else init[0])
    final = final if isinstance(final, tuple) else (final,)
    case = {"x": x, **{f"w/{k}": v for k, v in weights.items()}, **states, "out": out}
    case.update(zip(["h", "c"], final))
    return case


def main() -> None:
    """Builds every case and writes them, with the package versions, to ``OUT``."""
    keras_args = dict(return_sequences=True, return_state=True)
    torch_args = dict(input_size=INPUT_DIM, hidden_size=UNITS, batch_first=True)
    cases = {
        "keras_simple_rnn": keras_case(
            keras.layers.SimpleRNN(UNITS, activation="tanh", **keras_args), 1, (UNITS,)
        ),
        "keras_lstm": keras_case(keras.layers.LSTM(UNITS, **keras_args), 4, (4 * UNITS,)),
        "keras_gru_reset_after": keras_case(
            keras.layers.GRU(UNITS, reset_after=True, **keras_args), 3, (2, 3 * UNITS)
        ),
        "keras_gru_reset_before": keras_case(
            keras.layers.GRU(UNITS, reset_after=False, **keras_args), 3, (3 * UNITS,)
        ),
        "torch_rnn": torch_case(torch.nn.RNN(nonlinearity="tanh", **torch_args)),
        "torch_lstm": torch_case(torch.nn.LSTM(**torch_args)),
        "torch_gru": torch_case(torch.nn.GRU(**torch_args)),
    }
    arrays = {
        f"{name}/{key}": np.asarray(value, np.float32)
        for name, case in cases.items()
        for key, value in case.items()
    }
    versions = {"keras": keras.__version__, "keras_backend": keras.backend.backend()}
    versions |= {"torch": torch.__version__, "numpy": np.__version__}
    arrays |= {f"version/{k}": np.array(v) for k, v in versions.items()}
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT}: {versions}")


if __name__ == "__main__":
    main()
