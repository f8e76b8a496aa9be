"""Placed plugins on a local CPU Ray cluster: same scores as unplaced ones, no sample lost when a replica dies,
and a clear refusal when the cluster cannot hold the placement. Actors ask for a quarter CPU so several fit."""

from __future__ import annotations

import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from openrlhf_ext.placement import PlacementError, RayPlacer  # noqa: E402
from reward_plugins import Sample, Status, parse_pipeline_config  # noqa: E402
from reward_plugins.pipeline import build_pipeline  # noqa: E402
from reward_plugins.placement import PlacedMember, PlacedPlugin  # noqa: E402

ON_CPU = {"num_gpus": 0, "num_cpus": 0.25, "max_restarts": 1, "ready_timeout_s": 300}  # generous: a loaded CI box starts actors slowly
SAMPLES = [Sample(prompt=f"Prompt {i}. ", response="the dragon paints " * (i + 1)) for i in range(6)] + [
    Sample(prompt="Empty. ", response="  ")
]
LABELS = [
    {"context": "Write the next chapter about the dragon.", "gold": "She opened the door and smiled at the sea.", "baseline_ppl": 50.0},
    {"context": "The storm hits the harbour.", "gold": "Chapter two begins with a ship in trouble.", "baseline_ppl": 80.0},
    {"context": "A short story.", "gold": "The quick brown fox jumps over the lazy dog.", "baseline_ppl": 120.0},
]
PLANS = ["In summary: the hero leaves.", "Detailed Plan: a ship sinks.", "no marker here"]


