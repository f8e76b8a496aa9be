"""compute_baseline_perplexity.py with the tiny causal LM: the reward's own numbers, resumable, validated."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from reward_plugins.cli import UsageError
from reward_plugins.io import DataError, read_jsonl
from reward_plugins.pipeline import RewardPipeline
from reward_plugins.types import Sample, Status
from reward_plugins.vrcli import VRCLIPrompt
from setup_data import compute_baseline_perplexity as cbp
from setup_data import setup_rl_data

ROOT = Path(__file__).resolve().parents[1]
REWARD_YAML = ROOT / "configs" / "rewards" / "vrcli.yaml"
SPLITS = ("test", "val")
WORDS = "the fox walked to the river and found a map under the old oak near the sea".split()


def story_record(split: str, i: int) -> dict:
    """A story record in the paper's format whose chapter passes the paper's filters (more than 200 words)."""
    chapter = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(210 + 7 * i))
    return {"story_id": f"{split}{i}", "chapter_index": 2 + i, "last_n_chapters": 1,
            "story_text": f"Chapter {1 + i}: The fox left home on day {i} of the {split} trip.", "high_level_plot_summary": "A fox seeks a map.",
            "prior_plot_summary": f"The fox has walked {i} days.", "character_sheets": {"Fox": "clever"},
            "next_chapter_synopsis": f"The fox finds map number {i}.", "next_chapter_header": f"Chapter {2 + i}: Map {i}",
            "next_chapter": f"Chapter {2 + i}: Map {i}\n\n{chapter}"}


@pytest.fixture(scope="module")
def rl_data(tokenizer_dir, tmp_path_factory) -> Path:
    """The default story pipeline's first step: story records -> setup_rl_data.py (paper prompt and layout)."""
    source = tmp_path_factory.mktemp("stories")
    for split in SPLITS:
        rows = [story_record(split, i) for i in range(3)]
        (source / f"story_dataset_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path_factory.mktemp("rl_data")
    argv = ["--tokenizer_name", str(tokenizer_dir), "--input_dir", str(source), "--data_dir", str(out), "--splits", *SPLITS]
    assert setup_rl_data.main(argv) == 0
    return out


def copy_data(rl_data: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for split in SPLITS:
        shutil.copy(rl_data / f"{split}.jsonl", dest / f"{split}.jsonl")
    return dest


def baseline_args(data_dir: Path, lm_dir: Path, *extra: str):
    return cbp.parse_args(["--model_name", str(lm_dir), "--nice_model_name", "tiny", "--data_dir", str(data_dir),
                           "--splits", *SPLITS, "--batch_size", "4", "--chunk_size", "4", "--quiet",
                           "--reward_config", str(REWARD_YAML), *extra])


def out_of(data_dir: Path) -> Path:
    return data_dir.with_name(data_dir.name + "_with_baseline")


def loss_perplexity(model, context: list[int], gold: list[int]) -> float:
    """Perplexity from the model's own loss with the context masked: the published script's definition."""
    ids = torch.tensor([context + gold])
    labels = ids.clone()
    labels[0, : len(context)] = -100
    with torch.no_grad():
        return float(torch.exp(model(input_ids=ids, labels=labels).loss))


@pytest.fixture(scope="module")
def full_run(rl_data, lm_dir, tmp_path_factory) -> Path:
    data = copy_data(rl_data, tmp_path_factory.mktemp("full") / "data")
    cbp.run(baseline_args(data, lm_dir, "--table_format", "parquet"))
    return out_of(data)


def test_baseline_is_the_gold_perplexity_under_the_reward_prompt(full_run, rl_data, lm_dir):
    model = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    labels = [row["label"] for split in SPLITS for row in read_jsonl(full_run / f"{split}.jsonl")]
    assert len(labels) == 6
    assert read_jsonl(rl_data / "val.jsonl")[0]["label"]["baseline_ppl"] is None  # the input is left alone
    for label in labels[:4]:
        # The paper's no-plan prompt, written out from the label's parts, through the chat template by hand, with
        # the gold chapter as the assistant turn: one string, tokenized once; scored from the gold to the end.
        user = label["context"] + "\n### Instructions: ###\n" + label["instruction"]
        prefix = f"<|system|>{label['system']}<eos><|user|>{user}<eos><|assistant|>"
        whole = tokenizer(prefix + label["gold"] + "<eos>", add_special_tokens=False)["input_ids"]
        start = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
        assert label["baseline_ppl"] == pytest.approx(loss_perplexity(model, whole[:start], whole[start:]), rel=1e-4)
        assert label["baseline_temperature"] == 1.0 and label["baseline_model"] == "tiny"
        stamp = label["baseline_fingerprint"]
        assert stamp["model"] == "ref_lm" and stamp["max_length"] == 4096 and stamp["temperature"] == 1.0
    values = np.array([label["baseline_ppl"] for label in labels])
    assert np.all(np.isfinite(values)) and len(set(values.round(6))) == len(values)


def test_table_is_keyed_by_id_in_jsonl_and_parquet(full_run):
    import pyarrow.parquet as pq

    rows = read_jsonl(full_run / "baseline_ppl_tiny.jsonl")
    labels = {row["label"]["id"]: row["label"] for split in SPLITS for row in read_jsonl(full_run / f"{split}.jsonl")}
    assert {row["id"]: row["baseline_ppl"] for row in rows} == {i: label["baseline_ppl"] for i, label in labels.items()}
    assert pq.read_table(full_run / "baseline_ppl_tiny.parquet").to_pylist() == rows
    assert not list(full_run.glob(".*.tmp"))


def test_reward_accepts_the_labels_and_reports_the_same_baseline(full_run, models_env):
    pipeline = RewardPipeline.from_yaml(REWARD_YAML)
    row = read_jsonl(full_run / "val.jsonl")[0]
    sample = Sample(prompt="", response="In summary: the hero finds the map.", label=row["label"])
    batch = pipeline.score([sample])
    assert batch.results[0].status == Status.OK, batch.results[0].error
    assert batch.results[0].components["baseline_ppl"] == row["label"]["baseline_ppl"]


def test_interrupted_run_resumes_with_identical_numbers(full_run, rl_data, lm_dir, tmp_path, monkeypatch):
    data = copy_data(rl_data, tmp_path / "data")
    real, calls = cbp.score_chunk, []

    def interrupted(scorer, items):
        if len(calls) == 1:  # one chunk of the two done
            raise KeyboardInterrupt
        calls.append(len(items))
        return real(scorer, items)

    monkeypatch.setattr(cbp, "score_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cbp.run(baseline_args(data, lm_dir))
    assert not (out_of(data) / "val.jsonl").exists()  # nothing half-written
    cache = out_of(data) / "baseline_ppl_tiny.cache.jsonl"
    with cache.open("a") as handle:
        handle.write('{"id": "cut-short-by-the-crash", "baseline')
    assert len(read_jsonl_lines(cache)) == 1 + sum(calls) + 1

    monkeypatch.setattr(cbp, "score_chunk", lambda s, items: calls.append(len(items)) or real(s, items))
    done_before = sum(calls)
    calls.clear()
    summary = cbp.run(baseline_args(data, lm_dir))
    total = sum(len(read_jsonl(full_run / f"{s}.jsonl")) for s in SPLITS)
    assert 0 < sum(calls) == total - done_before
    assert summary["test"]["cached"] + summary["val"]["cached"] == done_before
    for split in SPLITS:
        assert read_jsonl(out_of(data) / f"{split}.jsonl") == read_jsonl(full_run / f"{split}.jsonl")
        assert read_jsonl(data / f"{split}.jsonl") == read_jsonl(rl_data / f"{split}.jsonl")

    calls.clear()
    cbp.run(baseline_args(data, lm_dir))
    assert calls == []


def read_jsonl_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_missing_local_model_exits_2_naming_the_flag(rl_data, tmp_path, capsys):
    data = copy_data(rl_data, tmp_path / "data")
    assert cbp.main(["--model_name", str(tmp_path / "no_such_lm"), "--nice_model_name", "tiny", "--data_dir", str(data),
                     "--splits", *SPLITS, "--reward_config", str(REWARD_YAML)]) == 2
    err = capsys.readouterr().err
    assert f"error: --model_name: {tmp_path / 'no_such_lm'} does not exist (a local path; nothing is downloaded)" in err
    assert "Traceback" not in err and "huggingface.co" not in err


def test_changed_settings_refuse_the_old_cache(full_run, rl_data, lm_dir, tmp_path):
    data = copy_data(rl_data, tmp_path / "data")
    shutil.copytree(full_run, out_of(data))
    with pytest.raises(UsageError, match="other settings"):
        cbp.run(baseline_args(data, lm_dir, "--temperature", "0.7"))


def test_bad_rows_are_rejected_with_file_and_line(rl_data, lm_dir, tmp_path, capsys):
    data = copy_data(rl_data, tmp_path / "data")
    rows = read_jsonl(data / "val.jsonl")
    no_gold = {**rows[1], "label": {k: v for k, v in rows[1]["label"].items() if k != "gold"}}
    empty_gold = {**rows[2], "label": {**rows[2]["label"], "gold": " "}}
    no_context = {**rows[1], "label": {k: v for k, v in rows[1]["label"].items() if k != "context"}}
    lines = [json.dumps(rows[0]), "{broken", json.dumps(no_gold), json.dumps(empty_gold), json.dumps(no_context),
             json.dumps(rows[0]), json.dumps({"prompt": "no label"})]
    (data / "val.jsonl").write_text("\n".join(lines) + "\n")
    summary = cbp.run(baseline_args(data, lm_dir))
    assert summary["rejected"] == {"malformed_json": 1, "bad_label": 2, "empty_gold": 1, "duplicate_id": 1, "missing_key": 1}
    rejects = read_jsonl(out_of(data) / "baseline_rejects_tiny.jsonl")
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (2, "malformed_json"), (3, "bad_label"), (4, "empty_gold"), (5, "bad_label"), (6, "duplicate_id"), (7, "missing_key")]
    assert len(read_jsonl(out_of(data) / "val.jsonl")) == 1
    assert (data / "val.jsonl").read_text().splitlines() == lines  # the input keeps every row
    with pytest.raises(UsageError, match="input folder"):
        cbp.run(baseline_args(data, lm_dir, "--out_dir", str(data)))
    strict = copy_bad(data, lines, tmp_path / "strict")
    with pytest.raises(DataError, match=r"val.jsonl:2: malformed_json"):
        cbp.run(baseline_args(strict, lm_dir, "--strict"))


def copy_bad(data: Path, val_lines: list[str], dest: Path) -> Path:
    dest.mkdir()
    shutil.copy(data / "test.jsonl", dest / "test.jsonl")
    (dest / "val.jsonl").write_text("\n".join(val_lines) + "\n")
    return dest


def test_prompt_matches_vrcli_token_ids(rl_data, lm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    label = read_jsonl(rl_data / "val.jsonl")[0]["label"]
    prompt = cbp.load_vrcli_config(REWARD_YAML).prompt
    assert prompt.layout == "paper"
    context, gold = prompt.token_ids(tokenizer, label, None)
    text = tokenizer.decode(context)
    assert text.startswith("<|system|>" + VRCLIPrompt().system) and text.endswith("<|assistant|>")
    assert label["context"] + "\n### Instructions: ###\n" + label["instruction"] in text
    assert tokenizer.decode(gold) == label["gold"] + "<eos>"  # the gold turn with its end-of-turn token


def test_the_other_configs_baselines_are_refused(rl_data, lm_dir, tmp_path, models_env):
    """Baselines from the script's default (vrcli_reference.yaml: max_length 16384, plan reserve 2048) do not
    fit the local vrcli.yaml: the reward refuses them at load and on the batch instead of scoring silently."""
    from reward_plugins.registry import check_baselines
    from reward_plugins.vrcli import BaselineMismatchError

    data = copy_data(rl_data, tmp_path / "data")
    args = baseline_args(data, lm_dir)
    args.reward_config = cbp.DEFAULT_REWARD_CONFIG
    cbp.run(args)
    labels = [row["label"] for row in read_jsonl(out_of(data) / "val.jsonl")]
    assert labels[0]["baseline_fingerprint"]["max_length"] == 16384
    pipeline = RewardPipeline.from_yaml(REWARD_YAML)
    with pytest.raises(BaselineMismatchError, match="max_length: baseline 16384, reward 4096"):
        check_baselines(pipeline.root, labels)
    result = pipeline.score([Sample(prompt="", response="In summary: x", label=labels[0])]).results[0]
    assert result.status is Status.ERROR and "prompt_hash" in result.error


def test_openrlhf_prompt_reader_gets_prompt_and_label(full_run, lm_dir):
    datasets = pytest.importorskip("datasets")
    from openrlhf.datasets.prompts_dataset import preprocess_data
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    loaded = datasets.load_dataset("json", data_files={"validation": str(full_run / "val.jsonl")},
                                   cache_dir=str(full_run.parent / "hf_cache"))["validation"]
    ours = read_jsonl(full_run / "val.jsonl")
    for row, expected in zip(loaded, ours):
        prompt, label = preprocess_data(row, input_key="prompt", label_key="label",
                                        apply_chat_template=tokenizer.apply_chat_template)
        assert prompt == tokenizer.apply_chat_template(expected["prompt"], add_generation_prompt=True, tokenize=False)
        assert label == expected["label"] and label["baseline_ppl"] > 0
