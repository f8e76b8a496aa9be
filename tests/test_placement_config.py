"""Placement without a cluster: the YAML schema, which models a config would load unplaced, batch splits,
the resource arithmetic of an unsatisfiable placement, and the launcher's refusal of the trainer-CPU trap."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from reward_plugins import ConfigError, load_pipeline_config, parse_pipeline_config
from reward_plugins.config import Placement
from reward_plugins.placement import placement_requests, split_even, unplaced_models

ROOT = Path(__file__).parents[1]
REWARDS = ROOT / "configs" / "rewards"
BASE = ["--actor.model_name_or_path", "policy", "--rollout.n_samples_per_prompt", "4", "--algo.advantage.estimator", "group_norm"]


def spec_of(name: str):
    return load_pipeline_config(REWARDS / name, check_paths=False).reward


def test_shipped_configs_say_which_models_would_load_in_the_caller():
    assert unplaced_models(spec_of("ensemble_uwo5.yaml")) == [f"reward.members.{i} (ensemble uwo)" for i in range(5)]
    assert unplaced_models(spec_of("reward_model.yaml")) == ["reward (reward_model rm)"]
    assert unplaced_models(spec_of("vrcli.yaml")) == ["reward.scorer (vrcli vrcli)"]
    assert unplaced_models(spec_of("vrcli_reference.yaml")) == []
    assert unplaced_models(spec_of("ensemble_uwo5_placed.yaml")) == []
    assert unplaced_models(spec_of("rm_eos_penalty.yaml")) == ["reward.inner (reward_model rm)"]
    assert unplaced_models(spec_of("weighted_sum.yaml")) == ["reward.terms.0.plugin (reward_model rm)"]


def test_placement_once_for_all_members_or_each_member():
    placed = spec_of("ensemble_uwo5_placed.yaml")
    requests = placement_requests(placed)
    assert [name for name, _ in requests] == [f"uwo.seed{s}" for s in range(1, 6)]
    assert all(p == Placement(num_gpus=1, num_cpus=1, replicas=1, max_restarts=3) for _, p in requests)

    whole = {"type": "ensemble", "name": "ens", "path_template": "/m/rm{seed}", "seeds": [1, 2], "placement": {"replicas": 2}}
    spec = parse_pipeline_config({"reward": whole}, check_paths=False).reward
    assert unplaced_models(spec) == [] and placement_requests(spec) == [("ens", Placement(replicas=2))]
    mixed = {"type": "ensemble", "name": "ens", "members": [{"path": "/m/a", "placement": {"num_gpus": 0.5}}, {"path": "/m/b"}]}
    spec = parse_pipeline_config({"reward": mixed}, check_paths=False).reward
    assert unplaced_models(spec) == ["reward.members.1 (ensemble ens)"]
    assert placement_requests(spec) == [("ens.member0", Placement(num_gpus=0.5))]


def test_bad_placements_fail_at_load_naming_the_key():
    def problems(reward: dict) -> str:
        with pytest.raises(ConfigError) as caught:
            parse_pipeline_config({"reward": reward}, check_paths=False)
        return str(caught.value)

    both = {"type": "ensemble", "path_template": "/m/{seed}", "seeds": [1], "placement": {}, "member": {"placement": {}}}
    assert "give placement once" in problems(both)
    assert "reward.placement.replicas: Input should be greater than or equal to 1" in problems(
        {"type": "reward_model", "path": "/m", "placement": {"replicas": 0}}
    )
    assert "reward.placement.gpus: unknown key" in problems({"type": "reward_model", "path": "/m", "placement": {"gpus": 1}})
    assert "whole number" in problems({"type": "reward_model", "path": "/m", "placement": {"num_gpus": 1.5}})
    external = {"type": "vrcli", "scorer": {"backend": "external", "placement": {}}}
    assert "a placement applies to backend: hf" in problems(external)


@pytest.mark.parametrize("count, parts, sizes", [(7, 2, [4, 3]), (10, 5, [2] * 5), (2, 5, [1, 1]), (0, 3, []), (5, 1, [5])])
def test_split_even_covers_every_item_once_in_order(count, parts, sizes):
    slices = split_even(count, parts)
    assert [s.stop - s.start for s in slices] == sizes
    assert [i for s in slices for i in range(count)[s]] == list(range(count))


def test_unsatisfiable_message_says_what_was_asked_and_what_the_cluster_has():
    ray_placement = pytest.importorskip("openrlhf_ext.placement")
    nodes = [{"CPU": 16.0, "GPU": 2.0}, {"CPU": 16.0, "GPU": 1.0}]
    ok = [("a", Placement(num_gpus=1, replicas=2)), ("b", Placement(num_gpus=0.5, replicas=2))]
    assert ray_placement.unsatisfiable(ok, nodes) is None
    message = ray_placement.unsatisfiable([("a", Placement(num_gpus=1, replicas=2)), ("b", Placement(num_gpus=1, replicas=2))], nodes)
    assert "asked 4 GPUs in total (a: 2 x 1, b: 2 x 1), the Ray cluster has 3 (2 node(s): 2, 1)" in message
    wide = ray_placement.unsatisfiable([("big", Placement(num_gpus=3))], nodes)
    assert "big asks 3 GPUs per replica, the largest node has 2" in wide
    assert "the Ray cluster has 0 (1 node(s): 0)" in ray_placement.unsatisfiable([("a", Placement())], [{"CPU": 2.0}])


@pytest.mark.filterwarnings("ignore:'openrlhf_ext.launch' found in sys.modules")
def test_launcher_refuses_models_on_the_trainer_cpu_before_ray_starts(monkeypatch, capsys):
    pytest.importorskip("openrlhf")
    import ray

    from openrlhf_ext import launch

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray must not start")

    monkeypatch.setattr(ray, "init", no_ray)
    argv = [*BASE, "--reward.remote_url", launch.DEFERRED_REWARD]
    monkeypatch.setattr(sys, "argv", ["launch", "--reward-config", str(REWARDS / "ensemble_uwo5.yaml"), *argv])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_module("openrlhf_ext.launch", run_name="__main__")
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "ensemble_uwo5.yaml: --reward-config scores in OpenRLHF's trainer actor, which holds no GPU" in err
    assert "reward.members.4 (ensemble uwo)" in err and "placement" in err and "openrlhf_ext.serve" in err

    for name in ("reward_model.yaml", "vrcli.yaml"):
        with pytest.raises(launch.LaunchError, match="would load and run on its CPU"):
            launch.preflight(launch.parse_openrlhf_args(argv), str(REWARDS / name))
    assert launch.preflight(launch.parse_openrlhf_args(argv), str(REWARDS / "ensemble_uwo5_placed.yaml")) == []
    assert launch.main(["--dry-run", "--reward-config", str(REWARDS / "ensemble_uwo5_placed.yaml"), *argv]) == 0


def test_without_a_placer_a_placement_is_ignored_loudly(rm_dirs, caplog):
    from reward_plugins.pipeline import build_pipeline
    from reward_plugins.reward_model import RewardModelPlugin

    reward = {"type": "reward_model", "name": "rm", "path": str(rm_dirs[1]), "placement": {"num_gpus": 1}}
    with caplog.at_level("WARNING", logger="reward_plugins.placement"):
        pipeline = build_pipeline(parse_pipeline_config({"reward": reward}))
    assert isinstance(pipeline.root, RewardModelPlugin)
    assert "rm has a placement but this process has no placer (Ray); its model loads here" in caplog.text


def test_failure_text_keeps_the_exception_not_the_traceback():
    ray_placement = pytest.importorskip("openrlhf_ext.placement")
    remote = (
        "The actor died because of an error raised in its creation task, ray::_Replica.__init__() (pid=1)\n"
        '  File "x.py", line 3, in __init__\n    self.obj = factory()\n'
        "ValueError: Couldn't instantiate the backend tokenizer from one of:\n(1) a tokenizers file\n"
    )
    assert ray_placement.failure_text(remote) == "ValueError: Couldn't instantiate the backend tokenizer from one of:\n(1) a tokenizers file"
    assert ray_placement.failure_text("the actor was killed\n") == "the actor was killed"
