"""The monitor's numbers against values computed here, by hand or with numpy's own least-squares fit (np.polyfit),
never with reward_plugins.monitor itself: slopes and trends per KL, standardised disagreement, divergence, score,
streaks and the step the alarm fires at, refusals word for word, resume and replay against the uninterrupted run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from reward_plugins.monitor import (
    MemberBatch, Monitor, MonitorConfig, MonitorError, disagreement, member_batch, member_keys, member_reference,
    eval_member_scores, monitor_keys, per_kl, replay, slope, worst_member,
)
from reward_plugins.types import RewardResult

KEYS = ("kl", "disagreement", "disagreement_rise", "trend", "proxy", "proxy_trend", "divergence", "worst_member",
        "eval_worst_member", "worst_member_drop", "score")
NO_ALARM = {"divergence": None, "disagreement_rise": 1e9, "worst_member_drop": None}


def fit(x, y) -> float:
    return float(np.polyfit(np.asarray(x, dtype=float), np.asarray(y, dtype=float), 1)[0])


def expected_signals(steps, kl, d, p, w, *, window, reference_steps, min_kl_rise, weight):
    """Every signal after the last of these steps (no eval yet), from the definitions in the module's docstring."""
    n = len(steps)
    full = n >= max(window, reference_steps)
    reference = float(np.mean(d[:reference_steps])) if n >= reference_steps else 0.0
    st, k, dw, pw = steps[-window:], kl[-window:], d[-window:], p[-window:]

    def per_nat(values):
        if not full:
            return 0.0
        kl_rate = fit(st, k)
        return 0.0 if kl_rate * (st[-1] - st[0]) < min_kl_rise else fit(st, values) / kl_rate

    trend, proxy_trend = per_nat(dw), per_nat(pw)
    return {"kl": kl[-1], "disagreement": d[-1], "disagreement_rise": float(np.mean(dw)) - reference,
            "trend": trend, "proxy": p[-1], "proxy_trend": proxy_trend,
            "divergence": weight * trend - proxy_trend if full else 0.0, "worst_member": w[-1],
            "eval_worst_member": 0.0, "worst_member_drop": 0.0, "score": sum(w[-window:]) / len(w[-window:])}


# ---------------------------------------------------------------- pure functions

def test_slope_against_polyfit_and_its_no_variation_tolerance():
    assert slope([1e6, 1e6 + 1, 1e6 + 2, 1e6 + 4], [5, 3, 2, -1]) == pytest.approx(fit([0, 1, 2, 4], [5, 3, 2, -1]))
    assert slope([3, 1, 2], [1, 1, 1]) == 0.0
    assert slope([0, 1e-3], [0, 1]) == pytest.approx(1e3)  # small x that does vary: a slope
    assert slope([0, 1.7e-6], [0, 1]) == pytest.approx(1 / 1.7e-6)  # spread 1.4e-12, just over the 1e-12 floor
    assert slope([0, 1e-6], [0, 1]) == 0.0  # spread 5e-13: under the floor
    assert slope([1e6, 1e6 + 1e-3], [0, 1]) == 0.0  # a relative spread of 1e-9: rounding, not variation
    # y far from 0: centring y too keeps the rounding of sum(x - mean x) out of the slope
    assert slope([0.1, 0.2, 0.7], [1e12, 1e12 + 1, 1e12 + 2]) == pytest.approx(fit([0.1, 0.2, 0.7], [0, 1, 2]), rel=1e-9)


def test_float32_inputs_are_computed_in_float64():
    rng = np.random.default_rng(4)
    x, y = rng.normal(100, 1, 50).astype(np.float32), rng.normal(7, 3, 50).astype(np.float32)
    assert slope(x, y) == pytest.approx(fit(x.astype(float), y.astype(float)), rel=1e-11)
    scores = rng.normal(3, 2, (3, 40)).astype(np.float32)
    means, stds = member_reference([scores[:, :20], scores[:, 20:]])
    wide = scores.astype(np.float64)
    assert means.tolist() == pytest.approx([math.fsum(row) / 40 for row in wide.tolist()], rel=1e-14, abs=0)
    assert stds.tolist() == pytest.approx(np.sqrt(((wide - wide.mean(axis=1, keepdims=True)) ** 2).mean(axis=1)), rel=1e-12)
    mean32, std32 = means.astype(np.float32), stds.astype(np.float32)
    z = (wide - mean32.astype(float)[:, None]) / std32.astype(float)[:, None]
    assert disagreement(scores, mean32, std32) == pytest.approx(z.std(axis=0).mean(), rel=1e-13)


def test_per_kl_gate_is_the_fitted_rise_over_the_window():
    steps, kl, values = [0, 1, 2, 3], [0.0, 0.5, 1.0, 1.5], [0.0, 1.0, 2.0, 3.0]
    assert per_kl(steps, kl, values, 1.5) == 2.0  # KL rose exactly 1.5: enough
    assert per_kl(steps, kl, values, 1.5 + 1e-9) == 0.0
    # unevenly spaced steps: the rise is the fitted slope times last step - first step (10), not a neighbour's
    steps = [0, 2, 4, 10]
    kl = [0.125 * s for s in steps]
    assert per_kl(steps, kl, [3.0, 2.0, 1.0, -2.0], 1.25) == pytest.approx(fit(steps, [3, 2, 1, -2]) / 0.125)
    assert per_kl(steps, [0.0, -0.1, -0.2, -0.3], [0.0, 1.0, 2.0, 3.0], 0.0) == 0.0  # KL fell: no slope per nat


