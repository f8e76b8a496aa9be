"""Run folders: a rerun resumes only what matches its settings, --fresh moves the old run aside, --resume force
continues anyway, and Ctrl-C says where the same command resumes (GRPO, PPO, SFT, RM)."""

from __future__ import annotations

import json
import random

import pytest
import yaml

from reward_plugins.io import write_jsonl
from setup_data import synthetic_task as st
from trl_ext import ppo as ppo_mod
from trl_ext import run_dir, sft, train, train_rm
from trl_ext.config import load_config
from trl_ext.reward_adapter import PipelineRewardFunc
from trl_ext.run_dir import SETTINGS_FILE, RunMismatch, open_run_dir

SETTINGS = {"algorithm": "grpo", "learning_rate": 1e-6, "world_size": 1, "seed": 0}


def checkpoint(folder, step):
    (folder / f"checkpoint-{step}").mkdir(parents=True)
    (folder / f"checkpoint-{step}" / "model.safetensors").write_text("x")


def test_first_run_records_settings_and_a_matching_rerun_resumes(tmp_path):
    out = tmp_path / "run"
    assert open_run_dir(out, SETTINGS) is None
    assert json.loads((out / SETTINGS_FILE).read_text()) == {"settings": SETTINGS}
    checkpoint(out, 2)
    checkpoint(out, 10)
    (out / "checkpoint-11").mkdir()  # empty: a checkpoint that never got written
    assert open_run_dir(out, dict(SETTINGS)) == out / "checkpoint-10"


def test_other_settings_are_refused_in_one_line_naming_them(tmp_path):
    out = tmp_path / "run"
    open_run_dir(out, SETTINGS)
    checkpoint(out, 200)
    with pytest.raises(RunMismatch) as info:
        open_run_dir(out, {**SETTINGS, "learning_rate": 0.1, "world_size": 2, "policy": "m"})
    message = str(info.value)
    assert "\n" not in message
    assert message == (f"{out} was trained with other settings: learning_rate 1e-06 -> 0.1; policy (none) -> m; "
                       "world_size 1 -> 2. --fresh moves it aside and starts over; --resume force continues it anyway")
    assert json.loads((out / SETTINGS_FILE).read_text()) == {"settings": SETTINGS}  # nothing changed


def test_fresh_moves_the_old_run_aside_and_never_deletes(tmp_path, capsys):
    out = tmp_path / "run"
    open_run_dir(out, SETTINGS)
    checkpoint(out, 5)
    new = {**SETTINGS, "seed": 1}
    assert open_run_dir(out, new, "fresh") is None
    assert (tmp_path / "run.old-1" / "checkpoint-5" / "model.safetensors").exists()
    assert json.loads((tmp_path / "run.old-1" / SETTINGS_FILE).read_text())["settings"] == SETTINGS
    assert json.loads((out / SETTINGS_FILE).read_text()) == {"settings": new}
    checkpoint(out, 1)
    open_run_dir(out, SETTINGS, "fresh")
    assert (tmp_path / "run.old-2" / "checkpoint-1").exists() and (tmp_path / "run.old-1" / "checkpoint-5").exists()
    assert f"moved the old run folder {out} to {tmp_path / 'run.old-2'}" in capsys.readouterr().out


def test_force_continues_and_keeps_the_earlier_settings(tmp_path):
    out = tmp_path / "run"
    open_run_dir(out, SETTINGS)
    checkpoint(out, 3)
    changed = {**SETTINGS, "learning_rate": 0.1}
    assert open_run_dir(out, changed, "force") == out / "checkpoint-3"
    assert json.loads((out / SETTINGS_FILE).read_text()) == {"settings": changed, "earlier": [SETTINGS]}
    assert open_run_dir(out, changed) == out / "checkpoint-3"  # the recorded settings are now the forced ones


