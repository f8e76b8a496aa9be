"""PPO details that change what a run computes: value clip, EOS checks, skipped samples, whitening, KL settings,
sampling that follows the policy, and sampled tokens kept as sampled. Expected values are computed by hand or
with plain torch, never with the function under test."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer

from reward_plugins.io import write_jsonl
from setup_data import synthetic_task as st
from trl_ext import generation, ppo, train
from trl_ext.run_config import PPOSettings


@pytest.mark.parametrize("old, new, ret, expected, clipped", [
    # old 1.0, new 1.5: the clipped value is 1.2 (a step of 0.2 from the OLD value), (1.2 - 3)^2 > (1.5 - 3)^2
    (1.0, 1.5, 3.0, 0.5 * (1.2 - 3.0) ** 2, 1.0),
    # old 1.0, new 0.9: inside 1.0 +- 0.2, plain squared error; clipping around 0 would give 0.2 and 0.5 * 2.8^2
    (1.0, 0.9, 3.0, 0.5 * (0.9 - 3.0) ** 2, 0.0),
    # old -2.0, new -1.0: clipped to -1.8 and the return is 0, so (-1.8)^2 > (-1)^2 binds
    (-2.0, -1.0, 0.0, 0.5 * 1.8**2, 1.0),
])
def test_value_clip_is_around_the_old_value(old, new, ret, expected, clipped):
    values = torch.tensor([[new]], requires_grad=True)
    loss, frac = ppo.value_loss(values, torch.tensor([[old]]), torch.tensor([[ret]]), torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(expected, abs=1e-6) and frac.item() == clipped
    loss.backward()
    # inside the range the critic learns (gradient v - R); when the clipped error binds it gets none
    assert values.grad.item() == pytest.approx(0.0 if clipped else new - ret, abs=1e-6)


def test_has_eos_any_real_token_not_all_and_not_padding():
    eos, pad = 1, 0
    tokens = torch.tensor([[5, 6, eos, pad], [5, 6, 7, 8], [5, eos, pad, pad], [5, 6, eos, eos]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    assert ppo.response_has_eos(tokens, mask, eos).tolist() == [True, False, True, True]
    # pad == eos: the padding after a response without EOS is not an EOS it emitted
    shared = torch.tensor([[5, 6, 7, eos], [5, eos, eos, eos]])
    shared_mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    assert ppo.response_has_eos(shared, shared_mask, eos).tolist() == [False, True]
    zeros = torch.zeros(2, 4)
    sums = dict(zip(ppo.ROLLOUT_SUMS, ppo.rollout_sums(torch.zeros(2), zeros, zeros, zeros, shared_mask, shared, eos).tolist()))
    assert sums["eos_tokens"] == 1  # val/num_eos_tokens: the one emitted, not the padding that shares its id


def test_missing_eos_penalty_reaches_only_responses_without_eos():
    has_eos = ppo.response_has_eos(torch.tensor([[3, 1], [3, 4]]), torch.ones(2, 2), 1)
    assert ppo.apply_missing_eos_penalty(torch.tensor([1.0, 1.0]), has_eos, 0.5).tolist() == [1.0, 0.5]


def _batch(n: int, width: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logprobs, ref = -torch.rand(n, width, generator=g), -torch.rand(n, width, generator=g)
    values = torch.randn(n, width, generator=g)
    mask = torch.ones(n, width)
    mask[0, 3:] = 0
    return logprobs, ref, values, mask


def test_a_skipped_sample_leaves_the_batch():
    """`on_error: skip` (reward None): the sample is not trained towards its placeholder score, adds nothing
    to the whitening statistics, and the others get exactly what a batch without it gives them."""
    logprobs, ref, values, mask = _batch(3)
    settings = dict(kl_coef=0.1, gamma=1.0, lam=0.95)
    scores, valid = torch.tensor([1.0, 123.0, -2.0]), torch.tensor([1.0, 0.0, 1.0])
    skipped = ppo.training_targets(scores, valid, logprobs, ref, values, mask, **settings)
    keep = [0, 2]
    alone = ppo.training_targets(scores[keep], torch.ones(2), logprobs[keep], ref[keep], values[keep], mask[keep],
                                 **settings)
    assert skipped.mask[1].sum() == 0 and torch.equal(skipped.mask[keep], mask[keep])
    assert torch.allclose(skipped.advantages[keep], alone.advantages, atol=1e-6)
    assert torch.allclose(skipped.returns[keep], alone.returns, atol=1e-6)
    assert torch.all(skipped.advantages[1] == 0) and torch.all(skipped.rewards[1] == 0)
    # and no gradient reaches the skipped sample's tokens
    new = logprobs.clone().requires_grad_(True)
    loss, _ = ppo.policy_loss(new, logprobs, skipped.advantages, skipped.mask, 0.2)
    loss.backward()
    assert torch.all(new.grad[1] == 0) and torch.any(new.grad[0] != 0)
    sums = ppo.rollout_sums(scores, logprobs, ref, skipped.non_score, skipped.mask, torch.zeros(3, 4, dtype=torch.long), 1)
    named = dict(zip(ppo.ROLLOUT_SUMS, sums.tolist()))
    assert named["samples"] == 2 and named["scores"] == pytest.approx(-1.0)


def test_whitening_uses_the_unbiased_variance_over_masked_positions():
    x = torch.tensor([[1.0, 4.0, 2.0, 50.0], [7.0, -3.0, -50.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    picked = torch.tensor([1.0, 4.0, 2.0, 7.0, -3.0])
    mean, std = picked.mean(), picked.std(unbiased=True)  # torch's sample std: ddof 1
    out = ppo.masked_whiten(x, mask)
    expected = torch.zeros_like(x)
    expected[mask.bool()] = (picked - mean) / torch.sqrt(std**2 + 1e-8)
    assert torch.allclose(out, expected, atol=1e-6)
    unshifted = ppo.masked_whiten(x, mask, shift_mean=False)
    assert torch.allclose(unshifted[mask.bool()], expected[mask.bool()] + mean, atol=1e-6)
    assert ppo.masked_var(torch.tensor([[3.0, 9.0]]), torch.tensor([[1.0, 0.0]])).item() == 0.0  # one token


def test_kl_coef_zero_with_a_target_is_refused():
    with pytest.raises(ValidationError, match="kl_coef: 0 would stay 0"):
        PPOSettings(kl_coef=0.0, kl_target=6.0)
    assert PPOSettings(kl_coef=0.0).kl_target is None


@pytest.fixture(scope="module")
def opinionated_lm(tmp_path_factory, lm_dir):
    """The tiny LM saved with a generation config that would change sampling if it applied."""
    model = AutoModelForCausalLM.from_pretrained(lm_dir)
    model.generation_config.repetition_penalty = 1.3
    model.generation_config.min_new_tokens = 6
    model.generation_config.no_repeat_ngram_size = 2
    model.generation_config.suppress_tokens = list(range(10, 200))  # a field our sampling config leaves unset
    out = tmp_path_factory.mktemp("opinionated")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(lm_dir).save_pretrained(out)
    return out


def test_sampler_logprobs_are_the_policy_softmax_at_temperature(opinionated_lm):
    model = AutoModelForCausalLM.from_pretrained(opinionated_lm).eval()
    tokenizer = AutoTokenizer.from_pretrained(opinionated_lm)
    prompts = ["The fox", "In summary: the hero leaves the village and"]
    temperature = 0.8
    gens = generation.sample(model, tokenizer, prompts, 8, temperature, seed=3, return_logprobs=True)
    worst = 0.0
    for prompt_ids, completion, sampled in zip(gens.prompt_ids, gens.completion_ids, gens.logprobs):
        ids = torch.tensor([prompt_ids + completion])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt_ids) - 1 : -1] / temperature
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(completion).unsqueeze(1)).squeeze(1)
        worst = max(worst, (torch.tensor(sampled) - expected).abs().max().item())
    assert worst < 1e-4
    assert model.generation_config.repetition_penalty == 1.3  # set aside while sampling, then restored


def test_sampled_pads_are_kept_and_an_all_pad_response_is_penalised(tmp_path, lm_dir, prompt_rows, monkeypatch):
    """A response without EOS is trained on exactly as sampled ([5, pad, 7, 8] stays so), and a response of
    pads is neither replaced by [eos] nor exempt from missing_eos_penalty."""
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    assert pad != eos
    assert generation.completion_ids([5, pad, 7, 8], eos) == [5, pad, 7, 8]
    assert generation.completion_ids([5, eos, pad, pad], eos) == [5, eos]
    assert generation.completion_ids([pad, pad], eos) == [pad, pad]
    planned = [[5, pad, 7, 8], [pad, pad, pad, pad], [5, 6, eos], [9, 9, 9, 9]]
    seen: dict[str, list] = {}

    def fake_sample(model, tok, prompts, max_new_tokens, temperature, batch_size, seed):
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        completions = [list(planned[i % len(planned)]) for i in range(len(prompts))]
        return generation.Generations(list(prompts), [tok.decode(c) for c in completions], ids, completions)

    real_pack = ppo.pack

    def spy_pack(prompt_ids, response_ids, pad_id):
        seen["responses"] = [list(r) for r in response_ids]
        return real_pack(prompt_ids, response_ids, pad_id)

    monkeypatch.setattr(ppo, "sample", fake_sample)
    monkeypatch.setattr(ppo, "pack", spy_pack)
    reward = tmp_path / "const.yaml"
    reward.write_text(yaml.safe_dump({"reward": {"type": "length_penalty", "name": "len", "coef": 0.0}}))
    settings = {"max_steps": 1, "batch_size": 4, "mini_batch_size": 4, "ppo_epochs": 1, "max_new_tokens": 4,
                "learning_rate": 0.001, "kl_coef": 0.05, "missing_eos_penalty": 0.5}
    cfg = train.parse_args([
        "--set", "algorithm=ppo", "--set", f"policy={lm_dir}", "--set", f"reward_config={reward}",
        "--set", f"train_data={prompt_rows}", "--set", f"output_dir={tmp_path / 'ppo'}", "--set", "eval_every=0",
        "--set", "table_every=0", "--set", f"ppo={json.dumps(settings)}",
    ])
    train.run(cfg)
    assert seen["responses"] == planned
    record = json.loads((tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["val/num_eos_tokens"] == 1  # only the response that emitted one
    assert record["objective/scores"] == pytest.approx(-0.5 * 3 / 4)  # three responses without EOS, reward 0


@pytest.fixture()
def prompt_rows(tmp_path):
    path = tmp_path / "prompts.jsonl"
    write_jsonl(path, st.prompt_rows(st.sample_tasks(8, random.Random(0))))
    return path
