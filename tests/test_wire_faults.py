"""Issue 17's faults through OpenRLHF 0.11.2's own SingleTurnAgentExecutor with our client installed: every sample's
reward equals the one the same pipeline computes in-process, or the run stops with a clear error; no valid sample
is ever given the penalty."""

from __future__ import annotations

import time

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response
from serve_helpers import PROMPTS, RESPONSES, execute, install_client, make_engine

from openrlhf_ext import reward_client
from openrlhf_ext.reward_client import RewardClientError
from openrlhf_ext.server_app import ServerSettings, create_app, serve_in_thread
from openrlhf_ext.server_protocol import GuardedScorer
from reward_plugins import RewardPipeline, Sample, build_pipeline, parse_pipeline_config
from reward_plugins.registry import RewardPlugin, score_safely
from reward_plugins.types import ScoringUnavailable

pytest.importorskip("openrlhf")

PENALTY = -1.0


@pytest.fixture(scope="module")
def rm_pipeline(rm_dirs):
    config = {"on_error": "penalty", "error_penalty": PENALTY,
              "reward": {"type": "reward_model", "name": "rm", "path": str(rm_dirs[1]), "batch_size": 8}}
    return build_pipeline(parse_pipeline_config(config))


def rollouts(tokenizer_dir, pipeline, n: int):
    """n distinct rollouts and the reward the pipeline gives each in-process (the expectation)."""
    pairs = [(PROMPTS[i % 4] + f" Variant {i}.", RESPONSES[i % 4]) for i in range(n)]
    tokenizer, engine, prompts = make_engine(tokenizer_dir, pairs)
    direct = pipeline.score([Sample(p, r) for p, (_, r) in zip(prompts, pairs)])
    assert all(r is not None for r in direct.rewards)
    return tokenizer, engine, prompts, np.array(direct.rewards, dtype=float)


def assert_own_rewards(outputs, expected):
    got = np.array([o["reward"] for o in outputs], dtype=float)
    penalised = int(np.sum(np.isclose(got, PENALTY) & ~np.isclose(expected, PENALTY)))
    assert penalised == 0, f"{penalised} valid samples were given the penalty"
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert all(o["extra_logs"]["reward/errors"] == 0.0 for o in outputs)


def test_overloaded_server_with_a_short_request_timeout(monkeypatch, tokenizer_dir, rm_pipeline):
    """300 concurrent rollouts, scoring slower than --request-timeout allows: 429s and retried timeouts, no penalty."""
    install_client(monkeypatch)
    scorer = GuardedScorer(rm_pipeline)
    real = scorer.score

    def slow(samples):
        time.sleep(0.05)
        return real(samples)

    scorer.score = slow
    app = create_app(scorer, ServerSettings(max_batch_size=8, max_wait_ms=5, request_timeout_s=1.0))
    tokenizer, engine, prompts, expected = rollouts(tokenizer_dir, rm_pipeline, 300)
    with serve_in_thread(app) as url:
        outputs = execute([url], tokenizer, engine, prompts)
    assert_own_rewards(outputs, expected)
    assert app.state.statuses["429"] > 0, "the server must really have been overloaded for this test to mean anything"


def _liar(value: bytes) -> FastAPI:
    """A server that answers every sample with `value` as its reward (and the right log keys)."""
    app = FastAPI()

    @app.post("/get_reward")
    async def get_reward(request: Request):
        body = b'{"rewards": ' + value + b', "scores": 0.5, "extra_logs": {"reward/mean": 0.5, "reward/errors": 0.0, ' \
               b'"reward/skipped": 0.0, "reward/rm": 0.5}}'
        return Response(body, media_type="application/json")

    return app


@pytest.mark.parametrize("value", [b"1" + b"0" * 400, b"3.5e38", b"-6.4e38", b"NaN", b'"0.5"', b"[0.5, 0.5]", b"[[0.5]]"],
                         ids=["10**400", "3.5e38", "-6.4e38", "NaN", "string", "list", "nested"])
def test_a_server_answering_numbers_openrlhf_cannot_hold(monkeypatch, tokenizer_dir, rm_pipeline, value):
    install_client(monkeypatch)
    tokenizer, engine, prompts, expected = rollouts(tokenizer_dir, rm_pipeline, 12)
    with serve_in_thread(_liar(value)) as bad, serve_in_thread(create_app(GuardedScorer(rm_pipeline))) as good:
        outputs = execute([bad, good], tokenizer, engine, prompts)
        assert_own_rewards(outputs, expected)
        monkeypatch.setenv(reward_client.BUDGET_ENV, "1.5")
        monkeypatch.setattr(reward_client, "_BOOK", reward_client.ServerBook())
        with pytest.raises(RewardClientError, match=rf"no reward for 1 of 1 sample.* last: {bad}/get_reward: "):
            execute([bad], tokenizer, engine, prompts[:1])


