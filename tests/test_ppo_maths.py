"""PPO's pure functions (trl_ext/ppo.py) at the cases the other tests leave open: non-zero old log-probs, a value
moving down past its clip, KL far below its target, one-token and empty responses, constant batches, reward
whitening and the linear schedule. Every expected value is worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from trl_ext import ppo
from trl_ext.run_config import PPOSettings


def test_entropy_per_position_over_the_vocabulary():
    # position 0: logits (0, 0, 0) -> uniform over 3: ln 3; position 1: (ln 1, ln 3) over 2 tokens -> p = 1/4, 3/4
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e9]]])
    expected = [math.log(3.0), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]
    out = ppo.entropy_from_logits(logits)
    assert out.shape == (1, 2) and out[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_gae_of_one_token_responses():
    # one position: A = r - V, return = r (the value after the last token is 0)
    adv, ret = ppo.gae(torch.tensor([[2.0], [-1.0]]), torch.tensor([[0.5], [0.25]]), torch.ones(2, 1), 0.9, 0.8)
    assert adv.flatten().tolist() == [1.5, -1.25] and ret.flatten().tolist() == [2.0, -1.0]


def test_policy_ratio_is_taken_against_non_zero_old_logprobs():
    # new -1.0, old -1.5: ratio e^0.5 = 1.6487 > 1.2, advantage 2: max(-2 * 1.6487, -2 * 1.2) = -2.4, clipped
    new, old = torch.tensor([[-1.0]]), torch.tensor([[-1.5]])
    loss, stats = ppo.policy_loss(new, old, torch.tensor([[2.0]]), torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(-2.4) and stats["clipfrac"].item() == 1.0
    assert stats["ratio"].item() == pytest.approx(math.exp(0.5)) and stats["approxkl"].item() == pytest.approx(0.125)


def test_a_value_moving_down_is_clipped_around_the_old_value():
    # old 1.0, new 0.5, return 0: clipped value 0.8; (0.8 - 0)^2 = 0.64 > (0.5 - 0)^2 = 0.25 binds: 0.5 * 0.64
    loss, frac = ppo.value_loss(torch.tensor([[0.5]]), torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.ones(1, 1),
                                0.2)
    assert loss.item() == pytest.approx(0.32) and frac.item() == 1.0


def test_adaptive_kl_steps_down_at_most_20_percent_of_the_horizon_share():
    ctl = ppo.KLController(0.1, target=6.0, horizon=100)
    ctl.update(0.0, 10)  # error -1 clipped to -0.2: 0.1 * (1 - 0.2 * 10 / 100)
    assert ctl.value == pytest.approx(0.098)


def test_unbiased_variance_of_two_positions_and_a_constant_batch_whitens_to_zero():
    # 1 and 3 (the 100 is masked): mean 2, squared deviations 1 + 1 over n - 1 = 1 position: variance 2
    assert ppo.masked_var(torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 0.0]])).item() == pytest.approx(2.0)
    constant = ppo.masked_whiten(torch.full((2, 3), 4.0), torch.ones(2, 3))
    assert torch.equal(constant, torch.zeros(2, 3))  # variance 0: zeros, not NaN


def test_an_empty_response_gets_no_score_and_one_token_gets_it_at_its_only_token():
    logprobs, ref = torch.tensor([[-1.0, -1.0], [-2.0, -1.0]]), torch.tensor([[-1.5, -1.0], [-2.0, -1.0]])
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    rewards, non_score = ppo.per_token_rewards(torch.tensor([3.0, 5.0]), logprobs, ref, mask, kl_coef=0.1)
    # row 0: KL term -0.1 * 0.5 = -0.05 plus the score 3 at its only token; row 1 has no token, so nothing
    assert torch.allclose(rewards, torch.tensor([[2.95, 0.0], [0.0, 0.0]]))
    assert torch.allclose(non_score, torch.tensor([[-0.05, 0.0], [0.0, 0.0]]))


def test_rollout_sums_by_hand_with_one_token_and_empty_rows():
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -9.0], [-3.0, -3.0]])
    ref = torch.tensor([[-1.5, -1.0], [-1.0, -9.0], [-1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])  # two tokens, one token, none (skipped)
    non_score = torch.tensor([[0.25, 0.5], [1.0, 0.0], [0.0, 0.0]])
    tokens = torch.tensor([[4, 1], [1, 1], [1, 1]])  # eos = 1: row 0's second token, row 1's only token
    sums = ppo.rollout_sums(torch.tensor([2.0, -1.0, 7.0]), logprobs, ref, non_score, mask, tokens, eos_id=1)
    named = dict(zip(ppo.ROLLOUT_SUMS, sums.tolist()))
    # kl: (0.5 - 1.0) + 0.5 = 0; -log pi: 1 + 2 + 0.5 = 3.5; non-score: 1.75; scores of trained rows: 2 - 1 = 1
    assert named == pytest.approx({"kl": 0.0, "neg_logprob": 3.5, "non_score": 1.75, "scores": 1.0, "samples": 2.0,
                                   "eos_tokens": 2.0})


def test_training_targets_whiten_rewards_only_when_asked_and_without_shifting_their_mean():
    logprobs = ref = torch.zeros(1, 3)
    values, mask = torch.zeros(1, 3), torch.ones(1, 3)
    plain = ppo.training_targets(torch.tensor([3.0]), torch.ones(1), logprobs, ref, values, mask, kl_coef=0.1,
                                 gamma=1.0, lam=1.0)
    assert plain.rewards.tolist() == [[0.0, 0.0, 3.0]]  # the default leaves the rewards as they are
    whitened = ppo.training_targets(torch.tensor([3.0]), torch.ones(1), logprobs, ref, values, mask, kl_coef=0.1,
                                    gamma=1.0, lam=1.0, whiten_rewards=True)
    # rewards (0, 0, 3): mean 1, unbiased variance (1 + 1 + 4) / 2 = 3; scaled by 1/sqrt(3), mean kept: x/sqrt3 + 1 - 1/sqrt3
    s = 1 / math.sqrt(3.0)
    assert whitened.rewards[0].tolist() == pytest.approx([1 - s, 1 - s, 3 * s + 1 - s], abs=1e-6)


def test_linear_learning_rate_decays_to_zero_at_max_steps():
    linear = PPOSettings(learning_rate=0.4, lr_schedule="linear", max_steps=8)
    assert [ppo.learning_rate(linear, s) for s in (0, 2, 8, 9)] == pytest.approx([0.4, 0.3, 0.0, 0.0])
    constant = PPOSettings(learning_rate=0.4, max_steps=8)
    assert [ppo.learning_rate(constant, s) for s in (0, 8)] == [0.4, 0.4]
