"""PyTorch ``nn.RNN``/``nn.LSTM``/``nn.GRU`` state dicts to and from our Keras layout, in NumPy.

PyTorch keeps ``weight_ih_l{k} (blocks·H, in)``, ``weight_hh_l{k} (blocks·H, H)`` and two biases
``bias_ih_l{k}``, ``bias_hh_l{k}`` per layer ``k`` (``_reverse`` for the backward direction of
a bidirectional layer). Our layout (DESIGN.md §3) is ``kernel = weight_ih.T``,
``recurrent_kernel = weight_hh.T`` and:

- SimpleRNN and LSTM (blocks i, f, g, o in both libraries): one ``bias = bias_ih + bias_hh``.
  Going back, the sum is put in ``bias_ih`` and ``bias_hh`` is zero: the same function, but not
  the same two vectors, as the original state dict.
- GRU: PyTorch's blocks are r, z, n, ours z, r, h, so the first two blocks of every weight and
  bias swap places; both biases are kept, as the rows ``b_x, b_h`` of ``bias (2, 3H)``.
  PyTorch's GRU is the reset-after form (:func:`rnn_jax.gru` with ``reset_after=True``).

Multi-layer state dicts map to the ``{"layer_0": ..., "layer_1": ...}`` layout of stacked
layers, a bidirectional layer to ``{"forward": ..., "backward": ...}``. Torch tensors are read
with ``np.asarray``; torch itself is never imported.
"""

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

Params = dict[str, np.ndarray]

_BLOCKS = {"simple_rnn": 1, "lstm": 4, "gru": 3}
_NAME = re.compile(r"(weight|bias)_(ih|hh|hr)_l(\d+)(_reverse)?$")


def _blocks(cell: str) -> int:
    if cell not in _BLOCKS:
        raise ValueError(f"cell={cell!r} must be one of {sorted(_BLOCKS)}")
    return _BLOCKS[cell]


def _swap_gru_gates(a: np.ndarray, axis: int) -> np.ndarray:
    """Swaps the first two of three gate blocks along ``axis`` (r, z, n <-> z, r, h)."""
    first, second, third = np.split(a, 3, axis=axis)
    return np.concatenate([second, first, third], axis=axis)


def layer_from_torch(
    weight_ih: Any, weight_hh: Any, bias_ih: Any = None, bias_hh: Any = None, *, cell: str
) -> Params:
    """One direction of one PyTorch layer in our layout.

    Args:
      weight_ih: ``(blocks·H, input_dim)``.
      weight_hh: ``(blocks·H, H)``.
      bias_ih, bias_hh: ``(blocks·H,)``, or None for a layer built with ``bias=False``.
      cell: ``"simple_rnn"``, ``"lstm"`` or ``"gru"``.

    Returns:
      ``{"kernel": (input_dim, blocks·H), "recurrent_kernel": (H, blocks·H), "bias"}`` with
      ``bias`` ``(blocks·H,)``, or ``(2, 3H)`` for the GRU.
    """
    blocks = _blocks(cell)
    w_ih, w_hh = np.asarray(weight_ih), np.asarray(weight_hh)
    hidden = w_hh.shape[-1]
    if (
        w_hh.shape != (blocks * hidden, hidden)
        or w_ih.ndim != 2
        or w_ih.shape[0] != blocks * hidden
    ):
        raise ValueError(
            f"a PyTorch {cell} layer has weight_ih ({blocks}·H, input_dim) and weight_hh "
            f"({blocks}·H, H); got {w_ih.shape} and {w_hh.shape}"
        )
    zeros = np.zeros(blocks * hidden, w_hh.dtype)
    b_ih = zeros if bias_ih is None else np.asarray(bias_ih)
    b_hh = zeros if bias_hh is None else np.asarray(bias_hh)
    if b_ih.shape != (blocks * hidden,) or b_hh.shape != (blocks * hidden,):
        raise ValueError(
            f"the biases of a PyTorch {cell} layer are ({blocks * hidden},); "
            f"got {b_ih.shape} and {b_hh.shape}"
        )
    kernel, recurrent_kernel = w_ih.T, w_hh.T
    if cell == "gru":
        return {
            "kernel": _swap_gru_gates(kernel, axis=1),
            "recurrent_kernel": _swap_gru_gates(recurrent_kernel, axis=1),
            "bias": np.stack([_swap_gru_gates(b_ih, 0), _swap_gru_gates(b_hh, 0)]),
        }
    return {
        "kernel": np.ascontiguousarray(kernel),
        "recurrent_kernel": np.ascontiguousarray(recurrent_kernel),
        "bias": b_ih + b_hh,
    }


