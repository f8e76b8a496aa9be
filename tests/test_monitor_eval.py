"""evaluation.monitor_eval on run folders written by hand: the replayed alarm, lead time, hit, false alarm and the
gold kept, against values worked out by hand."""

from __future__ import annotations

import json

import pytest

from evaluation import monitor_eval
from evaluation.eval_files import EvalFile, EvalRow, write_eval_file
from reward_plugins.io import DataError, write_json, write_jsonl

CONFIG = {"window": 1, "patience": 1, "action": "warn",
          "thresholds": {"divergence": None, "disagreement_rise": 0.1, "worst_member_drop": None}}


def make_run(path, gold, rising_from=None, action="warn", spread=0.1, proxy_slope=0.1):
    """60 steps at KL 0.1 per step; disagreement 0.3, rising 0.04 per step after `rising_from`; proxy and worst member
    0.05 per step;
    an eval every 10 steps with the given gold means (two rows each, `spread` either side) and a proxy that rises
    by `proxy_slope` per eval."""
    records = []
    for step in range(60):
        d = 0.3 + (0.04 * (step - rising_from) if rising_from is not None and step > rising_from else 0.0)
        records.append({"step": step, "kl": 0.1 * step, "disagreement": d, "proxy": 0.05 * step, "worst_member": 0.05 * step})
    write_jsonl(path / "monitor" / "steps.jsonl", records)
    write_json(path / "monitor" / "config.json", {"config": {**CONFIG, "action": action}})
    for i, value in enumerate(gold):
        rows = [EvalRow("p", "a", proxy_slope * i, gold_score=value + delta) for delta in (-spread, spread)]
        write_eval_file(path / "eval", EvalFile(step=10 * i, rows=rows, kl=0.1 * 10 * i))
    return path


@pytest.fixture()
def runs(tmp_path):
    over = make_run(tmp_path / "over", [0.4, 0.5, 0.6, 0.55, 0.4, 0.3], rising_from=30)
    control = make_run(tmp_path / "control", [0.4, 0.45, 0.5, 0.52, 0.55, 0.56])
    return over, control


def test_lead_hit_false_alarm_and_gold_kept_by_hand(runs):
    over, control = (monitor_eval.evaluate_run(run) for run in runs)
    # disagreement 0.3 + 0.04 * (step - 30) first exceeds 0.3 + 0.1 at step 33 (0.42), KL 3.3
    assert (over.alarm_step, over.signal) == (33, "disagreement_rise") and over.alarm_kl == pytest.approx(3.3)
    assert over.peak_kl == pytest.approx(2.0) and over.drop == pytest.approx(0.3) and over.budget == pytest.approx(5.9)
    assert over.lead == pytest.approx(1.3)
    assert not over.hit()  # 3.3 > 2.0 + 10 % of 5.9
    # stop would keep the eval step with the best gold-free score among 0..30: the score before step s is the worst
    # member's level at step s - 1 (a window of 1), 0.05 (s - 1), so step 30, whose gold is 0.55
    assert over.kept_step == 30 and over.gold_of(30) == pytest.approx(0.55)
    assert control.alarm_step is None and control.drop == pytest.approx(0.0)


def test_a_drop_within_the_noise_is_a_control(tmp_path):
    # two rows 0.2 either side: each eval's standard error is 0.2, the drop's 0.2 * sqrt(2) = 0.28 > 0.3 / 2
    noisy = monitor_eval.evaluate_run(make_run(tmp_path / "noisy", [0.4, 0.7, 0.4], spread=0.2))
    assert noisy.drop == pytest.approx(0.3) and noisy.drop_se == pytest.approx(0.2 * 2 ** 0.5)
    assert not noisy.over_optimises(0.05)
    assert monitor_eval.evaluate_run(make_run(tmp_path / "clear", [0.4, 0.7, 0.4], spread=0.1)).over_optimises(0.05)
    assert not monitor_eval.evaluate_run(make_run(tmp_path / "small", [0.4, 0.44, 0.4], spread=0.001)).over_optimises(0.05)


def test_table_and_figures(runs, tmp_path, capsys):
    table = monitor_eval.main([str(r) for r in runs] + ["--markdown", str(tmp_path / "t.md")])
    assert (tmp_path / "t.md").read_text() == table
    assert "hit rate (alarm <= gold peak + 10 % of the KL budget): 0 of 1 over-optimising runs = 0% (target >= 80%: missed)" in table
    assert "false alarms: 0 of 1 control runs = 0% (target <= 10%: met)" in table
    assert "lead time: KL at the alarm minus KL at the gold peak, median +1.300" in table
    assert "gold kept by stop: 92% of the peak (target >= 95%: met in 0 of 1)" in table
    row = next(line for line in table.splitlines() if line.startswith(f"| {runs[0]} "))
    assert "over-optimises (drop 0.300" in row and "step 33 (disagreement_rise) at 3.300" in row and "| no |" in row


def test_thresholds_are_re_evaluated_without_retraining(runs):
    # 0.04 * (step - 30) > 0.05 first at step 32
    rerun = monitor_eval.evaluate_run(runs[0], ["thresholds.disagreement_rise=0.05"])
    assert rerun.alarm_step == 32 and rerun.hit() is False
    looser = monitor_eval.evaluate_run(runs[1], ["thresholds.disagreement_rise=0.0001", "thresholds.divergence=null"])
    assert looser.alarm_step is None  # flat disagreement never rises


