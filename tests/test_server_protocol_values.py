"""The wire format's values and refusals word for word, without a server: error codes and policies, the answer a
scorer builds and the answer a client reads, token files, and the edges of float32 and of the prompt overlap.
Expected values are written here by hand."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from serve_helpers import chars_scorer

from openrlhf_ext.server_protocol import (
    FINAL_CODES, MIN_OVERLAP, RETRYABLE_CODES, SKIP_REFUSED, ErrorPolicy, Outcome, SampleError, derive_response,
    finite_float32, longest_prompt_overlap, read_answer, read_token_file, to_payload, to_sample, type_name,
)
from reward_plugins.pipeline import FIXED_LOG_KEYS, ScoredBatch
from reward_plugins.types import RewardResult, Sample, ScoringUnavailable

F32_MAX = float(np.finfo(np.float32).max)
CHARS_KEYS = (*FIXED_LOG_KEYS, "reward/length")  # chars_scorer's pipeline: one length_penalty plugin
FAILED_LOGS = {**dict.fromkeys(CHARS_KEYS, 0.0), "reward/errors": 1.0}


def test_float32_edges():
    assert finite_float32(F32_MAX) and finite_float32(-F32_MAX) and finite_float32(int(F32_MAX))
    assert not finite_float32(float(np.nextafter(F32_MAX, np.inf))) and not finite_float32(int(F32_MAX) + 1)
    assert not finite_float32(-int(F32_MAX) - 1) and not finite_float32(False)


def test_type_name_says_what_without_the_value():
    assert [type_name(v) for v in ("x", [1], None, True, 10**400, float("nan"), 1e39)] == [
        "str", "list", "NoneType", "bool", "int over float32", "float nan", "float over float32"]


def test_token_file_is_stripped_and_its_problems_named(tmp_path):
    good = tmp_path / "token"
    good.write_text("  s3cret \n", encoding="utf-8")
    assert read_token_file(str(good), "--token-file") == "s3cret"
    empty = tmp_path / "empty"
    empty.write_text(" \n\t", encoding="utf-8")
    cases = [(empty, "which is empty"), (tmp_path / "none", "which cannot be read (No such file or directory)"),
             (tmp_path, "which cannot be read (Is a directory)")]
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\xfa")
    cases.append((binary, "which cannot be read (not UTF-8)"))
    for path, why in cases:
        with pytest.raises(ValueError) as error:
            read_token_file(str(path), "REWARD_TOKEN_FILE")
        assert str(error.value) == f"REWARD_TOKEN_FILE names {path}, {why}"


def test_response_found_after_exactly_min_overlap_characters_and_not_fewer():
    prompt = "P" * 10 + "".join(chr(ord("a") + i) for i in range(MIN_OVERLAP))  # the tail: 16 distinct letters
    tail = prompt[-MIN_OVERLAP:]
    assert derive_response(tail + "ANSWER", prompt) == "ANSWER"
    assert derive_response("\ufffd\ufffd" + tail + "ANSWER", prompt) == "ANSWER"
    assert derive_response(prompt + "\ufffdX", prompt) == "\ufffdX"  # the whole prompt first, before any stripping
    with pytest.raises(ValueError) as error:
        derive_response(tail[1:] + "ANSWER", prompt)
    assert str(error.value) == (
        f"the query does not start with the prompt (query begins {(tail[1:] + 'ANSWER')[:40]!r}, prompt begins "
        f"{prompt[:40]!r}); cannot tell the response apart")
    long_query, long_prompt = "q" * 30 + "Q" * 30, "p" * 30 + "P" * 30
    with pytest.raises(ValueError) as error:
        derive_response(long_query, long_prompt)
    assert str(error.value) == (f"the query does not start with the prompt (query begins {'q' * 30 + 'Q' * 10!r}, "
                                f"prompt begins {'p' * 30 + 'P' * 10!r}); cannot tell the response apart")
    assert longest_prompt_overlap("", "abc") == 0 and longest_prompt_overlap("abc", "") == 0
    assert longest_prompt_overlap("xabab", "ababz") == 4 and longest_prompt_overlap("aaa", "aaaa") == 3


def test_to_sample_keeps_the_label_and_takes_a_missing_prompt_as_empty():
    assert to_sample("all response", None, {"k": 1}) == Sample(prompt="", response="all response", query="all response",
                                                                label={"k": 1})
    assert to_sample("Q: hi A: yo", "Q: hi A:", 3) == Sample(prompt="Q: hi A:", response=" yo", query="Q: hi A: yo", label=3)


def test_error_codes_and_their_wire_form():
    assert {code for code in FINAL_CODES if SampleError(code).retry} == set()
    assert all(SampleError(code).retry for code in RETRYABLE_CODES) and SampleError("new code").retry
    assert SampleError("timeout", "m" * 600).wire() == {"code": "timeout", "retry": True, "message": "m" * 500}
    assert SampleError("skipped").wire() == {"code": "skipped", "retry": False, "message": ""}


def refused(make) -> str:
    with pytest.raises(ValueError) as error:
        make()
    return str(error.value)


def test_error_policy_refusals_word_for_word():
    assert refused(lambda: ErrorPolicy("skip")) == SKIP_REFUSED
    assert refused(lambda: ErrorPolicy("ignore")) == "on_error must be penalty or raise, got 'ignore'"
    assert refused(lambda: ErrorPolicy("penalty")) == "on_error: penalty needs a finite error_penalty, got None"
    assert refused(lambda: ErrorPolicy("penalty", 1e39)) == "on_error: penalty needs a finite error_penalty, got 1e+39"
    assert ErrorPolicy("raise").wire() == {"on_error": "raise", "error_penalty": None}
    for value in ([], {"on_error": 1}, {"error_penalty": 1.0}):
        assert refused(lambda value=value: ErrorPolicy.from_wire(value)) == (
            "the announced on_error is not an object with a string 'on_error'")
    # a penalty that is not a finite number is dropped, then refused as missing: never trained on
    assert refused(lambda: ErrorPolicy.from_wire({"on_error": "penalty", "error_penalty": "nan"})).endswith("got None")
    assert ErrorPolicy.from_wire({"on_error": "penalty", "error_penalty": -3}) == ErrorPolicy("penalty", -3.0)
    assert ErrorPolicy.from_wire({"on_error": "raise", "error_penalty": 2.0}).wire() == {"on_error": "raise",
                                                                                         "error_penalty": 2.0}


def test_error_policy_of_a_config_names_its_file(tmp_path):
    from reward_plugins import parse_pipeline_config

    config = parse_pipeline_config({"reward": {"type": "length_penalty", "coef": 1.0}, "on_error": "skip"})
    assert refused(lambda: ErrorPolicy.of(config)) == f"{config.source}: {SKIP_REFUSED}"
    good = parse_pipeline_config({"reward": {"type": "length_penalty", "coef": 1.0}, "on_error": "penalty",
                                  "error_penalty": -1})
    assert ErrorPolicy.of(good) == ErrorPolicy("penalty", -1.0)


def test_penalised_keeps_the_error_and_counts_it():
    failed = Outcome(None, {"reward/mean": 0.0, "reward/errors": 1.0, "rm/score": 0.0}, SampleError("plugin_error"))
    settled = ErrorPolicy("penalty", -2).penalised(failed)
    assert settled == Outcome(-2.0, {"reward/mean": -2.0, "reward/errors": 1.0, "rm/score": 0.0}, SampleError("plugin_error"))
    assert isinstance(settled.reward, float)
    for policy in (ErrorPolicy("raise"), ErrorPolicy("raise", 2.0)):
        with pytest.raises(AssertionError):
            policy.penalised(failed)


# ---------------------------------------------------------------- the scorer's side

def scripted(scorer, results, rewards, extra_keys=()):
    """Make the scorer's pipeline answer with these results (and count its calls)."""
    keys = FIXED_LOG_KEYS + tuple(extra_keys)
    scorer.log_keys = keys
    scorer.pipeline.score = lambda samples: ScoredBatch(list(results), list(rewards), {}, keys)


