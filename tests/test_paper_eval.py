"""The VR-CLI authors' held-out evaluation on OpenRLHF 0.11.2: top-p / top-k for eval sampling and an eval before
training, carried from the launcher to the trainer; and the scripts' two eval presets."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from openrlhf_ext import launch
from openrlhf_ext.experience_maker import evaluate_before_training, plugin_evaluate
from openrlhf_ext.settings import HookSettings

ROOT = Path(__file__).resolve().parents[1]


def test_eval_settings_travel_through_the_runtime_env():
    settings = HookSettings("/r.yaml", "/e", 8, 0.8, 20, True)
    env = settings.env_vars()
    assert HookSettings.from_env(env) == settings
    assert HookSettings.from_env({}).eval_sampling() == {} and not HookSettings.from_env({}).eval_at_start
    ours, rest = launch.split_argv(["--eval-top-p", "0.8", "--eval-top-k", "20", "--eval-before-training", "--",
                                    "--eval.split", "test"])
    assert (ours.eval_top_p, ours.eval_top_k, ours.eval_before_training) == (0.8, 20, True)
    assert rest == ["--eval.split", "test"]


class FakeTrainer:
    """The parts of OpenRLHF's PPOTrainer the wrappers touch: evaluate samples with the kwargs it is given."""

    def __init__(self, settings: HookSettings, resumed_step: int = 0):
        self.experience_maker = SimpleNamespace(settings=settings, pipeline=None)
        self.samples_generator = SimpleNamespace(generate_eval_samples=self._generate)
        self.generate_kwargs = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 16}
        self.args = SimpleNamespace(eval=SimpleNamespace(temperature=0.7, n_samples_per_prompt=1))
        self.eval_dataloader = [object()]
        self.resumed_step = resumed_step
        self.calls: list = []

    def _generate(self, **kwargs):
        self.calls.append(("sample", kwargs))
        return []

    def init_checkpoint_states(self):
        return {"global_step": self.resumed_step}

    def evaluate(self, global_step, **kwargs):
        return plugin_evaluate(FakeTrainer._evaluate)(self, global_step, **kwargs)

    def _evaluate(self, global_step, **kwargs):
        self.samples_generator.generate_eval_samples(**kwargs)
        return {}

    def fit(self, global_step=0):
        self.calls.append(("fit", global_step))


def test_paper_eval_samples_with_top_p_top_k_and_evaluates_first():
    trainer = FakeTrainer(HookSettings(None, None, None, 0.8, 20, True))
    evaluate_before_training(FakeTrainer.fit)(trainer)
    (kind, kwargs), fit = trainer.calls
    assert kind == "sample" and fit == ("fit", 0)
    assert (kwargs["temperature"], kwargs["top_p"], kwargs["top_k"], kwargs["n_samples_per_prompt"]) == (0.7, 0.8, 20, 1)


def test_no_eval_before_a_resumed_run_or_without_the_setting():
    resumed = FakeTrainer(HookSettings(None, None, None, 0.8, 20, True), resumed_step=16)
    evaluate_before_training(FakeTrainer.fit)(resumed)
    assert resumed.calls == [("fit", 0)]
    plain = FakeTrainer(HookSettings(None, None, None))
    evaluate_before_training(FakeTrainer.fit)(plain)
    assert plain.calls == [("fit", 0)]
    plain.evaluate(8, **plain.generate_kwargs)
    assert plain.calls[-1][1]["top_p"] == 1.0  # the rollout's settings when none are given


def dry_run(script: str, **env) -> str:
    result = subprocess.run(["bash", str(ROOT / "scripts" / script)], capture_output=True, text=True, check=True,
                            env={**os.environ, "DRY_RUN": "1", "PYTHON": "python3", **env})
    return result.stdout


@pytest.mark.parametrize("script", ["train_7b.sh", "train_3b.sh"])
def test_scripts_offer_the_paper_eval_and_ours(script):
    paper = dry_run(script)
    for flag in ("--eval.split test", "--eval.temperature 0.7", "--eval-top-p 0.8", "--eval-top-k 20",
                 "--eval-before-training", "--eval.n_samples_per_prompt 1"):
        assert flag in paper, flag
    ours = dry_run(script, EVAL_PRESET="ours")
    assert "--eval.split validation" in ours and "--eval-top-p" not in ours and "--eval.temperature 1.0" in ours
    with pytest.raises(subprocess.CalledProcessError):
        dry_run(script, EVAL_PRESET="nope")


def test_baseline_command_uses_the_reward_sides_numerics():
    """BASELINES=1 prints the baseline command with the dtype and attention kernel the reference model runs."""
    out = dry_run("train_7b.sh", STAGE="baselines")
    assert "setup_data/compute_baseline_perplexity.py" in out
    assert "--torch_dtype bfloat16" in out and "--attn_implementation flash_attention_2" in out
    train = dry_run("train_7b.sh")
    assert "--ds.param_dtype bf16" in train and "--ds.attn_implementation flash_attention_2" in train
