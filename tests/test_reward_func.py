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
    """A new lazily built shim state per test; aborts are recorded instead of ending pytest."""
    aborts: list[int] = []
    state = shim.ShimState(abort=aborts.append)
    monkeypatch.setattr(shim, "_STATE", state)
    state.aborts = aborts
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
    assert fresh_state.aborts == []
    assert fresh_state.batcher.stats.delivered == len(pairs), "every call went through the shared batcher"


def test_missing_config_stops_the_worker(fresh_state, monkeypatch, caplog):
    monkeypatch.setenv(shim.FALLBACK_ENV, "-2.5")
    with caplog.at_level(logging.WARNING, logger="openrlhf_ext.shim"):
        result = shim.reward_func(["<|user|>hi<|assistant|>yo"], ["<|user|>hi<|assistant|>"], [None])
    assert fresh_state.aborts == [1]
    assert any(r.levelno == logging.CRITICAL and "REWARD_PLUGINS_CONFIG is not set" in r.getMessage() for r in caplog.records)
    assert result["extra_logs"]["reward/errors"] == 1.0


def test_unbuildable_pipeline_stops_at_first_call_with_the_pipelines_log_keys(
    fresh_state, models_env, tmp_path, monkeypatch, caplog
):
    good = Path("configs/rewards/reward_model.yaml")
    bad = tmp_path / "wrong_model.yaml"
    bad.write_text(good.read_text().replace("${MODELS_DIR:-models}", str(tmp_path / "nowhere")))
    assert bad.read_text() != good.read_text()
    monkeypatch.setenv(shim.CONFIG_ENV, str(bad))
    with caplog.at_level(logging.CRITICAL, logger="openrlhf_ext.shim"):
        result = shim.reward_func(["pabc"], ["p"], [None])
    assert fresh_state.aborts == [1], "the run stops instead of answering 0.0 on every call"
    critical = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert critical and str(bad) in critical[0] and "nowhere" in critical[0]
    assert result["rewards"] == -1.0, "the config's error_penalty, not 0.0"
    assert list(result["extra_logs"]) == list(RewardPipeline.from_yaml(good).log_keys)


@pytest.mark.parametrize(
    "name, value", [(shim.MAX_FAILURES_ENV, "three"), (shim.MAX_FAILURES_ENV, "-1"), (shim.FALLBACK_ENV, "nan"),
                    (shim.FALLBACK_ENV, "inf"), (shim.MAX_BATCH_ENV, "0")]
)
def test_bad_environment_values_stop_the_worker(fresh_state, tmp_path, monkeypatch, caplog, name, value):
    config = tmp_path / "chars.yaml"
    config.write_text("reward:\n  type: length_penalty\n  coef: 1.0\n  unit: chars\n")
    monkeypatch.setenv(shim.CONFIG_ENV, str(config))
    monkeypatch.setenv(name, value)
    with caplog.at_level(logging.CRITICAL, logger="openrlhf_ext.shim"):
        result = shim.reward_func(["pabc"], ["p"], [None])
    assert fresh_state.aborts == [1]
    assert any(f"${name}" in r.getMessage() and repr(value) in r.getMessage() for r in caplog.records)
    assert np.isfinite(result["rewards"])


def test_log_keys_from_config_match_the_built_pipelines(models_env):
    from openrlhf_ext.server_protocol import config_log_keys
    from reward_plugins import build_pipeline, load_pipeline_config

    configs = sorted(Path("configs/rewards").glob("*.yaml"))
    assert len(configs) >= 5
    for path in configs:
        config = load_pipeline_config(path)
        derived = config_log_keys(load_pipeline_config(path, check_paths=False))
        assert derived == build_pipeline(config).log_keys, path


def test_log_keys_from_config_load_no_model(monkeypatch):
    """The keys of a failed build come from the config alone: the ensemble's members are not loaded."""
    from openrlhf_ext.server_protocol import config_log_keys
    from reward_plugins import load_pipeline_config, reward_model

    monkeypatch.setenv("MODELS_DIR", "/no/models/here")
    monkeypatch.setattr(reward_model.RewardModelScorer, "__init__", _no_model_load)
    keys = config_log_keys(load_pipeline_config("configs/rewards/ensemble_uwo5.yaml", check_paths=False))
    assert keys[3:] == tuple(f"reward/{k}" for k in ("seed1", "seed2", "seed3", "seed4", "seed5", "variance", "combined"))


def _no_model_load(*args, **kwargs):
    raise AssertionError("a model was loaded")


def test_consecutive_failures_abort_and_ok_resets(fresh_state, tmp_path, monkeypatch):
    config = tmp_path / "chars.yaml"
    config.write_text("on_error: skip\nreward:\n  type: length_penalty\n  coef: 1.0\n  unit: chars\n")
    monkeypatch.setenv(shim.CONFIG_ENV, str(config))
    monkeypatch.setenv(shim.MAX_FAILURES_ENV, "3")
    bad = (["unrelated text"], ["<|user|>a prompt<|assistant|>"], [None])
    good = (["pabc"], ["p"], [None])
    assert shim.reward_func(*good)["rewards"] == -3.0
    for call in (bad, bad, good, bad, bad):
        shim.reward_func(*call)
    assert fresh_state.aborts == [], "an OK sample resets the count"
    result = shim.reward_func(*bad)
    assert fresh_state.aborts == [1]
    assert result["rewards"] == 0.0 and result["extra_logs"]["reward/errors"] == 1.0


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
