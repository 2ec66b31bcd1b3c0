"""Every cell of the library by name, for experiment flags and comparison tables.

``rnn_jax.cells.CELLS`` stays the tutorial's three Keras cells (what the Keras and PyTorch
conversions and golden tests cover). Here are those and the cells proposed for long memory,
including the options that depend on the sequence length a comparison trains at: chrono
initialisation draws its biases for dependencies up to ``T`` steps (``t_max = T``), IndRNN
bounds its recurrent weights by ``2^{1/T}``.
"""

from collections.abc import Callable

from rnn_jax.cells import Cell, exp_rnn, gru, indrnn, lstm, simple_rnn
from rnn_jax.linear import lru, min_gru, min_lstm

# name -> (units, length) -> Cell; length is the longest sequence the cell will be trained on.
_BUILDERS: dict[str, Callable[[int, int | None], Cell]] = {
    "simple_rnn": lambda units, length: simple_rnn(units),
    "lstm": lambda units, length: lstm(units),
    "gru": lambda units, length: gru(units),
    "lstm_chrono": lambda units, length: lstm(units, chrono_t_max=_t_max(length)),
    "gru_chrono": lambda units, length: gru(units, chrono_t_max=_t_max(length)),
    "ln_lstm": lambda units, length: lstm(units, layer_norm=True),
    "indrnn": lambda units, length: indrnn(units, max_length=length),
    "exp_rnn": lambda units, length: exp_rnn(units),
    "min_gru": lambda units, length: min_gru(units),
    "min_lstm": lambda units, length: min_lstm(units),
    "lru": lambda units, length: lru(units),
}

NAMES: tuple[str, ...] = tuple(_BUILDERS)
"""Every name :func:`named_cell` knows, the tutorial's three first."""


def _t_max(length: int | None) -> float:
    if length is None:
        raise ValueError("chrono initialisation needs length=T, the longest dependency to span")
    return float(max(length, 3))


def named_cell(name: str, units: int, length: int | None = None) -> Cell:
    """The cell called ``name`` (one of :data:`NAMES`) with ``units`` units, set up for
    sequences of up to ``length`` steps where its initialisation depends on it (``*_chrono``:
    ``chrono_t_max = length``; ``indrnn``: ``|u| ≤ 2^{1/length}``, unbounded when None)."""
    if name not in _BUILDERS:
        raise ValueError(f"cell={name!r} is not one of {', '.join(NAMES)}")
    return _BUILDERS[name](units, length)