def test_per_kl_with_no_rise_required_and_flat_kl_is_zero_not_a_division_by_zero():
    assert per_kl([0, 1, 2], [0.3, 0.3, 0.3], [0.0, 1.0, 2.0], 0.0) == 0.0
    assert per_kl([5], [0.3], [1.0], 0.0) == 0.0  # a window of one step


def test_disagreement_against_a_loop_over_samples():
    rng = np.random.default_rng(3)
    scores = rng.normal(0, 3, (4, 7))
    means, stds = rng.normal(0, 1, 4), rng.uniform(0.5, 2, 4)
    per_sample = []
    for j in range(7):
        z = [(scores[i, j] - means[i]) / stds[i] for i in range(4)]
        centre = sum(z) / 4
        per_sample.append(math.sqrt(sum((v - centre) ** 2 for v in z) / 4))
    assert disagreement(scores, means, stds) == pytest.approx(sum(per_sample) / 7, rel=1e-12)
    # integer scores and lists work alike
    assert disagreement([[1, 3], [2, 6]], [2, 4], [1, 2]) == 0.0
    assert disagreement([[3, 3], [2, 6]], [2, 4], [1, 2]) == pytest.approx((1.0 + 0.0) / 2)


def test_worst_member_against_a_loop_over_members():
    rng = np.random.default_rng(8)
    scores = rng.normal(0, 3, (4, 7))
    means, stds = rng.normal(0, 1, 4), rng.uniform(0.5, 2, 4)
    member_means = [sum((scores[i, j] - means[i]) / stds[i] for j in range(7)) / 7 for i in range(4)]
    assert worst_member(scores, means, stds) == pytest.approx(min(member_means), rel=1e-12)
    # by hand: member a scores 1, 3 (mean 2, z 0); member b 2, 6 standardised by (2, 2): 0, 2 (mean 1); worst is a
    assert worst_member([[1, 3], [2, 6]], [2, 2], [1, 2]) == 0.0
    assert worst_member([[1, 3], [0, 2]], [0, 2], [1, 2]) == pytest.approx(-0.5)  # a: 1, 3 -> mean 2; b: -1, 0 -> -0.5


def test_member_reference_pools_batches_of_different_sizes():
    means, stds = member_reference([[[1, 2, 3], [0, 0, 4]], [[6], [4]]])  # member 0: 1, 2, 3, 6; member 1: 0, 0, 4, 4
    assert means.tolist() == [3.0, 2.0] and stds.tolist() == pytest.approx([math.sqrt(3.5), 2.0])
    assert means.dtype == np.float64


# ---------------------------------------------------------------- what a trainer hands the monitor

@pytest.mark.parametrize(("scores", "proxy", "shapes"), [
    ([1.0, 2.0], [1.0, 2.0], "(2,) and (2,)"),
    ([[1.0, 2.0]], [1.0, 2.0], "(1, 2) and (2,)"),
    ([[1.0, 2.0], [3.0, 4.0]], [1.0, 2.0, 3.0], "(2, 2) and (3,)"),
    ([[[1.0]], [[2.0]]], [1.0], "(2, 1, 1) and (1,)"),
])
def test_member_batch_shapes_refused_word_for_word(scores, proxy, shapes):
    with pytest.raises(MonitorError) as error:
        MemberBatch(scores, proxy, ("a", "b"))
    assert str(error.value) == f"member scores must be (k >= 2, B) with B proxy rewards; got {shapes}"


def test_member_batch_takes_two_members_and_stores_float64():
    batch = MemberBatch([[1, 2], [3, 4]], [5, 6], ("a", "b"))
    assert batch.scores.dtype == np.float64 and batch.proxy.dtype == np.float64
    assert MemberBatch.concat([batch]).scores.tolist() == [[1, 2], [3, 4]]
    both = MemberBatch.concat([batch, MemberBatch([[7], [8]], [9], ("a", "b"))])
    assert both.scores.tolist() == [[1, 2, 7], [3, 4, 8]] and both.proxy.tolist() == [5, 6, 9] and both.names == ("a", "b")


def test_member_batch_keeps_only_ok_samples_with_every_member_and_a_proxy():
    keys = ("e/s1", "e/s2")
    results = [
        RewardResult.ok(1.0, {"e/s1": 1, "e/s2": 2}),
        RewardResult.failed("boom", {"e/s1": 5.0, "e/s2": 5.0}),  # has the members, but errored
        RewardResult.skipped("too long", {"e/s1": 6.0, "e/s2": 6.0}),
        RewardResult.ok(0.5, {"e/s1": 7.0}),  # a member missing
        RewardResult.ok(0.7, {"e/s1": 8.0, "e/s2": 9.0}),  # no proxy reward
        RewardResult.ok(0.2, {"e/s1": 3.0, "e/s2": 4.0, "other": 1.0}),
    ]
    batch = member_batch(results, [1.0, 1.0, 1.0, 1.0, None, 0.25], keys)
    assert batch.scores.tolist() == [[1.0, 3.0], [2.0, 4.0]] and batch.proxy.tolist() == [1.0, 0.25]
    assert batch.scores.dtype == np.float64 and batch.names == keys
    none = member_batch(results[1:3], [1.0, 1.0], keys)
    assert none.scores.shape == (2, 0) and none.proxy.shape == (0,)
    with pytest.raises(ValueError):
        member_batch(results, [1.0], keys)  # a proxy list of another length is a caller's bug, not a filter


