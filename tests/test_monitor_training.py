"""The monitor inside real training runs on tiny models: PPO (trl_ext.ppo) and TRL's GRPO / RLOO.

Thresholds are set so the alarm fires at a known step (divergence > -1000 holds from the first full window), so
the actions can be checked exactly: `adapt_kl` changes the coefficient the loss uses, `stop` keeps the checkpoint
with the best monitor score and a rerun resumes from it, and the `monitor/*` keys are the same on every step.
"""

from __future__ import annotations

import json
import random

import monitor_gold_stub
import pytest
import torch
import yaml
from safetensors.torch import load_file

from evaluation.eval_files import list_eval_files, read_eval_file
from reward_plugins.config import ConfigError
from reward_plugins.io import write_jsonl
from reward_plugins.monitor import monitor_keys
from setup_data import synthetic_task as st
from trl_ext import train

ALWAYS = {"divergence": -1000.0, "disagreement_rise": None, "worst_member_drop": None}  # fires at step window+patience-2


@pytest.fixture()
def files(tmp_path, rm_dirs):
    rng = random.Random(0)
    train_file, eval_file = tmp_path / "prompts.jsonl", tmp_path / "eval.jsonl"
    write_jsonl(train_file, st.prompt_rows(st.sample_tasks(32, rng)))
    write_jsonl(eval_file, st.prompt_rows(st.sample_tasks(4, rng)))
    single = tmp_path / "rm.yaml"
    single.write_text(yaml.safe_dump({"on_error": "penalty", "error_penalty": -1.0,
                                      "reward": {"type": "reward_model", "name": "rm", "path": str(rm_dirs[1])}}))
    shadow = tmp_path / "shadow.yaml"
    shadow.write_text(yaml.safe_dump({"on_error": "penalty", "error_penalty": -1.0, "reward": {
        "type": "ensemble", "name": "shadow", "objective": "mean",
        "path_template": str(rm_dirs[1]).replace("rm_seed1", "rm_seed{seed}"), "seeds": [1, 2, 3]}}))
    return {"train": train_file, "eval": eval_file, "single": single, "shadow": shadow}