def test_unknown_folders_are_refused_but_empty_ones_are_used(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    assert open_run_dir(out, SETTINGS) is None  # empty: nothing to protect
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(RunMismatch, match=f"{foreign} already holds files but no {SETTINGS_FILE}"):
        open_run_dir(foreign, SETTINGS)
    assert open_run_dir(foreign, SETTINGS, "force") is None and (foreign / "notes.txt").exists()


def test_a_run_stopped_before_writing_anything_does_not_block(tmp_path):
    out = tmp_path / "run"
    open_run_dir(out, SETTINGS)  # then, say, the data file was bad: only the settings file exists
    assert open_run_dir(out, {**SETTINGS, "learning_rate": 0.5}) is None


def test_other_ranks_decide_the_same_but_write_nothing(tmp_path, monkeypatch):
    out = tmp_path / "run"
    open_run_dir(out, SETTINGS)
    checkpoint(out, 4)
    monkeypatch.setenv("RANK", "1")
    assert open_run_dir(out, SETTINGS, "fresh") is None
    assert (out / "checkpoint-4").exists() and not (tmp_path / "run.old-1").exists()
    with pytest.raises(RunMismatch):
        open_run_dir(out, {**SETTINGS, "seed": 3})


def test_unreadable_settings_are_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / SETTINGS_FILE).write_text("{not json")
    (out / "checkpoint-1").mkdir()
    with pytest.raises(RunMismatch, match="cannot be read"):
        open_run_dir(out, SETTINGS)


def test_interrupted_message(tmp_path):
    assert run_dir.interrupted_message(tmp_path / "none", 3) == (
        "interrupted at step 3; no checkpoint yet, so the same command starts over")
    checkpoint(tmp_path, 2)
    assert run_dir.interrupted_message(tmp_path, 3) == "interrupted at step 3; the same command resumes from checkpoint-2"
    assert run_dir.interrupted_message(tmp_path, None) == "interrupted; the same command resumes from checkpoint-2"


# ---------------------------------------------------------------- the training commands


@pytest.fixture()
def setup(tmp_path, lm_dir):
    rng = random.Random(0)
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, st.prompt_rows(st.sample_tasks(16, rng)))
    reward = tmp_path / "short.yaml"
    reward.write_text(yaml.safe_dump({"reward": {"type": "length_penalty", "name": "short", "coef": 0.05,
                                                 "unit": "chars"}}))
    return {"policy": lm_dir, "prompts": prompts, "reward": reward, "out": tmp_path / "grpo"}


def grpo_args(s, *extra):
    return ["--set", f"policy={s['policy']}", "--set", f"reward_config={s['reward']}",
            "--set", f"train_data={s['prompts']}", "--set", f"output_dir={s['out']}", "--set", "table_every=0",
            "--set", "trl={max_steps: 3, per_device_train_batch_size: 4, num_generations: 4, "
                     "max_completion_length: 4, learning_rate: 0.01, save_steps: 1, logging_steps: 1}", *extra]


