"""`python -m evaluation.plots`: best-of-n runs (seeds averaged, ensembles) and RL eval folders on one sqrt(KL) axis."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from evaluation import plots
from evaluation.bon import bon_curve
from evaluation.eval_files import EvalFile, EvalRow, write_eval_file
from reward_plugins.io import DataError, write_json


def bon_run(root, rng):
    gold = rng.normal(size=(5, 20))
    for name in ("seed1", "seed2", "ensemble_WCO"):
        proxy = gold + rng.normal(size=gold.shape)
        write_json(root / name / "bon_sampled_results.json", bon_curve(proxy, gold, [1, 2, 4, 16]))
    return root


def rl_run(root, with_gold=True):
    for k, step in enumerate((0, 100, 200)):
        rows = [EvalRow("p", "a", proxy_score=0.5 * k + i, gold_score=(1.0 - k + i) if with_gold else None) for i in range(2)]
        write_eval_file(root, EvalFile(step=step, rows=rows, kl=[0.0, 2.25, 9.0][k]))
    return root


def read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_bon_and_rl_curves_overlaid(tmp_path):
    bon = bon_run(tmp_path / "bon", np.random.default_rng(0))
    rl = rl_run(tmp_path / "ppo" / "eval")
    png, csv_path = plots.main([str(bon), str(rl), "-o", str(tmp_path / "out" / "fig")])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    rows = read_csv(csv_path)
    assert {r["curve"] for r in rows} == {"single RM (mean of 2)", "ensemble_WCO", "eval"}
    single = [r for r in rows if r["curve"].startswith("single")]
    seeds = [plots._read_bon(bon / s / "bon_sampled_results.json") for s in ("seed1", "seed2")]
    for i, row in enumerate(single):
        assert float(row["gold"]) == pytest.approx((seeds[0][i]["gold_score"] + seeds[1][i]["gold_score"]) / 2)
        assert float(row["sqrt_kl"]) == pytest.approx(math.sqrt(math.log(int(row["n_or_step"])) - (int(row["n_or_step"]) - 1) / int(row["n_or_step"])))
        assert row["members"] == "seed1 seed2" and row["gold_std"] != ""
    rl_rows = [r for r in rows if r["method"] == "rl"]
    assert [float(r["sqrt_kl"]) for r in rl_rows] == [0.0, 1.5, 3.0]
    assert [float(r["proxy"]) for r in rl_rows] == [0.5, 1.0, 1.5] and [float(r["gold"]) for r in rl_rows] == [1.5, 0.5, -0.5]


def test_recenter_and_max_kl(tmp_path):
    bon = bon_run(tmp_path / "bon", np.random.default_rng(1))
    rl = rl_run(tmp_path / "eval")
    _, csv_path = plots.main([str(bon / "ensemble_WCO"), str(rl), "--recenter", "--max-kl", "5", "-o", str(tmp_path / "fig")])
    rows = read_csv(csv_path)
    for curve in ("ensemble_WCO", "eval"):
        first = next(r for r in rows if r["curve"] == curve)
        assert float(first["gold"]) == 0.0 and float(first["proxy"]) == 0.0
    assert [r["n_or_step"] for r in rows if r["curve"] == "eval"] == ["0", "100"]


def test_missing_gold_is_blank_and_bad_dirs_fail(tmp_path):
    rl = rl_run(tmp_path / "eval", with_gold=False)
    _, csv_path = plots.main([str(rl), "-o", str(tmp_path / "fig")])
    assert all(r["gold"] == "" for r in read_csv(csv_path))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="nothing: no bon_sampled_results.json"):
        plots.main([str(tmp_path / "nothing")])
    bad = tmp_path / "bad"
    write_json(bad / "bon_sampled_results.json", [{"n": 1, "proxy_score": "x", "gold_score": 0.0}])
    with pytest.raises(DataError, match="entry 0: needs numbers"):
        plots.main([str(bad)])


def test_marks_put_peaks_and_alarms_at_sqrt_kl_in_their_runs_colour():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evaluation.plots import Mark, draw_marks

    fig, ax = plt.subplots()
    draw_marks(ax, [Mark("single_rm", "peak", 4.0, 0.7), Mark("wco", "peak", 9.0, 0.8),
                    Mark("single_rm", "alarm", 6.25)], {"single_rm": "#ff0000", "wco": "#00ff00"})
    stars = [line for line in ax.lines if line.get_marker() == "*"]
    assert [(list(s.get_xdata()), list(s.get_ydata()), s.get_color()) for s in stars] == [
        ([2.0], [0.7], "#ff0000"), ([3.0], [0.8], "#00ff00")]
    alarms = [line for line in ax.lines if line.get_linestyle() == ":"]
    assert [(list(a.get_xdata()), a.get_color()) for a in alarms] == [([2.5, 2.5], "#ff0000")]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["gold peak of a run", "monitor alarm of a run"]
    plt.close(fig)