def test_scorer_codes_each_failed_sample_and_keeps_the_others(caplog):
    scorer = chars_scorer()
    results = [RewardResult.ok(1.0, {"c": 0.5}), RewardResult.failed("boom", {"c": 0.25}), RewardResult.skipped("long"),
               RewardResult.ok(1.0, {"c": 1e39}), RewardResult.ok(2.0, {"c": 1.0})]
    rewards = [1.0, None, None, 1.0, 1e39]
    scripted(scorer, results, rewards, ["reward/c"])
    with caplog.at_level(logging.WARNING, logger="openrlhf_ext.server_protocol"):
        out = scorer.score([Sample("p", "r")] * 5)
    assert [r.getMessage() for r in caplog.records] == [
        "sample 3: not finite in float32: reward 1.0, logs reward/c",
        "sample 4: not finite in float32: reward 1e+39, logs reward/mean"]
    assert out[0] == Outcome(1.0, {"reward/mean": 1.0, "reward/errors": 0.0, "reward/skipped": 0.0, "reward/c": 0.5})
    assert out[1] == Outcome(None, {"reward/mean": 0.0, "reward/errors": 1.0, "reward/skipped": 0.0, "reward/c": 0.25},
                             SampleError("plugin_error", "boom"))
    assert out[2] == Outcome(None, {"reward/mean": 0.0, "reward/errors": 1.0, "reward/skipped": 1.0, "reward/c": 0.0},
                             SampleError("skipped", "long"))
    zeros = {"reward/mean": 0.0, "reward/errors": 1.0, "reward/skipped": 0.0, "reward/c": 0.0}
    assert out[3] == Outcome(None, zeros, SampleError("non_finite", "not finite in float32: reward 1.0, logs reward/c"))
    assert out[4] == Outcome(None, zeros, SampleError(
        "non_finite", "not finite in float32: reward 1e+39, logs reward/mean"))
    scripted(scorer, [RewardResult.failed("")], [None])
    assert scorer.score([Sample("p", "r")])[0].error == SampleError("plugin_error", "plugin_error")
    scripted(scorer, [RewardResult.failed("bad", {"c": 1e39, "d": 2.0})], [None], ["reward/c", "reward/d"])
    assert scorer.score([Sample("p", "r")])[0].logs == {"reward/mean": 0.0, "reward/errors": 1.0, "reward/skipped": 0.0,
                                                       "reward/c": 0.0, "reward/d": 2.0}  # unsendable numbers: 0
    scripted(scorer, [RewardResult.ok(1.0, {"c": 1e39, "d": -1e39})], [1.0], ["reward/c", "reward/d"])
    assert scorer.score([Sample("p", "r")])[0].error.message == "not finite in float32: reward 1.0, logs reward/c, reward/d"
    scripted(scorer, [RewardResult.ok(1.0)], [None])
    assert scorer.score([Sample("p", "r")])[0].error.message == "not finite in float32: reward None, logs finite"
    scripted(scorer, [RewardResult.ok(float("nan"))], [float("nan")])
    assert scorer.score([Sample("p", "r")])[0].error.code == "plugin_error"  # RewardResult.ok already refused NaN


