"""Device bugs fail on a CPU: the training maths and the reward post-processing run on `meta` tensors.

A tensor made without `device=` lands on the CPU; mixed with `meta` inputs it raises, exactly as it would mix
with CUDA tensors on a GPU (where the same code would crash at the first step). Models cannot run on `meta`
with padding (transformers reads mask values), so model wrappers are driven by stand-in modules whose
weights live on `meta`. New tensor code gets a case here (README, notes for contributors).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from reward_plugins.batching import position_ids_from_mask
from reward_plugins.logprobs import continuation_token_logprobs
from reward_plugins.reward_model import _ValueHeadModel
from trl_ext import ppo

META = torch.device("meta")
B, T, V = 3, 5, 11


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device=META)


def on_meta(*tensors):
    for t in tensors:
        assert t.device.type == "meta", t.device


def test_training_maths_on_meta():
    rewards, values, logprobs, ref = meta(B, T), meta(B, T), meta(B, T), meta(B, T)
    mask = torch.ones(B, T, device=META)
    on_meta(*ppo.gae(rewards, values, mask, 1.0, 0.95))
    on_meta(ppo.masked_mean(rewards, mask), ppo.masked_var(rewards, mask), ppo.masked_whiten(rewards, mask),
            ppo.masked_whiten(rewards, mask, shift_mean=False))
    loss, stats = ppo.policy_loss(logprobs, ref, rewards, mask, 0.2)
    on_meta(loss, *stats.values())
    on_meta(*ppo.value_loss(values, ref, rewards, mask, 0.2))
    on_meta(ppo.entropy_from_logits(meta(B, T, V)))
    on_meta(ppo.token_logprobs(meta(B, T, V), torch.zeros(B, T, dtype=torch.long, device=META)))
    scores = meta(B)
    on_meta(*ppo.per_token_rewards(scores, logprobs, ref, mask, 0.1))
    tokens = torch.zeros(B, T, dtype=torch.long, device=META)
    has_eos = ppo.response_has_eos(tokens, mask, 1)
    on_meta(has_eos, ppo.apply_missing_eos_penalty(scores, has_eos, 0.5))
    valid = torch.ones(B, device=META)
    targets = ppo.training_targets(scores, valid, logprobs, ref, values, mask, kl_coef=0.1, gamma=1.0, lam=0.95,
                                   whiten_rewards=True)
    on_meta(targets.mask, targets.rewards, targets.non_score, targets.advantages, targets.returns)
    sums = ppo.rollout_sums(scores, logprobs, ref, targets.non_score, targets.mask, tokens, 1)
    on_meta(sums)
    assert sums.shape == (len(ppo.ROLLOUT_SUMS),)


class StubBackbone(nn.Module):
    """Embedding + linear on whatever device its weights are: last_hidden_state like a transformers backbone."""

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.embed = nn.Embedding(V, hidden)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **_):
        hidden = self.embed(input_ids) + position_ids.unsqueeze(-1).to(self.embed.weight.dtype)
        return SimpleNamespace(last_hidden_state=hidden * attention_mask.unsqueeze(-1))


class StubLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = StubBackbone()
        self.head = nn.Linear(8, V)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **_):
        return SimpleNamespace(logits=self.head(self.model(input_ids, attention_mask, position_ids).last_hidden_state))


class StubValue(nn.Module):
    base_model_prefix = "model"

    def __init__(self):
        super().__init__()
        self.model = StubBackbone()
        self.score = nn.Linear(8, 1)


def test_policy_value_and_reference_forwards_on_meta():
    with torch.device(META):
        policy, value, reference = StubLM(), StubValue(), StubLM()
    ids = torch.zeros(B, T, dtype=torch.long, device=META)
    attention = torch.ones(B, T, dtype=torch.long, device=META)
    on_meta(position_ids_from_mask(attention))
    logits, values = ppo.PolicyAndValue(policy, value)(ids, attention, 2, 0.7)
    on_meta(logits, values)
    assert logits.shape == (B, T - 2, V) and values.shape == (B, T - 2)
    on_meta(ppo.ref_logprobs(reference, ids, attention, 2, 0.7))


def test_reward_post_processing_on_meta():
    logits = meta(2, 4, V)
    input_ids = torch.zeros(2, 6, dtype=torch.long, device=META)
    rows = continuation_token_logprobs(logits, input_ids, [3, 4], [6, 5], 0.9)
    on_meta(*rows)
    assert [r.shape[0] for r in rows] == [3, 1]
    with torch.device(META):
        rm = _ValueHeadModel(StubBackbone(), nn.Linear(8, 1, bias=False), mean=0.5, std=2.0)
    on_meta(rm(input_ids, torch.ones(2, 6, dtype=torch.long, device=META)))


def test_a_cpu_made_tensor_fails_on_meta():
    """The premise: a factory without `device=` next to meta inputs raises, as it would next to CUDA ones."""
    rewards = meta(B, T)
    with pytest.raises((RuntimeError, NotImplementedError)):
        _ = rewards[:, 0] + torch.zeros(B)  # what gae's accumulator used to be
