"""The best-of-n estimator against brute-force enumeration of every n-subset, plus ties, ragged N and bad input."""

from __future__ import annotations

import math
import warnings
from fractions import Fraction
from itertools import combinations

import numpy as np
import pytest

from evaluation.bon import BonInputError, bon_coefficients, bon_curve, kl_bon


def brute_force(proxy, gold, n):
    """Mean over all n-subsets of (best proxy, mean gold among the subset's tied best)."""
    proxy_total = gold_total = 0.0
    subsets = list(combinations(range(len(proxy)), n))
    for subset in subsets:
        best = max(proxy[i] for i in subset)
        tied = [gold[i] for i in subset if proxy[i] == best]
        proxy_total += best
        gold_total += sum(tied) / len(tied)
    return proxy_total / len(subsets), gold_total / len(subsets)


def expected_curve(proxy_rows, gold_rows, ns):
    out = []
    for n in ns:
        pairs = [brute_force(p, g, n) for p, g in zip(proxy_rows, gold_rows)]
        out.append((n, np.mean([p for p, _ in pairs]), np.mean([g for _, g in pairs])))
    return out


def test_coefficients_match_exact_binomials():
    N = 40
    coefficients = bon_coefficients(N, [1, 2, 7, 40])
    for row, n in enumerate([1, 2, 7, 40]):
        exact = [Fraction(math.comb(i - 1, n - 1), math.comb(N, n)) if i >= n else 0 for i in range(1, N + 1)]
        np.testing.assert_allclose(coefficients[row], [float(x) for x in exact], rtol=1e-12, atol=0)


def test_coefficients_sum_to_one_at_published_scale():
    coefficients = bon_coefficients(12600, [1, 2, 16, 1024, 12500])
    np.testing.assert_allclose(coefficients.sum(axis=1), 1.0, atol=1e-10)
    assert np.all(coefficients >= 0) and np.all(np.isfinite(coefficients))
    assert coefficients[-1, -1] == pytest.approx(12500 / 12600)


def test_matches_enumeration_on_random_scores():
    rng = np.random.default_rng(3)
    proxy, gold = rng.normal(size=(4, 9)), rng.normal(size=(4, 9))
    ns = [1, 2, 4, 9]
    curve = bon_curve(proxy, gold, ns)
    for point, (n, p, g) in zip(curve, expected_curve(proxy.tolist(), gold.tolist(), ns)):
        assert point["n"] == n
        assert point["proxy_score"] == pytest.approx(p, abs=1e-12)
        assert point["gold_score"] == pytest.approx(g, abs=1e-12)
        assert point["kl_bon"] == pytest.approx(math.log(n) - (n - 1) / n)
    assert curve[0]["gold_score"] == pytest.approx(gold.mean())


def test_ties_average_gold_and_match_enumeration():
    proxy = [[1.0, 2.0, 2.0, 2.0, 0.5, 1.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
    gold = [[5.0, -1.0, 4.0, 0.0, 2.0, 7.0, 1.0, -3.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]]
    ns = [1, 2, 3, 5, 8]
    curve = bon_curve(np.array(proxy), np.array(gold), ns)
    for point, (_, p, g) in zip(curve, expected_curve(proxy, gold, ns)):
        assert point["proxy_score"] == pytest.approx(p, abs=1e-12)
        assert point["gold_score"] == pytest.approx(g, abs=1e-12)
    # Deterministic whatever the answer order.
    perm = np.random.default_rng(0).permutation(8)
    again = bon_curve(np.array(proxy)[:, perm], np.array(gold)[:, perm], ns)
    assert [c["gold_score"] for c in again] == pytest.approx([c["gold_score"] for c in curve], abs=1e-12)


def test_near_ties_keep_their_exact_order():
    base = 1.0
    proxy = np.array([[base, np.nextafter(base, 2), np.nextafter(np.nextafter(base, 2), 2), -0.0, 0.0]])
    gold = np.array([[1.0, 2.0, 3.0, 10.0, 20.0]])
    curve = bon_curve(proxy, gold, [1, 2, 3])
    for point, (_, p, g) in zip(curve, expected_curve(proxy.tolist(), gold.tolist(), [1, 2, 3])):
        assert point["gold_score"] == pytest.approx(g, abs=1e-12)
        assert point["proxy_score"] == pytest.approx(p, abs=1e-12)


def test_ragged_prompts_and_n_above_shortest_is_skipped():
    rng = np.random.default_rng(5)
    proxy = [rng.normal(size=k).tolist() for k in (5, 8, 8, 6)]
    gold = [rng.normal(size=k).tolist() for k in (5, 8, 8, 6)]
    with pytest.warns(UserWarning, match=r"skipping n=\[6, 8\]"):
        curve = bon_curve(proxy, gold, [1, 3, 5, 6, 8])
    assert [c["n"] for c in curve] == [1, 3, 5]
    for point, (_, p, g) in zip(curve, expected_curve(proxy, gold, [1, 3, 5])):
        assert point["proxy_score"] == pytest.approx(p, abs=1e-12)
        assert point["gold_score"] == pytest.approx(g, abs=1e-12)


def test_large_chunked_input_matches_small_pieces():
    rng = np.random.default_rng(9)
    proxy = np.round(rng.normal(size=(70, 300)), 1)  # many ties, several row chunks, threads
    gold = rng.normal(size=(70, 300))
    ns = [1, 2, 16, 300]
    whole = bon_curve(proxy, gold, ns, workers=2)
    rows = [bon_curve(proxy[i : i + 1], gold[i : i + 1], ns, workers=1) for i in range(70)]
    for j, point in enumerate(whole):
        assert point["gold_score"] == pytest.approx(np.mean([r[j]["gold_score"] for r in rows]), abs=1e-12)
    assert whole[-1]["proxy_score"] == pytest.approx(proxy.max(axis=1).mean())


def test_kl_bon_table_values():
    assert kl_bon(1) == 0.0
    assert kl_bon(2) == pytest.approx(0.1931, abs=1e-4)
    assert kl_bon(12500) == pytest.approx(8.4336, abs=1e-4)


@pytest.mark.parametrize(
    "proxy, gold, message",
    [
        ([[1.0, float("nan")]], [[1.0, 2.0]], r"row 0: proxy score of answer 1 is missing or not finite"),
        ([[1.0, 2.0], [1.0, None]], [[1.0, 2.0], [3.0, 4.0]], r"row 1: proxy score of answer 1"),
        ([[1.0, 2.0], [1.0, 2.0, 3.0]], [[1.0, 2.0], [3.0, 4.0]], r"row 1: 3 proxy scores but 2 gold scores"),
        ([], [], r"no prompts"),
        ([[1.0], []], [[1.0], []], r"row 1: no answers"),
        ([[1.0, 2.0]], [[1.0, float("inf")]], r"row 0: gold score of answer 1"),
    ],
)
def test_bad_input_names_the_row(proxy, gold, message):
    with pytest.raises(BonInputError, match=message):
        bon_curve(proxy, gold, [1])


def test_all_n_too_large_returns_nothing():
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert bon_curve([[1.0, 2.0]], [[0.0, 1.0]], [3]) == []


def test_huge_finite_scores_are_accepted():
    curve = bon_curve([[1e308, 1e308, 0.0]], [[1.0, 2.0, 3.0]], [1, 2])
    assert curve[1]["gold_score"] == pytest.approx(brute_force([1e308, 1e308, 0.0], [1.0, 2.0, 3.0], 2)[1])
    assert curve[1]["proxy_score"] == pytest.approx(1e308)
