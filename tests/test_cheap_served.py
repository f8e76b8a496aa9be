"""The multi-head and LoRA ensemble configs served to OpenRLHF 0.11.2's own client: the reward server and the
reward_func shim file, both driven by its SingleTurnAgentExecutor."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from serve_helpers import PROMPTS, RESPONSES, make_engine, sampling_params

from openrlhf_ext import shim
from openrlhf_ext.server_app import ServerSettings, create_app, serve_in_thread
from openrlhf_ext.server_protocol import GuardedScorer
from reward_plugins import RewardPipeline, Sample, build_pipeline, load_pipeline_config

pytest.importorskip("openrlhf")
from openrlhf.utils.agent import SingleTurnAgentExecutor  # noqa: E402

SHIM_FILE = str(Path(__file__).resolve().parents[1] / "openrlhf_ext" / "reward_func.py")
CONFIGS = {"multihead": "configs/rewards/multihead_uwo5.yaml", "lora": "configs/rewards/lora_uwo5.yaml"}
MEMBERS = {"multihead": [f"head{i}" for i in range(5)], "lora": [f"adapter{i}" for i in range(5)]}


def run_executor(url, tokenizer, engine, prompts):
    executor = SingleTurnAgentExecutor(remote_rm_url=[url])

    async def all_samples():
        return await asyncio.gather(*(executor.execute(p, None, sampling_params(), 256, tokenizer, engine) for p in prompts))

    return asyncio.run(all_samples())


def check_outputs(outputs, prompts, pairs, config, kind):
    pipeline = RewardPipeline.from_yaml(config)
    direct = pipeline.score([Sample(p, r) for p, (_, r) in zip(prompts, pairs)])
    np.testing.assert_allclose([o["reward"] for o in outputs], direct.rewards, rtol=1e-4, atol=1e-4)
    assert len({round(o["reward"], 4) for o in outputs}) > 4, "distinct answers get distinct rewards"
    for out, result in zip(outputs, direct.results):
        assert list(out["extra_logs"]) == list(pipeline.log_keys)
        for member in MEMBERS[kind]:
            assert out["extra_logs"][f"reward/{member}"] == pytest.approx(result.components[member], abs=1e-4)


@pytest.mark.parametrize("kind", ["multihead", "lora"])
def test_reward_server_serves_one_pass_ensembles(models_env, tokenizer_dir, kind):
    config = load_pipeline_config(CONFIGS[kind])
    scorer = GuardedScorer(build_pipeline(config))
    pairs = [(PROMPTS[i % 4] + f" Variant {i}.", RESPONSES[i % 4]) for i in range(12)]
    tokenizer, engine, prompts = make_engine(tokenizer_dir, pairs)
    with serve_in_thread(create_app(scorer, ServerSettings(max_batch_size=8, max_wait_ms=50))) as url:
        outputs = run_executor(url + "/get_reward", tokenizer, engine, prompts)
    check_outputs(outputs, prompts, pairs, CONFIGS[kind], kind)


@pytest.mark.parametrize("kind", ["multihead", "lora"])
def test_shim_serves_one_pass_ensembles(models_env, tokenizer_dir, monkeypatch, kind):
    state = shim.ShimState()
    monkeypatch.setattr(shim, "_STATE", state)
    monkeypatch.setenv(shim.CONFIG_ENV, CONFIGS[kind])
    pairs = [(PROMPTS[i % 4] + f" Case {i}.", RESPONSES[i % 4]) for i in range(8)]
    tokenizer, engine, prompts = make_engine(tokenizer_dir, pairs)
    outputs = run_executor(SHIM_FILE, tokenizer, engine, prompts)
    check_outputs(outputs, prompts, pairs, CONFIGS[kind], kind)


@pytest.mark.parametrize("kind", ["multihead", "lora"])
def test_served_log_keys_name_every_member(models_env, kind):
    scorer = GuardedScorer(build_pipeline(load_pipeline_config(CONFIGS[kind])))
    assert scorer.log_keys[3:] == tuple(f"reward/{k}" for k in (*MEMBERS[kind], "variance", "combined"))