def ppo_config(tmp_path, lm_dir, files, monitor, **ppo_fields):
    settings = {"max_steps": 5, "batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 1, "max_new_tokens": 8,
                "learning_rate": 0.01, "kl_coef": 0.05, "save_steps": 1, **ppo_fields}
    return train.parse_args([
        "--set", "algorithm=ppo", "--set", f"policy={lm_dir}", "--set", f"reward_config={files['single']}",
        "--set", f"train_data={files['train']}", "--set", f"eval_data={files['eval']}",
        "--set", f"output_dir={tmp_path / 'ppo'}", "--set", "eval_every=1", "--set", "table_every=0",
        "--set", f"ppo={json.dumps(settings)}", "--set", f"monitor={json.dumps(monitor)}",
    ])


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ppo_stop_keeps_the_best_checkpoint_and_resuming_from_it_works(tmp_path, lm_dir, files, capsys):
    # gold per eval step 0..3: the best saved checkpoint is step 2's; the alarm fires at step 2 (window 2, patience 2)
    monitor_gold_stub.reset([0.1, 0.3, 0.5, 0.2, 0.2, 0.2])
    monitor = {"shadow": str(files["shadow"]), "window": 2, "patience": 2, "thresholds": ALWAYS, "action": "stop",
               "gold": {"function": "monitor_gold_stub:gold"}}
    cfg = ppo_config(tmp_path, lm_dir, files, monitor)
    final = train.run(cfg)
    out = tmp_path / "ppo"
    err = capsys.readouterr().err
    alarm_lines = [line for line in err.splitlines() if "ALARM" in line]
    assert len(alarm_lines) == 1 and "step 2," in alarm_lines[0] and "divergence" in alarm_lines[0]
    stop = json.loads((out / "monitor" / "stop.json").read_text())
    assert stop["kept_step"] == 2 and stop["kept_checkpoint"] == str(out / "checkpoint-2")
    # checkpoint-0 is the initial policy (saved for `stop`); checkpoint-2 saved again at the alarm: the same policy
    assert stop["scores"] == {"0": 0.1, "1": 0.3, "2": 0.5}
    assert f"kept {out / 'checkpoint-2'}" in err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-0", "checkpoint-1", "checkpoint-2"]
    # the run ended at the alarm, before step 2's update; its final model is the kept checkpoint's policy
    assert [r["step"] for r in records(out / "metrics.jsonl")] == [1, 2]
    kept, got = load_file(out / "checkpoint-2" / "policy" / "model.safetensors"), load_file(final / "model.safetensors")
    assert all(torch.equal(kept[k], got[k]) for k in kept)
    steps = records(out / "monitor" / "steps.jsonl")
    assert [r["step"] for r in steps] == [0, 1, 2] and steps[-1]["alarm"] == 1.0
    # eval files carry gold on every row and the monitor's values
    eval_file = read_eval_file(list_eval_files(out / "eval")[-1])
    assert all(row.gold_score == 0.5 for row in eval_file.rows) and set(eval_file.meta["monitor"]) == set(monitor_keys(True))

    # Resuming picks the kept checkpoint (a warning now instead of a stop) and runs to the end.
    monitor_gold_stub.reset([0.4])
    resumed = cfg.model_copy(update={"monitor": cfg.monitor.model_copy(update={"action": "warn"})})
    train.run(resumed)
    assert [r["step"] for r in records(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    steps = records(out / "monitor" / "steps.jsonl")
    assert [r["step"] for r in steps] == [0, 1, 2, 3, 4]
    assert [r["alarm"] for r in steps] == [0.0, 0.0, 1.0, 1.0, 1.0]  # the replayed monitor fires again at step 2
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["step"] == 3
    assert not (out / "monitor" / "stop.json").exists()  # the resumed run did not stop


def test_ppo_adapt_kl_changes_the_coefficient_the_loss_uses(tmp_path, lm_dir, files):
    monitor = {"shadow": str(files["shadow"]), "window": 2, "patience": 1, "thresholds": ALWAYS,
               "action": "adapt_kl", "kl_factor": 4.0}
    train.run(ppo_config(tmp_path, lm_dir, files, monitor, max_steps=3, kl_coef=0.05))
    out = tmp_path / "ppo"
    logged = records(out / "metrics.jsonl")
    # the alarm fires at step 1 (the first full window), before that step's update: its rewards already use 0.2
    assert [r["objective/kl_coef"] for r in logged] == pytest.approx([0.05, 0.2, 0.2])
    for r in logged:  # the per-token KL penalty in the rewards is -coef * KL: the coefficient the loss used
        assert r["objective/non_score_reward"] == pytest.approx(-r["objective/kl_coef"] * r["objective/kl"], abs=1e-6)
    assert logged[1]["objective/kl"] > 0
    assert [r["monitor/kl_scale"] for r in logged] == [1.0, 4.0, 4.0]
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["kl_coef"] == pytest.approx(0.2)


def test_ppo_monitor_keys_are_the_same_every_step(tmp_path, lm_dir, files):
    """Keys before the alarm, at it and after it; in metrics.jsonl, TensorBoard and the per-step records."""
    monitor = {"shadow": str(files["shadow"]), "window": 2, "patience": 2, "thresholds": ALWAYS}
    train.run(ppo_config(tmp_path, lm_dir, files, monitor, max_steps=4, save_steps=0))
    out = tmp_path / "ppo"
    keys = set(monitor_keys(False))
    logged = records(out / "metrics.jsonl")
    assert [r["monitor/alarm"] for r in logged] == [0.0, 0.0, 1.0, 1.0]
    assert all({k for k in r if k.startswith("monitor/")} == keys for r in logged)
    steps = records(out / "monitor" / "steps.jsonl")
    assert all(set(r) == {k.removeprefix("monitor/") for k in keys} | {"step"} for r in steps)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "runs").rglob("events.out.tfevents*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert keys <= tags and all(len(events.Scalars(k)) == 4 for k in keys)


def grpo_config(tmp_path, lm_dir, files, monitor, algorithm="grpo", steps=4, **trl):
    settings = {"max_steps": steps, "per_device_train_batch_size": 4, "num_generations": 4, "max_completion_length": 8,
                "learning_rate": 0.01, "beta": 0.05, "save_strategy": "no", "report_to": [], **trl}
    return train.parse_args([
        "--set", f"algorithm={algorithm}", "--set", f"policy={lm_dir}", "--set", f"reward_config={files['single']}",
        "--set", f"train_data={files['train']}", "--set", f"eval_data={files['eval']}",
        "--set", f"output_dir={tmp_path / algorithm}", "--set", "eval_every=0", "--set", "table_every=0",
        "--set", f"trl={json.dumps(settings)}", "--set", f"monitor={json.dumps(monitor)}",
    ])


def test_grpo_adapt_kl_multiplies_beta_and_logs_every_step(tmp_path, lm_dir, files):
    monitor_gold_stub.reset([0.2, 0.3])
    monitor = {"shadow": str(files["shadow"]), "window": 2, "patience": 1, "thresholds": ALWAYS,
               "action": "adapt_kl", "kl_factor": 3.0, "gold": {"function": "monitor_gold_stub:gold"}}
    cfg = grpo_config(tmp_path, lm_dir, files, monitor)
    trainer = train.build_trainer(cfg)
    trainer.train()
    assert trainer.beta == pytest.approx(0.15)  # the coefficient GRPO's loss reads at every step
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4 and all({k for k in e if k.startswith("monitor/")} == set(monitor_keys(True)) for e in logs)
    assert all(e["monitor/gold"] == 0.2 for e in logs)  # the eval before training; the next is at the end
    first, last = (read_eval_file(p) for p in list_eval_files(tmp_path / "grpo" / "eval"))
    assert [r.gold_score for r in first.rows] == [0.2] * 4 and [r.gold_score for r in last.rows] == [0.3] * 4
    assert first.meta["gold_rm"] == "monitor_gold_stub:gold" and set(last.meta["monitor"]) == set(monitor_keys(True))
    assert [e["monitor/kl_scale"] for e in logs] == [1.0, 3.0, 3.0, 3.0]
    steps = records(tmp_path / "grpo" / "monitor" / "steps.jsonl")
    assert [r["step"] for r in steps] == [0, 1, 2, 3]  # the policy that sampled each step: global step - 1
    # the monitor's KL is TRL's per-token KL times the mean completion length
    assert steps[2]["kl"] == pytest.approx(logs[2]["kl"] * logs[2]["completions/mean_length"], rel=1e-5)


def test_rloo_stop_ends_training_and_keeps_a_checkpoint(tmp_path, lm_dir, files, capsys):
    monitor = {"shadow": str(files["shadow"]), "window": 2, "patience": 1, "thresholds": ALWAYS, "action": "stop"}
    cfg = grpo_config(tmp_path, lm_dir, files, monitor, algorithm="rloo", steps=6, save_strategy="steps", save_steps=1)
    final = train.run(cfg)
    out = tmp_path / "rloo"
    stop = json.loads((out / "monitor" / "stop.json").read_text())
    assert stop["alarm"]["step"] == 1  # the policy that sampled global step 2's batch
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in range(1, stop["kept_step"] + 1)]
    assert "ALARM at step 1" in capsys.readouterr().err
    kept = load_file(out / f"checkpoint-{stop['kept_step']}" / "model.safetensors")
    got = load_file(final / "model.safetensors")
    assert all(torch.equal(kept[k], got[k]) for k in kept)
    assert (out / f"checkpoint-{stop['kept_step']}" / "monitor_state.json").exists()
    # rerunning resumes from the kept checkpoint (a warning now), its monitor continuing from the state saved there
    resumed = cfg.model_copy(update={"monitor": cfg.monitor.model_copy(update={"action": "warn"}),
                                     "trl": {**cfg.trl, "max_steps": 4}})
    train.run(resumed)
    steps = [r["step"] for r in records(out / "monitor" / "steps.jsonl")]
    assert steps == [0, 1, 2, 3]
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["log_history"][0]["step"] == 1


def test_monitor_needs_a_kl_coefficient(tmp_path, lm_dir, files):
    monitor = {"shadow": str(files["shadow"])}
    with pytest.raises(ConfigError, match=r"trl.beta: the monitor needs the KL"):
        grpo_config(tmp_path, lm_dir, files, monitor, beta=0.0)
    with pytest.raises(ConfigError, match=r"ppo.kl_coef: monitor.action adapt_kl multiplies this coefficient"):
        ppo_config(tmp_path, lm_dir, files, {**monitor, "action": "adapt_kl"}, kl_coef=0.0)
    with pytest.raises(ConfigError, match="monitor.thresholds.gold_drop needs gold|gold_drop needs gold"):
        ppo_config(tmp_path, lm_dir, files, {**monitor, "thresholds": {"gold_drop": 0.1}})


def test_single_rm_without_shadow_is_refused(tmp_path, lm_dir, files):
    from reward_plugins.monitor import MonitorError

    with pytest.raises(MonitorError, match="no plugin with member scores"):
        train.prepare_run(ppo_config(tmp_path, lm_dir, files, {"action": "warn"}))


def test_member_batches_are_packed_on_the_device_they_are_gathered_on():
    """The monitor's only tensor code: padded (rows, k + 1) blocks built on the gather's device (meta here, where a
    tensor made on the wrong device fails as on CUDA), and unpacked without the padding."""
    import numpy as np

    from reward_plugins.monitor import MemberBatch
    from trl_ext.monitor_hooks import pack_member_batch, unpack_member_batch

    batch = MemberBatch([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], [0.5, 0.25], ("a", "b", "c"))
    on_meta = pack_member_batch(batch, batch.names, 4, torch.device("meta"))
    assert on_meta.device.type == "meta" and on_meta.shape == (4, 4)
    assert pack_member_batch(None, batch.names, 4, "meta").device.type == "meta"
    packed = pack_member_batch(batch, batch.names, 4, "cpu")
    both = np.concatenate([packed.numpy(), pack_member_batch(None, batch.names, 4, "cpu").numpy()])  # a second rank
    merged = unpack_member_batch(both, batch.names)
    assert merged.scores.tolist() == batch.scores.tolist() and merged.proxy.tolist() == [0.5, 0.25]


def test_ppo_evals_give_the_shadows_worst_member_on_the_eval_answers(tmp_path, lm_dir, files, capsys):
    """evals.jsonl against the shadow's scores of each eval file's answers, standardised by hand by the first eval."""
    import numpy as np

    from reward_plugins.pipeline import RewardPipeline
    from reward_plugins.types import Sample

    monitor = {"shadow": str(files["shadow"]), "thresholds": {"divergence": None, "disagreement_rise": None,
                                                             "worst_member_drop": 1e-9}}
    train.run(ppo_config(tmp_path, lm_dir, files, monitor, max_steps=4, save_steps=0))
    out = tmp_path / "ppo"
    logged = records(out / "monitor" / "evals.jsonl")
    eval_files = [read_eval_file(p) for p in list_eval_files(out / "eval")]
    assert [r["step"] for r in logged] == [f.step for f in eval_files] == [0, 1, 2, 3, 4]
    keys = json.loads((out / "monitor" / "config.json").read_text())["member_keys"]
    shadow = RewardPipeline.from_yaml(files["shadow"])
    scores = [np.array([[r.components[k] for r in shadow.score([Sample(row.prompt, row.answer) for row in f.rows]).results]
                        for k in keys]) for f in eval_files]
    means, stds = scores[0].mean(axis=1), scores[0].std(axis=1)
    worst = [min(((s[i] - means[i]) / stds[i]).mean() for i in range(len(keys))) for s in scores]
    assert [r["worst_member"] for r in logged] == pytest.approx(worst, abs=1e-9)
    assert all(r["gold"] is None for r in logged)  # no gold configured
    falls = [i for i in range(1, len(worst)) if max(worst[:i]) - worst[i] > 1e-9 and i < len(worst) - 1]
    alarm_lines = [line for line in capsys.readouterr().err.splitlines() if "ALARM" in line]
    if falls:  # the final eval comes after the last step: an alarm there changes nothing
        assert len(alarm_lines) == 1 and f"ALARM at step {falls[0]}," in alarm_lines[0] and "worst_member_drop" in alarm_lines[0]
    else:
        assert alarm_lines == []


def test_ppo_acts_on_an_alarm_raised_at_an_eval(tmp_path, lm_dir, files, capsys):
    """worst_member_drop fires at the eval of step 1 (the shadow's worst member falls from step 0's, see above);
    `stop` acts at step 1's batch, before it is learnt, and keeps the better of the checkpoints saved: the initial
    policy (checkpoint-0, worst member 0 by definition) over step 1's (below 0); the final model is the initial one."""
    monitor = {"shadow": str(files["shadow"]), "action": "stop",
               "thresholds": {"divergence": None, "disagreement_rise": None, "worst_member_drop": 1e-9}}
    train.run(ppo_config(tmp_path, lm_dir, files, monitor, max_steps=4, save_steps=2))
    out = tmp_path / "ppo"
    evals = records(out / "monitor" / "evals.jsonl")
    assert [r["step"] for r in evals] == [0, 1] and evals[1]["worst_member"] < evals[0]["worst_member"]
    stop = json.loads((out / "monitor" / "stop.json").read_text())
    assert stop["alarm"]["step"] == 1 and stop["alarm"]["signal"] == "worst_member_drop"
    assert stop["scores"] == pytest.approx({"0": 0.0, "1": evals[1]["worst_member"]}, abs=1e-12)
    assert stop["kept_step"] == 0 and evals[0]["worst_member"] == pytest.approx(0.0, abs=1e-12)
    assert [r["step"] for r in records(out / "metrics.jsonl")] == [1]  # step 1's batch was not learnt
    assert "ALARM at step 1," in capsys.readouterr().err
    initial = load_file(lm_dir / "model.safetensors")
    final = load_file(out / "final" / "model.safetensors")
    assert set(initial) == set(final) and all(torch.equal(initial[k], final[k]) for k in initial)