@pytest.fixture(scope="module")
def cluster():
    env = {"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=env)
    yield
    ray.shutdown()


@pytest.fixture()
def placer(cluster):
    placer = RayPlacer()
    yield placer
    placer.close()


def both(reward: dict, placer: RayPlacer, on_error: str = "penalty"):
    config = parse_pipeline_config({"reward": reward, "on_error": on_error, "error_penalty": -1.0})
    return build_pipeline(config, placer), build_pipeline(config)


def assert_same(placed, local):
    assert [r.status for r in placed.results] == [r.status for r in local.results]
    assert [r.error for r in placed.results] == [r.error for r in local.results]
    np.testing.assert_allclose(np.array(placed.rewards, dtype=float), np.array(local.rewards, dtype=float), rtol=1e-5, atol=1e-5)
    for a, b in zip(placed.results, local.results):
        assert a.components.keys() == b.components.keys()
        np.testing.assert_allclose(list(a.components.values()), list(b.components.values()), rtol=1e-5, atol=1e-5)


def test_reward_model_replicas_match_unplaced_and_survive_a_killed_replica(placer, rm_dirs):
    reward = {"type": "reward_model", "name": "rm", "path": str(rm_dirs[1]), "batch_size": 2, "placement": {**ON_CPU, "replicas": 2}}
    placed, local = both(reward, placer)
    assert isinstance(placed.root, PlacedPlugin) and placed.log_keys == local.log_keys
    expected = local.score(SAMPLES)
    assert expected.results[-1].status is Status.ERROR and expected.results[0].status is Status.OK
    assert_same(placed.score(SAMPLES), expected)

    group = placed.root.replicas
    before = group.pids()
    pending = group.submit("score", SAMPLES)
    ray.kill(group.actors[0], no_restart=False)
    results = pending.result()
    assert len(results) == len(SAMPLES)
    np.testing.assert_allclose([r.reward or -1.0 for r in results], np.array(expected.rewards, dtype=float), rtol=1e-5, atol=1e-5)
    deadline = time.monotonic() + 90
    while group.alive != [0, 1] and time.monotonic() < deadline:
        group.refresh(timeout=1.0)
    while True:  # a kill that lands after replica 0 finished its share leaves it restarting, still in the live set
        try:
            after = group.pids()
            break
        except ray.exceptions.RayActorError:
            assert time.monotonic() < deadline, "the killed replica did not come back within 90 s"
            time.sleep(0.5)
    assert after[0] != before[0] and after[1] == before[1], "Ray restarted the killed replica, the other kept running"

    ray.kill(group.actors[1], no_restart=True)
    assert_same(placed.score(SAMPLES), expected)
    assert group.alive == [0] and group.gone == {1}, "the batch of the replica gone for good went to the live one"


def test_ensemble_members_placed_each_or_all_at_once_match_unplaced(placer, rm_dirs):
    template = str(rm_dirs[1]).replace("rm_seed1", "rm_seed{seed}")
    base = {"type": "ensemble", "name": "ens", "objective": "uwo", "uwo_weight": 0.5, "path_template": template, "seeds": [1, 2]}
    member = {"template": "{prompt}{label[hint]} {response}"}
    samples = [Sample(s.prompt, s.response, label={"hint": f"h{i}"}) for i, s in enumerate(SAMPLES)]
    samples[2] = Sample("No hint. ", "a response", label={})
    each, local = both({**base, "member": {**member, "placement": ON_CPU}}, placer)
    assert all(isinstance(m, PlacedMember) for m in each.root.members)
    expected = local.score(samples)
    assert "ens: a member template needs 'hint' from the sample/label" in expected.results[2].error
    assert [r.status for r in expected.results].count(Status.OK) == len(samples) - 2
    assert_same(each.score(samples), expected)

    whole, _ = both({**base, "member": member, "placement": ON_CPU}, placer)
    assert isinstance(whole.root, PlacedPlugin)
    assert_same(whole.score(samples), expected)


def test_vrcli_placed_scorer_matches_unplaced(placer, lm_dir):
    reward = {"type": "vrcli", "name": "vr", "plan": {"whole_response_fallback": False},
              "scorer": {"model": str(lm_dir), "batch_size": 2, "placement": ON_CPU}}
    placed, local = both(reward, placer)
    samples = [Sample(prompt="p", response=plan, label=label) for plan, label in zip(PLANS, LABELS)]
    expected = local.score(samples)
    assert [r.status for r in expected.results] == [Status.OK, Status.OK, Status.ERROR]
    assert_same(placed.score(samples), expected)


def test_placed_vrcli_checks_baseline_fingerprints_like_a_local_one(placer, lm_dir):
    """The trainer holds only the placed proxy; the fingerprint check runs in a replica, against its scorer."""
    from reward_plugins.registry import check_baselines
    from reward_plugins.vrcli import BaselineMismatchError, has_vrcli

    reward = {"type": "vrcli", "name": "vr", "scorer": {"model": str(lm_dir), "max_length": 256, "placement": ON_CPU}}
    placed, local = both(reward, placer)
    assert has_vrcli(placed.root) and has_vrcli(local.root)
    stamp = local.root.fingerprint()
    assert stamp["max_length"] == 256
    good = [{**LABELS[0], "baseline_fingerprint": stamp}]
    bad = [{**LABELS[0], "baseline_fingerprint": {**stamp, "max_length": 4096}}]
    for pipeline in (placed, local):
        check_baselines(pipeline.root, good)
        with pytest.raises(BaselineMismatchError, match="max_length: baseline 4096, reward 256"):
            check_baselines(pipeline.root, bad)


def test_unsatisfiable_placement_fails_at_start_saying_what_was_asked(placer, rm_dirs):
    reward = {"type": "reward_model", "name": "rm", "path": str(rm_dirs[1]), "placement": {"num_gpus": 1, "replicas": 2}}
    config = parse_pipeline_config({"reward": reward})
    with pytest.raises(PlacementError, match=r"asked 2 GPUs in total \(rm: 2 x 1\), the Ray cluster has 0"):
        build_pipeline(config, placer)

    hold = ray.util.placement_group([{"CPU": 2}])
    ray.get(hold.ready())
    try:
        reward["placement"] = {**ON_CPU, "ready_timeout_s": 1}
        started = time.monotonic()
        with pytest.raises(PlacementError, match=r"not granted within 1 s; the cluster has 0 GPUs"):
            build_pipeline(parse_pipeline_config({"reward": reward}), placer)
        assert time.monotonic() - started < 30
    finally:
        ray.util.remove_placement_group(hold)


def test_serve_builds_placed_plugins_in_the_ray_cluster(cluster, monkeypatch, tmp_path, rm_dirs):
    from openrlhf_ext import serve

    config = tmp_path / "placed.yaml"
    config.write_text(
        "on_error: penalty\nerror_penalty: -1.0\nreward:\n  type: reward_model\n  name: rm\n"
        f"  path: {rm_dirs[2]}\n  placement: {{num_gpus: 0, num_cpus: 0.25, replicas: 1}}\n"
    )
    built = {}
    def fake_app(scorer, settings, health):
        built["health"] = health
        return built.setdefault("scorer", scorer)

    monkeypatch.setattr(serve, "create_app", fake_app)
    monkeypatch.setattr(serve, "uvicorn_config", lambda app, settings, **kwargs: built.setdefault("kwargs", kwargs))

    class NoServer:
        def __init__(self, config):
            pass

        def run(self):
            pass

    monkeypatch.setattr(serve.uvicorn, "Server", NoServer)
    serve.main(["--config", str(config), "--ray-address", "auto"])
    root = built["scorer"].pipeline.root
    assert isinstance(root, PlacedPlugin) and built["kwargs"]["host"] == "127.0.0.1"
    assert built["health"]() is None, "the server reports the replicas' health"
    try:
        local = build_pipeline(parse_pipeline_config({"reward": {"type": "reward_model", "name": "rm", "path": str(rm_dirs[2])}}))
        np.testing.assert_allclose(root.score(SAMPLES[:3])[0].reward, local.score(SAMPLES[:3]).rewards[0], rtol=1e-5)
    finally:
        root.replicas.close()
