"""Edges of the best-of-n estimator (evaluation/bon.py) that the enumeration tests do not reach: the fast sort's tie
detection, its order-preserving keys, row numbers in ragged errors, input paths and exact messages. Expected
values come from brute-force enumeration or are written out by hand."""

from __future__ import annotations

import math
import warnings
from itertools import combinations

import numpy as np
import pytest

from evaluation import bon
from evaluation.bon import BonInputError, _ascending_order, _order_preserving_keys, bon_coefficients, bon_curve, kl_bon


def brute_force_gold(proxy, gold, n):
    """Mean over every n-subset of the mean gold among the subset's tied proxy-best answers."""
    total, subsets = 0.0, list(combinations(range(len(proxy)), n))
    for subset in subsets:
        best = max(proxy[i] for i in subset)
        tied = [gold[i] for i in subset if proxy[i] == best]
        total += sum(tied) / len(tied)
    return total / len(subsets)


def ulps(x: float, k: int) -> float:
    for _ in range(k):
        x = np.nextafter(x, np.inf)
    return x


def test_fast_sort_flags_only_rows_with_near_ties():
    order, suspect = _ascending_order(np.array([[3.0, 1.0, 2.0], [0.5, -4.0, 9.0]]))
    assert order.tolist() == [[1, 2, 0], [4, 3, 5]] and suspect.tolist() == [False, False]
    # N = 2 drops one low bit: values two ulps apart still differ in the kept bits
    _, suspect = _ascending_order(np.array([[1.0, ulps(1.0, 2)], [1.0, ulps(1.0, 1)]]))
    assert suspect.tolist() == [False, True]
    # N = 3 drops two low bits: 0, 4 and 8 ulps above 1.0 keep distinct high bits
    order, suspect = _ascending_order(np.array([[ulps(1.0, 8), 1.0, ulps(1.0, 4)]]))
    assert order.tolist() == [[1, 2, 0]] and suspect.tolist() == [False]
    _, suspect = _ascending_order(np.array([[2.0, 2.0, 1.0]]))
    assert suspect.tolist() == [True]


def test_order_preserving_keys_sort_like_the_values():
    values = np.array([-np.inf, -1e300, -2.0, -1.0, -1e-20, -0.0, 0.0, 1e-20, 2e-20, 1.0, 2.0, np.inf])
    keys = _order_preserving_keys(values)
    assert np.all(keys[1:] >= keys[:-1]) and keys[5] == keys[6]  # -0.0 and +0.0 share a key
    assert len(set(keys.tolist())) == len(values) - 1
    assert _order_preserving_keys(np.array([2.0, 1.0], dtype=np.float32)).tolist() == \
        _order_preserving_keys(np.array([2.0, 1.0])).tolist()


def test_all_negative_distinct_scores_match_enumeration():
    proxy = [[-3.0, -0.5, -7.25, -1.0, -2.0]]
    gold = [[1.0, 5.0, -2.0, 3.0, 0.5]]
    curve = bon_curve(np.array(proxy), np.array(gold), [1, 2, 3, 5])
    for point in curve:
        assert point["gold_score"] == pytest.approx(brute_force_gold(proxy[0], gold[0], point["n"]), abs=1e-12)
    assert curve[-1]["proxy_score"] == -0.5


def test_many_prompts_few_answers_use_every_row():
    rng = np.random.default_rng(11)
    proxy, gold = rng.normal(size=(70, 4)), rng.normal(size=(70, 4))  # more row chunks than answers
    for workers in (1, 2):
        curve = bon_curve(proxy, gold, [1, 2, 4], workers=workers)
        for point in curve:
            expected = np.mean([brute_force_gold(p, g, point["n"]) for p, g in zip(proxy, gold)])
            assert point["gold_score"] == pytest.approx(expected, abs=1e-12)


def test_ragged_errors_name_the_original_row():
    proxy = [[1.0, 2.0], [1.0, 2.0, 3.0], [1.0, float("nan")]]
    gold = [[0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0]]
    with pytest.raises(BonInputError) as info:
        bon_curve(proxy, gold, [1])
    assert str(info.value) == "row 2: proxy score of answer 1 is missing or not finite (nan)"


def test_overflowing_and_cancelling_sums_raise_no_numpy_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bon_curve([[1e308, 1e308, 0.0]], [[1.0, 2.0, 3.0]], [1])[0]["gold_score"] == pytest.approx(2.0)
        with pytest.raises(BonInputError, match="row 0: proxy score of answer 0 is missing or not finite"):
            bon_curve([[np.inf, -np.inf]], [[1.0, 2.0]], [1])


