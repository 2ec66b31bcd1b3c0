"""Synthetic data generated in code: the long-range tasks (adding, copy) with their baselines,
and the topology experiments' data (number names, balanced parentheses, addition)."""

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rnn_jax.data import Labelled
from rnn_jax.losses import sequence_cross_entropy, squared_error

COPY_BLANK = 0
"""Copy-task token 0: the blank, input and target."""


class Task(NamedTuple):
    """A synthetic sequence task with its analytic baseline.

    Attributes:
      name: ``"adding"`` or ``"copy"``.
      length: time steps per sequence.
      input_dim: features per step (float inputs) or the input vocabulary (integer tokens).
      output_dim: outputs per prediction (1 for a regression, classes for a classification).
      return_sequences: the loss reads every step's output, not only the last one.
      sample: ``(key, batch) -> (xs, targets)``, fresh examples on device.
      loss: ``(outputs, targets) -> (batch,)`` per-example loss; outputs are ``(batch,
        output_dim)`` or ``(batch, time, output_dim)``.
      baseline: the loss of the best predictor that ignores the inputs (a memoryless one for
        copy): a model has learned something only well below it.
      solved_below: the test loss under which the task counts as solved.
    """

    name: str
    length: int
    input_dim: int
    output_dim: int
    return_sequences: bool
    sample: Callable[[jax.Array, int], tuple[jax.Array, jax.Array]]
    loss: Callable[[jax.Array, jax.Array], jax.Array]
    baseline: float
    solved_below: float


@functools.partial(jax.jit, static_argnums=(1, 2))
def adding_batch(key: jax.Array, batch: int, length: int) -> tuple[jax.Array, jax.Array]:
    """The adding problem (Hochreiter & Schmidhuber 1997; Le, Jaitly & Hinton 2015).

    Each step carries a value uniform in [0, 1] and a marker; exactly two steps are marked, one
    uniformly in the first half ``[0, length // 2)`` and one in the second half; the target is
    the sum of the two marked values.

    Returns:
      ``xs (batch, length, 2)`` float32 ``[value, marker]`` and ``targets (batch,)`` float32.
    """
    if length < 2:
        raise ValueError(f"length={length}: the adding problem needs length >= 2")
    k_v, k_a, k_b = jax.random.split(key, 3)
    values = jax.random.uniform(k_v, (batch, length))
    half = length // 2
    first = jax.random.randint(k_a, (batch,), 0, half)
    second = jax.random.randint(k_b, (batch,), half, length)
    steps = jnp.arange(length)[None, :]
    markers = ((steps == first[:, None]) | (steps == second[:, None])).astype(jnp.float32)
    targets = jnp.sum(values * markers, axis=1)
    return jnp.stack([values, markers], axis=-1), targets


def adding_baseline() -> float:
    """MSE of always predicting 1.0, the mean target: ``Var(u₁ + u₂) = 2 · 1/12 = 1/6``."""
    return 1.0 / 6.0


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def copy_batch(
    key: jax.Array, batch: int, delay: int, num_symbols: int = 8, copy_length: int = 10
) -> tuple[jax.Array, jax.Array]:
    """The copy (memory) task of Arjovsky, Shah & Bengio (2016).

    Tokens: 0 blank, ``1 .. num_symbols`` the symbols, ``num_symbols + 1`` the cue. Input:
    ``copy_length`` random symbols, ``delay - 1`` blanks, the cue, ``copy_length`` blanks
    (``delay + 2·copy_length`` steps). Target: blanks for ``delay + copy_length`` steps, then
    the symbols in order.

    Returns:
      ``xs (batch, delay + 2·copy_length)`` int32 tokens and ``targets`` int32 of the same
      shape, in ``0 .. num_symbols``.
    """
    if delay < 1:
        raise ValueError(f"delay={delay}: the copy task needs delay >= 1")
    symbols = jax.random.randint(key, (batch, copy_length), 1, num_symbols + 1)
    blank = jnp.full((batch, delay - 1), COPY_BLANK, jnp.int32)
    cue = jnp.full((batch, 1), num_symbols + 1, jnp.int32)
    tail = jnp.full((batch, copy_length), COPY_BLANK, jnp.int32)
    xs = jnp.concatenate([symbols, blank, cue, tail], axis=1)
    wait = jnp.full((batch, delay + copy_length), COPY_BLANK, jnp.int32)
    return xs, jnp.concatenate([wait, symbols], axis=1)


