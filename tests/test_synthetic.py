"""Synthetic data: structure by arithmetic and str methods, analytic baselines by sampling."""

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import cells, synthetic
from rnn_jax.data import (
    TextError,
    load_text,
    read_corpus,
    tile_windows,
    truecasing,
    truecasing_split,
)
from rnn_jax.models import sequence_classifier, sequence_tagger

# --- the long-range tasks ----------------------------------------------------------------------
# One shape per task: every jitted sampler shape costs a compilation, so the tests share them.
ADDING_LENGTH, COPY_DELAY = 10, 15


@pytest.fixture(scope="module")
def adding():
    task = synthetic.adding_problem(ADDING_LENGTH)
    return task, tuple(map(np.asarray, task.sample(jax.random.PRNGKey(1), 100_000)))


@pytest.fixture(scope="module")
def copy():
    task = synthetic.copy_task(COPY_DELAY)
    return task, tuple(map(np.asarray, task.sample(jax.random.PRNGKey(3), 40_000)))


def test_adding_structure(adding):
    task, (xs, targets) = adding
    n, half = len(xs), ADDING_LENGTH // 2
    assert xs.shape == (n, ADDING_LENGTH, 2) and xs.dtype == np.float32 and targets.shape == (n,)
    assert (task.input_dim, task.output_dim, task.return_sequences) == (2, 1, False)
    values, markers = xs[..., 0], xs[..., 1]
    assert np.all((values >= 0) & (values < 1))
    assert np.all(markers.sum(axis=1) == 2)
    first, second = (np.sort(np.nonzero(markers)[1].reshape(n, 2), axis=1)).T
    assert first.max() < half <= second.min()  # one mark in each half
    assert len(np.unique(first)) == half and len(np.unique(second)) == ADDING_LENGTH - half
    rows = np.arange(n)
    np.testing.assert_allclose(targets, values[rows, first] + values[rows, second], rtol=1e-6)


def test_adding_baseline_by_sampling(adding):
    task, (_, targets) = adding
    errors = (targets.astype(np.float64) - 1.0) ** 2
    stderr = errors.std() / math.sqrt(errors.size)
    assert abs(errors.mean() - synthetic.adding_baseline()) < 4 * stderr
    assert task.baseline == synthetic.adding_baseline() and abs(task.baseline - 1 / 6) < 1e-15
    # 1.0 is the best constant: the sample mean of the targets.
    assert abs(np.mean(targets) - 1.0) < 4 * math.sqrt(1 / 6 / targets.size)


def test_copy_structure(copy):
    task, (xs, targets) = copy
    delay, n = COPY_DELAY, len(xs)
    assert xs.shape == targets.shape == (n, delay + 20) and task.length == delay + 20
    symbols = xs[:, :10]
    assert symbols.min() == 1 and symbols.max() == 8
    assert np.all(xs[:, 10 : 10 + delay - 1] == synthetic.COPY_BLANK)
    assert np.all(xs[:, 9 + delay] == 9)  # the cue, one step before the recall
    assert np.all(xs[:, 10 + delay :] == synthetic.COPY_BLANK)
    assert np.all(targets[:, : delay + 10] == synthetic.COPY_BLANK)
    np.testing.assert_array_equal(targets[:, delay + 10 :], symbols)


def test_copy_baseline_by_sampling(copy):
    task, (_, targets) = copy
    delay = COPY_DELAY
    np.testing.assert_allclose(task.baseline, 10 * math.log(8) / (delay + 20), rtol=1e-15)
    np.testing.assert_allclose(task.baseline, synthetic.copy_baseline(delay), rtol=1e-15)
    np.testing.assert_allclose(task.solved_below, 0.1 * task.baseline, rtol=1e-15)
    # The best memoryless predictor is each position's marginal; its cross-entropy is the
    # mean over positions of the empirical entropies.
    entropy = 0.0
    for t in range(task.length):
        p = np.bincount(targets[:, t], minlength=9) / len(targets)
        entropy -= np.sum(p[p > 0] * np.log(p[p > 0]))
    np.testing.assert_allclose(entropy / task.length, task.baseline, rtol=2e-3)
    # Through the task's loss: blanks for sure, then uniform over the 8 symbols.
    logits = np.full((len(targets), task.length, 9), -1e9, np.float32)
    logits[:, : delay + 10, 0] = 0.0
    logits[:, delay + 10 :, 1:] = 0.0
    np.testing.assert_allclose(np.mean(task.loss(logits, targets)), task.baseline, rtol=1e-5)


@pytest.mark.parametrize("name", ["adding", "copy"])
def test_tasks_are_seeded_and_registered(name, request):
    task, (xs, _) = request.getfixturevalue(name)
    assert (
        synthetic.TASKS[name]
        is {"adding": synthetic.adding_problem, "copy": synthetic.copy_task}[name]
    )
    again = task.sample(jax.random.PRNGKey(1 if name == "adding" else 3), len(xs))
    other = task.sample(jax.random.PRNGKey(8), len(xs))
    np.testing.assert_array_equal(again[0], xs)
    assert not np.array_equal(other[0], xs)


