"""The demo's stages one by one at tiny sizes: each writes its outputs, and a rerun skips finished stages."""

from __future__ import annotations

import pytest
import torch

from evaluation.eval_files import list_eval_files, read_eval_file
from trl_ext import demo


TINY = dict(n_sft=64, n_pref=64, n_rl=16, n_eval=4, hidden_size=32, sft_epochs=1, rm_epochs=1, rm_seeds=[1, 2],
            bon_n=4, max_new_tokens=8, rl_seeds=[1, 2], rl_steps=2, rl_batch=4, rl_mini_batch=2, rl_epochs=1,
            rl_eval_samples=2, eval_every=1)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Run the stages once for the module (they build on each other), timing nothing."""
    before = torch.get_num_threads()
    cfg = demo.DemoConfig(out=str(tmp_path_factory.mktemp("demo")), **TINY)
    paths = demo.Paths(cfg.out)
    demo.stage_data(cfg, paths)
    demo.stage_sft(cfg, paths)
    reports = demo.stage_rms(cfg, paths)
    curves = demo.stage_bon(cfg, paths)
    yield cfg, paths, reports, curves
    torch.set_num_threads(before)


def test_data_and_sft(built):
    cfg, paths, _, _ = built
    assert (paths.data / "prefs.jsonl").exists() and (paths.policy / "model.safetensors").exists()
    stamp = (paths.policy / "model.safetensors").stat().st_mtime_ns
    demo.stage_sft(cfg, paths)  # done: skipped
    assert (paths.policy / "model.safetensors").stat().st_mtime_ns == stamp


def test_rms_report_accuracy_and_are_reused(built):
    cfg, paths, reports, _ = built
    assert [r["seed"] for r in reports] == [1, 2]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["test_pairs"] > 0 for r in reports)
    assert demo.stage_rms(cfg, paths) == reports


def test_bon_curves_for_members_and_ensembles(built):
    _, paths, _, curves = built
    assert set(curves) == {"rm_seed1", "rm_seed2", "ensemble_mean", "ensemble_WCO", "ensemble_UWO-0.5"}
    for curve in curves.values():
        assert [p["n"] for p in curve] == [1, 2, 4]
        assert curve[0]["kl_bon"] == 0.0
    # n=1 is the plain average, whatever the proxy: every objective agrees on it.
    assert len({round(c[0]["gold_score"], 9) for c in curves.values()}) == 1
    assert (paths.bon / "curves.json").exists()


def test_bon_and_rl_step0_sample_the_same_eval_prompts(built):
    cfg, paths, _, _ = built
    from reward_plugins.io import read_jsonl

    eval_prompts = [r["prompt"] for r in read_jsonl(paths.data / "eval_prompts.jsonl")]
    rl_prompts = [r["prompt"] for r in read_jsonl(paths.eval_prompts)]
    assert rl_prompts == [p for p in eval_prompts for _ in range(cfg.rl_eval_samples)]
    rl = demo.rl_config(cfg, paths, "uwo", 1)
    assert rl.eval_data == str(paths.eval_prompts) and rl.ppo.temperature == cfg.temperature
    assert rl.ppo.max_new_tokens == cfg.max_new_tokens


def test_rl_gold_and_report(built, monkeypatch):
    cfg, paths, reports, curves = built
    monkeypatch.setenv("MODELS_DIR", str(paths.models))
    monkeypatch.setattr(demo, "UWO_REWARD", _two_member(paths, demo.UWO_REWARD))
    monkeypatch.setattr(demo, "WCO_REWARD", _two_member(paths, demo.WCO_REWARD))
    demo.stage_rl(cfg, paths)
    demo.stage_gold(cfg, paths)
    for objective, dirs in demo.rl_runs(cfg, paths).items():
        assert [d.name for d in dirs] == ["seed1", "seed2"]
        for run_dir in dirs:
            files = list_eval_files(run_dir / "eval")
            assert [read_eval_file(f).step for f in files] == [0, 1, 2]
            assert all(r.gold_score is not None and r.proxy_score is not None for f in files for r in read_eval_file(f).rows)
            assert read_eval_file(files[0]).meta["algorithm"] == "ppo"
    # The single-RM runs average over RMs: seed i optimises the i-th proxy RM.
    assert "rm_seed2" in demo.rl_reward(cfg, paths, "single_rm", 2).read_text()
    table = demo.stage_report(cfg, paths, reports, curves)
    for name in ("single_rm", "wco", "uwo", "ensemble_UWO-0.5", "Gold at the largest KL", "Same start"):
        assert name in table
    assert (paths.out / "bon.png").exists() and (paths.out / "ppo.png").exists() and paths.summary.read_text() == table
    import csv

    with open(paths.out / "overoptimisation.csv") as handle:
        rows = list(csv.DictReader(handle))
    names = {(row["run"], row["curve"]) for row in rows}
    assert names == {("bon", "single RM (mean of 2)"), ("bon", "ensemble_mean"), ("bon", "ensemble_WCO"),
                     ("bon", "ensemble_UWO-0.5"), ("single_rm", "mean of 2 seeds"), ("wco", "mean of 2 seeds"),
                     ("uwo", "mean of 2 seeds")}
    # The seed mean and spread, checked against the two eval files of one step.
    step1 = [read_eval_file(list_eval_files(d / "eval")[1]) for d in demo.rl_runs(cfg, paths)["uwo"]]
    golds = [sum(r.gold_score for r in f.rows) / len(f.rows) for f in step1]
    row = next(r for r in rows if r["run"] == "uwo" and r["n_or_step"] == "1")
    assert float(row["gold"]) == pytest.approx(sum(golds) / 2) and float(row["gold_std"]) == pytest.approx(abs(golds[0] - golds[1]) / 2)
    assert float(row["kl"]) == pytest.approx((step1[0].kl + step1[1].kl) / 2)


def _two_member(paths, reward):
    text = reward.read_text().replace("seeds: [1, 2, 3]", "seeds: [1, 2]")
    out = paths.out / f"{reward.stem}_2.yaml"
    out.write_text(text)
    return out
