"""The VR-CLI demo stage at tiny sizes: the task's premise, the real pipeline end to end, outputs and resume."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch

from evaluation.eval_files import list_eval_files, read_eval_file
from reward_plugins.io import read_jsonl
from reward_plugins.pipeline import build_first_of_type
from trl_ext import demo_vrcli as dv
from trl_ext.run_config import TrainConfig

TINY = dict(n_lm=60, lm_steps=3, lm_batch=8, hidden_size=32, n_rl=16, n_eval=4, grpo_steps=2, grpo_batch=8,
            grpo_generations=4, eval_every=1)


def test_the_hidden_map_decides_the_gold_and_plans_vary_only_there():
    world = dv.hidden_map(3)
    assert sorted(world) == sorted(dv.CLUES) and sorted(world.values()) == sorted(dv.THINGS)
    rows = dv.stories(random.Random(0), 50, world)
    for row in rows:
        label = row["label"]
        clue = label["context"].split("clue : ")[1].removesuffix(" .")
        name = label["context"].split()[2]
        assert label["gold"] == f"{name} finds the {world[clue]} ."
        assert row["user"].startswith(label["context"]) and "plan it" in row["user"]


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    before = torch.get_num_threads()
    cfg = dv.VRCLIDemoConfig(out=str(tmp_path_factory.mktemp("vrcli") / "vrcli"), **TINY)
    section = dv.run_stage(cfg)
    yield cfg, section
    torch.set_num_threads(before)


def test_stage_writes_curve_summary_and_fingerprinted_baselines(stage, monkeypatch):
    cfg, section = stage
    out = Path(cfg.out)
    labels = [row["label"] for row in read_jsonl(out / "data_with_baseline" / "train.jsonl")]
    plugin = build_first_of_type(out / "reward.yaml", "vrcli")
    assert len(labels) == cfg.n_rl and all(label["baseline_fingerprint"] == plugin.fingerprint() for label in labels)
    files = list_eval_files(out / "grpo" / "eval")
    assert [read_eval_file(f).step for f in files] == [0, 1, 2]
    metrics = read_eval_file(files[-1]).meta["metrics"]
    assert set(metrics) == {"vrcli_reward", "vrcli_improvement", "vrcli_improved_share"}
    with open(out / "curve.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert float(rows[-1]["vrcli_improvement"]) == pytest.approx(metrics["vrcli_improvement"])
    assert (out / "curve.png").stat().st_size > 0
    assert "| grpo_vrcli | 2 |" in section and (out / "summary.md").read_text() == section
    assert list((out / "grpo" / "runs" / "heldout_eval").iterdir()), "eval/vrcli_* scalars for TensorBoard"
    calls = []
    monkeypatch.setattr(dv, "train_lm", lambda *a: calls.append(a))
    assert dv.run_stage(cfg) == section and calls == []  # finished steps are skipped


def test_trl_refuses_baselines_from_other_settings_at_load(stage, tmp_path):
    import json

    from reward_plugins.io import DataError
    from trl_ext import train as train_mod

    cfg, _ = stage
    out = Path(cfg.out)
    rows = read_jsonl(out / "data_with_baseline" / "train.jsonl")
    rows[1]["label"]["baseline_fingerprint"]["max_length"] = 4096
    bad = tmp_path / "train.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = TrainConfig(policy=str(out / "models" / "ref_lm"), reward_config=str(out / "reward.yaml"),
                                   train_data=str(bad), output_dir=str(tmp_path / "run"))
    with pytest.raises(DataError, match="max_length: baseline 4096, reward 128"):
        train_mod.build_trainer(config)