def test_samples_that_time_out_are_retried_elsewhere_never_penalised(monkeypatch, tokenizer_dir, rm_pipeline):
    """The first server's model hangs past its request timeout: the samples come back marked and go to the second."""
    install_client(monkeypatch)
    stuck = GuardedScorer(rm_pipeline)
    stuck.score = lambda samples: (time.sleep(1.5), [])[1]
    tokenizer, engine, prompts, expected = rollouts(tokenizer_dir, rm_pipeline, 16)
    hung = create_app(stuck, ServerSettings(request_timeout_s=0.5))
    with serve_in_thread(hung) as first, serve_in_thread(create_app(GuardedScorer(rm_pipeline))) as second:
        outputs = execute([first, second], tokenizer, engine, prompts)
    assert_own_rewards(outputs, expected)


def test_unscorable_samples_get_the_penalty_once_and_only_they(monkeypatch, tokenizer_dir, rm_pipeline):
    install_client(monkeypatch)
    pairs = [(PROMPTS[0], RESPONSES[0]), (PROMPTS[1], ""), (PROMPTS[2], RESPONSES[2])]
    tokenizer, engine, prompts = make_engine(tokenizer_dir, pairs)
    with serve_in_thread(create_app(GuardedScorer(rm_pipeline))) as url:
        outputs = execute([url], tokenizer, engine, prompts)
    direct = rm_pipeline.score([Sample(p, r) for p, (_, r) in zip(prompts, pairs)])
    assert direct.results[1].status.value == "error", "an empty response is the sample's own error"
    assert [o["reward"] for o in outputs] == pytest.approx([direct.rewards[0], PENALTY, direct.rewards[2]], abs=1e-4)
    assert [o["extra_logs"]["reward/errors"] for o in outputs] == [0.0, 1.0, 0.0]
    assert outputs[1]["extra_logs"]["reward/mean"] == PENALTY

    raising = build_pipeline(parse_pipeline_config({"on_error": "raise", "reward": {"type": "reward_model", "name": "rm",
                                                                                    "path": rm_pipeline.root.config.path}}))
    monkeypatch.setattr(reward_client, "_BOOK", reward_client.ServerBook())
    with serve_in_thread(create_app(GuardedScorer(raising))) as url:
        with pytest.raises(RewardClientError, match=r"could not score a sample \(plugin_error; .*on_error: raise; stopping"):
            execute([url], tokenizer, engine, prompts)


class _Gone(RewardPlugin):
    """A plugin whose scorer is unreachable (what a placed plugin with no live replica raises)."""

    component_keys = ()

    def score(self, samples):
        raise ScoringUnavailable("rm: no live replica (0 restarting, 2 gone for good, max_restarts 3)")


def test_a_lost_scorer_is_never_turned_into_per_sample_penalties():
    samples = [Sample("p", "a"), Sample("p", "b"), Sample("p", "c")]
    pipeline = RewardPipeline(_Gone(None, "gone"), on_error="penalty", error_penalty=PENALTY)
    with pytest.raises(ScoringUnavailable, match="no live replica"):
        score_safely(pipeline.root, samples)
    with pytest.raises(ScoringUnavailable):
        pipeline.score(samples)  # the experience maker's path: the run stops with this message
    outcomes = GuardedScorer(pipeline).score(samples)  # the server's path: the client retries elsewhere
    assert [(o.reward, o.error.code, o.error.retry) for o in outcomes] == [(None, "unavailable", True)] * 3


def test_every_openrlhf_path_refuses_skip_up_front(tmp_path):
    from openrlhf_ext import launch

    skip = tmp_path / "skip.yaml"
    skip.write_text("on_error: skip\nreward:\n  type: length_penalty\n  coef: 1.0\n  unit: chars\n")
    with pytest.raises(launch.LaunchError, match=f"{skip}: on_error: skip cannot be used with OpenRLHF 0.11.2"):
        launch.check_shim_policy(str(skip))
    with pytest.raises(ValueError, match="skip cannot be used"):
        GuardedScorer(build_pipeline(parse_pipeline_config({"on_error": "skip", "reward": {"type": "length_penalty", "coef": 1.0}})))