def test_member_keys_picks_the_first_complete_group_and_prefix():
    assert member_keys(("b/s1", "b/s2", "a/s1", "a/s2"), [("s1", "s2")], "x") == ("a/s1", "a/s2")  # sorted prefixes
    assert member_keys(("a/s1", "b/s1", "b/s2"), [("s1", "s2")], "x") == ("b/s1", "b/s2")  # a/ lacks s2
    both = ("u/h1", "u/h2", "w/s1", "w/s2")
    assert member_keys(both, [("s1", "s2"), ("h1", "h2")], "x") == ("w/s1", "w/s2")  # the root's group first
    assert member_keys(both, [("z1", "z2"), ("h1", "h2")], "x") == ("u/h1", "u/h2")
    assert member_keys(("s1", "s2"), [("s1", "s2")], "x") == ("s1", "s2")
    with pytest.raises(MonitorError) as error:
        member_keys(("xs1", "xs2"), [("s1", "s2")], "reward.yaml")  # a name's tail is not the member
    assert str(error.value) == ("reward.yaml: no plugin with member scores (an ensemble); name a shadow ensemble in "
                                "monitor.shadow, or list the component keys in monitor.members")


# ---------------------------------------------------------------- the monitor's state and signals

def test_a_fresh_monitor_logs_zeros_and_a_kl_scale_of_one():
    plain = Monitor(MonitorConfig())
    assert plain.logs() == {**dict.fromkeys(monitor_keys(False), 0.0), "monitor/kl_scale": 1.0}
    assert plain.alarm is None and plain.score == 0.0 and plain.best_checkpoint() is None and plain.kl_scale == 1.0
    assert plain.streaks == dict.fromkeys(("gold_drop", "worst_member_drop", "divergence", "trend", "disagreement_rise"), 0)
    assert plain.signal_values() == {**dict.fromkeys(KEYS, 0.0), "alarm": 0.0, "kl_scale": 1.0}  # before any step
    assert plain.means is None and plain.stds is None and (plain.proxy_mean, plain.proxy_std) == (0.0, 0.0)  # no reference yet
    assert plain.eval_means is None and plain.eval_stds is None  # no eval yet
    gold = MonitorConfig(gold={"function": "m:f"})
    assert tuple(Monitor(gold).logs()) == monitor_keys(True)
    assert tuple(Monitor(gold, has_gold=False).logs()) == monitor_keys(False)
    assert tuple(Monitor(MonitorConfig(), has_gold=True).logs()) == monitor_keys(True)


STEPS = [0, 1, 2, 4, 5, 6, 8, 9]
KL = [0.0, 0.1, 0.15, 0.16, 0.17, 0.6, 0.62, 0.9]  # a plateau (steps 4-6 rose < 0.05) between rises
DIS = [0.2, 0.4, 0.3, 0.6, 0.5, 0.9, 1.0, 0.8]
PROXY = [0.0, 0.5, 0.4, 1.0, 1.4, 1.2, 1.1, 2.0]
WORST = [0.0, 0.3, 0.1, 0.5, -0.2, -0.4, 0.2, 0.6]


@pytest.mark.parametrize(("window", "reference_steps"), [(3, 2), (2, 4), (8, 1)])
def test_every_signal_at_every_step_of_a_fixed_stream(window, reference_steps):
    config = MonitorConfig(window=window, reference_steps=reference_steps, divergence_weight=1.5, thresholds=NO_ALARM)
    monitor = Monitor(config)
    for n in range(1, len(STEPS) + 1):
        monitor.observe_signals(STEPS[n - 1], KL[n - 1], DIS[n - 1], PROXY[n - 1], WORST[n - 1])
        want = expected_signals(STEPS[:n], KL[:n], DIS[:n], PROXY[:n], WORST[:n], window=window,
                                reference_steps=reference_steps, min_kl_rise=0.05, weight=1.5)
        logs = monitor.logs()
        assert {key: logs["monitor/" + key] for key in KEYS} == pytest.approx(want, abs=1e-12), n
        assert logs["monitor/alarm"] == 0.0 and logs["monitor/kl_scale"] == 1.0
    assert monitor.alarm is None


def test_the_plateau_gate_and_the_trend_per_nat_by_hand():
    monitor = Monitor(MonitorConfig(window=3, thresholds=NO_ALARM))
    for step, kl, d, p in zip(STEPS[:5], KL[:5], DIS[:5], PROXY[:5]):
        monitor.observe_signals(step, kl, d, p, 0.0)
    assert monitor.logs()["monitor/trend"] == 0.0  # steps 2, 4, 5: KL fitted to rise 0.019 < 0.05
    monitor.observe_signals(STEPS[5], KL[5], DIS[5], PROXY[5], 0.0)
    # steps 4, 5, 6: KL slope 0.22 per step, disagreement's 0.15, the proxy's 0.1
    assert monitor.logs()["monitor/trend"] == pytest.approx(0.15 / 0.22)
    assert monitor.logs()["monitor/proxy_trend"] == pytest.approx(0.1 / 0.22)


def test_monitor_values_with_gold_score_the_latest_gold():
    monitor = Monitor(MonitorConfig(window=2, gold={"function": "m:f"}, thresholds=NO_ALARM))
    monitor.observe_signals(0, 0.0, 0.1, 0.0, -0.5)
    assert monitor.logs()["monitor/score"] == -0.5  # no gold, no eval yet: the worst member over the window
    monitor.observe_eval_worst(1, 0.3)
    assert monitor.logs()["monitor/score"] == 0.3  # an eval's worst member
    monitor.observe_gold(1, 0.7)
    monitor.observe_signals(1, 0.1, 0.3, 1.0, 0.25)
    assert monitor.score == 0.7 and monitor.logs()["monitor/gold"] == 0.7
    monitor.observe_eval_worst(2, -0.2)
    assert monitor.score == 0.7  # gold outranks the members
    without = Monitor(MonitorConfig(window=2, thresholds=NO_ALARM), has_gold=False)
    without.observe_signals(0, 0.0, 0.1, 0.0, -0.5)
    without.observe_gold(1, 0.7)
    without.observe_signals(1, 0.1, 0.3, 1.0, 0.25)
    assert without.score == pytest.approx((-0.5 + 0.25) / 2)  # gold not part of this run's score
    without.observe_eval_worst(2, 0.125)
    assert without.score == 0.125


