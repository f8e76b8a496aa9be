"""Problems a new user hit following the README (issue 10), each reproduced: config loading, bad data, CLI errors,
a reward that always fails, errored eval rows, file modes, the published best-of-n flags, the launcher."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest
import yaml

from evaluation import plots, run_bon_pipeline
from evaluation.bon_analysis import ensemble_run_name
from evaluation.eval_files import EvalFile, read_eval_file, rows_from_scores, write_eval_file
from evaluation.gold_gens import load_gold_gens
from openrlhf_ext import launch
from reward_plugins.config import ConfigError, load_pipeline_config
from reward_plugins.io import DataError, iter_jsonl, write_jsonl
from reward_plugins.types import RewardResult
from setup_data import convert, setup_rl_data
from setup_data import synthetic_task as st
from trl_ext import sft, train, train_rm
from trl_ext.config import load_config
from trl_ext.reward_adapter import ErrorStreak, RewardFailure

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "setup_data" / "sample_data"


# --- one loader -------------------------------------------------------------------------------------------------

def test_train_config_expands_env_everywhere_so_run_dirs_differ(tmp_path, monkeypatch, lm_dir):
    data = tmp_path / "p.jsonl"
    write_jsonl(data, [{"prompt": "x", "label": {}}])
    preset = tmp_path / "t.yaml"
    preset.write_text(f"policy: {lm_dir}\nreward_config: {data}\ntrain_data: {data}\n"
                      "output_dir: ${RUN_DIR:-runs/grpo_uwo}\neval_every: ${EVERY:-7}\n")
    monkeypatch.delenv("RUN_DIR", raising=False)
    assert train.parse_args(["--config", str(preset)]).output_dir == "runs/grpo_uwo"
    monkeypatch.setenv("RUN_DIR", str(tmp_path / "second"))
    monkeypatch.setenv("EVERY", "3")
    cfg = train.parse_args(["--config", str(preset)])
    assert cfg.output_dir == str(tmp_path / "second") and cfg.eval_every == 3


def test_sft_and_rm_errors_name_kind_file_line_and_key(tmp_path, lm_dir):
    data = tmp_path / "sft.jsonl"
    write_jsonl(data, [{"prompt": "a", "completion": "b"}])
    bad = tmp_path / "sft.yaml"
    bad.write_text(f"model: {lm_dir}\ntrain_data: {data}\noutput_dir: o\nseed: many\ntrl_opts: {{}}\n")
    typo = tmp_path / "typo.yaml"
    typo.write_text(f"model: {lm_dir}\ntrain_data: {data}\noutput_dir: o\ntrl:\n  num_train_epochz: 2\n")
    with pytest.raises(ConfigError, match=rf"invalid SFT configuration:\n  {typo}:5: trl.num_train_epochz: unknown SFTConfig field"):
        load_config(sft.SFTRunConfig, typo)
    with pytest.raises(ConfigError) as info:
        load_config(sft.SFTRunConfig, bad)
    text = str(info.value)
    assert text.startswith("invalid SFT configuration:")
    assert f"{bad}:4: seed: Input should be a valid integer" in text and f"{bad}:5: trl_opts: unknown key" in text
    rm_bad = tmp_path / "rm.yaml"
    rm_bad.write_text(f"base: {lm_dir}\ntrain_data: ${{NOPE_NOT_SET}}\n")
    with pytest.raises(ConfigError, match=r"invalid RM configuration:\n  .*rm.yaml:2: train_data: environment variable "
                                          r"NOPE_NOT_SET is not set"):
        load_config(train_rm.RMRunConfig, rm_bad)


def test_reward_config_keeps_its_title_and_expands_env(tmp_path, monkeypatch, rm_dirs):
    monkeypatch.setenv("RM_DIR", str(rm_dirs[1]))
    path = tmp_path / "r.yaml"
    path.write_text("on_error: penalty\nerror_penalty: ${PENALTY:--2.5}\nreward:\n  type: reward_model\n  path: ${RM_DIR}\n")
    config = load_pipeline_config(path)
    assert config.error_penalty == -2.5 and config.reward.config.path == str(rm_dirs[1])
    path.write_text("reward:\n  type: reward_model\n  path: ${RM_DIR}\n  max_lenght: 3\n")
    with pytest.raises(ConfigError, match=rf"invalid reward configuration:\n  {path}:4: reward.max_lenght: unknown key"):
        load_pipeline_config(path)


# --- bad data never crashes and never vanishes ------------------------------------------------------------------

def _story_inputs(tmp_path: Path, train_bytes: bytes) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for split in ("train", "test", "val"):
        (folder / f"story_dataset_{split}.jsonl").write_bytes((SAMPLE / f"story_dataset_{split}.jsonl").read_bytes())
    (folder / "story_dataset_train.jsonl").write_bytes(train_bytes)
    return folder


def test_setup_rl_data_rejects_a_non_utf8_line_with_file_and_line(tmp_path, lm_dir):
    lines = (SAMPLE / "story_dataset_train.jsonl").read_bytes().splitlines(keepends=True)
    broken = lines[1].replace(b"story", b"st\xffory", 1)
    folder = _story_inputs(tmp_path, b"".join([lines[0], broken, *lines[2:]]))
    out = tmp_path / "rl"
    assert setup_rl_data.main(["--tokenizer_name", str(lm_dir), "--input_dir", str(folder), "--data_dir", str(out)]) == 0
    rejects = [row for _, row in iter_jsonl(out / "rejects.jsonl")]
    assert [(r["line"], r["reason"]) for r in rejects] == [(2, "not_utf8")]
    assert rejects[0]["file"].endswith("story_dataset_train.jsonl") and "0xff" in rejects[0]["message"]
    assert len(list(iter_jsonl(out / "train.jsonl"))) == len(lines) - 1


def test_empty_inputs_are_errors_naming_the_file(tmp_path, lm_dir, capsys):
    folder = _story_inputs(tmp_path, b"\n  \n")
    assert setup_rl_data.main(["--tokenizer_name", str(lm_dir), "--input_dir", str(folder), "--data_dir",
                               str(tmp_path / "rl")]) == 2
    err = capsys.readouterr().err
    assert "story_dataset_train.jsonl: empty input" in err and "Traceback" not in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert convert.main(["--from", "alpaca", "--to", "sft", "--input", str(empty), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert f"{empty}: empty input" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_jsonl_readers_name_the_non_utf8_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xc3\x28"}\n')
    with pytest.raises(DataError, match=r"x.jsonl:2: not UTF-8 \(byte 0xc3 at column 13\)"):
        list(iter_jsonl(path))


def test_chat_style_convert_output_is_read_by_sft_and_rm(tmp_path, tokenizer_dir):
    from trl_ext.data import RM_FIELDS, SFT_FIELDS, read_rows

    chats = tmp_path / "chats.jsonl"
    write_jsonl(chats, [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}])
    prefs = tmp_path / "prefs.jsonl"
    write_jsonl(prefs, [{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
                         "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]}])
    assert convert.main(["--from", "messages", "--to", "sft", "--input", str(chats), "--output", str(tmp_path / "s.jsonl")]) == 0
    assert convert.main(["--from", "messages", "--to", "rm", "--input", str(prefs), "--output", str(tmp_path / "r.jsonl")]) == 0
    assert read_rows(str(tmp_path / "s.jsonl"), SFT_FIELDS)[0]["completion"] == [{"role": "assistant", "content": "hello"}]
    from transformers import AutoTokenizer

    rows = train_rm.text_rows(read_rows(str(tmp_path / "r.jsonl"), RM_FIELDS), AutoTokenizer.from_pretrained(tokenizer_dir))
    assert rows == [{"prompt": "<|user|>q<eos><|assistant|>", "chosen": "good", "rejected": "bad"}]


# --- errors, not tracebacks --------------------------------------------------------------------------------------

def _train_preset(tmp_path: Path, policy: Path, reward: Path, **extra) -> Path:
    data = tmp_path / "prompts.jsonl"
    write_jsonl(data, st.prompt_rows(st.sample_tasks(8, random.Random(0))))
    preset = tmp_path / "t.yaml"
    preset.write_text(yaml.safe_dump({"policy": str(policy), "reward_config": str(reward), "train_data": str(data),
                                      "output_dir": str(tmp_path / "run"), "torch_threads": 1, **extra}))
    return preset


def test_cli_config_error_exits_2_with_one_message_and_debug_shows_it(tmp_path, capsys):
    preset = tmp_path / "t.yaml"
    preset.write_text("policy: /nowhere\nalgoritm: grpo\n")
    assert train.main(["--config", str(preset)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trl_ext.train: error: invalid train configuration:") and "Traceback" not in err
    assert f"{preset}:1: policy: path does not exist: /nowhere" in err and f"{preset}:2: algoritm: unknown key" in err
    with pytest.raises(ConfigError):
        train.main(["--config", str(preset), "--debug"])


def test_a_reward_model_as_policy_is_refused_up_front(tmp_path, rm_dirs, capsys):
    preset = _train_preset(tmp_path, rm_dirs[1], tmp_path / "t.yaml")
    assert train.main(["--config", str(preset)]) == 2
    err = capsys.readouterr().err
    assert f"policy: {rm_dirs[1]} is a LlamaForSequenceClassification, not a causal language model" in err


def test_a_missing_local_tokenizer_says_missing_not_hub(tmp_path, capsys, monkeypatch):
    (tmp_path / "models").mkdir()
    folder = _story_inputs(tmp_path, (SAMPLE / "story_dataset_train.jsonl").read_bytes())
    monkeypatch.chdir(tmp_path)
    assert setup_rl_data.main(["--tokenizer_name", "models/nope", "--input_dir", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "--tokenizer_name: models/nope does not exist (a local path" in err and "huggingface" not in err.lower()


# --- a reward that always fails stops training -------------------------------------------------------------------

def test_error_streak_stops_after_n_all_error_steps_and_resets_on_any_success():
    ok, bad = RewardResult.ok(1.0), RewardResult.failed("no plan")
    streak = ErrorStreak(3)
    streak.observe([bad, bad])
    streak.observe([bad, bad])
    streak.observe([ok, bad])  # one scored sample resets the count
    streak.observe([bad])
    streak.observe([RewardResult.failed("second")])
    with pytest.raises(RewardFailure, match=r"every sample of 3 consecutive steps .* First error: no plan"):
        streak.observe([bad])
    ErrorStreak(0).observe([bad])  # 0 disables


def test_grpo_with_vrcli_on_a_policy_without_plans_stops_at_step_3(tmp_path, models_env, lm_dir, capsys):
    """With the plan fallback off (the paper scores the whole response), a policy that writes no plan fails every sample."""
    reward = tmp_path / "vrcli_strict.yaml"
    reward.write_text((REPO / "configs/rewards/vrcli.yaml").read_text()
                      .replace("whole_response_fallback: true", "whole_response_fallback: false")
                      .replace("fingerprint: require", "fingerprint: check").replace("layout: paper", "layout: append"))
    preset = _train_preset(tmp_path, lm_dir, reward,
                           trl={"max_steps": 20, "per_device_train_batch_size": 4, "num_generations": 2,
                                "max_completion_length": 6, "report_to": [], "save_strategy": "no"})
    assert train.main(["--config", str(preset)]) == 2
    err = capsys.readouterr().err
    assert "the reward failed on every sample of 3 consecutive steps" in err
    assert "no plan marker" in err or "baseline_ppl" in err


def test_grpo_refuses_labels_without_the_baseline_fingerprint(tmp_path, models_env, lm_dir, capsys):
    preset = _train_preset(tmp_path, lm_dir, REPO / "configs/rewards/vrcli.yaml", trl={"max_steps": 1})
    assert train.main(["--config", str(preset)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trl_ext.train: error: ") and "Traceback" not in err
    assert "prompts.jsonl: vrcli: 8 label(s) have no 'baseline_fingerprint'" in err


# --- eval files carry status; plots leave errored rows out -------------------------------------------------------

def test_errored_rows_are_stored_with_status_and_left_out_of_plots(tmp_path):
    results = [RewardResult.ok(0.8), RewardResult.failed("no plan"), RewardResult.ok(0.4)]
    rows = rows_from_scores(["p"] * 3, ["a", "b", "c"], [0.8, 0.0, 0.4], [{}, {}, {}], [0.1, 0.2, 0.3], results)
    rows[0].gold_score, rows[1].gold_score, rows[2].gold_score = 1.0, 5.0, 2.0
    write_eval_file(tmp_path, EvalFile(step=10, rows=rows, kl=0.2))
    stored = read_eval_file(tmp_path / "eval_step000010.json").rows
    assert [(r.status, r.error) for r in stored] == [("ok", None), ("error", "no plan"), ("ok", None)]
    curve = plots.rl_curve("run", "run", tmp_path)
    assert curve.proxy.tolist() == [pytest.approx(0.6)] and curve.gold.tolist() == [pytest.approx(1.5)]


# --- file modes --------------------------------------------------------------------------------------------------

def test_atomic_outputs_keep_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_jsonl(tmp_path / "a.jsonl", [{}])
        os.umask(0o027)
        write_jsonl(tmp_path / "b.jsonl", [{}])
    finally:
        os.umask(old)
    assert (tmp_path / "a.jsonl").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.jsonl").stat().st_mode & 0o777 == 0o640


# --- the published best-of-n command -----------------------------------------------------------------------------

def test_bon_accepts_llm_optimization_spellings_and_defaults():
    parser = run_bon_pipeline.build_parser()
    args = parser.parse_args(["models/rm-pythia-44m_seed{seed}", "-gold", "g.jsonl", "-ns", "1,4", "--no-ensembles"])
    assert (args.gold_gens, args.sample_ns, args.ensembles, args.output_dir) == ("g.jsonl", [1, 4], False, None)
    assert parser.parse_args(["m", "--gold-labelled-generations", "h"]).gold_gens == "h"
    assert run_bon_pipeline.default_output_dir("models/rm-pythia-44m_seed{seed}") == "runs/bon_rm-pythia-44m"
    assert ensemble_run_name("uwo", 1) == "ensemble_UWO-1.0" and ensemble_run_name("uwo", 0.5) == "ensemble_UWO-0.5"


def test_bon_dataset_id_offline_says_it_could_not_be_fetched(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"no-such-org-x/no-such-set: not a local file or folder, and the Hugging Face "
                                        r"dataset could not be fetched"):
        load_gold_gens("no-such-org-x/no-such-set")
    with pytest.raises(DataError, match=r"no such file or directory"):
        load_gold_gens("./missing/gens.jsonl")


# --- launcher and scripts ----------------------------------------------------------------------------------------

def test_dry_run_after_the_separator_never_reaches_openrlhf():
    ours, rest = launch.split_argv(["--eval-every", "3", "--", "--actor.model_name_or_path", "m", "--dry-run",
                                    "--server-wait", "5"])
    assert ours.dry_run and ours.server_wait == 5 and ours.eval_every == 3
    assert rest == ["--actor.model_name_or_path", "m"]


def test_scripts_default_to_the_project_venv_python():
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    out = subprocess.run([str(REPO / "scripts/train_ppo_rm.sh")], env={**env, "DRY_RUN": "1"}, capture_output=True,
                         text=True, check=True).stdout.split()
    venv_python = REPO / ".venv/bin/python"
    assert out[0] == (str(venv_python) if venv_python.exists() else "python3")


def test_a_broken_model_folder_names_the_key(tmp_path, lm_dir, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(lm_dir, broken)
    (broken / "model.safetensors").unlink()
    data = tmp_path / "sft.jsonl"
    write_jsonl(data, [{"prompt": "a", "completion": "b"}])
    preset = tmp_path / "s.yaml"
    preset.write_text(f"model: {broken}\ntrain_data: {data}\noutput_dir: {tmp_path / 'o'}\ntrl: {{report_to: []}}\n")
    assert sft.main(["--config", str(preset)]) == 2
    err = capsys.readouterr().err
    assert f"trl_ext.sft: error: model: {broken} cannot be loaded:" in err and "Traceback" not in err
