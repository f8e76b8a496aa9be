import math

import pytest

from reward_plugins import RewardError, RewardPipeline, RewardResult, Sample, Status, parse_pipeline_config
from reward_plugins.pipeline import build_pipeline
from reward_plugins.registry import PluginConfig, RewardPlugin, register_plugin


@register_plugin("test_fragile")
class FragilePlugin(RewardPlugin):
    """Raises on any batch that contains the response 'boom', returns NaN for 'nan', else len(response)."""

    class Config(PluginConfig):
        pass

    calls = 0

    @property
    def component_keys(self):
        return ("chars",)

    def score(self, samples):
        FragilePlugin.calls += 1
        if any(s.response == "boom" for s in samples):
            raise RuntimeError("kaboom")
        return [
            RewardResult.ok(float("nan") if s.response == "nan" else len(s.response), {"chars": len(s.response)})
            for s in samples
        ]


def pipeline(reward: dict, **top) -> RewardPipeline:
    return build_pipeline(parse_pipeline_config({"reward": reward, **top}))


SAMPLES = [Sample(prompt="p", response=r) for r in ("abc", "boom", "nan", "hello")]


def test_one_bad_sample_never_sinks_the_batch():
    out = pipeline({"type": "test_fragile"}, on_error="skip").score(SAMPLES)
    assert [r.status for r in out.results] == [Status.OK, Status.ERROR, Status.ERROR, Status.OK]
    assert "kaboom" in out.results[1].error and "non-finite" in out.results[2].error
    assert out.rewards == [3.0, None, None, 5.0]
    assert out.logs["reward/errors"] == 2.0
    assert out.logs["reward/mean"] == 4.0


def test_error_policies():
    assert pipeline({"type": "test_fragile"}, on_error="penalty", error_penalty=-7.0).score(SAMPLES).rewards == [
        3.0,
        -7.0,
        -7.0,
        5.0,
    ]
    with pytest.raises(RewardError, match=r"2 of 4 samples failed: sample 1: .*kaboom"):
        pipeline({"type": "test_fragile"}).score(SAMPLES)
    # no errors: raise-policy passes through
    assert pipeline({"type": "test_fragile"}).score(SAMPLES[:1]).rewards == [3.0]


def test_log_keys_fixed_on_every_call_even_all_errors():
    pipe = pipeline(
        {"type": "weighted_sum", "terms": [
            {"weight": 1.0, "plugin": {"type": "test_fragile", "name": "frag"}},
            {"weight": 2.0, "plugin": {"type": "format_check", "name": "fmt", "pattern": "^h"}},
        ]},
        on_error="penalty", error_penalty=0.0,
    )
    expected = ("reward/mean", "reward/errors", "reward/skipped", "reward/frag/reward", "reward/frag/chars",
                "reward/fmt/reward", "reward/fmt/matched")
    assert pipe.log_keys == expected
    for batch in (SAMPLES, SAMPLES[1:2], SAMPLES[3:]):
        out = pipe.score(batch)
        assert tuple(out.logs) == expected
        for i in range(len(batch)):
            sample_logs = out.sample_logs(i)
            assert tuple(sample_logs) == expected and all(math.isfinite(v) for v in sample_logs.values())
    out = pipe.score(SAMPLES)
    assert out.rewards == [3.0, 0.0, 0.0, 5.0 + 2.0]
    assert out.sample_logs(1)["reward/errors"] == 1.0 and "frag" in out.results[1].error


def test_weighted_sum_skip_propagates():
    @register_plugin("test_skipper")
    class Skipper(RewardPlugin):
        class Config(PluginConfig):
            pass

        component_keys = ()

        def score(self, samples):
            return [RewardResult.skipped("not applicable") for _ in samples]

    pipe = pipeline({"type": "weighted_sum", "terms": [
        {"weight": 1.0, "plugin": {"type": "test_skipper"}},
        {"weight": 1.0, "plugin": {"type": "format_check", "pattern": "a"}},
    ]})
    out = pipe.score(SAMPLES[:1])
    assert out.results[0].status is Status.SKIPPED and out.rewards == [None] and out.logs["reward/skipped"] == 1.0


def test_eos_penalty_skips_inner_for_unfinished():
    FragilePlugin.calls = 0
    pipe = pipeline({"type": "eos_penalty", "penalty": -3.0, "eos_texts": ["</s>"], "eos_token_ids": [2],
                     "inner": {"type": "test_fragile", "name": "inner"}})
    samples = [
        Sample(prompt="p", response="done</s>\n"),
        Sample(prompt="p", response="cut off"),
        Sample(prompt="p", response="ids say done", response_ids=[5, 2]),
        Sample(prompt="p", response="ids say cut</s>", response_ids=[5, 6]),
    ]
    out = pipe.score(samples)
    assert out.rewards == [len("done</s>\n"), -3.0, len("ids say done"), -3.0]
    assert [r.components["missing_eos"] for r in out.results] == [0.0, 1.0, 0.0, 1.0]
    assert FragilePlugin.calls == 1  # one batched inner call, only for the finished ones


def test_length_penalty_units():
    words = pipeline({"type": "length_penalty", "coef": 0.5, "free_length": 2, "unit": "words"})
    assert words.score([Sample(prompt="", response="a b c d e")]).rewards == [-1.5]
    capped = pipeline({"type": "length_penalty", "coef": 1.0, "unit": "chars", "max_penalty": 2.0})
    assert capped.score([Sample(prompt="", response="abcdef")]).rewards == [-2.0]
    tokens = pipeline({"type": "length_penalty", "coef": 1.0, "unit": "tokens"}, on_error="skip")
    out = tokens.score([Sample(prompt="", response="x", response_ids=[1, 2, 3]), Sample(prompt="", response="x")])
    assert out.rewards == [-3.0, None] and "token ids" in out.results[1].error


def test_format_check_modes():
    search = pipeline({"type": "format_check", "pattern": "In summary:", "reward_mismatch": -1.0})
    assert search.score([Sample(prompt="", response="x In summary: y"), Sample(prompt="", response="nope")]).rewards == [1.0, -1.0]
    full = pipeline({"type": "format_check", "pattern": r"<think>.*</think>.*", "mode": "fullmatch"})
    assert full.score([Sample(prompt="", response="<think>a\nb</think> ok"), Sample(prompt="", response="ok <think></think>")]).rewards == [1.0, 0.0]


def test_colliding_component_names_fail_at_build():
    with pytest.raises(Exception, match="distinct names"):
        pipeline({"type": "weighted_sum", "terms": [
            {"weight": 1.0, "plugin": {"type": "format_check", "pattern": "a"}},
            {"weight": 1.0, "plugin": {"type": "format_check", "pattern": "b"}},
        ]})
