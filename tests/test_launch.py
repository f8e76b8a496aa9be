"""The launcher: exact openrlhf version, OpenRLHF's own parser, and refusals of setups that cannot work."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

pytest.importorskip("openrlhf")

from openrlhf_ext import launch  # noqa: E402
from openrlhf_ext.ref_scorer import ReferenceModelError  # noqa: E402
from openrlhf_ext.settings import ENV_CONFIG, ENV_EVAL_DIR, ENV_EVAL_EVERY, HookSettings  # noqa: E402
from openrlhf_ext.version import REQUIRED_OPENRLHF, OpenRLHFVersionError, check_openrlhf_version  # noqa: E402

ROOT = Path(__file__).parents[1]
VRCLI_REF = str(ROOT / "configs" / "rewards" / "vrcli_reference.yaml")
BASE = ["--actor.model_name_or_path", "policy", "--rollout.n_samples_per_prompt", "4", "--algo.advantage.estimator", "group_norm"]


def test_version_must_match_exactly(monkeypatch):
    assert check_openrlhf_version() == REQUIRED_OPENRLHF == importlib.metadata.version("openrlhf")
    for other in ("0.11.1", "0.11.2.post1", "0.10.1.post2"):
        with pytest.raises(OpenRLHFVersionError, match=f"openrlhf {other} is installed"):
            check_openrlhf_version(other)

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.11.1")
    with pytest.raises(OpenRLHFVersionError, match="0.11.1"):
        launch.main(["--dry-run", *BASE])
    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(OpenRLHFVersionError, match="not installed"):
        check_openrlhf_version()


def test_arguments_split_between_launcher_and_openrlhf():
    ours, rest = launch.split_argv(["--reward-config", "x.yaml", "--eval-every", "5", "--", "--eval.steps", "3", "--actor.model_name_or_path", "p"])
    assert (ours.reward_config, ours.eval_every, ours.eval_dir) == ("x.yaml", 5, None)
    assert rest == ["--eval.steps", "3", "--actor.model_name_or_path", "p"]


def test_real_parser_accepts_and_rejects():
    args = launch.parse_openrlhf_args([*BASE, "--reward.remote_url", "a.py,b.py", "--rollout.temperature", "0.7"])
    assert args.reward.remote_url == ["a.py", "b.py"], "validation rules ran (remote_url split on commas)"
    assert args.rollout.temperature == 0.7 and args.algo.advantage.estimator == "group_norm"
    with pytest.raises(launch.LaunchError, match="rejected"):
        launch.parse_openrlhf_args([*BASE, "--prompt_max_len", "1024"])  # a pre-0.11 flag
    with pytest.raises(launch.LaunchError, match="n_samples_per_prompt > 1"):
        launch.parse_openrlhf_args(["--algo.advantage.estimator", "group_norm"])


def test_preflight_refuses_vrcli_setups_that_cannot_work():
    good = [*BASE, "--reward.remote_url", launch.DEFERRED_REWARD, "--algo.kl.init_coef", "1e-6"]
    assert launch.preflight(launch.parse_openrlhf_args(good), VRCLI_REF) == []
    with pytest.raises(ReferenceModelError, match="init_coef 0"):
        launch.preflight(launch.parse_openrlhf_args([*good, "--algo.kl.init_coef", "0"]), VRCLI_REF)
    with pytest.raises(ReferenceModelError, match="rollout.temperature is 0.6"):
        launch.preflight(launch.parse_openrlhf_args([*good, "--rollout.temperature", "0.6"]), VRCLI_REF)
    with pytest.raises(launch.LaunchError, match="deferred_reward.py"):
        launch.preflight(launch.parse_openrlhf_args([*BASE, "--algo.kl.init_coef", "1e-6"]), VRCLI_REF)
    with pytest.raises(launch.LaunchError, match="--reward-config, which is missing"):
        launch.preflight(launch.parse_openrlhf_args(good), None)
    with pytest.raises(launch.LaunchError, match="dynamic_filtering"):
        launch.preflight(launch.parse_openrlhf_args([*good, "--algo.dynamic_filtering_enable"]), VRCLI_REF)


def test_runtime_env_carries_hook_and_settings():
    env = launch.runtime_env(HookSettings("/r.yaml", "/e", 7), environ={"NCCL_DEBUG": "INFO"})
    assert env["worker_process_setup_hook"] == "openrlhf_ext.hooks.install"
    assert env["env_vars"][ENV_CONFIG] == "/r.yaml" and env["env_vars"][ENV_EVAL_EVERY] == "7"
    assert env["env_vars"][ENV_EVAL_DIR] == "/e" and env["env_vars"]["NCCL_DEBUG"] == "INFO"
    assert env["env_vars"]["RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"] == "1"
    settings = HookSettings.from_env(env["env_vars"], eval_steps=float("inf"), output_dir="/out")
    assert settings == HookSettings("/r.yaml", "/e", 7)
    assert HookSettings.from_env({}, eval_steps=float("inf"), output_dir="/out").eval_every is None
    assert HookSettings.from_env({}, eval_steps=20, output_dir="/out") == HookSettings(None, "/out/eval", 20)


def test_unreachable_reward_server_is_refused_before_ray():
    with pytest.raises(launch.LaunchError, match="does not answer http://127.0.0.1:9/health"):
        launch.check_reward_servers(["http://127.0.0.1:9/get_reward"], timeout=1.0)
    launch.check_reward_servers([launch.DEFERRED_REWARD])


def test_shim_and_trainer_configs_travel_in_separate_variables():
    env = launch.runtime_env(HookSettings("/trainer.yaml", "/e", None), environ={}, shim_config="/shim.yaml")
    assert env["env_vars"][ENV_CONFIG] == "/trainer.yaml"
    assert env["env_vars"]["REWARD_PLUGINS_CONFIG"] == "/shim.yaml"
    assert ENV_CONFIG != "REWARD_PLUGINS_CONFIG"
    assert "REWARD_PLUGINS_CONFIG" not in launch.runtime_env(HookSettings(None, "/e", None), environ={})["env_vars"]
