"""The demo's stages one by one at tiny sizes: each writes its outputs, and a rerun skips finished stages."""

from __future__ import annotations

import pytest
import torch

from evaluation.eval_files import list_eval_files, read_eval_file
from trl_ext import demo


TINY = dict(n_sft=64, n_pref=64, n_rl=16, n_eval=4, hidden_size=32, sft_epochs=1, rm_epochs=1, rm_seeds=[1, 2],
            bon_prompts=4, bon_n=4, max_new_tokens=8, grpo_steps=2, grpo_batch=8, grpo_generations=4, eval_every=1)


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


def test_grpo_gold_and_report(built, monkeypatch):
    cfg, paths, reports, curves = built
    monkeypatch.setenv("MODELS_DIR", str(paths.models))
    monkeypatch.setattr(demo, "UWO_REWARD", _two_member_uwo(paths))
    demo.stage_grpo(cfg, paths)
    demo.stage_gold(cfg, paths)
    for name in demo.grpo_runs(paths):
        files = list_eval_files(paths.run(name) / "eval")
        assert [read_eval_file(f).step for f in files] == [0, 1, 2]
        assert all(r.gold_score is not None and r.proxy_score is not None for f in files for r in read_eval_file(f).rows)
    table = demo.stage_report(cfg, paths, reports, curves)
    assert "grpo_rm_seed1" in table and "grpo_uwo3" in table and "ensemble_UWO-0.5" in table
    assert (paths.out / "bon.png").exists() and (paths.out / "grpo.png").exists() and paths.summary.read_text() == table
    # evaluation.plots' overlay: the single RMs averaged into one curve, each ensemble and each GRPO run its own.
    import csv

    with open(paths.out / "overoptimisation.csv") as handle:
        names = {(row["run"], row["curve"]) for row in csv.DictReader(handle)}
    assert names == {("bon", "single RM (mean of 2)"), ("bon", "ensemble_mean"), ("bon", "ensemble_WCO"),
                     ("bon", "ensemble_UWO-0.5"), ("grpo_rm_seed1", "eval"), ("grpo_uwo3", "eval")}
    assert (paths.out / "overoptimisation.png").stat().st_size > 0


def _two_member_uwo(paths):
    text = demo.UWO_REWARD.read_text().replace("seeds: [1, 2, 3]", "seeds: [1, 2]")
    out = paths.out / "uwo2.yaml"
    out.write_text(text)
    return out
