"""VR-CLI's small numbers by hand: held-out metrics, perplexity, context fitting, continuation log-probs, baseline
values and fingerprint comparison (reward_plugins.vrcli.scoring / baselines, reward_plugins.logprobs)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reward_plugins.logprobs import continuation_token_logprobs, dtype_name, fit_context, perplexity
from reward_plugins.vrcli import eval_metrics, fingerprint_differences, valid_baseline


def test_eval_metrics_by_hand():
    rewards = [1.0, None, 0.5, 0.0]
    components = [{"improvement": 2.0}, {"baseline_ppl": 3.0}, {"improvement": -1.0}, {"improvement": math.nan}]
    # reward: mean of 1, 0.5, 0 (None left out); improvement: mean of 2 and -1 (NaN and missing left out); share 1/2
    assert eval_metrics(rewards, components) == pytest.approx(
        {"vrcli_reward": 0.5, "vrcli_improvement": 0.5, "vrcli_improved_share": 0.5})
    # improvement exactly 0 did not improve; nothing scored gives NaN, not 0
    assert eval_metrics([0.0], [{"improvement": 0.0}])["vrcli_improved_share"] == 0.0
    empty = eval_metrics([None], [{}])
    assert all(math.isnan(v) for v in empty.values()) and set(empty) == {"vrcli_reward", "vrcli_improvement",
                                                                          "vrcli_improved_share"}


def test_perplexity_is_exp_of_the_mean_negative_log_likelihood():
    assert perplexity(np.array([math.log(0.5), math.log(0.125)])) == pytest.approx(math.exp((math.log(2) + math.log(8)) / 2))
    with pytest.raises(ValueError, match="zero tokens"):
        perplexity(np.array([]))


def test_fit_context_cuts_the_oldest_context_tokens_and_never_the_continuation():
    assert fit_context([1, 2, 3], [7, 8], 5) == ([1, 2, 3], False)  # 3 + 2 fits exactly
    assert fit_context([1, 2, 3, 4], [7, 8], 5) == ([2, 3, 4], True)
    assert fit_context([1, 2, 3], [7, 8, 9, 10], 5) == ([3], True)  # room for one context token
    with pytest.raises(ValueError, match="leaves no room for context within max_length=5"):
        fit_context([1], [7, 8, 9, 10, 11], 5)
    with pytest.raises(ValueError, match="empty context"):
        fit_context([], [7], 5)
    with pytest.raises(ValueError, match="empty continuation"):
        fit_context([1], [], 5)


def test_continuation_logprobs_read_the_positions_before_each_token():
    # 2 rows of 4 tokens over a vocabulary of 3; logits cover the last 3 positions (offset 1)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 3, generator=gen)
    input_ids = torch.tensor([[0, 1, 2, 1], [2, 2, 0, 0]])
    rows = continuation_token_logprobs(logits, input_ids, starts=[2, 2], lengths=[4, 3], temperature=2.0)
    # row 0 scores tokens 2 and 3 (ids 2, 1) from positions 1 and 2, i.e. logits rows 0 and 1 (offset 1)
    expected0 = [torch.log_softmax(logits[0, 0] / 2.0, -1)[2].item(), torch.log_softmax(logits[0, 1] / 2.0, -1)[1].item()]
    # row 1 (length 3) scores token 2 (id 0) from position 1: logits row 0
    expected1 = [torch.log_softmax(logits[1, 0] / 2.0, -1)[0].item()]
    assert rows[0].tolist() == pytest.approx(expected0, abs=1e-6)
    assert rows[1].tolist() == pytest.approx(expected1, abs=1e-6)


@pytest.mark.parametrize("value, ok", [(1.5, True), (3, True), (0, False), (-2.0, False), (math.inf, False),
                                       (math.nan, False), (True, False), ("2.0", False), (None, False), (10**400, False)])
def test_valid_baseline(value, ok):
    assert valid_baseline(value) is ok


def test_fingerprint_differences_name_each_key_and_skip_what_the_reward_does_not_know():
    expected = {"model": "m", "temperature": 1.0, "max_length": 64, "prompt_hash": "abc", "dtype": None,
                "attn_implementation": "sdpa"}
    same = {"model": "m", "temperature": 1.0 + 1e-12, "max_length": 64, "prompt_hash": "abc", "dtype": "bfloat16",
            "attn_implementation": "sdpa"}
    assert fingerprint_differences(expected, same) == []  # dtype None on the reward side is not compared
    found = {**same, "temperature": 0.7, "max_length": 32, "attn_implementation": "eager"}
    assert fingerprint_differences(expected, found) == [
        "temperature: baseline 0.7, reward 1.0", "max_length: baseline 32, reward 64",
        "attn_implementation: baseline 'eager', reward 'sdpa'"]
    assert fingerprint_differences(expected, {**same, "temperature": True}) == ["temperature: baseline True, reward 1.0"]
    assert fingerprint_differences({**expected, "prompt_hash": None}, same) == ["prompt_hash: baseline 'abc', reward None"]
    assert fingerprint_differences(expected, "x") == ["baseline_fingerprint is 'x', not an object"]


def test_dtype_names():
    assert [dtype_name(v) for v in ("bf16", torch.bfloat16, "fp16", "half", "fp32", "float", None, "float64")] == [
        "bfloat16", "bfloat16", "float16", "float16", "float32", "float32", None, "float64"]


def test_eval_metrics_small_gains_count_and_empty_inputs_warn_nothing():
    import warnings

    # an improvement of half a percent is an improvement (> 0), not only those above 1 %
    assert eval_metrics([0.5], [{"improvement": 0.5}])["vrcli_improved_share"] == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the mean of nothing is NaN by decision, not numpy's warning
        empty = eval_metrics([], [])
    assert all(math.isnan(v) for v in empty.values())
