"""Every training script's DRY_RUN command line goes through OpenRLHF 0.11.2's real parser and validation."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("openrlhf")

from openrlhf_ext import launch  # noqa: E402

SCRIPTS = Path(__file__).parents[1] / "scripts"
TRAIN_SCRIPTS = ["train_7b.sh", "train_3b.sh", "train_ppo_rm.sh", "train_ppo_ensemble.sh"]


def dry_run(script: str, **env: str) -> list[str]:
    result = subprocess.run(
        ["bash", str(SCRIPTS / script)], env={**os.environ, "DRY_RUN": "1", **env}, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


@pytest.mark.parametrize("script", TRAIN_SCRIPTS)
def test_script_command_passes_openrlhf_parser(script, capsys):
    argv = dry_run(script)
    assert argv[1:3] == ["-m", "openrlhf_ext.launch"]
    assert launch.main(["--dry-run", *argv[3:]]) == 0
    assert "ok: runtime_env" in capsys.readouterr().out


def test_scripts_resolve_paper_settings():
    ours, rest = launch.split_argv(dry_run("train_3b.sh")[3:])
    args = launch.parse_openrlhf_args(rest)
    assert args.actor.model_name_or_path == "Qwen/Qwen2.5-3B-Instruct" and args.rollout.n_samples_per_prompt == 16
    assert args.algo.advantage.estimator == "group_norm" and args.algo.kl.use_loss and args.algo.kl.estimator == "k3"
    assert args.actor.adam.lr == 5e-7 and args.algo.kl.init_coef == 1e-6 and ours.reward_config.endswith("vrcli_reference.yaml")
    assert args.actor.loss_agg_mode == "seq-mean-token-mean"  # the paper: mean per sequence, then across sequences
    assert args.eval.dataset == args.data.prompt_dataset and args.eval.split == "test" and args.eval.steps == 8
    assert args.eval.temperature == 0.7 and (ours.eval_top_p, ours.eval_top_k, ours.eval_before_training) == (0.8, 20, True)
    _, rest = launch.split_argv(dry_run("train_7b.sh")[3:])
    assert launch.parse_openrlhf_args(rest).rollout.n_samples_per_prompt == 8
    _, rest = launch.split_argv(dry_run("train_ppo_ensemble.sh")[3:])
    ppo = launch.parse_openrlhf_args(rest)
    assert ppo.algo.advantage.estimator == "gae" and ppo.reward.remote_url == ["http://127.0.0.1:5000/get_reward"]
    assert ppo.critic.model_name_or_path == ppo.actor.model_name_or_path


def test_environment_overrides_reach_the_command():
    argv = dry_run("train_7b.sh", POLICY="/models/p", N_SAMPLES="4", EXTRA_ARGS="--ckpt.save_hf --ckpt.max_num 2")
    _, rest = launch.split_argv(argv[3:])
    args = launch.parse_openrlhf_args(rest)
    assert args.actor.model_name_or_path == "/models/p" and args.rollout.n_samples_per_prompt == 4
    assert args.ckpt.save_hf and args.ckpt.max_num == 2


def test_a_flag_openrlhf_rejects_fails_the_dry_run():
    argv = dry_run("train_ppo_rm.sh", EXTRA_ARGS="--generate_max_len 1024")
    with pytest.raises(launch.LaunchError, match="rejected"):
        launch.main(["--dry-run", *argv[3:]])


@pytest.mark.parametrize("kind", ["multihead", "lora"])
def test_ppo_ensemble_script_scores_a_one_pass_ensemble_in_the_trainer(kind, capsys):
    argv = dry_run("train_ppo_ensemble.sh", ENSEMBLE=kind)
    assert launch.main(["--dry-run", *argv[3:]]) == 0, "the launcher's checks accept the placed config"
    ours, rest = launch.split_argv(argv[3:])
    assert ours.reward_config.endswith(f"configs/rewards/{kind}_uwo5_placed.yaml")
    args = launch.parse_openrlhf_args(rest)
    assert args.reward.remote_url == [launch.DEFERRED_REWARD] and args.algo.advantage.estimator == "gae"
    assert args.ckpt.path.endswith(f"runs/ppo_{kind}_uwo0.1/checkpoints") and ours.eval_dir.endswith(f"ppo_{kind}_uwo0.1/eval")
    unplaced = dry_run("train_ppo_ensemble.sh", ENSEMBLE=kind, REWARD_CONFIG=f"configs/rewards/{kind}_uwo5.yaml")
    with pytest.raises(launch.LaunchError, match="trainer actor, which holds no GPU"):
        launch.main(["--dry-run", *unplaced[3:]])


def test_ppo_ensemble_script_refuses_an_unknown_ensemble():
    result = subprocess.run(["bash", str(SCRIPTS / "train_ppo_ensemble.sh")], capture_output=True, text=True, timeout=30,
                            env={**os.environ, "DRY_RUN": "1", "ENSEMBLE": "multi-head"})
    assert result.returncode == 2 and "ENSEMBLE must be models, multihead or lora, got 'multi-head'" in result.stderr