def test_member_scores_standardised_by_the_pooled_reference_steps():
    names = ("a", "b", "c")
    rng = np.random.default_rng(5)
    batches = [rng.normal(i, 1 + i, (3, 6)) * [[1], [2], [4]] for i in range(4)]
    proxies = [rng.normal(0, 1, 6) + i for i in range(4)]
    monitor = Monitor(MonitorConfig(reference_steps=3, window=2, thresholds=NO_ALARM))
    for step in range(4):
        monitor.observe(step, 0.1 * step, MemberBatch(batches[step], proxies[step], names))
        if step == 0:  # provisional: standardised by step 0 alone
            m, s = batches[0].mean(axis=1, keepdims=True), batches[0].std(axis=1, keepdims=True)
            assert monitor.series.disagreement[0] == pytest.approx(((batches[0] - m) / s).std(axis=0).mean())
    pooled = np.hstack(batches[:3])
    m, s = pooled.mean(axis=1, keepdims=True), pooled.std(axis=1, keepdims=True)
    want = [float(((b - m) / s).std(axis=0).mean()) for b in batches]
    reference_proxy = np.concatenate(proxies[:3])
    want_proxy = [(p.mean() - reference_proxy.mean()) / reference_proxy.std() for p in proxies]
    assert monitor.series.disagreement == pytest.approx(want, rel=1e-12)  # the reference steps rewritten too
    assert monitor.series.proxy == pytest.approx(want_proxy, rel=1e-12)
    assert monitor.series.worst == pytest.approx([float(((b - m) / s).mean(axis=1).min()) for b in batches], rel=1e-12)
    assert monitor.reference_disagreement == pytest.approx(np.mean(want[:3]), rel=1e-12)
    assert monitor.logs()["monitor/disagreement_rise"] == pytest.approx(np.mean(want[2:]) - np.mean(want[:3]))


def test_provisional_values_use_the_reference_steps_so_far():
    names = ("a", "b")
    monitor = Monitor(MonitorConfig(reference_steps=3, thresholds=NO_ALARM))
    monitor.observe(0, 0.0, MemberBatch([[0.0, 2.0], [1.0, 3.0]], [0.0, 0.2], names))
    monitor.observe(1, 0.1, MemberBatch([[1.0, 1.0], [4.0, 2.0]], [0.4, 0.6], names))
    # steps 0-1 pooled: a 0, 2, 1, 1 (mean 1, std sqrt(1/2)); b 1, 3, 4, 2 (mean 2.5, std sqrt(5/4));
    # proxy 0, 0.2, 0.4, 0.6 (mean 0.3, std sqrt(0.05), under 1)
    za, zb = np.array([0.0, 0.0]), (np.array([4.0, 2.0]) - 2.5) / math.sqrt(5 / 4)
    assert monitor.logs()["monitor/disagreement"] == pytest.approx(np.mean(np.abs(za - zb) / 2))
    assert monitor.logs()["monitor/proxy"] == pytest.approx((0.5 - 0.3) / math.sqrt(0.05))


# ---------------------------------------------------------------- streaks and the alarm

def first_fire(config: MonitorConfig, rows) -> tuple[int | None, Monitor]:
    monitor = Monitor(config)
    fired = None
    for step, kl, d, p, *worst in rows:  # the worst member's score is 0 unless a row gives it
        alarm = monitor.observe_signals(step, kl, d, p, worst[0] if worst else 0.0)
        if alarm is not None:
            assert fired is None, "the alarm fired twice"
            fired = step
    return fired, monitor


def test_a_negative_divergence_threshold_waits_for_a_full_window():
    rows = [(s, 0.1 * s, 0.0, 0.0) for s in range(8)]  # divergence is 0 everywhere, above -0.5
    thresholds = {"divergence": -0.5, "disagreement_rise": None}
    assert first_fire(MonitorConfig(window=3, patience=1, thresholds=thresholds), rows)[0] == 2
    assert first_fire(MonitorConfig(window=3, patience=2, thresholds=thresholds), rows)[0] == 3
    assert first_fire(MonitorConfig(window=3, reference_steps=5, patience=1, thresholds=thresholds), rows)[0] == 4
    assert first_fire(MonitorConfig(window=6, reference_steps=5, patience=1, thresholds=thresholds), rows)[0] == 5


def test_disagreement_rise_needs_no_full_window_but_a_complete_reference():
    rows = [(s, 0.1 * s, d, 0.0) for s, d in enumerate([0.0, 5.0, 5.0, 5.0, 5.0])]
    rise = {"divergence": None, "disagreement_rise": 0.1}
    assert first_fire(MonitorConfig(window=4, patience=1, thresholds=rise), rows)[0] == 1
    # reference over 3 steps (mean 10/3): no streak counts before step 2, where the rise is 5/3
    fired, monitor = first_fire(MonitorConfig(window=1, reference_steps=3, patience=1, thresholds=rise), rows)
    assert fired == 2 and monitor.alarm.value == pytest.approx(5 / 3) and monitor.alarm.threshold == 0.1
    assert first_fire(MonitorConfig(window=1, reference_steps=3, patience=2, thresholds=rise), rows)[0] == 3


