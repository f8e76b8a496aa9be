"""Multi-head and LoRA ensembles as the reward of short TRL GRPO / RLOO runs and of our PPO, on real tiny models."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import yaml

from evaluation.eval_files import list_eval_files, read_eval_file
from reward_plugins.io import write_jsonl
from setup_data import synthetic_task as st
from trl_ext import train


@pytest.fixture()
def prompt_files(tmp_path):
    rng = random.Random(0)
    write_jsonl(tmp_path / "prompts.jsonl", st.prompt_rows(st.sample_tasks(16, rng)))
    write_jsonl(tmp_path / "eval.jsonl", st.prompt_rows(st.sample_tasks(4, rng)))
    return tmp_path / "prompts.jsonl", tmp_path / "eval.jsonl"


def reward_yaml(tmp_path, kind: str, folder) -> tuple[str, list[str]]:
    count = {"multihead_ensemble": "heads", "lora_ensemble": "adapters"}[kind]
    path = tmp_path / f"{kind}.yaml"
    path.write_text(yaml.safe_dump({"on_error": "penalty", "error_penalty": -1.0, "reward": {
        "type": kind, "name": "uwo", "path": str(folder), count: 5, "objective": "uwo", "uwo_weight": 0.1,
        "max_length": 64}}))
    prefix = "head" if kind == "multihead_ensemble" else "adapter"
    return str(path), [f"{prefix}{i}" for i in range(5)]


def common(tmp_path, lm_dir, reward, prompt_files, algorithm):
    return ["--set", f"algorithm={algorithm}", "--set", f"policy={lm_dir}", "--set", f"reward_config={reward}",
            "--set", f"train_data={prompt_files[0]}", "--set", f"eval_data={prompt_files[1]}",
            "--set", f"output_dir={tmp_path / algorithm}", "--set", "eval_every=2", "--set", "table_every=1"]


def assert_eval_rows_carry_members(out, members):
    ok = [row for row in read_eval_file(list_eval_files(out / "eval")[-1]).rows if row.status == "ok"]
    assert ok, "some answers must score"
    for row in ok:
        values = np.array([row.components[m] for m in members])
        assert row.ensemble_variance == pytest.approx(values.var(), rel=1e-5, abs=1e-7)
        assert row.proxy_score == pytest.approx(values.mean() - 0.1 * values.var(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("algorithm, kind", [("grpo", "multihead_ensemble"), ("rloo", "lora_ensemble")])
def test_trl_trainers_train_on_one_pass_ensembles(tmp_path, lm_dir, multihead_dir, lora_dir, prompt_files, algorithm, kind):
    reward, members = reward_yaml(tmp_path, kind, multihead_dir if kind == "multihead_ensemble" else lora_dir)
    cfg = train.parse_args([*common(tmp_path, lm_dir, reward, prompt_files, algorithm), "--set",
                            "trl={max_steps: 2, per_device_train_batch_size: 4, num_generations: 4, "
                            "max_completion_length: 8, learning_rate: 0.05, beta: 0.1, logging_steps: 1}"])
    trainer = train.build_trainer(cfg)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for key in (*(f"reward/{m}" for m in members), "reward/variance", "reward/combined", "reward/errors"):
        assert all(key in entry for entry in logs), key
    assert_eval_rows_carry_members(tmp_path / algorithm, members)


@pytest.mark.parametrize("kind", ["multihead_ensemble", "lora_ensemble"])
def test_ppo_trains_on_one_pass_ensembles(tmp_path, lm_dir, multihead_dir, lora_dir, prompt_files, kind):
    reward, members = reward_yaml(tmp_path, kind, multihead_dir if kind == "multihead_ensemble" else lora_dir)
    settings = {"max_steps": 2, "batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 2, "max_new_tokens": 8,
                "learning_rate": 0.01, "kl_coef": 0.05}
    train.run(train.parse_args([*common(tmp_path, lm_dir, reward, prompt_files, "ppo"), "--set", f"ppo={json.dumps(settings)}"]))
    records = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    assert all({*(f"reward/{m}" for m in members), "reward/variance", "reward/combined"} <= set(r) for r in records)
    assert_eval_rows_carry_members(tmp_path / "ppo", members)
