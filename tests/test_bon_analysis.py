"""Ensembles in the best-of-n analysis: members stay aligned by answer index and gold follows the ensemble's order."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.bon import BonInputError, bon_curve
from evaluation.bon_analysis import analyse, ensemble_run_name, ensemble_scores


def test_ensemble_curves_use_their_own_ranking():
    rng = np.random.default_rng(2)
    gold = rng.normal(size=(6, 30))
    members = {f"seed{s}": gold + rng.normal(size=gold.shape) for s in range(1, 4)}
    curves = analyse(members, gold, [1, 4, 30], objectives=("mean", "wco", "uwo"), uwo_weights=(0.0, 2.0))
    assert list(curves) == ["seed1", "seed2", "seed3", "ensemble_mean", "ensemble_WCO", "ensemble_UWO-0.0", "ensemble_UWO-2.0"]
    stacked = np.stack(list(members.values()))
    worst = stacked.min(axis=0)
    assert curves["ensemble_WCO"][-1]["gold_score"] == pytest.approx(gold[np.arange(6), worst.argmax(axis=1)].mean())
    uwo = stacked.mean(0) - 2.0 * stacked.var(0)
    assert curves["ensemble_UWO-2.0"] == bon_curve(uwo, gold, [1, 4, 30])
    assert curves["ensemble_UWO-0.0"] == curves["ensemble_mean"]
    # The published bug: gold left in seed 1's order gives a different (wrong) ensemble curve.
    seed1_order = np.take_along_axis(gold, np.argsort(members["seed1"], axis=1), axis=1)
    wrong = bon_curve(np.sort(worst, axis=1), seed1_order, [30])[0]["gold_score"]
    assert wrong != pytest.approx(curves["ensemble_WCO"][-1]["gold_score"])


def test_ragged_members_and_bad_members():
    ragged = [[[1.0, 2.0, 3.0], [0.5]], [[3.0, 1.0, 2.0], [1.5]]]
    combined = ensemble_scores(ragged, "wco")
    assert [c.tolist() for c in combined] == [[1.0, 1.0, 2.0], [0.5]]
    with pytest.raises(BonInputError, match="row 1: members give different numbers of scores"):
        ensemble_scores([[[1.0], [1.0, 2.0]], [[1.0], [1.0]]], "mean")
    with pytest.raises(ValueError, match="unknown ensemble objective 'median'"):
        ensemble_scores(ragged, "median")
    with pytest.raises(ValueError, match="unknown ensemble objective"):
        ensemble_run_name("max")
    with pytest.raises(BonInputError, match="differ in shape"):
        ensemble_scores([np.zeros((2, 3)), np.zeros((2, 4))], "mean")