def test_worst_member_drop_fires_at_the_eval_below_its_best_by_hand():
    config = MonitorConfig(thresholds={"divergence": None, "disagreement_rise": None, "worst_member_drop": 0.5})
    monitor = Monitor(config)
    names = ("a", "b")
    # the first eval fixes each member's scale: a 1, 3 (mean 2, std 1); b 0, 4 (mean 2, std 2); both z-means are 0
    assert monitor.observe_eval_members(0, [[1.0, 3.0], [0.0, 4.0]], names) is None
    assert monitor.logs()["monitor/eval_worst_member"] == 0.0 and monitor.logs()["monitor/worst_member_drop"] == 0.0
    monitor.observe_signals(0, 0.25, 0.0, 0.0, 0.0)
    # a 4, 4 -> z 2, 2 (mean 2); b 4, 6 -> z 1, 2 (mean 1.5): the worst is b, 1.5
    assert monitor.observe_eval_members(5, [[4.0, 4.0], [4.0, 6.0]], names) is None
    assert monitor.logs()["monitor/eval_worst_member"] == 1.5 and monitor.score == 1.5
    monitor.observe_signals(5, 0.5, 0.0, 0.0, 0.0)
    # a 6, 8 -> z 4, 5 (mean 4.5); b 2, 4 -> z 0, 1 (mean 0.5): worst 0.5, 1.0 below the best eval (1.5)
    alarm = monitor.observe_eval_members(10, [[6.0, 8.0], [2.0, 4.0]], names)
    assert (alarm.step, alarm.kl, alarm.signal, alarm.value, alarm.threshold) == (10, 0.5, "worst_member_drop", 1.0, 0.5)
    assert monitor.logs()["monitor/worst_member_drop"] == 1.0 and monitor.logs()["monitor/alarm"] == 1.0
    assert monitor.observe_eval_worst(15, -3.0) is None and monitor.alarm is alarm  # it fires once
    monitor.observe_signals(15, 0.75, 0.0, 0.0, 0.0)  # a step after an eval keeps the eval's values
    logs = monitor.logs()
    assert (logs["monitor/eval_worst_member"], logs["monitor/worst_member_drop"], logs["monitor/score"]) == (-3.0, 4.5, -3.0)
    # a drop of exactly the threshold does not fire; a rising worst member never does
    edge = Monitor(config)
    assert edge.observe_eval_worst(0, 1.0) is None and edge.observe_eval_worst(5, 0.5) is None
    rising = Monitor(MonitorConfig(thresholds={"worst_member_drop": 1e-9}))
    assert all(rising.observe_eval_worst(step, 0.1 * step) is None for step in range(10))


def test_eval_members_refusals_word_for_word():
    monitor = Monitor(MonitorConfig())
    assert refusal(lambda: monitor.observe_eval_members(3, [[1.0, 2.0]], ("a",))) == (
        "step 3: eval member scores must be (k >= 2 members, n >= 2 samples); got (1, 2)")
    assert refusal(lambda: monitor.observe_eval_members(3, [[1.0], [2.0]], ("a", "b"))) == (
        "step 3: eval member scores must be (k >= 2 members, n >= 2 samples); got (2, 1)")
    assert refusal(lambda: monitor.observe_eval_members(3, [[1.0, 1.0], [2.0, 3.0]], ("a", "b"))) == (
        "step 3: member(s) a gave every eval sample the same score, so there is no scale to standardise by; use more "
        "eval prompts or samples")
    assert refusal(lambda: monitor.observe_eval_members(3, [[1.0, 1.0], [2.0, 2.0], [0.0, 1.0]], ("a", "b", "c"))) \
        .startswith("step 3: member(s) a, b gave every eval sample the same score")
    assert refusal(lambda: monitor.observe_eval_worst(4, math.nan)) == "step 4: the eval's worst member score is nan"
    assert monitor.series.eval_steps == [] and monitor.eval_means is None


def test_the_eval_reference_travels_with_the_evals_it_came_from():
    monitor = Monitor(MonitorConfig(thresholds=NO_ALARM))
    for step in range(3):
        monitor.observe_signals(step, 0.1 * step, 0.0, 0.0, 0.0)
    monitor.observe_eval_members(3, [[1.0, 3.0], [0.0, 4.0]], ("a", "b"))  # the first eval: means 2, 2; stds 1, 2
    assert monitor.state_dict(before_step=2)["eval_reference"] is None  # a resume there redoes the eval of step 3
    assert monitor.state_dict(before_step=3)["eval_reference"] == {"means": [2.0, 2.0], "stds": [1.0, 2.0]}
    resumed = Monitor(MonitorConfig(thresholds=NO_ALARM))
    resumed.load_state_dict(monitor.state_dict(before_step=3))
    assert resumed.eval_means.tolist() == [2.0, 2.0] and resumed.series.eval_worst == [0.0]
    assert resumed.observe_eval_members(8, [[3.0, 3.0], [2.0, 6.0]], ("a", "b")) is None
    assert resumed.series.eval_worst == [0.0, 1.0]  # a: z 1, 1; b: z 0, 2 -- standardised by the restored reference


def test_eval_member_scores_leave_out_samples_without_every_member():
    rows = [{"a": 1.0, "b": 2.0, "x": 9.0}, None, {"a": 3.0}, {"b": 5.0, "a": 4.0}]
    assert eval_member_scores(rows, ("a", "b")).tolist() == [[1.0, 4.0], [2.0, 5.0]]
    assert eval_member_scores([None, {}], ("a", "b")).shape == (2, 0)