def copy_baseline(delay: int, num_symbols: int = 8, copy_length: int = 10) -> float:
    """Cross-entropy per step of the memoryless predictor: blanks, then uniform symbols.

    ``copy_length · ln(num_symbols) / (delay + 2·copy_length)``, i.e. ``10 ln 8 / (T + 20)``.
    """
    return copy_length * math.log(num_symbols) / (delay + 2 * copy_length)


def adding_problem(length: int, solved_below: float = 0.05) -> Task:
    """The adding problem as a :class:`Task`: MSE on the last output, baseline 1/6."""
    return Task(
        name="adding",
        length=length,
        input_dim=2,
        output_dim=1,
        return_sequences=False,
        sample=lambda key, batch: adding_batch(key, batch, length),
        loss=squared_error,
        baseline=adding_baseline(),
        solved_below=solved_below,
    )


def copy_task(
    delay: int, num_symbols: int = 8, copy_length: int = 10, solved_fraction: float = 0.1
) -> Task:
    """The copy task as a :class:`Task`: mean cross-entropy over every step.

    Counted solved below ``solved_fraction`` of the memoryless baseline.
    """
    baseline = copy_baseline(delay, num_symbols, copy_length)
    return Task(
        name="copy",
        length=delay + 2 * copy_length,
        input_dim=num_symbols + 2,
        output_dim=num_symbols + 1,
        return_sequences=True,
        sample=lambda key, batch: copy_batch(key, batch, delay, num_symbols, copy_length),
        loss=sequence_cross_entropy,
        baseline=baseline,
        solved_below=solved_fraction * baseline,
    )


TASKS: dict[str, Callable[..., Task]] = {"adding": adding_problem, "copy": copy_task}


# --- the topology experiments' data ------------------------------------------------------------


class SequencePairs(NamedTuple):
    """Inputs and EOS-terminated target sequences (an encoder–decoder or one-to-many task).

    Attributes:
      inputs: ``(n, in_len)`` int32 tokens or ``(n, input_dim)`` float32 vectors.
      lengths: ``(n,)`` int32 real input steps (``in_len``-padded); 1 for vectors.
      targets: ``(n, out_len)`` int32 output tokens, then EOS, then EOS as padding.
      target_mask: ``(n, out_len)`` bool: true up to and including the first EOS.
    """

    inputs: np.ndarray
    lengths: np.ndarray
    targets: np.ndarray
    target_mask: np.ndarray