def test_array_input_and_list_input_paths():
    with pytest.raises(BonInputError) as info:
        bon_curve(np.zeros((1, 2)), np.zeros((1, 3)), [1])
    assert str(info.value) == "proxy scores have shape (1, 2) but gold scores (1, 3)"
    with pytest.raises(BonInputError) as info:  # a 2-D proxy array with ragged gold lists: checked row by row
        bon_curve(np.zeros((2, 2)), [[1.0, 2.0], [3.0]], [1])
    assert str(info.value) == "row 1: 2 proxy scores but 1 gold scores"
    rows = bon_curve(np.array([[1.0, 3.0]]), (row for row in [[5.0, 7.0]]), [1, 2])  # any iterable of rows
    assert [r["gold_score"] for r in rows] == [6.0, 7.0]
    assert bon_curve(np.array([[1.0]]), np.array([[2.0]]), [1])[0]["gold_score"] == 2.0
    with pytest.raises(BonInputError) as info:
        bon_curve(np.zeros((1, 0)), np.zeros((1, 0)), [1])
    assert str(info.value) == "row 0: no answers"


def test_object_arrays_and_text_numbers_are_converted():
    proxy = np.array([[1.0, None]], dtype=object)
    with pytest.raises(BonInputError, match="row 0: proxy score of answer 1 is missing or not finite"):
        bon_curve(proxy, np.array([[1.0, 2.0]], dtype=object), [1])
    with pytest.raises(BonInputError, match="row 0: gold score of answer 0 is missing or not finite"):
        bon_curve(np.array([[1.0, 2.0]], dtype=object), np.array([[None, 2.0]], dtype=object), [1])
    with pytest.raises(BonInputError, match="row 1: gold score of answer 1 is missing or not finite"):
        bon_curve([[1.0, 2.0], [1.0, 2.0]], [[1.0, 2.0], [1.0, None]], [1])
    assert bon_curve([["1.5", "0.5"]], [["2", "4"]], [2])[0]["gold_score"] == 2.0


@pytest.mark.parametrize("proxy, gold, message", [
    ([], [], "no prompts: proxy_scores is empty"),
    ([[1.0]], [[1.0], [2.0]], "1 prompts of proxy scores but 2 of gold scores"),
    ([["x"]], [[1.0]], "row 0: scores are not numbers (could not convert string to float: 'x')"),
    ([[1.0, 2.0]], [[[1.0, 2.0]]], "row 0: expected a flat list of scores per prompt"),
    ([[[1.0], [2.0]]], [[1.0, 2.0]], "row 0: expected a flat list of scores per prompt"),
])
def test_input_errors_word_for_word(proxy, gold, message):
    with pytest.raises(BonInputError) as info:
        bon_curve(proxy, gold, [1])
    assert str(info.value) == message


def test_coefficients_for_one_answer_and_their_errors():
    assert bon_coefficients(1, [1]).tolist() == [[1.0]]
    assert bon_coefficients(3, [2])[0].tolist() == pytest.approx([0.0, 1 / 3, 2 / 3])
    with pytest.raises(ValueError) as info:
        bon_coefficients(0, [1])
    assert str(info.value) == "N must be at least 1"
    with pytest.raises(ValueError) as info:
        bon_coefficients(3, [4])
    assert str(info.value) == "n=4 is outside 1..N=3"


@pytest.mark.parametrize("ns", [[], [0], [2, -1]])
def test_bad_ns_are_refused(ns):
    with pytest.raises(ValueError) as info:
        bon_curve([[1.0, 2.0]], [[1.0, 2.0]], ns)
    assert str(info.value) == f"ns must be a non-empty list of positive integers, got {ns}"


def test_skip_warning_points_at_the_caller():
    with pytest.warns(UserWarning, match=r"skipping n=\[3\], above the 2 answers") as record:
        bon_curve([[1.0, 2.0]], [[0.0, 1.0]], [1, 3])
    assert record[0].filename != bon.__file__  # the warning names the caller's line, not the library's


def test_kl_bon_scalar_and_array():
    assert type(kl_bon(2)) is float and kl_bon(2) == pytest.approx(math.log(2) - 0.5)
    values = kl_bon([1, 4])
    assert isinstance(values, np.ndarray) and values.tolist() == pytest.approx([0.0, math.log(4) - 0.75])