def test_a_value_equal_to_its_threshold_does_not_count():
    rows = [(0, 0.0, 0.0, 0.0), (1, 0.1, 0.5, 0.0), (2, 0.2, 0.5, 0.0)]
    assert first_fire(MonitorConfig(window=1, patience=1, thresholds={"disagreement_rise": 0.5}), rows)[0] is None


def test_the_alarm_fires_once_at_the_expected_step_and_names_the_first_signal():
    rows = [(s, 0.1 * s, 0.1 * s * s, 0.0) for s in range(10)]  # disagreement grows faster than KL, proxy flat
    thresholds = {"divergence": 0.5, "trend": 0.5, "disagreement_rise": 0.01}
    config = MonitorConfig(window=3, patience=2, thresholds=thresholds, action="adapt_kl")
    fired, monitor = first_fire(config, rows)
    # rise counts from step 1 (fires at 2); trend and divergence from step 2 (window full), so disagreement_rise
    assert fired == 2 and monitor.alarm.signal == "disagreement_rise"
    assert monitor.alarm.kl == pytest.approx(0.2) and monitor.alarm.action == "adapt_kl"
    assert monitor.alarm.value == pytest.approx(np.mean([0.0, 0.1, 0.4]) - 0.0)
    # with patience 1 all three are over at step 2: the report follows SIGNALS' order, divergence first
    fired, monitor = first_fire(MonitorConfig(window=3, patience=1, thresholds=thresholds, reference_steps=3), rows)
    assert fired == 2 and monitor.alarm.signal == "divergence"
    trend = fit([0, 1, 2], [0.0, 0.1, 0.4]) / 0.1
    assert monitor.alarm.value == pytest.approx(2 * trend) and monitor.alarm.threshold == 0.5
    assert monitor.logs()["monitor/alarm"] == 1.0 and monitor.streaks["divergence"] == 8
    monitor.scale_kl(9)
    assert monitor.signal_values()["alarm"] == 1.0 and monitor.signal_values()["kl_scale"] == 2.0


def test_gold_drop_fires_strictly_beyond_its_threshold_and_only_once():
    config = MonitorConfig(thresholds={"divergence": None, "disagreement_rise": None, "gold_drop": 0.25},
                           gold={"function": "m:f"})
    monitor = Monitor(config)
    assert monitor.observe_gold(0, 0.5) is None
    assert monitor.observe_gold(1, 0.25) is None  # a drop of exactly 0.25
    alarm = monitor.observe_gold(2, 0.125)
    assert (alarm.step, alarm.kl, alarm.signal, alarm.value, alarm.threshold) == (2, 0.0, "gold_drop", 0.375, 0.25)
    assert alarm.action == "warn"
    assert monitor.logs()["monitor/alarm"] == 1.0 and monitor.logs()["monitor/score"] == 0.125
    assert monitor.observe_gold(3, -1.0) is None and monitor.alarm is alarm
    # the best so far is the reference: a rise then a fall from the new best
    later = Monitor(config)
    later.observe_signals(0, 0.3, 0.0, 0.0, 0.0)
    assert later.observe_gold(0, 0.0) is None and later.observe_gold(1, 1.0) is None
    alarm = later.observe_gold(2, 0.7)
    assert alarm is not None and alarm.value == pytest.approx(0.3) and alarm.kl == 0.3


def test_an_alarm_set_by_gold_blocks_the_signals_alarm():
    config = MonitorConfig(window=1, patience=1, thresholds={"disagreement_rise": 0.1, "gold_drop": 0.1},
                           gold={"function": "m:f"})
    monitor = Monitor(config)
    monitor.observe_signals(0, 0.0, 0.0, 0.0, 0.0)
    monitor.observe_gold(1, 1.0)
    assert monitor.observe_gold(1, 0.5).signal == "gold_drop"
    assert monitor.observe_signals(1, 0.1, 3.0, 0.0, 0.0) is None and monitor.alarm.signal == "gold_drop"


def test_kl_scale_compounds():
    monitor = Monitor(MonitorConfig(kl_factor=3.0))
    assert monitor.scale_kl(4) == 3.0 and monitor.scale_kl(9) == 3.0
    assert monitor.kl_scale == 9.0 and monitor.kl_scalings == [4, 9] and monitor.logs()["monitor/kl_scale"] == 9.0


# ---------------------------------------------------------------- refusals, word for word

def refusal(call) -> str:
    with pytest.raises(MonitorError) as error:
        call()
    return str(error.value)


def test_refusals_word_for_word():
    names = ("a", "b")
    good = MemberBatch([[1.0, 2.0], [3.0, 5.0]], [1.0, 2.0], names)
    monitor = Monitor(MonitorConfig())
    for kl in (math.nan, math.inf):
        assert refusal(lambda kl=kl: monitor.observe(3, kl, good)) == (
            f"step 3: the KL to the initial policy is {kl}; the monitor needs it every step")
    empty = MemberBatch(np.zeros((2, 0)), [], names)
    assert refusal(lambda: monitor.observe(3, 0.1, empty)) == "step 3: no sample had every member score and a proxy reward"
    assert refusal(lambda: monitor.observe_gold(5, math.nan)) == "step 5: gold is nan"
    assert monitor.series.steps == [] and monitor.series.gold == []  # nothing recorded by a refused call
    monitor.observe(4, 0.1, good)
    for step in (4, 2):
        assert refusal(lambda step=step: monitor.observe_signals(step, 0.1, 0.0, 0.0, 0.0)) == (
            f"step {step} comes after step 4; steps must increase")
    assert monitor.series.steps == [4]
    tail = "gave every reference sample the same score, so there is no scale to standardise by; " \
           "raise monitor.reference_steps or the batch size"
    flat_two = MemberBatch([[1.0, 1.0], [2.0, 2.0], [0.0, 1.0]], [1.0, 2.0], ("a", "b", "c"))
    assert refusal(lambda: Monitor(MonitorConfig()).observe(0, 0.0, flat_two)) == f"step 0: member(s) a, b {tail}"
    flat_proxy = MemberBatch([[1.0, 2.0], [2.0, 0.0]], [1.0, 1.0], names)
    assert refusal(lambda: Monitor(MonitorConfig()).observe(0, 0.0, flat_proxy)) == f"step 0: the proxy reward {tail}"