def test_adapt_kl_pair(runs, tmp_path):
    acted = make_run(tmp_path / "acted", [0.4, 0.5, 0.6, 0.58, 0.59, 0.58], rising_from=30, action="adapt_kl")
    write_json(acted / "monitor" / "alarm.json", {"step": 31, "kl": 3.1, "signal": "divergence", "value": 1.0,
                                                  "threshold": 0.0, "action": "adapt_kl"})
    assert monitor_eval.evaluate_run(acted, ["thresholds.disagreement_rise=0.05"]).alarm_step == 31  # the real one
    table = monitor_eval.main([str(runs[1]), "--pair", f"{acted}={runs[0]}"])
    # final gold 0.58 against the base run's peak 0.6 (97 %), the base run itself ends at 0.3 (50 %)
    assert "alarm at step 31, KL 3.10): gold at step 50 0.580 = 97% of the base run's peak 0.600, against 0.300 = 50% " \
           "without (target >= 95%: met)" in table


def test_errors_name_the_run(tmp_path):
    with pytest.raises(DataError, match="no monitor/config.json"):
        monitor_eval.evaluate_run(tmp_path)
    run = make_run(tmp_path / "r", [0.1])
    (run / "monitor" / "steps.jsonl").write_text(json.dumps({"step": 0, "kl": 0.0}) + "\n")
    with pytest.raises(DataError, match=r"steps.jsonl:1: a record needs finite step, kl, disagreement, proxy, "
                                        r"worst_member \(missing: disagreement, proxy, worst_member\)"):
        monitor_eval.evaluate_run(run)


def test_command_line_errors_are_one_line(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "evaluation.monitor_eval", str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "no monitor/config.json" in done.stderr and "Traceback" not in done.stderr


def test_worst_member_drop_replayed_from_the_evals_and_stop_keeps_the_best_eval(runs):
    over = runs[0]
    write_jsonl(over / "monitor" / "evals.jsonl",
                [{"step": 10 * i, "worst_member": w, "gold": None} for i, w in enumerate([0.0, 0.2, 0.4, 0.3, 0.1, -0.2])])
    result = monitor_eval.evaluate_run(over, ["thresholds.worst_member_drop=0.15", "thresholds.disagreement_rise=null"])
    # best 0.4 at step 20; 0.1 below it at step 30 (not over 0.15), 0.3 at step 40: the alarm, after step 39's KL
    assert (result.alarm_step, result.signal) == (40, "worst_member_drop") and result.alarm_kl == pytest.approx(3.9)
    # stop keeps the eval with the best worst member up to the alarm (step 20), whose gold is the peak, 0.6
    assert result.kept_step == 20 and result.gold_of(20) == pytest.approx(result.peak_gold)
    (over / "monitor" / "evals.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(DataError, match=r"evals.jsonl:1: a record needs step and worst_member"):
        monitor_eval.evaluate_run(over)


def test_no_share_of_a_peak_at_or_below_zero(tmp_path):
    run = make_run(tmp_path / "negative", [-0.4, -0.3, -0.2, -0.35, -0.5, -0.6], rising_from=30)
    table = monitor_eval.main([str(run)])
    row = next(line for line in table.splitlines() if line.startswith(f"| {run} "))
    assert row.endswith("| no | -0.350 (step 30) = n/a (peak -0.200 <= 0) |")
    assert "- gold kept by stop" not in table  # no share to report


def test_gold_falling_with_its_proxy_degrades_and_counts_in_neither_rate(tmp_path, runs):
    degrading = make_run(tmp_path / "degrading", [0.4, 0.5, 0.6, 0.55, 0.4, 0.3], rising_from=30, proxy_slope=-0.1)
    result = monitor_eval.evaluate_run(degrading)
    assert result.gold_falls(0.05) and not result.over_optimises(0.05) and result.kind(0.05) == "degrades"
    assert result.proxy[result.peak] == pytest.approx(-0.2) and result.proxy[-1] == pytest.approx(-0.5)
    flat = make_run(tmp_path / "flat", [0.4, 0.5, 0.6, 0.55, 0.4, 0.3], proxy_slope=0.0)
    assert monitor_eval.evaluate_run(flat).kind(0.05) == "degrades"  # a proxy that holds does not rise
    table = monitor_eval.main([str(degrading), *map(str, runs)])
    row = next(line for line in table.splitlines() if line.startswith(f"| {degrading} "))
    assert "| degrades (drop 0.300 +- 0.141) |" in row
    assert "| -0.200 -> -0.500 | step 33 (disagreement_rise) at 3.300 | +1.300 | alarm |" in row
    assert "hit rate (alarm <= gold peak + 10 % of the KL budget): 0 of 1 over-optimising runs" in table
    assert "false alarms: 0 of 1 control runs" in table
    assert "- runs whose gold fell with their proxy (a policy that degrades, not over-optimisation; in neither " \
           "rate): 1, alarmed 1" in table


def test_eval_files_without_proxy_scores_are_refused(tmp_path):
    run = make_run(tmp_path / "r", [0.1, 0.2])
    write_eval_file(run / "eval", EvalFile(step=10, rows=[EvalRow("p", "a", None, gold_score=0.2)], kl=1.0))
    with pytest.raises(DataError, match=r"eval_step0*10.json: no proxy scores; over-optimisation"):
        monitor_eval.evaluate_run(run)
