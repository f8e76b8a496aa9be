"""convert.py: every source format into SFT / RM / prompt rows, validation with file:line, TRL reads the output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from reward_plugins.io import DataError, read_jsonl
from setup_data import convert


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def run(tmp_path: Path, lines: list, *args: str) -> tuple[list[dict], list[dict]]:
    source = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    assert convert.main(["--input", str(source), "--output", str(out), *args]) == 0
    rejects = tmp_path / "out.jsonl.rejects.jsonl"
    return read_jsonl(out), (read_jsonl(rejects) if rejects.exists() else [])


def test_llm_on_ray_sft_uses_its_template_and_only_shows_input_when_set(tmp_path):
    rows, rejects = run(tmp_path, [
        {"instruction": "List three fruits.", "context": "", "response": "apple, banana, cherry"},
        {"instruction": "Summarize.", "context": "The fox jumps.", "response": "A fox jumped."},
        {"instruction": "No answer.", "context": ""},
    ], "--from", "llm_on_ray_sft", "--to", "sft")
    assert [r["completion"] for r in rows] == ["apple, banana, cherry", "A fox jumped."]
    assert "Input:" not in rows[0]["prompt"] and rows[0]["prompt"].endswith("### Instruction:\nList three fruits.\n\n### Response:\n")
    assert "\n\nInput:\nThe fox jumps.\n\n### Response:\n" in rows[1]["prompt"] and "### Input" not in rows[1]["prompt"]
    assert [(r["line"], r["reason"]) for r in rejects] == [(3, "missing_key")]


@pytest.mark.parametrize("key", ["prompt", "instruction"])
def test_llm_on_ray_rm_accepts_prompt_or_instruction(tmp_path, key):
    rows, rejects = run(tmp_path, [
        {key: "\n\nHuman: hi\n\nAssistant:", "chosen": " Hello!", "rejected": " Go away."},
        {"prompt": "a", "instruction": "b", "chosen": "x", "rejected": "y"},
        {"prompt": "same", "instruction": "same", "chosen": "x", "rejected": "y"},
        {key: "q", "chosen": "same", "rejected": "same"},
        {"chosen": "x", "rejected": "y"},
    ], "--from", "llm_on_ray_rm", "--to", "rm")
    assert rows == [{"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " Hello!", "rejected": " Go away."},
                    {"prompt": "same", "chosen": "x", "rejected": "y"}]
    assert [(r["line"], r["reason"]) for r in rejects] == [(2, "bad_value"), (4, "identical_pair"), (5, "missing_key")]


def test_alpaca_preferences_in_both_encodings(tmp_path):
    rows, rejects = run(tmp_path, [
        {"instruction": "Pick", "input": "", "answers": ["first", "second"], "preference": 1},
        {"instruction": "Pick", "input": "ctx", "answers": ["first", "second"], "preference": 0},
        {"instruction": "Pick", "input": "", "output_1": "one", "output_2": "two", "preference": 1},
        {"instruction": "Pick", "input": "", "output_1": "one", "output_2": "two", "preference": 2},
        {"instruction": "Pick", "input": "", "answers": ["a", "b"], "preference": 2},
        {"instruction": "Pick", "input": "", "answers": ["a", "b", "c"], "preference": 0},
        {"instruction": "Pick", "input": "", "answers": ["a", "b"], "preference": True},
        {"instruction": "Pick", "input": "", "answers": ["first", "second"], "preference": 1},
    ], "--from", "alpaca_pref", "--to", "rm", "--style", "chat")
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [
        ("second", "first"), ("first", "second"), ("one", "two"), ("two", "one")]
    assert rows[1]["prompt"] == [{"role": "user", "content": "Pick\n\nctx"}]
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (5, "bad_value"), (6, "bad_value"), (7, "bad_value"), (8, "duplicate_id")]


def test_alpaca_prompts_carry_the_reference_as_gold(tmp_path):
    rows, _ = run(tmp_path, [
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Say hi.", "input": "", "output": "hello"},
    ], "--from", "alpaca", "--to", "prompt", "--template", "plain")
    assert [r["prompt"] for r in rows] == ["Say hi.", "Say hi."]
    assert [r["label"]["gold"] for r in rows] == ["hi", "hello"]
    assert rows[0]["label"]["id"] != rows[1]["label"]["id"]
    ppo, _ = run(tmp_path, [{"prompt": "Tell a joke."}], "--from", "llm_on_ray_ppo", "--to", "prompt")
    assert ppo[0]["prompt"] == "Tell a joke." and ppo[0]["label"]["gold"] is None


def test_messages_to_sft_rm_and_prompt(tmp_path):
    system = {"role": "system", "content": "Be brief."}
    user = {"role": "user", "content": "Name a fruit."}
    chat = [system, user, {"role": "assistant", "content": "Apple."}]
    sft, rejects = run(tmp_path, [
        {"messages": chat},
        {"messages": [user]},
        {"messages": [{"role": "assistant", "content": "x"}, user]},
        {"messages": [user, {"role": "assistant", "content": ""}]},
        "not json",
    ], "--from", "messages", "--to", "sft")
    assert sft == [{"prompt": [system, user], "completion": [{"role": "assistant", "content": "Apple."}]}]
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (2, "missing_key"), (3, "role_order"), (4, "empty_value"), (5, "malformed_json")]
    prompts, _ = run(tmp_path, [{"messages": chat}, {"messages": [user]}], "--from", "messages", "--to", "prompt")
    assert [p["prompt"] for p in prompts] == [[system, user], [user]]
    pair = {"chosen": chat, "rejected": [system, user, {"role": "assistant", "content": "Rock."}]}
    other = {"chosen": chat, "rejected": [user, {"role": "assistant", "content": "Rock."}]}
    rm, rejects = run(tmp_path, [pair, other], "--from", "messages", "--to", "rm")
    assert rm == [{"prompt": [system, user], "chosen": [chat[-1]], "rejected": [pair["rejected"][-1]]}]
    assert [r["reason"] for r in rejects] == ["bad_value"]


def test_messages_as_text_through_the_chat_template(tmp_path, tokenizer_dir):
    chat = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."}]
    rows, _ = run(tmp_path, [{"messages": chat}], "--from", "messages", "--to", "sft", "--style", "text",
                  "--tokenizer", str(tokenizer_dir))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert rows == [{"prompt": tokenizer.apply_chat_template(chat[:1], add_generation_prompt=True, tokenize=False),
                     "completion": "Apple."}]


def test_trl_reads_the_outputs(tmp_path, tokenizer_dir):
    data_utils = pytest.importorskip("trl.data_utils")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rm, _ = run(tmp_path, [{"instruction": "Pick", "answers": ["a", "b"], "preference": 0}],
                "--from", "alpaca_pref", "--to", "rm", "--style", "chat")
    applied = data_utils.maybe_apply_chat_template(rm[0], tokenizer)
    assert data_utils.is_conversational(rm[0])
    assert applied["prompt"] == "<|user|>Pick<eos><|assistant|>" and applied["chosen"].startswith("a")
    sft, _ = run(tmp_path, [{"instruction": "Pick", "output": "a"}], "--from", "alpaca", "--to", "sft")
    assert not data_utils.is_conversational(sft[0]) and set(sft[0]) == {"prompt", "completion"}


def test_strict_and_impossible_conversions(tmp_path, capsys):
    source = write_lines(tmp_path / "in.jsonl", [{"instruction": "ok", "output": "fine"}, {"instruction": "x"}])
    out = tmp_path / "out.jsonl"
    assert convert.main(["--from", "alpaca", "--to", "sft", "--input", str(source), "--output", str(out), "--strict"]) == 2
    assert f"{source}:2: missing_key" in capsys.readouterr().err and not out.exists()
    with pytest.raises(DataError):
        convert.run(convert.parse_args(["--from", "alpaca", "--to", "sft", "--input", str(source), "--output", str(out),
                                        "--strict"]))
    with pytest.raises(SystemExit):
        convert.parse_args(["--from", "alpaca", "--to", "rm", "--input", str(source), "--output", str(out)])
    with pytest.raises(SystemExit):
        convert.parse_args(["--from", "messages", "--to", "sft", "--style", "text", "--input", "a", "--output", "b"])
