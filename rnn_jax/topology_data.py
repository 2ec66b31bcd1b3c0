"""Data for the topology experiments: number names, balanced parentheses, addition, truecasing."""

from typing import NamedTuple

import numpy as np

from rnn_jax.data import TextError, Vocabulary, load_text


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


class Labelled(NamedTuple):
    """Variable-length token sequences with one label each (many-to-one).

    Attributes:
      tokens: ``(n, max_len)`` int32, padded with ``pad``.
      lengths: ``(n,)`` int32.
      labels: ``(n,)`` int32.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray


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

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
NAME_CHARS = " -abcdefghijklmnopqrstuvwxyz"


def number_name(n: int) -> str:
    """American English name of ``0 <= n < 10**6``: 347 -> ``"three hundred forty-seven"``."""
    if not 0 <= n < 10**6:
        raise ValueError(f"number_name covers 0 to 999999, got {n}")
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
    return SequencePairs(digit_vectors(numbers, digits), np.ones(len(numbers), np.int32),
                         targets, mask)


def split_numbers(digits: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """All numbers below ``10**digits``, shuffled and split into ``(train, test)``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"--test_fraction must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(10**digits)
    cut = int(round(len(order) * (1.0 - test_fraction)))
    if cut < 1 or cut == len(order):
        raise ValueError(f"--digits={digits} and --test_fraction={test_fraction} leave no "
                         "training or no test numbers; change either")
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
        raise ValueError(f"lengths must be even and at least 2, got {lengths}")
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
            rows.append(np.pad(np.where(steps > 0, 0, 1), ((0, 0), (0, max_len - n)),
                               constant_values=2))
            lens.append(np.full(len(steps), n))
            labels.append(np.full(len(steps), label))
    order = rng.permutation(sum(len(r) for r in rows))
    return Labelled(np.concatenate(rows).astype(np.int32)[order],
                    np.concatenate(lens).astype(np.int32)[order],
                    np.concatenate(labels).astype(np.int32)[order])


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
            f"operands of up to {digits} digits make {space} problems; --train_examples="
            f"{num_train} and --test_examples={num_test} must be positive and fit in them: "
            "lower them or raise --digits"
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
    return ["".join(ADDITION_CHARS[t] for t in row[:n])
            for row, n in zip(np.asarray(inputs), np.asarray(lengths))]


# --- synced many-to-many: truecasing -----------------------------------------------------------


def load_cased_text(path: str) -> str:
    """The tutorial's cleanup (DESIGN.md §1) without lower-casing: strip, ASCII, join lines.

    ``load_cased_text(p).lower() == rnn_jax.data.load_text(p)``.

    Raises:
      TextError: the file is missing, unreadable, empty or binary (the message names ``--text``).
    """
    load_text(path)  # the checks and their messages
    with open(path, "rb") as f:
        raw = f.read()
    lines = (line.strip().decode("ascii", "ignore") for line in raw.split(b"\n"))
    return " ".join(line for line in lines if line)


def truecasing(text: str) -> tuple[str, np.ndarray]:
    """``(text.lower(), labels)``: ``labels[i]`` is 1 where ``text[i].isupper()``, int32."""
    return text.lower(), np.fromiter((c.isupper() for c in text), np.int32, len(text))


def rule_truecasing(lower: str) -> np.ndarray:
    """A rule baseline's labels: upper-case the first letter of the text and of each sentence
    (after ``.``, ``!`` or ``?`` and spaces or quotes) and the word ``i``."""
    labels = np.zeros(len(lower), np.int32)
    sentence_start = True
    for k, c in enumerate(lower):
        if c.isalpha():
            alone = (k == 0 or not lower[k - 1].isalpha()) and (
                k + 1 == len(lower) or not lower[k + 1].isalpha())
            if sentence_start or (c == "i" and alone):
                labels[k] = 1
            sentence_start = False
        elif c in ".!?":
            sentence_start = True
        elif c.isdigit():
            sentence_start = False
    return labels


def truecasing_split(text: str, val_fraction: float, seq_len: int):
    """Tokens and labels of the lower-cased text, split into a training head and a held-out tail.

    Returns:
      ``(vocabulary, (train_tokens, train_labels), (val_tokens, val_labels))``, int32 arrays;
      the vocabulary is the sorted characters of the whole lower-cased text.

    Raises:
      TextError: either side is shorter than ``seq_len`` (names ``--val_fraction``).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val_fraction must be in (0, 1), got {val_fraction}")
    lower, labels = truecasing(text)
    vocab = Vocabulary.from_text(lower)
    tokens = vocab.encode(lower)
    cut = int(round(len(tokens) * (1.0 - val_fraction)))
    if cut < seq_len + 1 or len(tokens) - cut < seq_len:
        raise TextError(
            f"{len(tokens)} characters split at {cut} leave fewer than --seq_len={seq_len} on one "
            "side; use a longer text, a shorter --seq_len or another --val_fraction"
        )
    return vocab, (tokens[:cut], labels[:cut]), (tokens[cut:], labels[cut:])


def tile_windows(tokens: np.ndarray, labels: np.ndarray, seq_len: int) -> Labelled:
    """Consecutive non-overlapping windows covering every character once; the last one is
    shorter and padded (its ``lengths`` say so). ``Labelled.labels`` is ``(n, seq_len)``."""
    count = -(-len(tokens) // seq_len)
    pad = count * seq_len - len(tokens)
    lengths = np.full(count, seq_len, np.int32)
    lengths[-1] = seq_len - pad
    return Labelled(np.pad(tokens, (0, pad)).reshape(count, seq_len).astype(np.int32), lengths,
                    np.pad(labels, (0, pad)).reshape(count, seq_len).astype(np.int32))