def test_a_flat_first_step_is_fine_when_more_reference_steps_give_a_scale():
    """The refusal says to raise reference_steps; doing so must work when step 0 alone is flat."""
    names = ("a", "b")
    monitor = Monitor(MonitorConfig(reference_steps=2))
    assert monitor.observe(0, 0.0, MemberBatch([[1.0, 1.0], [3.0, 5.0]], [1.0, 1.0], names)) is None
    assert monitor.logs()["monitor/disagreement"] == 0.5 and monitor.logs()["monitor/proxy"] == 0.0  # provisional
    monitor.observe(1, 0.1, MemberBatch([[3.0, 3.0], [3.0, 5.0]], [3.0, 3.0], names))
    # pooled member a: 1, 1, 3, 3 (mean 2, std 1); b: 3, 5, 3, 5 (mean 4, std 1); proxy 1, 1, 3, 3
    assert monitor.series.disagreement == pytest.approx([0.5 * (1.0 + 0.0), 0.5 * (0.0 + 1.0)])
    assert monitor.series.proxy == pytest.approx([-1.0, 1.0])
    assert all(math.isfinite(v) for v in monitor.logs().values())
    still_flat = Monitor(MonitorConfig(reference_steps=2))
    still_flat.observe(0, 0.0, MemberBatch([[1.0, 1.0], [3.0, 5.0]], [1.0, 2.0], names))
    assert refusal(lambda: still_flat.observe(7, 0.1, MemberBatch([[1.0, 1.0], [3.0, 5.0]], [1.0, 2.0], names))) \
        .startswith("step 7: member(s) a gave every reference sample the same score")


# ---------------------------------------------------------------- resume and replay

def training(steps: int = 24, seed: int = 0):
    """Member scores that drift apart after step 10 (member 0 is the proxy), with gold that peaks at step 10."""
    rng = np.random.default_rng(seed)
    for step in range(steps):
        drift = max(0, step - 10) * 0.3
        scores = rng.normal(0, 1, 8) + rng.normal(0, 0.3, (3, 8)) + rng.normal(0, 1, (3, 8)) * drift
        scores[0] = np.abs(scores[0]) + drift
        yield step, 0.05 * step + rng.normal(0, 0.01), MemberBatch(scores, scores[0], ("m0", "m1", "m2"))


def gold_at(step: int) -> float | None:
    return 1.0 - abs(step - 10) * 0.05 if step % 4 == 0 else None


def drive(monitor: Monitor, runs, resumed_at: int | None = None, states: dict | None = None) -> list[dict[str, float]]:
    """A trainer: gold before the step's batch (its eval), a checkpoint every 5 steps (its state in `states`),
    adapt_kl when the alarm fires. Resumed at a step, that step's gold and checkpoint are in the loaded state."""
    logs = []
    for step, kl, batch in runs:
        if resumed_at is not None and step < resumed_at:
            continue
        redo = step == resumed_at
        if gold_at(step) is not None and not redo and monitor.observe_gold(step, gold_at(step)) is not None:
            monitor.scale_kl(step)
        if step % 5 == 0 and not redo:
            monitor.note_checkpoint(step)
            if states is not None:
                states[step] = json.loads(json.dumps(monitor.state_dict(before_step=step)))  # as written to disk
        if monitor.observe(step, kl, batch) is not None:
            monitor.scale_kl(step)
        logs.append(monitor.logs())
    return logs


def snapshot(monitor: Monitor) -> dict:
    return {"series": vars(monitor.series), "alarm": monitor.alarm, "streaks": monitor.streaks,
            "kl_scale": monitor.kl_scale, "kl_scalings": monitor.kl_scalings, "checkpoints": monitor.checkpoints,
            "means": monitor.means.tolist(), "stds": monitor.stds.tolist(), "proxy": (monitor.proxy_mean, monitor.proxy_std),
            "reference_disagreement": monitor.reference_disagreement}


@pytest.mark.parametrize("reference_steps", [1, 3])
def test_resume_from_each_checkpoint_continues_the_stream_identically(reference_steps):
    config = MonitorConfig(reference_steps=reference_steps, window=5, patience=2, action="adapt_kl",
                           thresholds={"divergence": None, "disagreement_rise": 1.0, "gold_drop": 0.12, "worst_member_drop": None},
                           gold={"function": "m:f"})
    runs = list(training())
    whole, states = Monitor(config), {}
    whole_logs = drive(whole, runs, states=states)
    assert whole.alarm is not None and 6 < whole.alarm.step < 18 and whole.kl_scalings == [whole.alarm.step]
    for cut, state in states.items():
        assert json.loads(json.dumps(whole.state_dict(before_step=cut))) == state, cut  # cut from the end = saved then
        resumed = Monitor(config)
        drive(resumed, runs[:3])  # whatever it held before is replaced
        resumed.load_state_dict(state)
        assert resumed.kl_scale == whole.kl_scale ** (whole.alarm.step < cut), cut
        assert resumed.logs()["monitor/kl_scale"] == resumed.kl_scale, cut
        assert drive(resumed, runs, resumed_at=cut) == whole_logs[cut:], cut
        assert snapshot(resumed) == snapshot(whole), cut
    assert set(whole.checkpoints) == {0, 5, 10, 15, 20} and whole.best_checkpoint() in whole.checkpoints
    if reference_steps == 1:
        assert whole.alarm.step in states  # a checkpoint of the step that scaled the KL: that step redoes it