def layer_to_torch(params: Mapping[str, Any], *, cell: str) -> dict[str, np.ndarray]:
    """The inverse of :func:`layer_from_torch`: PyTorch's four arrays of one layer direction.

    Returns ``{"weight_ih", "weight_hh", "bias_ih", "bias_hh"}`` (names without ``_l{k}``).

    For SimpleRNN and LSTM the merged bias goes to ``bias_ih`` and ``bias_hh`` is zero.

    Raises:
      ValueError: a GRU in the reset-before form (``bias (3H,)``), which PyTorch cannot express.
    """
    _blocks(cell)
    kernel = np.asarray(params["kernel"])
    recurrent_kernel = np.asarray(params["recurrent_kernel"])
    bias = np.asarray(params["bias"])
    if cell == "gru":
        if bias.ndim != 2:
            raise ValueError(
                "PyTorch's GRU is the reset-after form; a GRU with reset_after=False (one bias "
                f"of shape {bias.shape}) has no PyTorch equivalent"
            )
        return {
            "weight_ih": np.ascontiguousarray(_swap_gru_gates(kernel, axis=1).T),
            "weight_hh": np.ascontiguousarray(_swap_gru_gates(recurrent_kernel, axis=1).T),
            "bias_ih": _swap_gru_gates(bias[0], 0),
            "bias_hh": _swap_gru_gates(bias[1], 0),
        }
    return {
        "weight_ih": np.ascontiguousarray(kernel.T),
        "weight_hh": np.ascontiguousarray(recurrent_kernel.T),
        "bias_ih": bias.copy(),
        "bias_hh": np.zeros_like(bias),
    }


def _layout(state_dict: Mapping[str, Any], prefix: str) -> tuple[int, bool, bool]:
    """``(num_layers, bidirectional, has_bias)`` read from the parameter names."""
    layers, reverse, bias = set(), False, False
    for name in state_dict:
        if not name.startswith(prefix):
            continue
        match = _NAME.fullmatch(name[len(prefix) :])
        if match is None:
            continue
        kind, which, layer, rev = match.groups()
        if which == "hr":
            raise ValueError("LSTMs with proj_size > 0 (weight_hr_l*) are not supported")
        layers.add(int(layer))
        reverse |= rev is not None
        bias |= kind == "bias"
    if not layers:
        raise ValueError(f"no PyTorch RNN weights named {prefix}weight_ih_l0 in the state dict")
    if layers != set(range(len(layers))):
        raise ValueError(f"layers {sorted(layers)} are not numbered 0..{len(layers) - 1}")
    return len(layers), reverse, bias


def from_torch(state_dict: Mapping[str, Any], cell: str, prefix: str = "") -> dict[str, Any]:
    """A whole ``nn.RNN``/``nn.LSTM``/``nn.GRU`` state dict in our layout.

    Args:
      state_dict: ``module.state_dict()`` (tensors or arrays), names as PyTorch writes them.
      cell: ``"simple_rnn"`` (``nn.RNN``), ``"lstm"`` or ``"gru"``.
      prefix: the module's prefix in a larger model's state dict, e.g. ``"encoder.rnn."``.

    Returns:
      ``{"layer_0": ..., "layer_1": ...}``: each layer a cell's params, or
      ``{"forward": ..., "backward": ...}`` for a bidirectional module.
    """
    num_layers, bidirectional, has_bias = _layout(state_dict, prefix)
    out = {}
    for k in range(num_layers):
        directions = {}
        for direction, suffix in [("forward", ""), ("backward", "_reverse")][: 1 + bidirectional]:
            names = [f"{prefix}{w}_l{k}{suffix}" for w in ("weight_ih", "weight_hh")]
            if has_bias:
                names += [f"{prefix}{b}_l{k}{suffix}" for b in ("bias_ih", "bias_hh")]
            directions[direction] = layer_from_torch(*(state_dict[n] for n in names), cell=cell)
        out[f"layer_{k}"] = directions if bidirectional else directions["forward"]
    return out


def to_torch(params: Mapping[str, Any], cell: str, prefix: str = "") -> dict[str, np.ndarray]:
    """The inverse of :func:`from_torch`: PyTorch names and layout, as NumPy arrays.

    ``module.load_state_dict({k: torch.from_numpy(v) for k, v in ...})`` loads the result into
    ``nn.RNN/LSTM/GRU(..., num_layers=len(params), bidirectional=...)``.
    """
    out = {}
    k = 0
    while f"layer_{k}" in params:
        layer = params[f"layer_{k}"]
        if "forward" in layer:
            directions = [("", layer["forward"]), ("_reverse", layer["backward"])]
        else:
            directions = [("", layer)]
        for suffix, p in directions:
            for name, value in layer_to_torch(p, cell=cell).items():
                out[f"{prefix}{name}_l{k}{suffix}"] = value
        k += 1
    if k == 0 or len(params) != k:
        raise ValueError(
            f"params must be {{'layer_0': ..., 'layer_1': ...}}, got keys {sorted(params)}"
        )
    return out
