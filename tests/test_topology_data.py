"""The topology data generators produce what they claim (checked by arithmetic and str methods)."""

import collections

import numpy as np
import pytest

from rnn_jax import topology_data as td
from rnn_jax.data import TextError, load_text

_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen".split())}
_WORDS.update({w: 10 * i for i, w in enumerate(
    "twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)})


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
        name = td.number_name(n)
        assert _parse_name(name) == n, name
        assert set(name) <= set(td.NAME_CHARS) and name == name.strip() and "  " not in name
    assert td.number_name(0) == "zero" and td.number_name(15) == "fifteen"
    assert td.number_name(40) == "forty" and td.number_name(999_999).startswith("nine hundred")
    with pytest.raises(ValueError):
        td.number_name(10**6)


def test_number_pairs_digit_vectors_and_targets():
    numbers = np.array([0, 7, 305, 999, 42])
    data = td.number_names(numbers, 3)
    assert data.inputs.shape == (5, 30)
    digits = data.inputs.reshape(5, 3, 10).argmax(-1)
    np.testing.assert_array_equal(digits @ np.array([100, 10, 1]), numbers)
    np.testing.assert_array_equal(data.inputs.sum(1), 3.0)
    names = td.decode_targets(data.targets, td.NAME_CHARS)
    assert [_parse_name(s) for s in names] == numbers.tolist()
    eos = len(td.NAME_CHARS)
    for row, mask, name in zip(data.targets, data.target_mask, names):
        assert mask.sum() == len(name) + 1 and row[len(name)] == eos and mask[: len(name) + 1].all()
    train, test = td.split_numbers(3, 0.1, seed=0)
    assert len(train) == 900 and len(test) == 100
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(1000))


def _balanced_by_rewriting(word: str) -> bool:
    while "()" in word:
        word = word.replace("()", "")
    return word == ""


def test_balanced_parentheses_labels_lengths_and_hard_negatives():
    data = td.balanced_parentheses([2, 4, 10, 16], 40, seed=0, max_len=20)
    words = td.decode_words(data)
    assert data.tokens.shape == (160, 20)
    assert [len(w) for w in words] == data.lengths.tolist()
    assert collections.Counter(data.lengths.tolist()) == {2: 40, 4: 40, 10: 40, 16: 40}
    assert [int(_balanced_by_rewriting(w)) for w in words] == data.labels.tolist()
    for row, n in zip(data.tokens, data.lengths):
        assert (row[n:] == td.PAREN_CHARS.index(" ")).all()
    for n in (2, 4, 10, 16):
        assert data.labels[data.lengths == n].sum() == 20
    # Half the negatives have as many '(' as ')': counting alone cannot reject them.
    negatives = [w for w, y in zip(words, data.labels) if y == 0 and len(w) > 2]
    even = [w for w in negatives if w.count("(") == w.count(")")]
    assert len(even) == 30 and all(td.is_balanced(w) is False for w in even)
    with pytest.raises(ValueError, match="even"):
        td.balanced_parentheses([3], 4, seed=0)


def test_balanced_words_are_uniform():
    data = td.balanced_parentheses([6], 4000, seed=1)
    counts = collections.Counter(w for w, y in zip(td.decode_words(data), data.labels) if y)
    # The 5 balanced words of length 6 (Catalan number C3), 2000 draws: about 400 each.
    assert len(counts) == 5
    assert all(330 < c < 470 for c in counts.values()), counts


def test_addition_answers_by_arithmetic_and_disjoint_split():
    train, test = td.addition_split(2000, 500, digits=3, seed=0)
    for data in (train, test):
        questions = td.decode_questions(data.inputs, data.lengths)
        answers = td.decode_targets(data.targets, td.SUM_CHARS)
        for q, a in zip(questions, answers):
            left, right = q.split("+")
            assert len(left) <= 3 and len(right) <= 3
            assert int(a) == int(left) + int(right) and str(int(a)) == a
        np.testing.assert_array_equal(data.lengths, [len(q) for q in questions])
        np.testing.assert_array_equal(data.target_mask.sum(1), [len(a) + 1 for a in answers])
        assert data.inputs.shape[1] == 7 and data.targets.shape[1] == 5
    seen = set(td.decode_questions(train.inputs, train.lengths))
    assert not seen & set(td.decode_questions(test.inputs, test.lengths))
    with pytest.raises(ValueError, match="--train_examples"):
        td.addition_split(90, 20, digits=1, seed=0)


def test_truecasing_labels_are_isupper():
    text = "Alice said: 'I'm NOT mad.' The Queen, 3 hats."
    lower, labels = td.truecasing(text)
    assert lower == text.lower()
    assert labels.tolist() == [int(c.isupper()) for c in text]
    assert "".join(c.upper() if y else c for c, y in zip(lower, labels)) == text
    vocab, (train_tok, train_lab), (val_tok, val_lab) = td.truecasing_split(text * 4, 0.25, 8)
    assert vocab.decode(np.concatenate([train_tok, val_tok])) == (text * 4).lower()
    np.testing.assert_array_equal(np.concatenate([train_lab, val_lab]), labels.tolist() * 4)
    windows = td.tile_windows(val_tok, val_lab, 8)
    mask = np.arange(8)[None] < windows.lengths[:, None]
    np.testing.assert_array_equal(windows.tokens[mask], val_tok)
    np.testing.assert_array_equal(windows.labels[mask], val_lab)


def test_cased_alice_lowercases_to_the_tutorial_text(alice_path):
    text = td.load_cased_text(alice_path)
    assert text.lower() == load_text(alice_path)
    _, labels = td.truecasing(text)
    assert labels.sum() == sum(c.isupper() for c in text) > 1000
    assert "Alice" in text and text.isascii()


def test_cased_text_errors_name_the_flag(tmp_path):
    with pytest.raises(TextError, match="--text"):
        td.load_cased_text(str(tmp_path / "missing.txt"))
    with pytest.raises(TextError, match="--seq_len"):
        td.truecasing_split("Short text.", 0.5, 64)
