"""One-model ensembles placed on a local CPU Ray cluster: each replica holds all heads (adapters), the scores match
the unplaced plugin, and the launcher accepts the placed configs the PPO script uses."""

from __future__ import annotations

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from openrlhf_ext.placement import RayPlacer  # noqa: E402
from reward_plugins import Sample, load_pipeline_config, parse_pipeline_config  # noqa: E402
from reward_plugins.pipeline import build_pipeline  # noqa: E402
from reward_plugins.placement import PlacedPlugin, placement_requests, unplaced_models  # noqa: E402

ON_CPU = {"num_gpus": 0, "num_cpus": 0.25, "max_restarts": 1, "ready_timeout_s": 300}  # generous: a loaded CI box starts actors slowly
SAMPLES = [Sample(prompt=f"Prompt {i}. ", response="the dragon paints " * (i + 1)) for i in range(5)] + [
    Sample(prompt="Empty. ", response=" ")]


@pytest.fixture(scope="module")
def placer():
    env = {"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=env)
    placer = RayPlacer()
    yield placer
    placer.close()
    ray.shutdown()


@pytest.mark.parametrize("kind, count", [("multihead_ensemble", "heads"), ("lora_ensemble", "adapters")])
def test_each_replica_holds_every_member_and_scores_like_the_local_plugin(placer, multihead_dir, lora_dir, kind, count):
    folder = multihead_dir if kind == "multihead_ensemble" else lora_dir
    reward = {"type": kind, "name": "uwo", "path": str(folder), count: 5, "objective": "uwo", "uwo_weight": 0.5,
              "batch_size": 2, "placement": {**ON_CPU, "replicas": 2}}
    config = parse_pipeline_config({"reward": reward, "on_error": "penalty", "error_penalty": -1.0})
    assert placement_requests(config.reward) == [("uwo", config.reward.config.placement)], "one group for all members"
    placed, local = build_pipeline(config, placer), build_pipeline(config)
    assert isinstance(placed.root, PlacedPlugin) and placed.log_keys == local.log_keys
    got, want = placed.score(SAMPLES), local.score(SAMPLES)
    np.testing.assert_allclose(got.rewards, want.rewards, rtol=1e-5, atol=1e-5)
    for a, b in zip(got.results, want.results):
        assert a.status == b.status and a.components.keys() == b.components.keys()
        np.testing.assert_allclose(list(a.components.values()), list(b.components.values()), rtol=1e-5, atol=1e-5)
    assert len(placed.root.replicas.pids()) == 2


def test_unplaced_one_model_ensembles_are_named_for_the_launcher(models_env):
    for name in ("multihead_uwo5", "lora_uwo5"):
        spec = load_pipeline_config(f"configs/rewards/{name}.yaml").reward
        (found,) = unplaced_models(spec)
        assert found.startswith("reward (") and spec.type in found
        placed = load_pipeline_config(f"configs/rewards/{name}_placed.yaml").reward
        assert unplaced_models(placed) == [] and placement_requests(placed)[0][1].num_gpus == 1
