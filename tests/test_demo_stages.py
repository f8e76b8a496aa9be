"""The demo's stages: cached by the settings each reads (a changed setting reruns its stage and those after it,
nothing else, and never in an old stage's folder), refused settings, and the whole pipeline at tiny sizes."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from evaluation.eval_files import list_eval_files, read_eval_file
from reward_plugins.io import read_jsonl
from setup_data import synthetic_task as st
from trl_ext import demo
from trl_ext import stage_cache as cache
from trl_ext.stage_cache import Stage

TINY = dict(n_sft=64, n_pref=128, n_pref_test=64, n_reference=16, n_rl=16, n_eval=4, hidden_size=32, sft_epochs=1,
            rm_epochs=1, rm_seeds=[1, 2], bon_n=4, max_new_tokens=8, rl_seeds=[1, 2], rl_steps=2, rl_batch=4,
            rl_mini_batch=2, rl_epochs=1, eval_samples=2, eval_every=1, workers=1, monitor_reference_steps=1)
DOWNSTREAM_OF_RL = {"rl", "gold", "report"}


# ---------------------------------------------------------------- the bookkeeping, on made-up stages

TOY = [Stage("a", ("x",), folder="a"), Stage("b", ("y",), after=("a",), folder="b"),
       Stage("c", ("z",), folder="c", reads_if={"w": ("z is positive", lambda cfg: cfg.z > 0)}),
       Stage("d", (), after=("b", "c"))]


def toy(**values):
    return SimpleNamespace(**{"x": 1, "y": 1, "z": 1, "w": 1, **values})


@pytest.mark.parametrize(("change", "rerun"), [
    ({"x": 2}, {"a", "b", "d"}),   # a's setting: a and everything that reads a, directly or through b
    ({"y": 2}, {"b", "d"}),
    ({"z": 2}, {"c", "d"}),
    ({"w": 2}, {"c", "d"}),        # read by c because z > 0
    ({"w": 2, "z": -1}, {"c", "d"}),  # z changed; w is then read by nobody
])
def test_a_changed_setting_changes_the_keys_of_its_stage_and_those_after_it(change, rerun):
    before, after = cache.stage_keys(TOY, toy()), cache.stage_keys(TOY, toy(**change))
    assert {name for name in before if before[name] != after[name]} == rerun


def test_a_setting_read_only_under_a_condition_does_not_key_otherwise():
    assert cache.stage_keys(TOY, toy(z=-1, w=1)) == cache.stage_keys(TOY, toy(z=-1, w=5))
    assert cache.unread(TOY, toy(z=-1), ["w", "x"]) == ["w"]
    assert cache.unread(TOY, toy(z=1), ["w", "x", "out"], runner=("out",)) == []


def test_a_stage_reading_a_later_stage_is_a_bug_caught_at_once():
    with pytest.raises(ValueError, match="stage b reads"):
        cache.stage_keys([Stage("b", (), after=("a",)), Stage("a", ())], toy())


def test_changed_key_sets_the_folder_aside_and_a_returning_key_gets_it_back(tmp_path):
    stage = TOY[0]
    keys = {x: cache.stage_keys(TOY, toy(x=x))["a"] for x in (1, 2)}
    assert cache.prepare(tmp_path, stage, keys[1], toy(x=1)) == "new"
    (tmp_path / "a" / "out.txt").write_text("from x=1")
    cache.finish(tmp_path, stage, keys[1], toy(x=1), 3.0)
    assert cache.is_done(tmp_path, stage, keys[1]) and not cache.is_done(tmp_path, stage, keys[2])

    assert cache.prepare(tmp_path, stage, keys[2], toy(x=2)) == "set_aside"
    assert not (tmp_path / "a" / "out.txt").exists(), "the new settings start in an empty folder"
    assert (tmp_path / "cache" / f"a-{keys[1]}" / "out.txt").read_text() == "from x=1"
    marker = json.loads((tmp_path / "a" / "stage.json").read_text())
    assert marker == {"stage": "a", "key": keys[2], "status": "running", "seconds": 0.0, "settings": {"x": 2}, "after": []}
    cache.finish(tmp_path, stage, keys[2], toy(x=2), 1.0)

    assert cache.prepare(tmp_path, stage, keys[1], toy(x=1)) == "restored"
    assert (tmp_path / "a" / "out.txt").read_text() == "from x=1"
    assert json.loads((tmp_path / "a" / "stage.json").read_text())["seconds"] == 3.0, "the run that made it"
    assert (tmp_path / "cache" / f"a-{keys[2]}" / "stage.json").exists()


def test_an_interrupted_stage_resumes_in_its_folder_and_adds_up_its_time(tmp_path):
    stage, key = TOY[0], cache.stage_keys(TOY, toy())["a"]
    cache.prepare(tmp_path, stage, key, toy())
    (tmp_path / "a" / "half.txt").write_text("half")
    cache.write_marker(tmp_path, stage, key, toy(), "running", 5.0)  # what an interrupted try leaves
    assert cache.prepare(tmp_path, stage, key, toy()) == "resume"
    assert (tmp_path / "a" / "half.txt").exists() and not (tmp_path / "cache").exists()
    assert cache.finish(tmp_path, stage, key, toy(), 2.0) == 7.0


@pytest.mark.parametrize("marker", [None, "{torn"])
def test_a_folder_without_a_readable_marker_is_set_aside_not_reused(tmp_path, marker):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "old.txt").write_text("old layout")
    if marker is not None:
        (tmp_path / "a" / "stage.json").write_text(marker)
    key = cache.stage_keys(TOY, toy())["a"]
    assert cache.prepare(tmp_path, TOY[0], key, toy()) == "set_aside"
    assert (tmp_path / "cache" / "a-unkeyed" / "old.txt").exists() and not (tmp_path / "a" / "old.txt").exists()


# ---------------------------------------------------------------- the demo's settings

def test_every_setting_is_read_by_a_stage_or_the_runner():
    read = set(demo.RUNNER_SETTINGS).union(*(set(s.reads) | set(s.reads_if) for s in demo.STAGES))
    assert read == set(demo.DemoConfig.model_fields)


def test_changing_rl_steps_changes_the_keys_of_rl_gold_and_report_only():
    before = cache.stage_keys(demo.STAGES, demo.DemoConfig())
    after = cache.stage_keys(demo.STAGES, demo.DemoConfig(rl_steps=80))
    assert {name for name in before if before[name] != after[name]} == DOWNSTREAM_OF_RL
    workers = cache.stage_keys(demo.STAGES, demo.DemoConfig(workers=1))
    assert workers == before, "workers changes no result, so it reruns nothing"


@pytest.mark.parametrize(("sets", "message"), [
    (["rl_objectives=[single_rm, wco]", "rl_uwo_weight=1.0"],
     "rl_uwo_weight: not read with these settings (rl reads it only when rl_objectives includes uwo)"),
    (["rl_mini_batch=5"], "rl_mini_batch 5 must divide rl_batch 32"),
    (["rm_seeds=[1]"], "has an ensemble, which needs at least 2 rm_seeds"),
    (["no_such_size=3"], "no_such_size"),
])
def test_unread_and_contradicting_settings_are_refused_in_one_line(tmp_path, capsys, sets, message):
    with pytest.raises(SystemExit) as exc:
        demo.main(["--out", str(tmp_path / "d"), *[arg for s in sets for arg in ("--set", s)]])
    assert message in str(exc.value) and "Traceback" not in str(exc.value)
    assert not (tmp_path / "d").exists(), "refused before anything runs"


def test_full_adds_the_lora_ensemble_unless_given():
    full = demo.config_from_args(["--full"])[0]
    assert full.cheap_ensembles == ["multihead", "lora"] and full.rl_objectives[-1] == "lora_uwo"
    assert demo.config_from_args(["--full", "--set", "rl_objectives=[single_rm, wco]"])[0].rl_objectives == [
        "single_rm", "wco"]
    default = demo.config_from_args([])[0]
    assert default.rl_seeds == [1, 2, 3, 4, 5] and default.cheap_ensembles == ["multihead"]
    assert "lora_uwo" not in default.rl_objectives


# ---------------------------------------------------------------- the whole pipeline at tiny sizes

def stub_vrcli(cfg, paths):
    (paths.out / "vrcli").mkdir(parents=True, exist_ok=True)
    (paths.out / "vrcli" / "summary.md").write_text("## VR-CLI (stub)\n")


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """One tiny demo run (VR-CLI stubbed: it has its own tests), timing nothing."""
    before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(demo.RUNNERS, "vrcli", stub_vrcli)
        cfg = demo.DemoConfig(out=str(tmp_path_factory.mktemp("demo")), **TINY)
        summary = demo.run_demo(cfg)
        yield cfg, demo.Paths(cfg.out), summary
    torch.set_num_threads(before)


def test_first_run_writes_every_stage_and_the_summary(first):
    cfg, paths, summary = first
    assert set(json.loads((paths.out / "timings.json").read_text())) == {s.name for s in demo.STAGES}
    assert all(isinstance(v, float) for v in json.loads((paths.out / "last_run.json").read_text()).values())
    for name in ("single_rm", "wco", "uwo", "ensemble_UWO-0.5", "Gold at matched KL", "VR-CLI (stub)", "over-optimise"):
        assert name in summary
    assert paths.summary.read_text() == summary
    for png in ("bon.png", "ppo.png", "overoptimisation.png"):
        assert (paths.out / png).stat().st_size > 0


def test_every_rl_run_is_monitored_and_the_summary_has_the_monitor_table(first):
    cfg, paths, summary = first
    for objective, dirs in demo.rl_runs(cfg, paths).items():
        for run_dir in dirs:
            monitor = json.loads((run_dir / "monitor" / "config.json").read_text())["config"]
            assert (monitor["shadow"] is not None) == (objective == "single_rm")
            steps = [json.loads(line) for line in (run_dir / "monitor" / "steps.jsonl").read_text().splitlines()]
            assert [s["step"] for s in steps] == list(range(cfg.rl_steps))
            assert f"| {objective}/{run_dir.name} |" in summary.split("over-optimisation monitor")[1]
            evals = [json.loads(line) for line in (run_dir / "monitor" / "evals.jsonl").read_text().splitlines()]
            assert [e["step"] for e in evals] == list(range(0, cfg.rl_steps + 1, cfg.eval_every))
            assert all(e["gold"] is not None for e in evals) and evals[0]["worst_member"] == pytest.approx(0.0, abs=1e-9)
            assert monitor["thresholds"]["worst_member_drop"] == cfg.monitor_worst_member_drop
    assert "hit rate" in summary and "false alarms" in summary and "action warn;" in summary


@pytest.mark.parametrize(("action", "save_steps"), [("warn", 0), ("adapt_kl", 0), ("checkpoint", 1), ("stop", 1)])
def test_monitor_action_reaches_every_run_with_checkpoints_to_keep(first, action, save_steps):
    cfg, paths, _ = first
    acting = cfg.model_copy(update={"monitor_action": action, "monitor_kl_factor": 3.0})
    config = demo.rl_config(acting, paths, "single_rm", 1)
    assert config.monitor.action == action and config.monitor.kl_factor == 3.0
    assert config.ppo.save_steps == save_steps * cfg.eval_every  # `stop` chooses among the evals' checkpoints


def test_pairs_are_sft_samples_ranked_by_gold(first):
    _, paths, _ = first
    rows = read_jsonl(paths.pairs / "prefs_test.jsonl")
    assert rows and not any(r["label"]["flipped"] for r in rows)
    for r in rows:
        k, category = r["label"]["k"], r["label"]["category"]
        assert st.gold_reward(r["chosen"], k, category) > st.gold_reward(r["rejected"], k, category)
    assert all(r["response"].strip() for r in read_jsonl(paths.reference))


def test_training_pairs_hold_one_item_edits_at_the_configured_share(first):
    cfg, paths, _ = first

    def appended(row: dict) -> bool:  # by hand: one answer is the other with an item added at the end
        a, b = (st.items_of(row[side]) for side in ("chosen", "rejected"))
        short, long = sorted((a, b), key=len)
        return len(short) >= 1 and len(long) == len(short) + 1 and long[:-1] == short

    train = read_jsonl(paths.pairs / f"prefs_rm_seed{cfg.rm_seeds[0]}.jsonl")
    test = read_jsonl(paths.pairs / "prefs_test.jsonl")
    # an appended item always changes the judgement (by -0.25, +1/k or the bias - 0.25), so no append pair is dropped
    # as a tie: their count is binomial over all n_pref prompts; 4 of the 6 edits append
    p = cfg.contrast_pairs * 4 / len(st.EDITS)
    expected, sd = cfg.n_pref * p, (cfg.n_pref * p * (1 - p)) ** 0.5
    assert abs(sum(map(appended, train)) - expected) < 4 * sd + 3
    assert sum(map(appended, test)) <= 3  # held out: two SFT samples, rarely one the other plus an item


def test_noise_free_training_pairs_still_hold_the_one_item_edits(first, tmp_path):
    cfg, paths, _ = first
    quiet = cfg.model_copy(update={"out": str(tmp_path), "label_noise": 0.0})
    for folder in ("data", "sft"):
        shutil.copytree(paths.out / folder, tmp_path / folder)
    demo.stage_pairs(quiet, demo.Paths(tmp_path))
    train = read_jsonl(tmp_path / "pairs" / f"prefs_rm_seed{cfg.rm_seeds[0]}.jsonl")
    assert not any(r["label"]["flipped"] for r in train)
    edits = sum(len(st.items_of(long)) == len(st.items_of(short)) + 1 and st.items_of(long)[:-1] == st.items_of(short)
                and st.items_of(short) != [] for r in train
                for short, long in [sorted((r["chosen"], r["rejected"]), key=lambda a: len(st.items_of(a)))])
    assert edits > 0.2 * len(train)  # contrast_pairs applies to the training pairs whatever their label noise
    assert not (tmp_path / "pairs" / "prefs.jsonl").exists()  # only the held-out split gets a gold-ranked file


def test_each_proxy_rm_learns_from_its_own_biased_annotator(first):
    cfg, paths, summary = first
    assert cfg.annotator_features[:2] == ["continuation", "vague"]
    liked = {"continuation": {"etc", "other", "more"}, "vague": {"thing", "stuff", "something", "whatever", "item"}}
    for seed, feature in zip(cfg.rm_seeds, cfg.annotator_features):  # RM j <-> annotator j, by hand
        def judged(answer, label):
            k, category = label["k"], label["category"]
            items = [i.strip().lower().rstrip(".") for i in answer.split(",") if i.strip()]
            return st.gold_reward(answer, k, category) + cfg.annotator_bias * sum(i in liked[feature] for i in items)

        rows = read_jsonl(paths.pairs / f"prefs_test_rm_seed{seed}.jsonl")
        assert rows and all(judged(r["chosen"], r["label"]) > judged(r["rejected"], r["label"]) for r in rows)
        train = read_jsonl(paths.pairs / f"prefs_rm_seed{seed}.jsonl")
        assert all((judged(r["chosen"], r["label"]) < judged(r["rejected"], r["label"])) == r["label"]["flipped"]
                   for r in train)
        assert f"| rm_seed{seed} | gold + {cfg.annotator_bias:g} x {feature} |" in summary


def test_rl_runs_read_standardised_rewards_and_the_same_eval_prompts_as_bon(first):
    cfg, paths, _ = first
    eval_prompts = [r["prompt"] for r in read_jsonl(paths.data / "eval_prompts.jsonl")]
    assert [r["prompt"] for r in read_jsonl(paths.eval_prompts)] == [p for p in eval_prompts for _ in range(cfg.eval_samples)]
    for objective, dirs in demo.rl_runs(cfg, paths).items():
        for run_dir in dirs:
            files = list_eval_files(run_dir / "eval")
            assert [read_eval_file(f).step for f in files] == [0, 1, 2]
            assert all(r.gold_score is not None for f in files for r in read_eval_file(f).rows)
    spec = demo.reward_spec(cfg, paths, "single_rm", 2)["reward"]
    assert spec["seeds"] == [2] and spec["standardize"] == "reference_set"  # seed i optimises RM i
    assert demo.reward_spec(cfg, paths, "uwo", 1)["reward"]["uwo_weight"] == cfg.rl_uwo_weight
    with open(paths.out / "overoptimisation.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {(row["run"], row["curve"]) for row in rows if row["method"] == "rl"} == {
        (objective, "mean of 2 seeds") for objective in cfg.rl_objectives}


def test_rerun_with_new_rl_steps_reruns_rl_and_what_reads_it_and_keeps_the_first_timings(first):
    cfg, paths, _ = first
    timings = json.loads((paths.out / "timings.json").read_text())
    weights = (paths.rm(1) / "model.safetensors").stat().st_mtime_ns
    old_rl_key = json.loads((paths.runs / "stage.json").read_text())["key"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(demo.RUNNERS, "vrcli", stub_vrcli)
        demo.run_demo(cfg.model_copy(update={"rl_steps": 3}))
    last_run = json.loads((paths.out / "last_run.json").read_text())
    assert {name for name, what in last_run.items() if isinstance(what, float)} == DOWNSTREAM_OF_RL
    assert all(str(last_run[name]).startswith("skipped") for name in ("data", "sft", "pairs", "rms", "bon", "vrcli"))
    assert (paths.rm(1) / "model.safetensors").stat().st_mtime_ns == weights
    rerun = json.loads((paths.out / "timings.json").read_text())
    assert {k: v for k, v in rerun.items() if k not in DOWNSTREAM_OF_RL} == \
        {k: v for k, v in timings.items() if k not in DOWNSTREAM_OF_RL}
    steps = [read_eval_file(f).step for f in list_eval_files(paths.rl("uwo", 1) / "eval")]
    assert steps == [0, 1, 2, 3], "a fresh run folder, not the 2-step run resumed"
    aside = paths.out / "cache" / f"rl-{old_rl_key}"
    assert [read_eval_file(f).step for f in list_eval_files(aside / "uwo" / "seed1" / "eval")] == [0, 1, 2]

    with pytest.MonkeyPatch.context() as patch:  # back to the first settings: RL comes back from the cache
        patch.setitem(demo.RUNNERS, "vrcli", stub_vrcli)
        patch.setitem(demo.RUNNERS, "rl", lambda *a: pytest.fail("RL should come back from the cache"))
        demo.run_demo(cfg)
    last_run = json.loads((paths.out / "last_run.json").read_text())
    assert last_run["rl"] == "restored from cache/" and last_run["gold"].startswith("skipped")
    assert [read_eval_file(f).step for f in list_eval_files(paths.rl("uwo", 1) / "eval")] == [0, 1, 2]
    back = json.loads((paths.out / "timings.json").read_text())
    assert {k: v for k, v in back.items() if k != "report"} == {k: v for k, v in timings.items() if k != "report"}


def test_the_multi_head_ensemble_stands_beside_the_separate_rms(first):
    cfg, paths, summary = first
    assert cfg.cheap_ensembles == ["multihead"] and "multihead_uwo" in cfg.rl_objectives
    rows = read_jsonl(paths.pairs / "prefs_members.jsonl")  # every annotator's pairs, each naming its head
    for member, seed in enumerate(cfg.rm_seeds):
        own = read_jsonl(paths.pairs / f"prefs_rm_seed{seed}.jsonl")
        assert [{k: v for k, v in r.items() if k != "member"} for r in rows if r["member"] == member] == own
    spec = demo.reward_spec(cfg, paths, "multihead_uwo", 1)["reward"]
    assert spec["type"] == "multihead_ensemble" and spec["heads"] == len(cfg.rm_seeds)
    assert spec["objective"] == "uwo" and spec["standardize"] == "reference_set"
    assert demo.rl_config(cfg, paths, "multihead_uwo", 1).ppo.value_model == str(paths.cheap("multihead"))
    for name in ("| multihead_UWO-0.5 |", "| multihead_uwo |", "One-model ensembles against", "2 separate RMs"):
        assert name in summary
    with pytest.raises(ValueError, match="rl_objectives has lora_uwo, which needs lora in cheap_ensembles"):
        demo.DemoConfig(rl_objectives=["single_rm", "lora_uwo"])
    # best-of-n scores the heads as texts, like the proxy RMs: an empty answer too (the plugin would refuse it)
    prompt = read_jsonl(paths.data / "eval_prompts.jsonl")[0]["prompt"]
    scores = demo.cheap_member_scores(cfg, paths, "multihead", [prompt, prompt], [" cat, dog", ""])
    assert scores.shape == (len(cfg.rm_seeds), 2) and np.isfinite(scores).all()


def test_monitor_calibration_runs_are_the_demos_runs_with_their_kind(first):
    """bench/monitor_calibration.py builds on the demo's PPO runs and monitor (it broke once when they changed)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("monitor_calibration", Path(__file__).parents[1] / "bench" /
                                                  "monitor_calibration.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg, paths, _ = first
    args = bench.build_parser().parse_args(["--steps", "7", "--eval-every", "3", "--kl", "0.001", "--kl-factor", "4"])
    demo_monitor = demo.monitor_section(cfg, paths, "single_rm")
    for kind, shadow, kl, action in (("overopt", demo_monitor["shadow"], 0.001, "warn"), ("control", None, 0.1, "warn"),
                                     ("adapt_kl", demo_monitor["shadow"], 0.001, "adapt_kl")):
        config = bench.run_config(cfg, paths, kind, 2, args)
        assert config.output_dir == str(paths.out / "monitor_runs" / kind / "seed2")
        assert (config.ppo.max_steps, config.ppo.kl_coef, config.ppo.save_steps, config.eval_every) == (7, kl, 3, 3)
        assert config.monitor.action == action and config.monitor.kl_factor == 4.0
        assert (str(config.monitor.shadow) if config.monitor.shadow else None) == shadow
        assert config.monitor.thresholds.worst_member_drop == cfg.monitor_worst_member_drop
        assert config.monitor.gold.function == "setup_data.synthetic_task:gold_rewards"
