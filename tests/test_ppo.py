"""PPO (trl_ext.ppo): the maths against hand-computed values, and short runs on real tiny models."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml
from pydantic import ValidationError

from evaluation.eval_files import list_eval_files, read_eval_file
from reward_plugins.io import write_jsonl
from setup_data import synthetic_task as st
from trl_ext import ppo, train
from trl_ext.run_config import PPOSettings

PPO_METRICS = ("eps", "objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
               "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
               "val/clipfrac_avg", "policy/entropy_avg", "val/ratio", "val/ratio_var", "val/num_eos_tokens", "lr", "episode")


def test_gae_hand_computed():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [1.0, 2.0, 9.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: d2 = 2 - 1.5 = 0.5; d1 = 0 + 0.9*1.5 - 1 = 0.35; d0 = 1 + 0.9*1 - 0.5 = 1.4
    # A2 = 0.5; A1 = 0.35 + 0.72*0.5 = 0.71; A0 = 1.4 + 0.72*0.71 = 1.9112
    # row 1 ends after two tokens, so the padded value 7 and reward 9 never count: d1 = 2 - 1 = 1, d0 = 1.4
    expected = torch.tensor([[1.9112, 0.71, 0.5], [1.4 + 0.72 * 1.0, 1.0, 0.0]])
    assert torch.allclose(adv, expected, atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[2.4112, 1.71, 2.0], [2.62, 2.0, 0.0]]), atol=1e-6)


def test_gae_with_gamma_lam_one_is_reward_to_go_minus_value():
    gen = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    mask = torch.ones(3, 5)
    adv, ret = ppo.gae(rewards, values, mask, 1.0, 1.0)
    to_go = torch.tensor([[sum(rewards[i, t:].tolist()) for t in range(5)] for i in range(3)])
    assert torch.allclose(adv, to_go - values, atol=1e-5) and torch.allclose(ret, to_go, atol=1e-5)


@pytest.mark.parametrize("advantage, ratio, loss, clipped", [
    (1.0, 1.3, -1.2, 1.0),   # good action pushed past 1+c: the clipped term binds, no gradient
    (1.0, 0.7, -0.7, 0.0),   # good action below 1-c: unclipped (pessimistic) term
    (-1.0, 1.3, 1.3, 0.0),   # bad action above 1+c: unclipped term
    (-1.0, 0.7, 0.8, 1.0),   # bad action pushed below 1-c: clipped
    (1.0, 1.2, -1.2, 0.0),   # exactly at the boundary: both terms equal, not counted as clipped
])
def test_policy_loss_at_the_clip_boundaries(advantage, ratio, loss, clipped):
    old = torch.zeros(1, 1)
    new = torch.full((1, 1), float(torch.log(torch.tensor(ratio)))).requires_grad_(True)
    value, stats = ppo.policy_loss(new, old, torch.full((1, 1), advantage), torch.ones(1, 1), 0.2)
    value.backward()
    assert value.item() == pytest.approx(loss, abs=1e-6) and stats["clipfrac"].item() == clipped
    expected_grad = 0.0 if clipped else -advantage * ratio  # d(-A r)/d log r = -A r
    assert new.grad.item() == pytest.approx(expected_grad, abs=1e-6)
    assert stats["approxkl"].item() == pytest.approx(0.5 * float(torch.log(torch.tensor(ratio))) ** 2, rel=1e-5)


def test_policy_loss_ignores_masked_tokens():
    new, old = torch.tensor([[0.1, 5.0]]), torch.zeros(1, 2)
    value, stats = ppo.policy_loss(new, old, torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]]), 0.2)
    assert value.item() == pytest.approx(-float(torch.exp(torch.tensor(0.1))), abs=1e-6) and stats["clipfrac"] == 0


@pytest.mark.parametrize("new, loss, clipped", [
    (0.5, 0.5 * (0.2 - 1.0) ** 2, 1.0),  # moved 0.5 from old 0: clipped to 0.2, the larger error binds
    (0.1, 0.5 * (0.1 - 1.0) ** 2, 0.0),  # inside the range: plain squared error
    (-0.5, 0.5 * (-0.5 - 1.0) ** 2, 0.0),  # away from the return: the unclipped error is the larger
])
def test_value_loss_clipping(new, loss, clipped):
    value, frac = ppo.value_loss(torch.tensor([[new]]), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2)
    assert value.item() == pytest.approx(loss, abs=1e-6) and frac.item() == clipped


def test_kl_penalty_on_every_token_and_score_on_the_last():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -9.0], [-2.0, -1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    rewards, non_score = ppo.per_token_rewards(torch.tensor([2.0, -1.0]), logprobs, ref, mask, kl_coef=0.1)
    assert torch.allclose(non_score, torch.tensor([[-0.05, 0.1, 0.0, 0.0], [-0.1, 0.0, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1, 2.0, 0.0], [-1.1, 0.0, 0.0, 0.0]]))


def test_eos_trick():
    scores, has_eos = torch.tensor([1.0, 1.0, -0.5]), torch.tensor([True, False, False])
    assert torch.allclose(ppo.apply_missing_eos_penalty(scores, has_eos, 0.75), torch.tensor([1.0, 0.25, -1.25]))
    assert torch.equal(ppo.apply_missing_eos_penalty(scores, has_eos, None), scores)


def test_adaptive_kl_controller_and_whitening():
    ctl = ppo.KLController(0.1, target=6.0, horizon=100)
    ctl.update(12.0, 10)  # error clipped to +0.2: 0.1 * (1 + 0.2 * 10/100)
    assert ctl.value == pytest.approx(0.102)
    ctl.update(5.4, 10)  # error -0.1
    assert ctl.value == pytest.approx(0.102 * 0.99)
    fixed = ppo.KLController(0.1)
    fixed.update(100.0, 10)
    assert fixed.value == 0.1
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    whitened = ppo.masked_whiten(x, mask)  # mean 2, unbiased variance ((-1)^2 + 0 + 1^2) / (3 - 1) = 1, as TRL
    assert torch.allclose(whitened, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-4)


def test_prompt_order_is_a_permutation_per_pass_split_by_rank():
    seen = [i for step in range(3) for rank in range(2) for i in ppo.prompt_indices(step, rank, 2, 2, 12, seed=3)]
    assert sorted(seen) == list(range(12))
    assert ppo.prompt_indices(5, 1, 2, 2, 12, 3) == ppo.prompt_indices(5, 1, 2, 2, 12, 3)


def test_settings_errors(tmp_path):
    with pytest.raises(ValidationError, match="mini_batch_size 3 must divide batch_size 8"):
        PPOSettings(batch_size=8, mini_batch_size=3)
    with pytest.raises(ValidationError, match="value_init: reward_model needs value_model"):
        PPOSettings(value_init="reward_model")


@pytest.fixture()
def prompt_files(tmp_path):
    rng = random.Random(0)
    train_file, eval_file = tmp_path / "prompts.jsonl", tmp_path / "eval.jsonl"
    write_jsonl(train_file, st.prompt_rows(st.sample_tasks(32, rng)))
    write_jsonl(eval_file, st.prompt_rows(st.sample_tasks(4, rng)))
    return train_file, eval_file


def _cfg(tmp_path, lm_dir, reward_yaml, prompt_files, **ppo_fields):
    settings = {"max_steps": 2, "batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 2, "max_new_tokens": 8,
                "learning_rate": 0.01, "kl_coef": 0.05, **ppo_fields}
    return train.parse_args([
        "--set", "algorithm=ppo", "--set", f"policy={lm_dir}", "--set", f"reward_config={reward_yaml}",
        "--set", f"train_data={prompt_files[0]}", "--set", f"eval_data={prompt_files[1]}",
        "--set", f"output_dir={tmp_path / 'ppo'}", "--set", "eval_every=2", "--set", "table_every=1",
        "--set", f"ppo={json.dumps(settings)}",
    ])


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_config_sections_are_not_mixed(tmp_path, lm_dir, rm_dirs, prompt_files):
    reward = tmp_path / "r.yaml"
    reward.write_text(yaml.safe_dump({"reward": {"type": "format_check", "pattern": "a"}}))
    with pytest.raises(Exception, match="algorithm ppo reads the `ppo` section"):
        train.parse_args(["--set", "algorithm=ppo", "--set", f"policy={lm_dir}", "--set", f"reward_config={reward}",
                          "--set", f"train_data={prompt_files[0]}", "--set", "output_dir=x", "--set", "trl={max_steps: 2}"])
    with pytest.raises(Exception, match="only read with algorithm: ppo"):
        train.parse_args(["--set", f"policy={lm_dir}", "--set", f"reward_config={reward}",
                          "--set", f"train_data={prompt_files[0]}", "--set", "output_dir=x", "--set", "ppo={max_steps: 2}"])


def test_rule_reward_rises(tmp_path, lm_dir, prompt_files):
    """A length penalty in characters: PPO learns to prefer short tokens within a few steps."""
    reward = tmp_path / "short.yaml"
    reward.write_text(yaml.safe_dump({"reward": {"type": "length_penalty", "name": "short", "coef": 0.05, "unit": "chars"}}))
    cfg = _cfg(tmp_path, lm_dir, reward, prompt_files, max_steps=8, batch_size=16, mini_batch_size=8, ppo_epochs=4,
               learning_rate=0.02, kl_coef=0.0, missing_eos_penalty=0.5)
    train.run(cfg)
    records = _metrics(tmp_path / "ppo")
    assert [r["step"] for r in records] == list(range(1, 9))
    for key in (*PPO_METRICS, "reward/mean", "reward/length"):
        assert all(key in r for r in records), key
    first, last = (sum(r["reward/mean"] for r in part) / 2 for part in (records[:2], records[-2:]))
    assert last > first + 0.1, (first, last)
    # The EOS trick: objective/scores is the pipeline reward less 0.5 per response without EOS (none emits EOS here).
    for r in records:
        no_eos = 16 - r["val/num_eos_tokens"]
        assert r["objective/scores"] == pytest.approx(r["reward/mean"] - 0.5 * no_eos / 16, abs=1e-5)


def test_ensemble_reward_value_from_rm_eval_files_and_resume(tmp_path, lm_dir, rm_dirs, prompt_files):
    reward = tmp_path / "uwo.yaml"
    reward.write_text(yaml.safe_dump({"on_error": "penalty", "error_penalty": -1.0, "reward": {
        "type": "ensemble", "name": "uwo", "objective": "uwo", "uwo_weight": 0.1,
        "path_template": str(rm_dirs[1]).replace("rm_seed1", "rm_seed{seed}"), "seeds": [1, 2, 3]}}))
    cfg = _cfg(tmp_path, lm_dir, reward, prompt_files, value_init="reward_model", value_model=str(rm_dirs[4]), save_steps=1)
    train.run(cfg)
    out = tmp_path / "ppo"
    records = _metrics(out)
    assert all({"reward/seed1", "reward/variance", "reward/combined"} <= set(r) for r in records)
    assert records[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)  # step 1 samples from the initial policy
    assert records[-1]["objective/kl"] != pytest.approx(0.0, abs=1e-6)
    assert records[0]["objective/non_score_reward"] == pytest.approx(-0.05 * records[0]["objective/kl"], abs=1e-6)
    assert [read_eval_file(p).step for p in list_eval_files(out / "eval")] == [0, 2]
    assert (out / "checkpoint-1" / "policy" / "model.safetensors").exists() and (out / "value" / "model.safetensors").exists()
    assert list((out / "completions").glob("completions_step*.jsonl")) and list((out / "runs").rglob("events.out.tfevents*"))
    # The value head started from the reward model's, not at random.
    from safetensors.torch import load_file

    start = load_file(rm_dirs[4] / "model.safetensors")["score.weight"]
    ckpt = load_file(out / "checkpoint-1" / "value" / "model.safetensors")["score.weight"]
    assert (ckpt - start).abs().max() < 0.1 * start.abs().max()
    # Resume: a longer run continues from checkpoint-2, reproducing nothing and keeping the metric history.
    longer = cfg.model_copy(update={"ppo": cfg.ppo.model_copy(update={"max_steps": 3})})
    train.run(longer)
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3] and _metrics(out)[:2] == records
    assert (out / "checkpoint-3" / "trainer_state.json").exists()
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["episode"] == 24


def test_chat_prompts_are_rendered_and_an_always_failing_reward_stops(tmp_path, lm_dir, rm_dirs, prompt_files, capsys):
    """setup_rl_data's chat-message prompts reach PPO rendered by the chat template, as GRPO gets them; a reward
    that fails on every sample stops the run after `stop_after_failed_steps`, as it stops GRPO."""
    chat = tmp_path / "chat.jsonl"
    rows = [json.loads(line) for line in prompt_files[0].read_text().splitlines()]
    write_jsonl(chat, [{**r, "prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows])
    reward = tmp_path / "needs_key.yaml"
    reward.write_text(yaml.safe_dump({"on_error": "penalty", "error_penalty": -1.0,
                                      "reward": {"type": "reward_model", "name": "rm", "path": str(rm_dirs[1]),
                                                 "template": "{prompt}{label[missing]} {response}"}}))
    cfg = _cfg(tmp_path, lm_dir, reward, (chat, prompt_files[1]), max_steps=6)
    assert train.main(["--config", str(_dump(tmp_path, cfg))]) == 2
    err = capsys.readouterr().err
    assert "the reward failed on every sample of 3 consecutive steps" in err
    table = [json.loads(line) for f in sorted((tmp_path / "ppo" / "completions").glob("*.jsonl"))
             for line in f.read_text().splitlines()]
    assert table and all(row["prompt"].startswith("<|user|>") for row in table), table[:1]


def _dump(tmp_path, cfg):
    path = tmp_path / "ppo_chat.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True)))
    return path
