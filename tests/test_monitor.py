"""The over-optimisation monitor's maths and alarm (reward_plugins.monitor) against hand-computed values and
synthetic score streams built to over-optimise or not."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pydantic import ValidationError

from reward_plugins.monitor import (
    MemberBatch, Monitor, MonitorConfig, MonitorError, best_step, disagreement, member_batch, member_keys,
    member_reference, monitor_keys, per_kl, replay, slope,
)
from reward_plugins.types import RewardResult

STEP0 = [[1.0, 3.0], [2.0, 6.0], [0.0, 4.0]]  # member means 2, 4, 2; stds 1, 2, 2: every member's z is [-1, 1]
STEP1 = [[3.0, 1.0], [8.0, 4.0], [2.0, 6.0]]  # z: [1, -1], [2, 0], [0, 2]


def test_disagreement_by_hand():
    means, stds = member_reference([STEP0])
    assert means.tolist() == [2.0, 4.0, 2.0] and stds.tolist() == [1.0, 2.0, 2.0]
    assert disagreement(STEP0, means, stds) == 0.0  # the members agree up to their own location and scale
    # column 0: z = (1, 2, 0), population std sqrt(2/3); column 1: z = (-1, 0, 2), std sqrt(14)/3
    assert disagreement(STEP1, means, stds) == pytest.approx((math.sqrt(2 / 3) + math.sqrt(14) / 3) / 2, abs=1e-12)
    # the reference over two steps pools their samples: member 0 has scores 1, 3, 3, 1 -> mean 2, std 1
    means2, stds2 = member_reference([STEP0, STEP1])
    assert means2[0] == 2.0 and stds2[0] == 1.0 and means2[1] == 5.0 and stds2[1] == pytest.approx(math.sqrt(5.0))


def test_slope_and_trend_per_kl_by_hand():
    # x mean 1.5, y mean 1.25; sum dx*dy = 4.5, sum dx^2 = 5
    assert slope([0, 1, 2, 3], [0, 1, 1, 3]) == pytest.approx(0.9)
    assert slope([2, 2, 2], [0, 1, 5]) == 0.0  # x did not move: no slope, not a division by zero
    # per KL: disagreement's slope per step 0.9 over KL's per step (kl = 0, 2, 1, 3: slope 0.8) = 1.125
    assert per_kl([0, 1, 2, 3], [0, 2, 1, 3], [0, 1, 1, 3], 0.05) == pytest.approx(0.9 / 0.8)
    assert per_kl([0, 1, 2, 3], [0, 0.01, 0.0, 0.02], [0, 1, 1, 3], 0.05) == 0.0  # KL rose 0.018: too little


def test_monitor_values_by_hand():
    config = MonitorConfig(window=2, patience=1,
                           thresholds={"divergence": None, "disagreement_rise": None, "trend": 100.0,
                                       "worst_member_drop": None})
    monitor = Monitor(config)
    names = ("a", "b", "c")
    assert monitor.observe(0, 0.0, MemberBatch(STEP0, [1.0, 3.0], names)) is None
    logs = monitor.logs()
    assert logs["monitor/disagreement"] == 0.0 and logs["monitor/proxy"] == 0.0 and logs["monitor/trend"] == 0.0
    monitor.observe(1, 0.5, MemberBatch(STEP1, [4.0, 6.0], names))
    d1 = (math.sqrt(2 / 3) + math.sqrt(14) / 3) / 2
    logs = monitor.logs()
    assert logs["monitor/disagreement"] == pytest.approx(d1)
    assert logs["monitor/disagreement_rise"] == pytest.approx(d1 / 2)  # the window's mean less step 0's, 0
    assert logs["monitor/proxy"] == pytest.approx(3.0)  # (mean 5 - step-0 mean 2) / step-0 std 1
    assert logs["monitor/trend"] == pytest.approx(d1 / 0.5)  # two points: rise over run
    assert logs["monitor/proxy_trend"] == pytest.approx(3.0 / 0.5)
    assert logs["monitor/divergence"] == pytest.approx(2 * d1 / 0.5 - 6.0)  # divergence_weight 2
    assert logs["monitor/worst_member"] == 0.0  # member means of z: a 0, b 1, c 1
    assert logs["monitor/score"] == 0.0  # no eval, no gold: the worst member over the window, (0 + 0) / 2
    assert logs["monitor/kl"] == 0.5 and logs["monitor/alarm"] == 0.0 and logs["monitor/kl_scale"] == 1.0
    monitor.observe(2, 0.7, MemberBatch([[0.0, 2.0], [2.0, 2.0], [4.0, 6.0]], [4.0, 6.0], names))
    # z: a -2, 0 (mean -1); b -1, -1 (-1); c 1, 2 (1.5): worst -1; over the last 2 steps (0 - 1) / 2
    logs = monitor.logs()
    assert logs["monitor/worst_member"] == -1.0 and logs["monitor/score"] == -0.5
    assert logs["monitor/worst_member_drop"] == 0.0 and logs["monitor/eval_worst_member"] == 0.0  # no eval yet


def member_scores(rng, kl: float, over_optimise: bool, batch: int) -> np.ndarray:
    """Three members' scores of `batch` samples of a policy whose true quality rises like sqrt(KL); member 0 is the
    proxy. Built to over-optimise: past KL 2 the true quality falls while each member's own error grows (the policy
    leaves the members' data) and the proxy's error, the one the policy exploits, is positive, so the proxy keeps
    rising. Built not to: the same without either."""
    excess = max(0.0, kl - 2.0) if over_optimise else 0.0
    quality = rng.normal(math.sqrt(kl) - 0.6 * excess, 1.0, batch)
    errors = rng.normal(0.0, 1.0, (3, batch)) * excess
    errors[0] = np.abs(errors[0])
    return quality + errors + rng.normal(0.0, 0.3, (3, batch))


def stream(over_optimise: bool, steps: int = 100, batch: int = 64, seed: int = 0):
    """Each step's member batch at KL 0.04 per step (measured with noise), and an eval of 256 samples every 10
    steps (None between evals)."""
    rng = np.random.default_rng(seed)
    for step in range(steps):
        kl = 0.04 * step
        scores = member_scores(rng, kl, over_optimise, batch)
        evals = member_scores(rng, kl, over_optimise, 256) if step % 10 == 0 else None
        yield step, kl + rng.normal(0.0, 0.05), MemberBatch(scores, scores[0], ("m0", "m1", "m2")), evals


def first_alarm(over_optimise: bool, seed: int = 0, **config):
    monitor = Monitor(MonitorConfig(**config))
    for step, kl, batch, evals in stream(over_optimise, seed=seed):
        if evals is not None and (alarm := monitor.observe_eval_members(step, evals, batch.names)) is not None:
            return alarm
        if (alarm := monitor.observe(step, kl, batch)) is not None:
            return alarm
    return None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alarm_fires_on_a_stream_that_over_optimises_and_not_on_one_that_does_not(seed):
    alarm = first_alarm(True, seed)  # the default settings
    assert alarm is not None and alarm.signal in ("worst_member_drop", "disagreement_rise")
    assert 2.0 < alarm.step * 0.04 < 3.0, alarm  # after gold's peak at KL 2, well before the stream ends at 3.96
    assert first_alarm(False, seed) is None
    # each signal alone sees it too and stays silent on the control
    for name, threshold in (("trend", 0.3), ("divergence", 0.3), ("worst_member_drop", 0.1), ("disagreement_rise", 0.05)):
        thresholds = {"divergence": None, "disagreement_rise": None, "worst_member_drop": None, name: threshold}
        alarm = first_alarm(True, seed, thresholds=thresholds)
        assert alarm is not None and alarm.signal == name and 2.2 < alarm.step * 0.04 < 3.8, alarm
        assert first_alarm(False, seed, thresholds=thresholds) is None


def test_alarm_line_is_one_line_with_step_kl_and_signal(capsys):
    alarm = first_alarm(True, action="stop")
    line = alarm.line()
    assert "\n" not in line and f"step {alarm.step}" in line and f"KL {alarm.kl:.3f}" in line
    assert alarm.signal in line and "action: stop" in line


def test_patience_counts_consecutive_steps():
    config = MonitorConfig(window=1, patience=3, thresholds={"divergence": None, "disagreement_rise": 0.5})
    monitor = Monitor(config)
    monitor.observe_signals(0, 0.0, 0.0, 0.0, 0.0)
    fired = [monitor.observe_signals(step, 0.1 * step, d, 0.0, 0.0) for step, d in enumerate([1, 1, 0, 1, 1, 1], 1)]
    assert [a is not None for a in fired] == [False, False, False, False, False, True]
    assert monitor.alarm.step == 6 and monitor.alarm.kl == pytest.approx(0.6)
    assert monitor.observe_signals(7, 0.7, 5.0, 0.0, 0.0) is None  # it fires once


def test_keys_are_the_same_on_every_step_before_and_after_the_alarm():
    monitor = Monitor(MonitorConfig(gold={"function": "setup_data.synthetic_task:gold_rewards"}))
    seen = set()
    for step, kl, batch, evals in stream(True):
        if evals is not None:
            monitor.observe_gold(step, 0.1)
            monitor.observe_eval_members(step, evals, batch.names)
            seen.add(tuple(monitor.logs()))
        monitor.observe(step, kl, batch)
        seen.add(tuple(monitor.logs()))
    assert monitor.alarm is not None
    assert seen == {monitor_keys(True)} and "monitor/gold" in monitor_keys(True) and "monitor/gold" not in monitor_keys(False)


def test_gold_drop_alarm_and_gold_score():
    config = MonitorConfig(thresholds={"divergence": None, "disagreement_rise": None, "worst_member_drop": None,
                                       "gold_drop": 0.05},
                           gold={"function": "m:f"})
    monitor = Monitor(config)
    monitor.observe_signals(0, 0.0, 0.0, 0.0, 0.0)
    assert monitor.observe_gold(0, 0.3) is None and monitor.observe_gold(10, 0.5) is None
    assert monitor.logs()["monitor/score"] == 0.5  # with gold, the score is the latest gold
    monitor.observe_signals(11, 1.0, 0.0, 0.0, 0.0)
    assert monitor.logs()["monitor/score"] == 0.5 and monitor.logs()["monitor/gold"] == 0.5
    assert monitor.observe_gold(20, 0.46) is None  # 0.04 below the best: not yet
    alarm = monitor.observe_gold(30, 0.44)
    assert alarm.signal == "gold_drop" and alarm.value == pytest.approx(0.06) and alarm.kl == 1.0


def test_resume_replays_to_the_same_state():
    runs = list(stream(True))
    whole = Monitor(MonitorConfig(reference_steps=3, action="stop"))
    for step, kl, batch, evals in runs:
        if evals is not None:
            whole.observe_eval_members(step, evals, batch.names)
        if step == 30:
            whole.note_checkpoint(30)
        whole.observe(step, kl, batch)
    assert whole.alarm is not None and len(whole.series.eval_steps) == 10
    for cut in (2, 25, 50, 60):  # inside the reference steps, before the alarm, after it, at an eval
        resumed = Monitor(MonitorConfig(reference_steps=3, action="stop"))
        resumed.load_state_dict(json.loads(json.dumps(whole.state_dict(before_step=cut))))
        for step, kl, batch, evals in runs[cut:]:
            if evals is not None and step > cut:  # the eval of the step resumed at is in the state
                resumed.observe_eval_members(step, evals, batch.names)
            resumed.observe(step, kl, batch)
        assert resumed.logs() == pytest.approx(whole.logs()), cut
        assert resumed.alarm == whole.alarm, cut
        for name, values in vars(whole.series).items():
            assert getattr(resumed.series, name) == pytest.approx(values, rel=1e-12), (cut, name)
        assert resumed.eval_means.tolist() == whole.eval_means.tolist(), cut
    assert resumed.checkpoints == {30: whole.checkpoints[30]}


def test_replay_of_the_logged_series_matches_the_online_alarm():
    monitor = Monitor(MonitorConfig())
    for step, kl, batch, evals in stream(True):
        if evals is not None:
            monitor.observe_eval_members(step, evals, batch.names)
        monitor.observe(step, kl, batch)
    s = monitor.series
    records = [{"step": st, "kl": k, "disagreement": d, "proxy": p, "worst_member": w}
               for st, k, d, p, w in zip(s.steps, s.kl, s.disagreement, s.proxy, s.worst)]
    evals = list(zip(s.eval_steps, s.eval_worst))
    assert replay(MonitorConfig(), records, evals=evals).alarm == monitor.alarm
    assert vars(replay(MonitorConfig(), records, evals=evals).series) == vars(s)
    stricter = replay(MonitorConfig(thresholds={"disagreement_rise": 0.5, "worst_member_drop": 0.5}), records,
                      evals=evals).alarm
    assert stricter is None or stricter.step > monitor.alarm.step  # thresholds re-evaluated without retraining


def test_scale_and_best_checkpoint():
    monitor = Monitor(MonitorConfig(action="adapt_kl", kl_factor=3.0))
    assert monitor.scale_kl(5) == 3.0 and monitor.logs()["monitor/kl_scale"] == 3.0
    assert best_step({10: 0.2, 20: 0.5, 30: 0.5, 40: 0.1}) == 20 and best_step({}) is None


def test_member_batch_leaves_out_errored_samples():
    results = [RewardResult.ok(1.0, {"uwo/s1": 1.0, "uwo/s2": 2.0}), RewardResult.failed("boom"),
               RewardResult.ok(0.5, {"uwo/s1": 0.0, "uwo/s2": 1.0})]
    batch = member_batch(results, [1.0, -1.0, 0.5], ("uwo/s1", "uwo/s2"))
    assert batch.scores.tolist() == [[1.0, 0.0], [2.0, 1.0]] and batch.proxy.tolist() == [1.0, 0.5]


def test_member_keys_found_at_the_root_or_nested():
    assert member_keys(("s1", "s2", "variance", "combined"), [("s1", "s2")], "x") == ("s1", "s2")
    nested = ("rm/reward", "uwo/reward", "uwo/s1", "uwo/s2", "uwo/variance")
    assert member_keys(nested, [("s1", "s2")], "x") == ("uwo/s1", "uwo/s2")
    assert member_keys(("rm/reward", "xs1"), [], "x") if False else True
    with pytest.raises(MonitorError, match="no plugin with member scores"):
        member_keys(("rm/reward", "xs1", "xs2"), [("s1", "s2")], "reward.yaml")


def test_flat_reference_is_refused():
    monitor = Monitor(MonitorConfig())
    with pytest.raises(MonitorError, match="member.s. b gave every reference sample the same score"):
        monitor.observe(0, 0.0, MemberBatch([[1.0, 2.0], [3.0, 3.0]], [1.0, 2.0], ("a", "b")))


def test_config_errors():
    with pytest.raises(ValidationError, match="every signal is off"):
        MonitorConfig(thresholds={"divergence": None, "disagreement_rise": None, "worst_member_drop": None})
    with pytest.raises(ValidationError, match="gold_drop needs gold"):
        MonitorConfig(thresholds={"gold_drop": 0.1})
    with pytest.raises(ValidationError, match="exactly one of reward_config"):
        MonitorConfig(gold={})
    with pytest.raises(ValidationError, match="module:callable|package.module:callable"):
        MonitorConfig(gold={"function": "no_colon"})
    with pytest.raises(ValidationError, match="kl_factor"):
        MonitorConfig(kl_factor=1.0)
    with pytest.raises(ValidationError, match="at least 2 distinct"):
        MonitorConfig(members=["a", "a"])
    with pytest.raises(ValidationError, match="path does not exist"):
        MonitorConfig(shadow="/nonexistent/shadow.yaml")


def test_session_hands_an_eval_alarm_to_the_next_step_once(tmp_path, capsys, caplog):
    from reward_plugins.monitor_session import MonitorSession
    from reward_plugins.types import Sample

    config = MonitorConfig(members=["a", "b"], action="stop",
                           thresholds={"divergence": None, "disagreement_rise": None, "worst_member_drop": 0.5})
    session = MonitorSession(config, None, tmp_path)
    samples = [Sample("p", "r")] * 2
    batch = MemberBatch([[0.0, 1.0], [1.0, 3.0]], [0.0, 1.0], ("a", "b"))
    # first eval: a 1, 3 (mean 2, std 1); b 0, 4 (mean 2, std 2); an errored row (None) is left out
    assert session.score_eval(0, samples + [Sample("p", "x")], [{"a": 1.0, "b": 0.0}, {"a": 3.0, "b": 4.0}, None]) is None
    warned = [r.getMessage() for r in caplog.records if "first eval has 2 samples" in r.getMessage()]
    assert len(warned) == 1 and "worst_member_drop (threshold 0.5) are noisy below 32" in warned[0]
    assert session.step(0, 0.1, batch) is None
    # a 1, 1 -> z -1, -1; b 2, 2 -> z 0, 0: worst -1, 1.0 below step 0's 0
    session.score_eval(1, samples, [{"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 2.0}])
    assert "ALARM at step 1, KL 0.100: worst_member_drop 1 > 0.5; action: stop" in capsys.readouterr().err
    alarm = session.step(1, 0.2, batch)
    assert (alarm.step, alarm.signal, alarm.action) == (1, "worst_member_drop", "stop")
    assert session.step(2, 0.3, batch) is None  # handed once
    evals = [json.loads(line) for line in (tmp_path / "monitor" / "evals.jsonl").read_text().splitlines()]
    assert evals == [{"step": 0, "worst_member": 0.0, "gold": None}, {"step": 1, "worst_member": -1.0, "gold": None}]
    assert json.loads((tmp_path / "monitor" / "alarm.json").read_text())["signal"] == "worst_member_drop"