@pytest.mark.parametrize("name", ["adding", "copy"])
def test_task_model_shapes_and_loss(name, request):
    task, (xs, targets) = request.getfixturevalue(name)
    xs, targets = xs[:3], targets[:3]
    head = sequence_tagger if task.return_sequences else sequence_classifier
    model = head(cells.gru(4), task.input_dim, task.output_dim)
    # Random params of the model's shapes (drawn by NumPy: no initialiser to compile).
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
    outputs = jax.jit(model.apply)(params, xs)
    expected = (3, task.length, task.output_dim) if task.return_sequences else (3, task.output_dim)
    assert outputs.shape == expected
    losses = task.loss(outputs, targets)
    assert losses.shape == (3,)
    if task.name == "adding":
        np.testing.assert_allclose(losses, (outputs[:, 0] - targets) ** 2, rtol=1e-6)
    else:
        logp = jax.nn.log_softmax(outputs)
        nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
        np.testing.assert_allclose(losses, nll.mean(axis=1), rtol=1e-5)


def test_bad_lengths_raise():
    with pytest.raises(ValueError, match="length >= 2"):
        synthetic.adding_batch(jax.random.PRNGKey(0), 1, 1)
    with pytest.raises(ValueError, match="delay >= 1"):
        synthetic.copy_batch(jax.random.PRNGKey(0), 1, 0)


# --- one-to-many: number names -----------------------------------------------------------------

_WORDS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen".split()
    )
}
_WORDS.update(
    {
        w: 10 * i
        for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)
    }
)


def _parse_name(name: str) -> int:
    """Words back to a number: an independent inverse of number_name."""
    total, current = 0, 0
    for word in name.replace("-", " ").split():
        if word == "hundred":
            current *= 100
        elif word == "thousand":
            total, current = total + current * 1000, 0
        else:
            current += _WORDS[word]
    return total + current


def test_number_names_read_back_to_their_numbers():
    for n in range(10_000):
        name = synthetic.number_name(n)
        assert _parse_name(name) == n, name
        assert set(name) <= set(synthetic.NAME_CHARS) and name == name.strip()
        assert "  " not in name
    assert synthetic.number_name(0) == "zero" and synthetic.number_name(15) == "fifteen"
    assert synthetic.number_name(40) == "forty"
    assert _parse_name(synthetic.number_name(999_999)) == 999_999
    with pytest.raises(ValueError, match="999999"):
        synthetic.number_name(10**6)
    # The longest name below 10**d, plus EOS.
    assert synthetic.name_out_len(2) == len("seventy-seven") + 1


def test_number_pairs_digit_vectors_and_targets():
    numbers = np.array([0, 7, 305, 999, 42])
    data = synthetic.number_names(numbers, 3)
    assert data.inputs.shape == (5, 30)
    digits = data.inputs.reshape(5, 3, 10).argmax(-1)
    np.testing.assert_array_equal(digits @ np.array([100, 10, 1]), numbers)
    np.testing.assert_array_equal(data.inputs.sum(1), 3.0)
    np.testing.assert_array_equal(data.lengths, 1)
    names = synthetic.decode_targets(data.targets, synthetic.NAME_CHARS)
    assert [_parse_name(s) for s in names] == numbers.tolist()
    eos = len(synthetic.NAME_CHARS)
    for row, mask, name in zip(data.targets, data.target_mask, names):
        assert mask.sum() == len(name) + 1 and row[len(name)] == eos
        assert mask[: len(name) + 1].all() and (row[len(name) :] == eos).all()
    train, test = synthetic.split_numbers(3, 0.1, seed=0)
    assert len(train) == 900 and len(test) == 100
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(1000))
    with pytest.raises(ValueError, match="digits=3"):
        synthetic.number_names(np.array([1000]), 3)
    with pytest.raises(ValueError, match=r"test_fraction=0\.05"):
        synthetic.split_numbers(1, 0.05, seed=0)  # 10 numbers: none left to test


def test_encode_targets_round_trip_and_overflow():
    targets, mask = synthetic.encode_targets(["ab", "", "ba"], "ab", 3)
    np.testing.assert_array_equal(targets, [[0, 1, 2], [2, 2, 2], [1, 0, 2]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 0], [1, 1, 1]])
    assert synthetic.decode_targets(targets, "ab") == ["ab", "", "ba"]
    with pytest.raises(ValueError, match="EOS"):
        synthetic.encode_targets(["abc"], "abc", 3)


# --- many-to-one: balanced parentheses ---------------------------------------------------------


def _balanced_by_rewriting(word: str) -> bool:
    while "()" in word:
        word = word.replace("()", "")
    return word == ""