def test_grpo_ctrl_c_then_resume_then_refuse_other_settings(setup, monkeypatch, capsys):
    original, calls = PipelineRewardFunc.__call__, []

    def interrupt_third_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PipelineRewardFunc, "__call__", interrupt_third_step)
    assert train.main(grpo_args(setup)) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "trl_ext.train: interrupted at step 2; the same command resumes from checkpoint-2")
    monkeypatch.setattr(PipelineRewardFunc, "__call__", original)
    assert train.main(grpo_args(setup)) == 0  # the same command: resumes from checkpoint-2, trains step 3
    out = setup["out"]
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and (out / "final" / "model.safetensors").exists()
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3]
    recorded = json.loads((out / SETTINGS_FILE).read_text())["settings"]
    assert recorded["algorithm"] == "grpo" and recorded["policy"] == str(setup["policy"])
    assert recorded["reward_config"].startswith("sha256:") and recorded["world_size"] == 1
    # the README's second command: the same folder under torchrun with 2 processes
    monkeypatch.setenv("WORLD_SIZE", "2")
    capsys.readouterr()
    assert train.main(grpo_args(setup)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was trained with other settings: world_size 1 -> 2." in err[0] and "--fresh" in err[0]
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert train.main(grpo_args(setup, "--set", "trl.learning_rate=0.1")) == 2
    assert "learning_rate 0.01 -> 0.1" in capsys.readouterr().err


def test_grpo_fresh_trains_anew_beside_the_old_run(setup):
    cfg = train.parse_args(grpo_args(setup, "--set", "trl.max_steps=1"))
    train.run(cfg)
    changed = cfg.model_copy(update={"trl": {**cfg.trl, "learning_rate": 0.1}})
    with pytest.raises(RunMismatch):
        train.run(changed)
    train.run(changed, "fresh")
    old = setup["out"].with_name("grpo.old-1")
    assert (old / "final" / "model.safetensors").exists() and (setup["out"] / "final" / "model.safetensors").exists()
    assert json.loads((setup["out"] / SETTINGS_FILE).read_text())["settings"]["learning_rate"] == 0.1


def ppo_cfg(s, **fields):
    settings = {"max_steps": 3, "batch_size": 4, "mini_batch_size": 4, "ppo_epochs": 1, "max_new_tokens": 4,
                "learning_rate": 0.01, "save_steps": 1, "sample_rows": 0, **fields}
    return ["--set", "algorithm=ppo", "--set", f"policy={s['policy']}", "--set", f"reward_config={s['reward']}",
            "--set", f"train_data={s['prompts']}", "--set", f"output_dir={s['out']}", "--set", "table_every=0",
            "--set", f"ppo={json.dumps(settings)}"]


def test_ppo_ctrl_c_resume_and_refusal(setup, monkeypatch, capsys):
    original, calls = ppo_mod.sample, []

    def interrupt_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(ppo_mod, "sample", interrupt_third_step)
    assert train.main(ppo_cfg(setup)) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "trl_ext.train: interrupted at step 2; the same command resumes from checkpoint-2")
    monkeypatch.setattr(ppo_mod, "sample", original)
    assert train.main(ppo_cfg(setup)) == 0
    metrics = [json.loads(line)["step"] for line in (setup["out"] / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [1, 2, 3]
    capsys.readouterr()
    assert train.main(ppo_cfg(setup, learning_rate=0.5)) == 2
    assert "learning_rate 0.01 -> 0.5" in capsys.readouterr().err


def test_sft_and_rm_refuse_a_folder_trained_otherwise(tmp_path, lm_dir):
    data = tmp_path / "sft.jsonl"
    write_jsonl(data, [{"prompt": "Q: 1+1? A:", "completion": " 2"}] * 4)
    out = tmp_path / "sft"
    cfg = load_config(sft.SFTRunConfig, None, [f"model={lm_dir}", f"train_data={data}", f"output_dir={out}",
                                               "trl={learning_rate: 0.001}"])
    out.mkdir()
    (out / SETTINGS_FILE).write_text(json.dumps({"settings": {"algorithm": "sft", "learning_rate": 0.5}}))
    checkpoint(out, 1)
    with pytest.raises(RunMismatch, match=r"learning_rate 0.5 -> 0.001;.*model \(none\) -> "):
        sft.run(cfg)
    prefs = tmp_path / "prefs.jsonl"
    write_jsonl(prefs, [{"prompt": "Q", "chosen": " good", "rejected": " bad"}] * 4)
    rm_cfg = load_config(train_rm.RMRunConfig, None, [f"base={lm_dir}", f"train_data={prefs}",
                                                      f"output_root={tmp_path}", "seed=1"])
    folder = rm_cfg.output_dir
    folder.mkdir()
    (folder / SETTINGS_FILE).write_text(json.dumps({"settings": {"algorithm": "rm", "seed": 2}}))
    (folder / "model.safetensors").write_text("x")
    with pytest.raises(RunMismatch, match=r"seed 2 -> 1"):
        train_rm.train_rm(rm_cfg)