def test_state_dict_of_everything_reloads_to_the_same_monitor():
    config = MonitorConfig(reference_steps=2, window=4, thresholds={"disagreement_rise": 0.3}, gold={"function": "m:f"})
    monitor = Monitor(config)
    drive(monitor, training(16))
    monitor.observe_gold(16, 0.5)  # an eval after the last step
    monitor.note_checkpoint(16)
    again = Monitor(config)
    again.load_state_dict(json.loads(json.dumps(monitor.state_dict())))
    assert snapshot(again) == snapshot(monitor) and again.logs() == monitor.logs()
    told = Monitor(MonitorConfig(), has_gold=True)  # gold fed without a gold config (a replay of logged gold)
    told.load_state_dict(monitor.state_dict())
    assert tuple(told.logs()) == monitor_keys(True)


def test_streaks_of_the_last_reference_step_survive_a_resume():
    config = MonitorConfig(reference_steps=2, window=1, patience=2, thresholds={"divergence": -0.5, "disagreement_rise": None})
    runs = list(training(4))
    whole = Monitor(config)
    fired = [whole.observe(step, kl, batch) is not None for step, kl, batch in runs]
    assert fired == [False, False, True, False]  # over from step 1, the last reference step
    resumed = Monitor(config)
    resumed.load_state_dict(whole.state_dict(before_step=2))
    assert resumed.streaks["divergence"] == 1 and resumed.observe(*runs[2]) == whole.alarm


def test_a_hand_edited_state_with_a_flat_reference_is_refused():
    state = {"series": {"steps": [4], "kl": [0.0], "disagreement": [0.0], "proxy": [0.0], "worst": [0.0],
                        "eval_steps": [], "eval_worst": [], "gold_steps": [], "gold": []},
             "reference": [{"step": 4, "scores": [[1.0, 1.0], [0.0, 2.0]], "proxy": [0.0, 1.0], "names": ["a", "b"]}],
             "eval_reference": None, "kl_scalings": [], "checkpoints": {}}
    assert refusal(lambda: Monitor(MonitorConfig()).load_state_dict(state)).startswith(
        "step 4: member(s) a gave every reference sample the same score")


def test_a_state_from_before_the_worst_member_is_refused():
    monitor = Monitor(MonitorConfig(thresholds=NO_ALARM))
    monitor.observe_signals(0, 0.0, 0.0, 0.0, 0.0)
    state = json.loads(json.dumps(monitor.state_dict()))
    without_reference = {key: value for key, value in state.items() if key != "eval_reference"}
    assert refusal(lambda: Monitor(MonitorConfig()).load_state_dict(without_reference)) == (
        "this monitor state has no eval_reference: it was saved by an older version of the monitor; resume with that "
        "version or start a fresh run")
    for key in ("worst", "eval_steps", "eval_worst"):
        del state["series"][key]
    del state["eval_reference"]
    assert refusal(lambda: Monitor(MonitorConfig()).load_state_dict(state)) == (
        "this monitor state has no worst, eval_steps, eval_worst, eval_reference: it was saved by an older version of "
        "the monitor; resume with that version or start a fresh run")


def records_of(monitor: Monitor) -> list[dict[str, float]]:
    s = monitor.series
    return [{"step": st, "kl": k, "disagreement": d, "proxy": p, "worst_member": w}
            for st, k, d, p, w in zip(s.steps, s.kl, s.disagreement, s.proxy, s.worst)]


def test_replay_equals_the_online_run_with_gold_seen_before_its_step():
    config = MonitorConfig(reference_steps=2, window=5, patience=2,
                           thresholds={"disagreement_rise": None, "divergence": 0.5, "gold_drop": 0.12, "worst_member_drop": None},
                           gold={"function": "m:f"})
    online = Monitor(config)
    logs = drive(online, training())
    gold = list(zip(online.series.gold_steps, online.series.gold))
    again = replay(config, records_of(online), gold[::-1])  # in any order
    assert again.logs() == {**logs[-1], "monitor/kl_scale": 1.0}  # a replay takes no action
    assert again.alarm == online.alarm and vars(again.series) == vars(online.series)
    assert again.alarm.signal == "gold_drop" and again.alarm.step == 16
    assert again.alarm.kl == online.series.kl[15]  # gold of step 16 came before step 16's batch


def test_replay_takes_gold_after_the_last_record_and_knows_whether_it_has_gold():
    config = MonitorConfig(thresholds={"disagreement_rise": None, "divergence": 1.0, "gold_drop": 0.1},
                           gold={"function": "m:f"})
    records = [{"step": s, "kl": 0.1 * s, "disagreement": 0.0, "proxy": 0.0, "worst_member": 0.0} for s in range(3)]
    monitor = replay(config, records, [(0, 1.0), (7, 0.5)])
    assert monitor.alarm.step == 7 and monitor.alarm.kl == pytest.approx(0.2) and monitor.series.gold_steps == [0, 7]
    assert "monitor/gold" in replay(config, records, [(0, 1.0)]).logs()
    assert tuple(replay(config, records).logs()) == monitor_keys(False)
    assert replay(config, records).series.steps == [0, 1, 2]