def test_scorer_turns_a_failed_batch_into_retryable_codes(caplog):
    scorer = chars_scorer()

    def unavailable(samples):
        raise ScoringUnavailable("no replica")

    def broken(samples):
        raise KeyError("x")

    logs = FAILED_LOGS
    scorer.pipeline.score = unavailable
    with caplog.at_level(logging.WARNING):
        assert scorer.score([Sample("p", "a"), Sample("p", "b")]) == [Outcome(None, logs, SampleError("unavailable", "no replica"))] * 2
    scorer.pipeline.score = broken
    with caplog.at_level(logging.WARNING):
        assert scorer.score([Sample("p", "a")]) == [Outcome(None, logs, SampleError("internal", "KeyError: 'x'"))]
    assert scorer.score([]) == []
    assert [r.getMessage() for r in caplog.records] == ["reward pipeline unavailable for a batch of 2: no replica",
                                                        "reward pipeline failed on a batch of 1: KeyError: 'x'"]


def test_scorer_announces_the_pipelines_policy_and_scores_with_skip():
    scorer = chars_scorer(on_error="penalty", error_penalty=-7.0)
    assert scorer.policy == ErrorPolicy("penalty", -7.0) and scorer.pipeline.on_error == "skip"
    assert scorer.log_keys == CHARS_KEYS
    assert chars_scorer(on_error="raise", error_penalty=None).policy == ErrorPolicy("raise")


