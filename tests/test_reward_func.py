"""The reward_func shim file, loaded the way OpenRLHF 0.11.2 loads it (its own SingleTurnAgentExecutor)."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
from serve_helpers import PROMPTS, RESPONSES, make_engine, sampling_params

from openrlhf_ext import shim
from reward_plugins import RewardPipeline, Sample

pytest.importorskip("openrlhf")
from openrlhf.utils.agent import SingleTurnAgentExecutor  # noqa: E402

SHIM_FILE = str(Path(__file__).resolve().parents[1] / "openrlhf_ext" / "reward_func.py")


@pytest.fixture()
def fresh_state(monkeypatch):
    """A new lazily built shim state per test."""
    state = shim.ShimState()
    monkeypatch.setattr(shim, "_STATE", state)
    for name in (shim.CONFIG_ENV, shim.FALLBACK_ENV, shim.MAX_FAILURES_ENV, shim.MAX_BATCH_ENV):
        monkeypatch.delenv(name, raising=False)
    return state


def run_executor(tokenizer, engine, prompts):
    executor = SingleTurnAgentExecutor(remote_rm_url=[SHIM_FILE])
    assert executor.reward_func is not None, "OpenRLHF did not load reward_func from the shim file"

    async def all_samples():
        return await asyncio.gather(*(executor.execute(p, None, sampling_params(), 256, tokenizer, engine) for p in prompts))

    return asyncio.run(all_samples())


def test_shim_rewards_reach_openrlhf(fresh_state, models_env, tokenizer_dir, monkeypatch):
    config = "configs/rewards/reward_model.yaml"
    monkeypatch.setenv(shim.CONFIG_ENV, config)
    pairs = [(PROMPTS[i % 4] + f" Case {i}.", RESPONSES[i % 4]) for i in range(12)] + [(PROMPTS[0], "")]
    tokenizer, engine, prompts = make_engine(tokenizer_dir, pairs)
    outputs = run_executor(tokenizer, engine, prompts)

    pipeline = RewardPipeline.from_yaml(config)
    direct = pipeline.score([Sample(p, r) for p, (_, r) in zip(prompts[:-1], pairs[:-1])])
    got = np.array([o["reward"] for o in outputs[:-1]], dtype=float)
    np.testing.assert_allclose(got, np.array(direct.rewards, dtype=float), rtol=1e-4, atol=1e-4)
    assert all(list(o["extra_logs"]) == list(pipeline.log_keys) for o in outputs)
    empty = outputs[-1]
    assert empty["reward"] == -1.0 and empty["scores"] == -1.0, "error_penalty of the config, not None"
    assert empty["extra_logs"]["reward/errors"] == 1.0
    assert fresh_state.batcher.stats.delivered == len(pairs), "every call went through the shared batcher"


def test_missing_config_stops_the_run_in_one_line(fresh_state, caplog):
    with caplog.at_level(logging.WARNING, logger="openrlhf_ext.shim"):
        with pytest.raises(shim.RewardStopped, match=r"^reward_func stopped the run: cannot build .*REWARD_PLUGINS_CONFIG is not set"):
            shim.reward_func(["<|user|>hi<|assistant|>yo"], ["<|user|>hi<|assistant|>"], [None])
    assert any(r.levelno == logging.CRITICAL and "REWARD_PLUGINS_CONFIG is not set" in r.getMessage() for r in caplog.records)
    with pytest.raises(shim.RewardStopped, match="REWARD_PLUGINS_CONFIG is not set"):
        shim.reward_func(["x"], ["y"], [None])


def test_unbuildable_pipeline_stops_at_first_call(fresh_state, models_env, tmp_path, monkeypatch):
    good = Path("configs/rewards/reward_model.yaml")
    bad = tmp_path / "wrong_model.yaml"
    bad.write_text(good.read_text().replace("${MODELS_DIR:-models}", str(tmp_path / "nowhere")))
    assert bad.read_text() != good.read_text()
    monkeypatch.setenv(shim.CONFIG_ENV, str(bad))
    with pytest.raises(shim.RewardStopped) as stopped:
        shim.reward_func(["pabc"], ["p"], [None])
    message = str(stopped.value)
    assert str(bad) in message and "nowhere" in message and "\n" not in message


@pytest.mark.parametrize(
    "name, value", [(shim.MAX_FAILURES_ENV, "three"), (shim.MAX_FAILURES_ENV, "-1"), (shim.FALLBACK_ENV, "-1"),
                    (shim.MAX_BATCH_ENV, "0")]
)
def test_bad_environment_values_stop_the_run(fresh_state, tmp_path, monkeypatch, name, value):
    config = tmp_path / "chars.yaml"
    config.write_text("reward:\n  type: length_penalty\n  coef: 1.0\n  unit: chars\n")
    monkeypatch.setenv(shim.CONFIG_ENV, str(config))
    monkeypatch.setenv(name, value)
    with pytest.raises(shim.RewardStopped, match=rf"\${name}"):
        shim.reward_func(["pabc"], ["p"], [None])


def test_skip_is_refused_and_raise_stops_at_the_first_failed_sample(fresh_state, tmp_path, monkeypatch):
    config = tmp_path / "chars.yaml"
    config.write_text("on_error: skip\nreward:\n  type: length_penalty\n  coef: 1.0\n  unit: chars\n")
    monkeypatch.setenv(shim.CONFIG_ENV, str(config))
    with pytest.raises(shim.RewardStopped, match="on_error: skip cannot be used with OpenRLHF 0.11.2"):
        shim.reward_func(["pabc"], ["p"], [None])

    state = shim.ShimState()
    monkeypatch.setattr(shim, "_STATE", state)
    config.write_text("on_error: raise\nreward:\n  type: length_penalty\n  coef: 1.0\n  unit: chars\n")
    assert shim.reward_func(["pabc"], ["p"], [None])["rewards"] == -3.0
    with pytest.raises(shim.RewardStopped, match=r"on_error: raise and a sample failed; 1 sample\(s\) failed to score; "
                                                 r"last error: no_response: the query does not start"):
        shim.reward_func(["unrelated text"], ["<|user|>a prompt<|assistant|>"], [None])


def test_consecutive_failures_stop_the_run_and_ok_resets(fresh_state, tmp_path, monkeypatch):
    config = tmp_path / "chars.yaml"
    config.write_text("on_error: penalty\nerror_penalty: -5\nreward:\n  type: length_penalty\n  coef: 1.0\n  unit: chars\n")
    monkeypatch.setenv(shim.CONFIG_ENV, str(config))
    monkeypatch.setenv(shim.MAX_FAILURES_ENV, "3")
    bad = (["unrelated text"], ["<|user|>a prompt<|assistant|>"], [None])
    good = (["pabc"], ["p"], [None])
    assert shim.reward_func(*good)["rewards"] == -3.0
    for call in (bad, bad, good, bad, bad):
        result = shim.reward_func(*call)
    assert result["rewards"] == -5.0 and result["extra_logs"]["reward/errors"] == 1.0, "the penalty, counted"
    with pytest.raises(shim.RewardStopped, match=r"^reward_func stopped the run: 3 samples in a row failed to score "
                                                 r"\(\$REWARD_PLUGINS_MAX_CONSECUTIVE_FAILURES=3\); 5 sample\(s\) failed"):
        shim.reward_func(*bad)
    with pytest.raises(shim.RewardStopped, match="3 samples in a row"):
        shim.reward_func(*good)


def test_pipeline_built_once_under_concurrent_first_calls(fresh_state, tmp_path, monkeypatch):
    config = tmp_path / "chars.yaml"
    config.write_text("reward:\n  type: length_penalty\n  coef: 0.5\n  unit: chars\n")
    monkeypatch.setenv(shim.CONFIG_ENV, str(config))
    builds = []
    real_build = shim.build_pipeline

    def counting_build(cfg):
        builds.append(threading.get_ident())
        threading.Event().wait(0.2)
        return real_build(cfg)

    monkeypatch.setattr(shim, "build_pipeline", counting_build)
    results: list[dict] = []
    threads = [threading.Thread(target=lambda: results.append(shim.reward_func(["pabcd"], ["p"], [None]))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    assert [r["rewards"] for r in results] == [-2.0] * 8


def test_concurrent_failures_all_report_the_first_reason(fresh_state, tmp_path, monkeypatch):
    config = tmp_path / "chars.yaml"
    config.write_text("on_error: penalty\nerror_penalty: -5\nreward:\n  type: length_penalty\n  coef: 1.0\n  unit: chars\n")
    monkeypatch.setenv(shim.CONFIG_ENV, str(config))
    monkeypatch.setenv(shim.MAX_FAILURES_ENV, "3")
    stops: list[str] = []

    def call():
        try:
            shim.reward_func(["unrelated text"], ["<|user|>a prompt<|assistant|>"], [None])
        except shim.RewardStopped as exc:
            stops.append(str(exc))

    threads = [threading.Thread(target=call) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(stops) >= 10 and len(set(stops)) == 1, stops
    assert "3 samples in a row failed to score" in stops[0] and "; 3 sample(s) failed to score" in stops[0]
