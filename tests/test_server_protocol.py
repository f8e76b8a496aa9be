"""The wire format's pure parts: finding the response in a (left-cut) query, float32 checks, reading an answer.

Expected values come from brute force or by hand, never from the functions under test.
"""

from __future__ import annotations

import random

import httpx
import pytest
from serve_helpers import chars_scorer

from openrlhf_ext.server_app import create_app, serve_in_thread
from openrlhf_ext.server_protocol import (
    MIN_OVERLAP,
    ErrorPolicy,
    derive_response,
    finite_float32,
    longest_prompt_overlap,
    read_answer,
)


def brute_overlap(prompt: str, query: str) -> int:
    return max(k for k in range(min(len(prompt), len(query)) + 1) if prompt.endswith(query[:k]) or k == 0)


def test_overlap_search_on_repetitive_prompts_matches_brute_force():
    rng = random.Random(7)
    for _ in range(400):
        prompt = "".join(rng.choice("ab") for _ in range(rng.randint(1, 40)))
        query = "".join(rng.choice("ab") for _ in range(rng.randint(0, 50)))
        assert longest_prompt_overlap(prompt, query) == brute_overlap(prompt, query), (prompt, query)


def test_left_cut_repetitive_prompt_scores_the_response_not_a_prompt_fragment():
    prompt = "<|user|>" + "ab" * 30 + "aab" * 10 + "<|assistant|>"
    for cut in range(1, len(prompt) - MIN_OVERLAP):
        response = "aab" * 3 + "ends here"
        query = prompt[cut:] + response
        assert derive_response(query, prompt) == response, cut


def test_overlap_of_fewer_than_min_overlap_characters_is_refused():
    prompt = "<|user|>" + "Tell me a story about a dragon." + "<|assistant|>"
    assert MIN_OVERLAP == 16
    assert derive_response(prompt[-16:] + "reply", prompt) == "reply", "16 characters are enough"
    for kept in (15, 1):
        with pytest.raises(ValueError, match="does not start with the prompt"):
            derive_response(prompt[-kept:] + "reply", prompt)
    with pytest.raises(ValueError):
        derive_response(">hello", "<|user|>hi<|assistant|>")


def test_replacement_characters_left_by_a_cut_are_skipped():
    prompt = "龍の物語を書いてください。" * 3 + "<|assistant|>"
    assert derive_response("\ufffd\ufffd" + prompt[5:] + "答え", prompt) == "答え"


@pytest.mark.parametrize(
    "value, ok",
    [(0, True), (-1.5, True), (3.4e38, True), (-3.4e38, True), (3.5e38, False), (-6.4e38, False), (10**400, False),
     (-(10**39), False), (10**38, True), (float("nan"), False), (float("inf"), False), (True, False), ("1.0", False),
     ([1.0], False), (None, False)],
)
def test_finite_float32(value, ok):
    assert finite_float32(value) is ok


KEYS = ["reward/mean", "reward/errors"]


def answer(**overrides):
    body = {"rewards": [1.0, 2.0], "scores": [1.0, 2.0], "extra_logs": {"reward/mean": [1.0, 2.0], "reward/errors": [0.0, 0.0]}}
    body.update(overrides)
    return body


def test_read_answer_checks_every_field_per_sample():
    good = read_answer(answer(), 2, KEYS)
    assert [o.reward for o in good] == [1.0, 2.0] and all(o.error is None for o in good)
    for bad_scores in ([1.0, "2"], [1.0, float("nan")], [1.0, 3.5e38], [1.0, 10**400], [1.0, None]):
        outcomes = read_answer(answer(scores=bad_scores), 2, KEYS)
        assert outcomes[0].error is None and outcomes[0].reward == 1.0
        assert outcomes[1].reward is None and outcomes[1].error.code == "bad_answer" and outcomes[1].error.retry
    bad_log = read_answer(answer(extra_logs={"reward/mean": [1.0, "x"], "reward/errors": [0.0, 0.0]}), 2, KEYS)
    assert bad_log[1].error.code == "bad_answer" and "extra_logs.reward/mean (str)" in bad_log[1].error.message
    assert read_answer({"rewards": 1.5}, 1, None)[0].reward == 1.5, "scores default to rewards"


@pytest.mark.parametrize(
    "body, n, why",
    [
        ([1.0], 1, "not an object"),
        ({"scores": 1.0}, 1, "not an object with 'rewards'"),
        (answer(rewards=[1.0]), 2, "'rewards' holds 1 value"),
        (answer(extra_logs={"reward/mean": [1.0, 2.0]}), 2, "1 missing"),
        (answer(extra_logs={"reward/errors": [0.0, 0.0], "reward/mean": [1.0, 2.0]}), 2, "other order"),
        (answer(extra_logs={**answer()["extra_logs"], "reward/x": [0.0, 0.0]}), 2, "1 unknown"),
        (answer(errors=[None]), 2, "'errors' is not a list of 2"),
        (answer(extra_logs=[1.0]), 2, "'extra_logs' is not an object"),
    ],
)
def test_read_answer_refuses_unusable_answers(body, n, why):
    with pytest.raises(ValueError, match=why):
        read_answer(body, n, KEYS)


def test_read_answer_keeps_error_codes_it_knows_and_never_trusts_others():
    marked = read_answer(answer(rewards=[None, None], errors=[{"code": "timeout"}, {"code": "no_response"}]), 2, KEYS)
    assert [(o.error.code, o.error.retry) for o in marked] == [("timeout", True), ("no_response", False)]
    odd = read_answer(answer(errors=[{"code": "made up"}, "x"]), 2, KEYS)
    assert all(o.error.code == "bad_answer" and o.error.retry for o in odd), "an unknown mark is retried, not penalised"


def test_policy_refuses_skip_and_penalises_with_the_configured_value():
    with pytest.raises(ValueError, match="on_error: skip cannot be used with OpenRLHF"):
        ErrorPolicy("skip")
    with pytest.raises(ValueError, match="finite error_penalty"):
        ErrorPolicy("penalty", float("nan"))
    policy = ErrorPolicy.from_wire({"on_error": "penalty", "error_penalty": -2.5})
    (failed,) = read_answer({"rewards": None, "extra_logs": {"reward/mean": 0.0, "reward/errors": 1.0},
                             "errors": [{"code": "plugin_error"}]}, 1, KEYS)
    settled = policy.penalised(failed)
    assert settled.reward == -2.5 and settled.logs == {"reward/mean": -2.5, "reward/errors": 1.0}


def test_one_unfound_response_fails_only_its_own_sample():
    prompts = ["<|user|>one<|assistant|>", "<|user|>two<|assistant|>", "<|user|>three<|assistant|>"]
    queries = [prompts[0] + "abc", "something unrelated", prompts[2] + "abcdefg"]
    with serve_in_thread(create_app(chars_scorer())) as url:
        body = httpx.post(url + "/get_reward", json={"query": queries, "prompts": prompts, "labels": [None] * 3}).json()
    assert body["rewards"] == [-3.0, None, -7.0]
    assert body["errors"][0] is None and body["errors"][2] is None
    assert body["errors"][1]["code"] == "no_response" and body["errors"][1]["retry"] is False
    assert body["extra_logs"]["reward/errors"] == [0.0, 1.0, 0.0]