def test_prepare_caps_the_sample_size_inclusively_and_fails_only_that_sample(caplog):
    scorer = chars_scorer()
    with caplog.at_level(logging.WARNING, logger="openrlhf_ext.server_protocol"):
        outcomes, samples, positions = scorer.prepare(["ab" + "x" * 8, "ab" + "y" * 9, "zz"], ["ab", "ab", "ab"],
                                                      [1, 2, 3], max_sample_chars=12)
    unfound = ("the query does not start with the prompt (query begins 'zz', prompt begins 'ab'); "
               "cannot tell the response apart")
    assert [r.getMessage() for r in caplog.records] == [
        "sample 1: sample of 13 characters (query + prompt) is over the 12 cap", f"sample 2: {unfound}"]
    assert positions == [0] and samples == [Sample("ab", "x" * 8, "ab" + "x" * 8, 1)]
    assert outcomes[0] is None
    assert outcomes[1].error == SampleError("too_large", "sample of 13 characters (query + prompt) is over the 12 cap")
    assert outcomes[2].error == SampleError("no_response", unfound) and outcomes[2].logs["reward/errors"] == 1.0
    outcomes, samples, positions = scorer.prepare(["q1", "q2"], None, None)
    assert outcomes == [None, None] and positions == [0, 1] and samples == [Sample("", "q1", "q1"), Sample("", "q2", "q2")]
    outcomes, samples, positions = scorer.prepare(["q1", "q2"], ["q"], None)
    assert samples == [] and positions == [] and outcomes == [Outcome(None, FAILED_LOGS, SampleError("internal", "query, prompts and labels differ in length (2, 1, 2)"))] * 2
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="openrlhf_ext.server_protocol"):
        assert scorer.prepare(["q"], ["q"], [1, 2])[0][0].error.message == (
            "query, prompts and labels differ in length (1, 1, 2)")
    assert [r.getMessage() for r in caplog.records] == ["query, prompts and labels differ in length (1, 1, 2)"]


def test_score_raw_puts_each_outcome_at_its_query():
    scorer = chars_scorer()
    out = scorer.score_raw(["Pabc", "nope", "Pabcdefg"], ["P", "Q", "P"], None)
    assert [o.reward for o in out] == [-3.0, None, -7.0] and out[1].error.code == "no_response"
    seen = []
    score = scorer.pipeline.score
    scorer.pipeline.score = lambda samples: seen.extend(samples) or score(samples)
    scorer.score_raw(["Pa", "Pb"], ["P", "P"], [{"id": 1}, "two"])
    assert [s.label for s in seen] == [{"id": 1}, "two"]


# ---------------------------------------------------------------- the answer on the wire

def test_payload_scalars_for_one_sample_lists_otherwise():
    ok = Outcome(1.5, {"reward/mean": 1.5, "reward/errors": 0.0, "x": 9.0})
    bad = Outcome(None, {"reward/mean": 0.0, "reward/errors": 1.0, "x": 0.0}, SampleError("timeout", "slow"))
    keys = ["reward/mean", "reward/errors"]
    assert to_payload([ok], keys) == {"rewards": 1.5, "scores": 1.5, "extra_logs": {"reward/mean": 1.5, "reward/errors": 0.0},
                                      "errors": [None]}
    assert to_payload([ok, bad], keys, errors=False) == {
        "rewards": [1.5, None], "scores": [1.5, None],
        "extra_logs": {"reward/mean": [1.5, 0.0], "reward/errors": [0.0, 1.0]}}
    assert to_payload([bad, ok], keys)["errors"] == [{"code": "timeout", "retry": True, "message": "slow"}, None]
    full = Outcome(1.0, {"reward/mean": 1.0, "reward/errors": 0.0, "reward/skipped": 0.0})
    assert list(to_payload([full], [])["extra_logs"]) == list(FIXED_LOG_KEYS)  # no declared keys: the fixed ones


