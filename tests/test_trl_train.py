"""TRL backend: the reward adapter, config overrides, and tiny end-to-end GRPO / RLOO runs on real tiny models."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import yaml
from transformers import AutoModelForCausalLM


from evaluation.eval_files import list_eval_files, read_eval_file
from reward_plugins.config import ConfigError
from reward_plugins.io import write_jsonl
from reward_plugins.pipeline import RewardPipeline
from setup_data import synthetic_task as st
from trl_ext import train
from trl_ext.reward_adapter import PipelineRewardFunc


def _ensemble_yaml(path: Path, rm_dirs, on_error: str = "penalty") -> Path:
    lines = {"on_error": on_error, "reward": {
        "type": "ensemble", "name": "uwo", "objective": "uwo", "uwo_weight": 0.1,
        "path_template": str(rm_dirs[1]).replace("rm_seed1", "rm_seed{seed}"), "seeds": [1, 2, 3]}}
    if on_error == "penalty":
        lines["error_penalty"] = -5.0
    path.write_text(yaml.safe_dump(lines))
    return path




@pytest.fixture()
def prompt_files(tmp_path):
    rng = random.Random(0)
    train_file, eval_file = tmp_path / "prompts.jsonl", tmp_path / "eval.jsonl"
    write_jsonl(train_file, st.prompt_rows(st.sample_tasks(16, rng)))
    write_jsonl(eval_file, st.prompt_rows(st.sample_tasks(4, rng)))
    return train_file, eval_file


def test_adapter_one_batched_call_labels_and_logs(tmp_path, rm_dirs):
    pipeline = RewardPipeline.from_yaml(_ensemble_yaml(tmp_path / "r.yaml", rm_dirs))
    calls = []
    original = pipeline.score
    pipeline.score = lambda samples: calls.append(list(samples)) or original(samples)
    metrics, extra = {}, {}
    fn = PipelineRewardFunc(pipeline, name="uwo", table_dir=tmp_path / "tables", table_every=2)
    labels = [{"k": 2, "category": "fruits"}, {"k": 1, "category": "colors"}, {"k": 3, "category": "tools"}]
    state = type("State", (), {"global_step": 4})()
    rewards = fn(
        prompts=["a", "b", "c"], completions=[" apple, pear", "", " saw"], completion_ids=[[5, 6], [], [7]],
        label=labels, extra=[1, 2, 3], trainer_state=state,
        log_metric=lambda k, v: metrics.__setitem__(k, v), log_extra=lambda k, v: extra.__setitem__(k, v),
    )
    assert len(calls) == 1 and [s.label for s in calls[0]] == labels
    assert calls[0][0].response_ids == [5, 6] and calls[0][0].query == "a apple, pear"
    assert rewards[1] == -5.0  # the empty response errored and got the configured penalty, not 0
    assert set(metrics) == set(pipeline.log_keys) and metrics["reward/errors"] == 1.0
    direct = pipeline.score(calls[0])
    assert rewards[0] == pytest.approx(direct.rewards[0]) and rewards[2] == pytest.approx(direct.rewards[2])
    assert extra["reward/errors"] == [0.0, 1.0, 0.0]
    table = [json.loads(line) for line in (tmp_path / "tables" / "completions_step000004.jsonl").read_text().splitlines()]
    assert table[1]["status"] == "error" and table[0]["components"]["seed1"] == pytest.approx(direct.results[0].components["seed1"])


def test_adapter_skip_policy_returns_none(tmp_path, rm_dirs):
    pipeline = RewardPipeline.from_yaml(_ensemble_yaml(tmp_path / "r.yaml", rm_dirs, on_error="skip"))
    rewards = PipelineRewardFunc(pipeline)(prompts=["a", "b"], completions=[" x", "  "], label=[{}, {}])
    assert rewards[1] is None and isinstance(rewards[0], float)


def test_overrides_and_config_errors(tmp_path, lm_dir, rm_dirs, prompt_files):
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"policy": str(lm_dir), "reward_config": str(_ensemble_yaml(tmp_path / "r.yaml", rm_dirs)),
                                      "train_data": str(prompt_files[0]), "output_dir": str(tmp_path / "o"),
                                      "trl": {"max_steps": 3}}))
    cfg = train.parse_args(["--config", str(preset), "--set", "trl.learning_rate=0.01", "--trl.max_steps", "7",
                            "--algorithm=rloo"])
    assert cfg.trl == {"max_steps": 7, "learning_rate": 0.01} and cfg.algorithm == "rloo"
    with pytest.raises(ConfigError, match=r"invalid train configuration:\n  --set: train_data: path does not exist"):
        train.parse_args(["--config", str(preset), "--set", "train_data=/nope.jsonl"])
    with pytest.raises(ConfigError, match=r"--set: algoritm: unknown key"):
        train.parse_args(["--config", str(preset), "--set", "algoritm=grpo"])
    with pytest.raises(ConfigError, match=r"trl.max_stepz: unknown GRPOConfig field"):
        train.trl_args(train.parse_args(["--config", str(preset), "--set", "trl.max_stepz=3"]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "label": {}}\n{"label": {}}\n')
    with pytest.raises(Exception, match=r"bad.jsonl:2: 'prompt' must be a string or a list of chat messages"):
        train.load_prompt_rows(str(bad), "label")


def _run(tmp_path, lm_dir, reward_yaml, prompt_files, algorithm, steps):
    cfg = train.parse_args([
        "--set", f"algorithm={algorithm}", "--set", f"policy={lm_dir}", "--set", f"reward_config={reward_yaml}",
        "--set", f"train_data={prompt_files[0]}", "--set", f"eval_data={prompt_files[1]}",
        "--set", f"output_dir={tmp_path / algorithm}", "--set", "eval_every=2", "--set", "table_every=1",
        "--set", f"trl={{max_steps: {steps}, per_device_train_batch_size: 4, num_generations: 4, "
                 "max_completion_length: 8, learning_rate: 0.05, beta: 0.1, save_steps: 2, logging_steps: 1}",
    ])
    trainer = train.build_trainer(cfg)
    trainer.train()
    trainer.save_model(str(tmp_path / algorithm / "final"))
    return trainer


def test_grpo_end_to_end_with_ensemble(tmp_path, lm_dir, rm_dirs, prompt_files):
    reward_yaml = _ensemble_yaml(tmp_path / "r.yaml", rm_dirs)
    trainer = _run(tmp_path, lm_dir, reward_yaml, prompt_files, "grpo", steps=3)
    out = tmp_path / "grpo"
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for key in ("reward/seed1", "reward/variance", "reward/combined", "reward/errors", "kl", "entropy",
                "clip_ratio/region_mean", "completions/mean_length"):
        assert all(key in entry for entry in logs), key
    assert any(entry["kl"] > 0 for entry in logs[1:])  # the policy moved away from the reference
    files = list_eval_files(out / "eval")
    assert [read_eval_file(f).step for f in files] == [0, 2, 3]
    last = read_eval_file(files[-1])
    assert len(last.rows) == 4 and last.kl_history[0] == pytest.approx(0.0, abs=1e-4) and len(last.kl_history) == 3
    assert all(set(r.components) >= {"seed1", "seed2", "seed3", "variance", "combined"} for r in last.rows)
    assert np.mean([r.kl for r in last.rows]) == pytest.approx(last.kl)
    assert (out / "checkpoint-2" / "model.safetensors").exists() and list((out / "runs").rglob("events.out.tfevents*"))
    moved = AutoModelForCausalLM.from_pretrained(out / "final")
    start = AutoModelForCausalLM.from_pretrained(lm_dir)
    assert any(not np.allclose(a.detach(), b.detach()) for a, b in zip(moved.parameters(), start.parameters()))
    assert list((out / "completions").glob("completions_step*.jsonl"))


def test_rloo_runs_with_the_same_reward_file(tmp_path, lm_dir, rm_dirs, prompt_files):
    trainer = _run(tmp_path, lm_dir, _ensemble_yaml(tmp_path / "r.yaml", rm_dirs), prompt_files, "rloo", steps=2)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all("reward/combined" in e and "kl" in e for e in logs)
    assert len(list_eval_files(tmp_path / "rloo" / "eval")) == 2
