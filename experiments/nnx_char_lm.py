"""The stateful char-LM of ``experiments.char_lm`` as a Flax NNX model, trained with
``nnx.Optimizer``.

Run: python -m experiments.nnx_char_lm --mode=stateful --layers=2 --iterations=3 --workdir=runs/nnx
(about 15 s here, CPU; held-out bpc 3.9621 at iteration 3, as the pure run)
A stack of ``rnn_jax.nnx.Recurrent`` layers over integer tokens and an ``nnx.Linear`` head, the
carry passed from each ``bptt`` window to the next (``--mode=stateful`` of
``experiments.char_lm``: the same streams, loss, RMSprop, data order and held-out scoring). The
model starts from the params ``rnn_jax.language_model`` draws with the pure run's key, so at
the same seed and settings every iteration's training loss and held-out bits per char are the
pure run's (to float32 rounding; tests/test_nnx.py checks it). An epoch is one compiled call:
``nnx.split`` outside, ``nnx.merge`` inside a ``jax.lax.scan`` of updates (docs/nnx.md,
benchmarks/nnx.py). Only ``mode=stateful`` without dropout on one device; no generation, and
``workdir`` (optional in process) gets an orbax checkpoint of model and optimiser per
iteration (no resume: a rerun trains from the start and replaces them).
In process: ``run(char_lm.Config(mode="stateful", layers=2, units=8, iterations=1), None)``.
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from experiments import char_lm, cli
from rnn_jax import data
from rnn_jax import nnx as rnx
from rnn_jax.losses import masked_cross_entropy

# The experiment's flags are char_lm's: the same run, trained through Flax NNX.
Config = char_lm.Config


class LanguageModel(nnx.Module):
    """Stacked :class:`rnn_jax.nnx.Recurrent` layers over tokens, a Dense head on every step.

    ``model(tokens (batch, time) int, carry) -> (carry, logits (batch, time, vocab))``; the
    carry is a tuple with one cell carry per layer (:meth:`initial_carry`).
    """

    def __init__(
        self,
        cell: str,
        vocab_size: int,
        units: int,
        layers: int,
        length: int,
        *,
        unroll: int | bool = 1,
        rngs: nnx.Rngs,
    ):
        dims = [vocab_size] + [units] * (layers - 1)
        self.layers = nnx.List(
            [
                rnx.Recurrent(
                    rnx.RNNCell(cell, dim, units=units, length=length, rngs=rngs),
                    return_carry=True,
                    unroll=unroll,
                )
                for dim in dims
            ]
        )
        self.dense = nnx.Linear(units, vocab_size, rngs=rngs)

    def __call__(self, tokens: jax.Array, carry: tuple) -> tuple[tuple, jax.Array]:
        carries, xs = [], tokens
        for layer, layer_carry in zip(self.layers, carry, strict=True):
            layer_carry, xs = layer(xs, initial_carry=layer_carry)
            carries.append(layer_carry)
        return tuple(carries), self.dense(xs)

    def initial_carry(self, batch: int) -> tuple:
        """Zeros for ``batch`` streams, one carry per layer."""
        return tuple(layer.cell.initialize_carry((batch, 1)) for layer in self.layers)


def load_pure_params(model: LanguageModel, params: Any) -> None:
    """Writes the params of the pure ``rnn_jax.language_model`` (``{"rnn", "dense"}``, the
    layers as ``layer_k`` of a stack, or the one layer's own) into ``model``."""
    rnn = params["rnn"]
    layers = [rnn[f"layer_{k}"] for k in range(len(model.layers))] if "layer_0" in rnn else [rnn]
    for layer, layer_params in zip(model.layers, layers, strict=True):
        rnx.set_params(layer, layer_params)
    nnx.update(model.dense, {"kernel": params["dense"]["kernel"], "bias": params["dense"]["bias"]})


def train_step(model: LanguageModel, optimizer: nnx.Optimizer, carry, batch, weights):
    """One update on a window of every stream: the ``weights``-weighted mean of the streams'
    masked cross-entropies, as ``rnn_jax.train.apply_update``. Returns ``(carry, sums)``,
    the carry after the window (no gradient flows back through it: truncated BPTT) and the
    loss summed over the scored characters, with their count."""
    inputs, targets, mask = batch

    def loss_fn(model):
        new_carry, logits = model(inputs, carry)
        losses = masked_cross_entropy(logits, targets, mask)
        total = jnp.sum(losses * weights)
        return total / jnp.maximum(jnp.sum(weights), 1.0), (total, new_carry)

    (_, (total, carry)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return jax.lax.stop_gradient(carry), {"loss": total, "examples": jnp.sum(weights)}


def make_epoch(graphdef: nnx.GraphDef, num_windows: int, bptt: int) -> Callable:
    """``epoch(state, streams, carry) -> (state, carry, sums)``: ``num_windows`` updates in
    order as one compiled call, ``state = nnx.state((model, optimizer))`` of ``graphdef``.

    The pattern Flax recommends for speed: the modules are split outside, a ``jax.jit``ed pure
    function merges them inside (here inside the scan's body), so no NNX bookkeeping runs per
    call beyond the split and the update."""

    @jax.jit
    def epoch(state, streams, carry):
        def body(scanned, k):
            state, carry = scanned
            model, optimizer = nnx.merge(graphdef, state)
            batch, weights = data.stream_batch(streams, k, bptt)
            carry, sums = train_step(model, optimizer, carry, batch, weights)
            return (nnx.state((model, optimizer)), carry), sums

        (state, carry), sums = jax.lax.scan(body, (state, carry), jnp.arange(num_windows))
        return state, carry, jax.tree.map(jnp.sum, sums)

    return epoch


@nnx.jit(static_argnums=(2, 3))
def evaluate(model: LanguageModel, streams: data.Streams, num_windows: int, bptt: int):
    """Mean cross-entropy (nats) over the scored characters of ``streams``, read in order with
    the carry passed on (the held-out tail: one stream)."""

    def body(carry, k):
        (inputs, targets, mask), weights = data.stream_batch(streams, k, bptt)
        carry, logits = model(inputs, carry)
        losses = masked_cross_entropy(logits, targets, mask)
        return carry, (jnp.sum(losses * weights), jnp.sum(weights))

    carry = model.initial_carry(streams.num_streams)
    _, (loss, count) = jax.lax.scan(body, carry, jnp.arange(num_windows))
    return jnp.sum(loss) / jnp.sum(count)


class Result(NamedTuple):
    """What :func:`run` returns: the trained modules, one dict per iteration (``loss``,
    ``bits_per_char``, ``val_loss``, ``val_bits_per_char``) and the vocabulary."""

    model: LanguageModel
    optimizer: nnx.Optimizer
    history: list[dict]
    vocabulary: data.Vocabulary


def _check(config: char_lm.Config) -> None:
    for name, wanted in (("mode", "stateful"), ("dropout", 0.0), ("num_devices", 1)):
        if getattr(config, name) != wanted:
            raise ValueError(f"{name}={getattr(config, name)!r}: this example needs {wanted!r}")
    if config.compute_dtype != "float32":
        raise ValueError(f"compute_dtype={config.compute_dtype!r}: this example runs float32")


def pure_init(config: char_lm.Config, vocab_size: int):
    """The params ``experiments.char_lm`` starts from at ``config.seed``: its model's init
    with its init key (:func:`experiments.char_lm.init_keys`)."""
    return char_lm.make_model(config, vocab_size)[1].init(char_lm.init_keys(config)[0])


def run(config: char_lm.Config, workdir: str | None = None, out=print) -> Result:
    """Trains the NNX model on the text of ``config`` (an ``experiments.char_lm.Config`` with
    ``mode="stateful"``) for ``config.iterations`` iterations of ``epochs_per_iteration``
    epochs, scoring the held-out tail after each. ``workdir``: where a checkpoint of model and
    optimiser goes after each iteration (None: nowhere)."""
    _check(config)
    text = char_lm.load_config_text(config, out)
    vocab = data.Vocabulary.from_text(text)
    train_tokens, val_tokens = data.split_tokens(
        vocab.encode(text), config.held_out_fraction(), config.seq_len
    )
    streams, num_windows = data.make_streams(train_tokens, config.batch_size, config.bptt)

    unroll = config.unroll or (True if config.bptt <= 32 else 1)
    model = LanguageModel(
        config.cell,
        vocab.size,
        config.units,
        config.layers,
        config.bptt,
        unroll=unroll,
        rngs=nnx.Rngs(config.seed),
    )
    load_pure_params(model, pure_init(config, vocab.size))
    tx = config.optimizer_spec()
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    epoch = make_epoch(graphdef, num_windows, config.bptt)
    if val_tokens is not None:
        val_streams, val_windows = data.make_streams(
            val_tokens, 1, config.bptt, scored_from=config.seq_len - 1
        )
    out(f"{len(text)} characters, vocabulary of {vocab.size}, {num_windows} windows per epoch")

    history = []
    for iteration in range(1, config.iterations + 1):
        loss, examples = 0.0, 0.0
        for _ in range(config.epochs_per_iteration):
            # Every epoch starts from zeros, as the pure engine's in_order batches do.
            carry = model.initial_carry(config.batch_size)
            state, _, sums = epoch(state, streams, carry)
            loss, examples = loss + sums["loss"], examples + sums["examples"]
        nnx.update((model, optimizer), state)
        row = {"iteration": iteration, "loss": float(loss / examples)}
        row["bits_per_char"] = row["loss"] / math.log(2)
        if val_tokens is not None:
            row["val_loss"] = float(evaluate(model, val_streams, val_windows, config.bptt))
            row["val_bits_per_char"] = row["val_loss"] / math.log(2)
        history.append(row)
        line = f"iteration {iteration}  loss {row['loss']:.4f}  bpc {row['bits_per_char']:.4f}"
        if "val_bits_per_char" in row:
            line += f"  held-out bpc {row['val_bits_per_char']:.4f}"
        out(line)
        if workdir is not None:
            step = iteration * config.epochs_per_iteration * num_windows
            meta = {"experiment": "nnx_char_lm", "iteration": iteration}
            rnx.save_checkpoint(workdir, step, {"model": model, "optimizer": optimizer}, meta)
    return Result(model, optimizer, history, vocab)


if __name__ == "__main__":
    cli.main(char_lm.Config, run, workdir=None)