def encode_targets(answers: list[str], chars: str, out_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``(targets, mask)``: each answer's indices into ``chars``, then EOS (``len(chars)``).

    Raises:
      ValueError: an answer plus EOS is longer than ``out_len``.
    """
    eos = len(chars)
    index = {c: i for i, c in enumerate(chars)}
    targets = np.full((len(answers), out_len), eos, np.int32)
    mask = np.zeros((len(answers), out_len), bool)
    for row, answer in enumerate(answers):
        if len(answer) + 1 > out_len:
            raise ValueError(f"{answer!r} and EOS do not fit in {out_len} output steps")
        targets[row, : len(answer)] = [index[c] for c in answer]
        mask[row, : len(answer) + 1] = True
    return targets, mask


def decode_targets(tokens, chars: str) -> list[str]:
    """Strings from token rows, each cut at its first EOS (``len(chars)``)."""
    out = []
    for row in np.asarray(tokens):
        text = []
        for t in row:
            if t >= len(chars):
                break
            text.append(chars[t])
        out.append("".join(text))
    return out


# --- one-to-many: a number in, its English name out --------------------------------------------

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
NAME_CHARS = " -abcdefghijklmnopqrstuvwxyz"


def number_name(n: int) -> str:
    """American English name of ``0 <= n < 10**6``: 347 -> ``"three hundred forty-seven"``."""
    if not 0 <= n < 10**6:
        raise ValueError(f"n={n}: number_name covers 0 to 999999")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("-" + _ONES[n % 10] if n % 10 else "")
    if n < 1000:
        return _ONES[n // 100] + " hundred" + (" " + number_name(n % 100) if n % 100 else "")
    return number_name(n // 1000) + " thousand" + (" " + number_name(n % 1000) if n % 1000 else "")


def digit_vectors(numbers: np.ndarray, digits: int) -> np.ndarray:
    """``(n, 10 * digits)`` float32: the one-hot decimal digits, most significant first."""
    numbers = np.asarray(numbers)
    place = 10 ** np.arange(digits - 1, -1, -1)
    each = (numbers[:, None] // place[None, :]) % 10  # (n, digits)
    return np.eye(10, dtype=np.float32)[each].reshape(len(numbers), 10 * digits)


def name_out_len(digits: int) -> int:
    """Output steps for every name below ``10**digits`` plus EOS."""
    return max(len(number_name(n)) for n in range(10**digits)) + 1


def number_names(numbers: np.ndarray, digits: int) -> SequencePairs:
    """Vectors of ``numbers`` (:func:`digit_vectors`) and their names over :data:`NAME_CHARS`."""
    numbers = np.asarray(numbers)
    if numbers.size and not (numbers.min() >= 0 and numbers.max() < 10**digits):
        raise ValueError(f"numbers must lie in [0, {10**digits}) for digits={digits}")
    targets, mask = encode_targets(
        [number_name(int(n)) for n in numbers], NAME_CHARS, name_out_len(digits)
    )
    return SequencePairs(
        digit_vectors(numbers, digits), np.ones(len(numbers), np.int32), targets, mask
    )


def split_numbers(digits: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """All numbers below ``10**digits``, shuffled and split into ``(train, test)``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must be in (0, 1)")
    order = np.random.default_rng(seed).permutation(10**digits)
    cut = round(len(order) * (1.0 - test_fraction))
    if cut < 1 or cut == len(order):
        raise ValueError(
            f"digits={digits} and test_fraction={test_fraction} leave no "
            "training or no test numbers; change either"
        )
    return order[:cut], order[cut:]


# --- many-to-one: balanced parentheses ---------------------------------------------------------

PAREN_CHARS = "() "  # '(' 0, ')' 1, padding 2


def is_balanced(word: str) -> bool:
    """True when every ')' closes an earlier '(' and none stays open."""
    depth = 0
    for c in word:
        depth += 1 if c == "(" else -1
        if depth < 0:
            return False
    return depth == 0


def _completions(n: int) -> np.ndarray:
    # ways[r, h]: paths of r steps from height h down to 0 that never go below 0.
    ways = np.zeros((n + 1, n + 2))
    ways[0, 0] = 1.0
    for r in range(1, n + 1):
        ways[r, 0] = ways[r - 1, 1]
        ways[r, 1:-1] = ways[r - 1, :-2] + ways[r - 1, 2:]
    return ways


def _steps_valid(steps: np.ndarray) -> np.ndarray:
    depth = np.cumsum(steps, axis=1)
    return (depth.min(axis=1) >= 0) & (depth[:, -1] == 0)


def _dyck_steps(rng, count: int, n: int) -> np.ndarray:
    """``(count, n)`` of ±1: uniformly random balanced words of even length ``n``."""
    ways = _completions(n)
    steps = np.empty((count, n), np.int64)
    height = np.zeros(count, np.int64)
    for t in range(n):
        remaining = n - t
        p_open = ways[remaining - 1, height + 1] / ways[remaining, height]
        steps[:, t] = np.where(rng.random(count) < p_open, 1, -1)
        height += steps[:, t]
    return steps


def balanced_parentheses(lengths, count_per_length: int, seed: int, max_len: int | None = None):
    """Balanced and unbalanced words of each even length, half each, as a :class:`Labelled`.

    Positives are uniform over the balanced words of that length. Negatives are hard: half
    hold as many '(' as ')' in a random order that goes below depth 0 somewhere (a counter of
    the totals cannot reject them), half are a balanced word with one symbol flipped.

    Args:
      lengths: even word lengths to draw, ``count_per_length`` words each.
      count_per_length: words per length (even: half positive).
      seed: numpy seed.
      max_len: pad width (default: the largest length).

    Returns:
      ``Labelled`` over :data:`PAREN_CHARS` (label 1: balanced), shuffled.
    """
    lengths = [int(n) for n in lengths]
    if any(n < 2 or n % 2 for n in lengths):
        raise ValueError(f"lengths={lengths} must be even and at least 2")
    max_len = max(lengths) if max_len is None else max_len
    if max(lengths) > max_len:
        raise ValueError(f"max_len={max_len} is shorter than the longest length {max(lengths)}")
    rng = np.random.default_rng(seed)
    rows, lens, labels = [], [], []
    half = count_per_length // 2
    for n in lengths:
        positives = _dyck_steps(rng, half, n)
        flipped = _dyck_steps(rng, half - half // 2, n)
        flipped[np.arange(len(flipped)), rng.integers(0, n, len(flipped))] *= -1
        shuffled = np.empty((0, n), np.int64)
        while len(shuffled) < half // 2:
            base = np.tile(np.repeat([1, -1], n // 2), (half, 1))
            draws = rng.permuted(base, axis=1)
            shuffled = np.concatenate([shuffled, draws[~_steps_valid(draws)]])[: half // 2]
        for steps, label in ((positives, 1), (flipped, 0), (shuffled, 0)):
            rows.append(
                np.pad(np.where(steps > 0, 0, 1), ((0, 0), (0, max_len - n)), constant_values=2)
            )
            lens.append(np.full(len(steps), n))
            labels.append(np.full(len(steps), label))
    order = rng.permutation(sum(len(r) for r in rows))
    return Labelled(
        np.concatenate(rows).astype(np.int32)[order],
        np.concatenate(lens).astype(np.int32)[order],
        np.concatenate(labels).astype(np.int32)[order],
    )


def decode_words(data: Labelled) -> list[str]:
    """The words of a :class:`Labelled` parentheses set, padding removed."""
    return ["".join(PAREN_CHARS[t] for t in row[:n]) for row, n in zip(data.tokens, data.lengths)]


# --- encoder–decoder: addition ---------------------------------------------------------------

ADDITION_CHARS = "0123456789+ "  # the space pads the questions
SUM_CHARS = "0123456789"


def addition_split(num_train: int, num_test: int, digits: int, seed: int):
    """``(train, test)`` :class:`SequencePairs` of ``"a+b"`` -> ``str(a + b)``, no pair in both.

    ``a`` and ``b`` are uniform in ``[0, 10**digits)``; ordered pairs ``(a, b)`` are drawn
    without replacement, so every test problem is unseen (``"b+a"`` may be in training, as in
    Keras's example, which dedups only identical questions). Questions are ``2 * digits + 1``
    tokens over :data:`ADDITION_CHARS`, padded with spaces and with ``lengths``; answers are
    over :data:`SUM_CHARS` then EOS, in ``digits + 2`` steps.
    """
    space = 10 ** (2 * digits)
    if num_train < 1 or num_test < 1 or num_train + num_test > space:
        raise ValueError(
            f"operands of up to digits={digits} digits make {space} problems; num_train="
            f"{num_train} and num_test={num_test} must be positive and fit in them: "
            "lower them or raise digits"
        )
    rng = np.random.default_rng(seed)
    pairs = rng.choice(space, num_train + num_test, replace=False)
    a, b = pairs // 10**digits, pairs % 10**digits
    train = addition_problems(a[:num_train], b[:num_train], digits)
    test = addition_problems(a[num_train:], b[num_train:], digits)
    return train, test


def addition_problems(a, b, digits: int) -> SequencePairs:
    """Questions ``f"{a}+{b}"`` and answers ``str(a + b)`` as :class:`SequencePairs`."""
    questions = [f"{x}+{y}" for x, y in zip(np.asarray(a).tolist(), np.asarray(b).tolist())]
    in_len = 2 * digits + 1
    pad = ADDITION_CHARS.index(" ")
    inputs = np.full((len(questions), in_len), pad, np.int32)
    for row, q in enumerate(questions):
        if len(q) > in_len:
            raise ValueError(f"{q!r} has more than {digits} digits per operand")
        inputs[row, : len(q)] = [ADDITION_CHARS.index(c) for c in q]
    answers = [str(x + y) for x, y in zip(np.asarray(a).tolist(), np.asarray(b).tolist())]
    targets, mask = encode_targets(answers, SUM_CHARS, digits + 2)
    return SequencePairs(inputs, np.array([len(q) for q in questions], np.int32), targets, mask)


def decode_questions(inputs, lengths) -> list[str]:
    """The question strings of addition inputs."""
    return [
        "".join(ADDITION_CHARS[t] for t in row[:n])
        for row, n in zip(np.asarray(inputs), np.asarray(lengths))
    ]


# --- synced many-to-many: truecasing -----------------------------------------------------------
