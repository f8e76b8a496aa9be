"""SFT and seeded RM training through TRL on real tiny models; the RM loads in the reward_model plugin."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from reward_plugins.io import DataError, write_jsonl
from reward_plugins.pipeline import RewardPipeline
from reward_plugins.types import Sample
from setup_data import synthetic_task as st
from trl_ext import sft, train_rm
from trl_ext.config import load_config



@pytest.fixture()
def data(tmp_path):
    rng = random.Random(0)
    tasks = st.sample_tasks(40, rng)
    write_jsonl(tmp_path / "sft.jsonl", st.sft_rows(tasks, rng))
    write_jsonl(tmp_path / "prefs.jsonl", st.preference_rows(tasks, rng, label_noise=0.0))
    write_jsonl(tmp_path / "test.jsonl", st.preference_rows(st.sample_tasks(16, rng), rng, label_noise=0.0))
    return tmp_path


def _completion_nll(model_dir, rows) -> float:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total = 0.0
    with torch.no_grad():
        for row in rows:
            p = tok(row["prompt"], add_special_tokens=False)["input_ids"]
            c = tok(row["completion"] + tok.eos_token, add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(model(torch.tensor([p + c])).logits[0, :-1], -1)
            total -= logp[torch.arange(len(p) - 1, len(p) + len(c) - 1), torch.tensor(c)].sum().item()
    return total


def test_sft_lowers_completion_nll(data, lm_dir):
    cfg = load_config(sft.SFTRunConfig, None, [
        f"model={lm_dir}", f"train_data={data / 'sft.jsonl'}", f"output_dir={data / 'sft'}",
        "trl={num_train_epochs: 3, per_device_train_batch_size: 8, learning_rate: 0.01, logging_steps: 5}"])
    final = sft.run(cfg)
    rows = [json.loads(line) for line in (data / "sft.jsonl").read_text().splitlines()][:10]
    assert _completion_nll(final, rows) < 0.8 * _completion_nll(lm_dir, rows)


def test_sft_bad_row_names_file_and_line(data, lm_dir):
    (data / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 3}\n')
    cfg = load_config(sft.SFTRunConfig, None, [f"model={lm_dir}", f"train_data={data / 'bad.jsonl'}", f"output_dir={data / 'o'}"])
    with pytest.raises(DataError, match=r"bad.jsonl:2: 'completion' must be a string"):
        sft.build_trainer(cfg)


def _rm(data, lm_dir, seed, root="models"):
    cfg = load_config(train_rm.RMRunConfig, None, [
        f"base={lm_dir}", f"train_data={data / 'prefs.jsonl'}", f"test_data={data / 'test.jsonl'}",
        f"output_root={data / root}", "name=rm", f"seed={seed}",
        "trl={num_train_epochs: 2, per_device_train_batch_size: 8, learning_rate: 0.005}"])
    return train_rm.train_rm(cfg)


def test_rm_seed_controls_init_and_order_and_plugin_loads_it(data, lm_dir, tmp_path):
    a, b, again = _rm(data, lm_dir, 1), _rm(data, lm_dir, 2), _rm(data, lm_dir, 1, root="again")
    assert a["path"].endswith("rm_seed1") and b["path"].endswith("rm_seed2")
    wa, wb = load_file(f"{a['path']}/model.safetensors"), load_file(f"{b['path']}/model.safetensors")
    wa2 = load_file(f"{again['path']}/model.safetensors")
    assert all(torch.equal(wa[k], wa2[k]) for k in wa)  # same seed, same model
    assert not torch.equal(wa["score.weight"], wb["score.weight"])
    reward_file = tmp_path / "rm.yaml"
    reward_file.write_text(yaml.safe_dump({"reward": {"type": "reward_model", "name": "rm", "path": a["path"]}}))
    pipeline = RewardPipeline.from_yaml(reward_file)
    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    chosen = pipeline.score([Sample(r["prompt"], r["chosen"]) for r in rows]).rewards
    rejected = pipeline.score([Sample(r["prompt"], r["rejected"]) for r in rows]).rewards
    manual = np.mean((np.array(chosen) > np.array(rejected)) + 0.5 * (np.array(chosen) == np.array(rejected)))
    assert a["accuracy"] == pytest.approx(manual) and a["test_pairs"] == len(rows)
    assert json.loads((data / "models" / "rm_seed1" / "rm_eval.json").read_text())["accuracy"] == a["accuracy"]
