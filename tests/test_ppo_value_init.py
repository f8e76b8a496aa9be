"""PPO's value model started from an ensemble folder: a multi-head RM gives the mean of its heads (not a random
head); a LoRA ensemble folder is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaModel

from reward_plugins import tiny_models
from reward_plugins.config import ConfigError
from trl_ext import ppo, train


def _cfg(tmp_path, lm_dir, value_model, prompt_file):
    reward = tmp_path / "r.yaml"
    reward.write_text(yaml.safe_dump({"reward": {"type": "length_penalty", "name": "len", "coef": 0.0}}))
    settings = {"max_steps": 1, "batch_size": 2, "mini_batch_size": 2, "ppo_epochs": 1, "max_new_tokens": 4,
                "value_init": "reward_model", "value_model": str(value_model)}
    return train.parse_args(["--set", "algorithm=ppo", "--set", f"policy={lm_dir}", "--set", f"reward_config={reward}",
                             "--set", f"train_data={prompt_file}", "--set", f"output_dir={tmp_path / 'ppo'}",
                             "--set", f"ppo={json.dumps(settings)}"])


@pytest.fixture()
def prompt_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a b", "label": {}}\n')
    return path


def test_value_model_from_a_multihead_folder_starts_at_the_mean_of_its_heads(tmp_path, lm_dir, multihead_dir,
                                                                              prompt_file):
    cfg = _cfg(tmp_path, lm_dir, multihead_dir, prompt_file)
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    _, _, value = ppo.load_models(cfg, cfg.ppo, tokenizer)
    heads = load_file(multihead_dir / "heads.safetensors")["weight"]  # (5, hidden), read apart from the code
    assert heads.shape[0] == 5
    expected_head = heads.sum(0) / heads.shape[0]
    assert torch.allclose(value.score.weight[0], expected_head, atol=1e-6)
    # The value of a text is the mean of the 5 head scores on the saved backbone's last hidden state.
    backbone = LlamaModel.from_pretrained(multihead_dir).eval()
    ids = torch.tensor([[5, 9, 14, 3]])
    with torch.no_grad():
        hidden = backbone(ids).last_hidden_state[0, -1]
        by_hand = sum(float(h @ hidden) for h in heads) / len(heads)
        got = value.eval()(input_ids=ids).logits[0, 0].item()
    assert got == pytest.approx(by_hand, abs=1e-4)


def test_value_model_from_a_plain_rm_keeps_its_trained_head(tmp_path, lm_dir, rm_dirs, prompt_file):
    cfg = _cfg(tmp_path, lm_dir, rm_dirs[2], prompt_file)
    _, _, value = ppo.load_models(cfg, cfg.ppo, AutoTokenizer.from_pretrained(lm_dir))
    assert torch.equal(value.score.weight, load_file(rm_dirs[2] / "model.safetensors")["score.weight"])


def test_value_model_from_a_lora_ensemble_folder_is_refused(tmp_path, lm_dir, tokenizer_dir, prompt_file):
    folder = tiny_models.build_lora_ensemble(tmp_path / "lora", tokenizer_dir, k=2, seed=1)
    cfg = _cfg(tmp_path, lm_dir, folder, prompt_file)
    with pytest.raises(ConfigError, match=r"ppo.value_model .*lora: a LoRA ensemble folder") as caught:
        ppo.load_models(cfg, cfg.ppo, AutoTokenizer.from_pretrained(lm_dir))
    assert len(str(caught.value).splitlines()) == 2  # "invalid train configuration:" and the one problem


def test_heads_of_another_width_are_refused_naming_the_file(tmp_path, lm_dir, tokenizer_dir, prompt_file):
    from reward_plugins.member_info import MemberFileError, MemberInfo
    from reward_plugins.multihead import save_heads

    folder = tiny_models.build_multihead_rm(tmp_path / "mh", tokenizer_dir, k=2, seed=1)
    hidden = LlamaModel.from_pretrained(folder).config.hidden_size
    save_heads(folder, torch.ones(2, hidden + 1), MemberInfo([1, 2]))
    cfg = _cfg(tmp_path, lm_dir, folder, prompt_file)
    with pytest.raises(MemberFileError, match=rf"heads.safetensors: the heads are {hidden + 1} wide but the backbone"):
        ppo.load_models(cfg, cfg.ppo, AutoTokenizer.from_pretrained(lm_dir))