def test_read_answer_values_and_refusals_word_for_word():
    keys = ["reward/mean", "reward/errors"]
    body = {"rewards": [1, 2.5], "extra_logs": {"reward/mean": [1, 2.5], "reward/errors": [0, 0]}}
    out = read_answer(body, 2, keys)
    assert out == [Outcome(1.0, {"reward/mean": 1.0, "reward/errors": 0.0}), Outcome(2.5, {"reward/mean": 2.5, "reward/errors": 0.0})]
    assert all(isinstance(o.reward, float) and all(isinstance(v, float) for v in o.logs.values()) for o in out)
    assert read_answer({"rewards": [1.0, 2.0], "scores": None}, 2, None)[1] == Outcome(2.0, {})  # no logs: none
    assert read_answer({"rewards": [1.0, 2.0], "scores": [5.0, 6.0]}, 2, None)[0].reward == 1.0  # the reward, not the score
    assert refused(lambda: read_answer([1], 1, None)) == "answer is not an object with 'rewards' (got list)"
    assert refused(lambda: read_answer({"rewards": [1.0]}, 2, None)) == "answer's 'rewards' holds 1 value(s) for 2 sample(s)"
    assert refused(lambda: read_answer({"rewards": 1.0, "scores": [1.0, 2.0]}, 1, None)) == (
        "answer's 'scores' holds 2 value(s) for 1 sample(s)")
    assert refused(lambda: read_answer({"rewards": 1.0, "extra_logs": {1: 1.0}}, 1, None)) == (
        "answer's 'extra_logs' is not an object (got dict)")
    assert refused(lambda: read_answer({"rewards": 1.0, "extra_logs": {"a": 1.0}}, 1, ["b", "c"])) == (
        "answer's 'extra_logs' keys differ from the declared ones (2 missing, 1 unknown)")
    assert refused(lambda: read_answer({"rewards": 1.0, "extra_logs": {"b": 1.0}}, 1, ["b", "c"])) == (
        "answer's 'extra_logs' keys differ from the declared ones (1 missing, 0 unknown)")
    assert refused(lambda: read_answer({"rewards": 1.0, "extra_logs": {"c": 1.0, "b": 1.0}}, 1, ["b", "c"])) == (
        "answer's 'extra_logs' keys differ from the declared ones (0 missing, 0 unknown, other order)")
    assert refused(lambda: read_answer({"rewards": [1.0, 2.0], "extra_logs": {"a": [1.0]}}, 2, None)) == (
        "answer's 'a' holds 1 value(s) for 2 sample(s)")
    assert refused(lambda: read_answer({"rewards": 1.0, "errors": {"0": None}}, 1, None)) == "answer's 'errors' is not a list of 1"


def test_read_answer_marks_bad_samples_naming_fields_and_types():
    body = {"rewards": [1.0, "x", 2.0], "scores": [1.0, 1e39, None],
            "extra_logs": {"a": [0.5, 7.0, float("nan")], "b": [1.0, 2.0, 3.0]}}
    out = read_answer(body, 3, None)
    assert out[0] == Outcome(1.0, {"a": 0.5, "b": 1.0})
    assert out[1] == Outcome(None, {"a": 0.0, "b": 0.0}, SampleError(
        "bad_answer", "not a finite float32: rewards (str), scores (float over float32)"))
    assert out[2] == Outcome(None, {"a": 0.0, "b": 0.0}, SampleError(
        "bad_answer", "not a finite float32: scores (NoneType), extra_logs.a (float nan)"))
    marked = read_answer({"rewards": [None, 1.0], "extra_logs": {"a": [5, "x"], "b": [1e39, 1.0]},
                          "errors": [{"code": "too_large"}, None]}, 2, None)
    assert marked[0] == Outcome(None, {"a": 5.0, "b": 0.0}, SampleError("too_large", "marked by the server"))
    assert marked[1].error == SampleError("bad_answer", "not a finite float32: extra_logs.a (str)")
    assert read_answer({"rewards": [None], "errors": [{"code": 3}]}, 1, None)[0].error.code == "bad_answer"