def test_balanced_parentheses_labels_lengths_and_hard_negatives():
    data = synthetic.balanced_parentheses([2, 4, 10, 16], 40, seed=0, max_len=20)
    words = synthetic.decode_words(data)
    assert data.tokens.shape == (160, 20)
    assert [len(w) for w in words] == data.lengths.tolist()
    assert collections.Counter(data.lengths.tolist()) == {2: 40, 4: 40, 10: 40, 16: 40}
    assert [int(_balanced_by_rewriting(w)) for w in words] == data.labels.tolist()
    assert [synthetic.is_balanced(w) for w in words] == [bool(y) for y in data.labels]
    for row, n in zip(data.tokens, data.lengths):
        assert (row[n:] == synthetic.PAREN_CHARS.index(" ")).all()
    for n in (2, 4, 10, 16):
        assert data.labels[data.lengths == n].sum() == 20
    # Half the negatives have as many '(' as ')': counting alone cannot reject them.
    negatives = [w for w, y in zip(words, data.labels) if y == 0 and len(w) > 2]
    even = [w for w in negatives if w.count("(") == w.count(")")]
    assert len(even) == 30 and not any(_balanced_by_rewriting(w) for w in even)
    with pytest.raises(ValueError, match="even"):
        synthetic.balanced_parentheses([3], 4, seed=0)
    with pytest.raises(ValueError, match="max_len=4"):
        synthetic.balanced_parentheses([6], 4, seed=0, max_len=4)


def test_balanced_words_are_uniform():
    data = synthetic.balanced_parentheses([6], 4000, seed=1)
    words = synthetic.decode_words(data)
    counts = collections.Counter(w for w, y in zip(words, data.labels) if y)
    # The 5 balanced words of length 6 (Catalan number C3), 2000 draws: 400 each, sd 18.
    assert len(counts) == 5
    assert all(330 < c < 470 for c in counts.values()), counts


# --- encoder-decoder: addition -----------------------------------------------------------------


def test_addition_answers_by_arithmetic_and_disjoint_split():
    train, test = synthetic.addition_split(2000, 500, digits=3, seed=0)
    for data in (train, test):
        questions = synthetic.decode_questions(data.inputs, data.lengths)
        answers = synthetic.decode_targets(data.targets, synthetic.SUM_CHARS)
        for q, a in zip(questions, answers):
            left, right = q.split("+")
            assert len(left) <= 3 and len(right) <= 3
            assert int(a) == int(left) + int(right) and str(int(a)) == a
        np.testing.assert_array_equal(data.lengths, [len(q) for q in questions])
        np.testing.assert_array_equal(data.target_mask.sum(1), [len(a) + 1 for a in answers])
        assert data.inputs.shape[1] == 7 and data.targets.shape[1] == 5
    seen = set(synthetic.decode_questions(train.inputs, train.lengths))
    assert len(seen) == 2000
    assert not seen & set(synthetic.decode_questions(test.inputs, test.lengths))
    with pytest.raises(ValueError, match="num_train=90"):
        synthetic.addition_split(90, 20, digits=1, seed=0)


# --- synced many-to-many: truecasing (rnn_jax.data's helpers for the synced experiment) ---------


def test_truecasing_labels_are_isupper():
    text = "Alice said: 'I'm NOT mad.' The Queen, 3 hats."
    lower, labels = truecasing(text)
    assert lower == text.lower()
    assert labels.tolist() == [int(c.isupper()) for c in text]
    assert "".join(c.upper() if y else c for c, y in zip(lower, labels)) == text
    vocab, (train_tok, train_lab), (val_tok, val_lab) = truecasing_split(text * 4, 0.25, 8)
    assert len(val_tok) == round(len(text) * 4 * 0.25)
    assert vocab.decode(np.concatenate([train_tok, val_tok])) == (text * 4).lower()
    np.testing.assert_array_equal(np.concatenate([train_lab, val_lab]), labels.tolist() * 4)
    windows = tile_windows(val_tok, val_lab, 8)
    assert windows.tokens.shape == (math.ceil(len(val_tok) / 8), 8)
    mask = np.arange(8)[None] < windows.lengths[:, None]
    np.testing.assert_array_equal(windows.tokens[mask], val_tok)
    np.testing.assert_array_equal(windows.labels[mask], val_lab)


@pytest.mark.usefixtures("alice_path")  # skips where the corpus cannot be obtained
def test_cased_alice_lowercases_to_the_tutorial_text():
    text = read_corpus("alice", "cased")
    assert text.lower() == read_corpus("alice")
    _, labels = truecasing(text)
    assert labels.sum() == sum(c.isupper() for c in text) > 1000
    assert "Alice" in text and text.isascii()


def test_cased_text_errors_name_the_parameter(tmp_path):
    with pytest.raises(TextError, match=r"path=.*missing\.txt"):
        load_text(str(tmp_path / "missing.txt"), cleaning="cased")
    with pytest.raises(TextError, match="seq_len=64"):
        truecasing_split("Short text.", 0.5, 64)
    with pytest.raises(ValueError, match=r"val_fraction=1\.0"):
        truecasing_split("Short text.", 1.0, 2)
