"""setup_rl_data.py on the shipped sample data and on deliberately bad lines, with the tiny tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from reward_plugins.io import DataError, read_jsonl
from reward_plugins.vrcli import VRCLIPrompt
from setup_data import setup_rl_data
from setup_data.story_format import NO_FILTERS, REASONING_INSTRUCTION, story_messages

SAMPLE = Path(__file__).resolve().parents[1] / "setup_data" / "sample_data"
SYSTEM = {"role": "system", "content": "Be helpful."}


def chat(user: str, gold: str, system: bool = True) -> dict:
    turns = [{"role": "user", "content": user}, {"role": "assistant", "content": gold}]
    return {"messages": ([SYSTEM] if system else []) + turns}


def write_lines(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def run(tokenizer_dir, input_dir, data_dir, *extra) -> int:
    argv = ["--tokenizer_name", str(tokenizer_dir), "--input_dir", str(input_dir), "--data_dir", str(data_dir), *extra]
    return setup_rl_data.main(argv)


# The original's prompt for the first sample row (ReasoningNCP prompt_utils.generate_reasoning_from_story_messages:
# preamble, story information, synopsis, header, then the reasoning instruction), written out by hand.
S000_PROMPT = (
    "Instructions: You will be given the most recent chapter of the story, a high-level plan of the entire story and "
    "a brief synopsis of what should happen in the next chapter. You will also be given a chapter header for the next "
    "chapter, containing the chapter's title and any other epigraph-type text. You will first reason about the given "
    "story and about what should come next. Next, you will write the next chapter of the story.\n\n"
    "### High-Level Story Summary/Plan: ###\nA story about Sable, Ada and a brass key.\n\n"
    "### Previous Chapter: ###\nSable and Ada searched the night market for a brass key. On the last evening a storm "
    "rolled in, and Ada admitted a secret about the family.\n\n\n"
    "### Next Chapter Synopsis: ###\nSable follows the clue to the orchard, where a brass key reveals who betrayed Ada.\n\n\n"
    "### Next Chapter Header: ###\nChapter 3: Orchard\n\n"
    "### Instructions: ###\nInstructions: Based on the next chapter's synopsis and header, please reason step by step "
    "to come up with a more detailed plan for the next chapter. Format your reasoning with \"<citation>source A says "
    "X</citation>, therefore <reasoning>reasoning</reasoning>\" pairs, where the sources can be the character sheets, "
    "the high-level story plan, the previous-chapters summary, the next chapter synopsis, and the previous few chapters. "
    "Add and modify your conclusions as you remember more information. End your response with a detailed paragraph "
    "explaining your reasoning as to how next chapter will unfold (including plot and character points), beginning "
    "this paragraph with \"In summary: \"."
)


def test_sample_data_round_trip(tokenizer_dir, tmp_path):
    """Chat lines with the paper's sections get the paper's reasoning prompt and labels the paper layout scores."""
    out = tmp_path / "rl_data"
    assert run(tokenizer_dir, SAMPLE, out, "--label_fields", "story_id", "chapter_index") == 0
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = set()
    for split in ("train", "test", "val"):
        source = read_jsonl(SAMPLE / f"story_dataset_{split}.jsonl")
        rows = read_jsonl(out / f"{split}.jsonl")
        assert len(rows) == len(source)
        for src, row in zip(source, rows):
            system, user = row["prompt"]
            assert system == src["messages"][0] and user["role"] == "user"
            assert user["content"].endswith('beginning this paragraph with "In summary: ".')
            label = row["label"]
            assert user["content"] == label["context"] + "\n### Instructions: ###\n" + REASONING_INSTRUCTION
            assert label["gold"] == src["messages"][-1]["content"]
            assert label["story_id"] == src["story_id"] and label["prompt_layout"] == "paper"
            assert label["baseline_ppl"] is None
            context, gold = VRCLIPrompt(layout="paper").token_ids(tokenizer, label, None)
            assert context and gold[-1] == tokenizer.eos_token_id
            ids.add(label["id"])
    assert read_jsonl(out / "train.jsonl")[0]["prompt"][1]["content"] == S000_PROMPT
    assert len(ids) == sum(len(read_jsonl(out / f"{s}.jsonl")) for s in ("train", "test", "val"))
    first = read_jsonl(out / "train.jsonl")
    assert run(tokenizer_dir, SAMPLE, tmp_path / "again", "--label_fields", "story_id", "chapter_index") == 0
    assert [r["label"]["id"] for r in read_jsonl(tmp_path / "again" / "train.jsonl")] == [r["label"]["id"] for r in first]
    assert not (out / "rejects.jsonl").exists()


def test_a_story_record_and_its_chat_line_give_the_same_row(tokenizer_dir, tmp_path):
    """The messages path reads the paper's sections back: a story record and the chat line a user would hold for
    it (the baseline prompt as the user turn, the chapter as the assistant turn) give the same prompt and label."""
    record = {"story_id": "s9", "chapter_index": 4, "story_text": "The fox slept.\n\nThe owl watched.",
              "last_n_chapters": 2, "next_chapter": "Chapter 4: Dawn\n\nThe fox woke.",
              "next_chapter_synopsis": "The fox wakes ### early.", "next_chapter_header": "Chapter 4: Dawn",
              "high_level_plot_summary": "A fox and an owl.", "prior_plot_summary": "They met.",
              "character_sheets": {"Fox": "Quick.", "Owl": "Wise."}}
    story = story_messages(record, filters=NO_FILTERS)
    user = story["messages"][1]["content"] + "\n### Instructions: ###\n" + story["instruction"]
    line = {"story_id": "s9", "chapter_index": 4,
            "messages": [story["messages"][0], {"role": "user", "content": user}, story["messages"][2]]}
    write_lines(tmp_path / "a" / "story_dataset_val.jsonl", [record])
    write_lines(tmp_path / "b" / "story_dataset_val.jsonl", [line])
    for name in ("a", "b"):
        assert run(tokenizer_dir, tmp_path / name, tmp_path / f"out_{name}", "--splits", "val", "--no_filters",
                   "--label_fields", "story_id", "chapter_index") == 0
    from_record, from_line = (read_jsonl(tmp_path / f"out_{n}" / "val.jsonl")[0] for n in ("a", "b"))
    assert from_line == from_record
    assert "### Previous 2 Chapters: ###" in from_line["prompt"][1]["content"]


def test_chat_lines_without_the_papers_sections(tokenizer_dir, tmp_path, capsys):
    """Other chat data is refused under the default layout, naming the option that keeps it as written."""
    write_lines(tmp_path / "in" / "story_dataset_val.jsonl", [chat("Tell the story of the fox.", "The fox jumps.")])
    assert run(tokenizer_dir, tmp_path / "in", tmp_path / "out", "--splits", "val") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "0 rows to write" in err and "not_story_sections (1)" in err
    assert not (tmp_path / "out" / "val.jsonl").exists()
    assert run(tokenizer_dir, tmp_path / "in", tmp_path / "out", "--splits", "val", "--messages_layout", "as_is") == 0
    assert read_jsonl(tmp_path / "out" / "val.jsonl")[0]["label"]["context"] == "Tell the story of the fox."


def test_a_high_reject_share_warns_in_one_line(tokenizer_dir, tmp_path, capsys):
    good = chat("Prompt one.", "Gold one.")
    lines = [good, chat("Prompt two.", "  "), chat("Prompt three.", " "), "{broken"]
    write_lines(tmp_path / "in" / "story_dataset_val.jsonl", lines)
    argv = ["--splits", "val", "--messages_layout", "as_is"]
    assert run(tokenizer_dir, tmp_path / "in", tmp_path / "out", *argv) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(warning) == 1 and "3 of 4 rows rejected (75%), mostly empty_gold (2)" in warning[0]
    assert run(tokenizer_dir, tmp_path / "in", tmp_path / "out", *argv, "--max_reject_share", "0.8") == 0
    assert "warning" not in capsys.readouterr().err


def test_hf_datasets_reads_the_splits(tokenizer_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "rl_data"
    assert run(tokenizer_dir, SAMPLE, out) == 0
    loaded = datasets.load_dataset("json", data_files={s: str(out / f"{s}.jsonl") for s in ("train", "test", "val")},
                                   cache_dir=str(tmp_path / "cache"))
    assert loaded["val"].num_rows == len(read_jsonl(SAMPLE / "story_dataset_val.jsonl"))
    assert set(loaded["train"].features["label"].keys()) == set(read_jsonl(out / "train.jsonl")[0]["label"])


def bad_input(root: Path) -> Path:
    good = chat("Tell the story of the fox.", "The fox jumps over the lazy dog.")
    write_lines(root / "story_dataset_train.jsonl", [
        good,
        '{"messages": [oops',
        {"no_messages": []},
        chat("Write a chapter.", "   "),
        {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
        good,
        [{"role": "user", "content": "A bare message list."}, {"role": "assistant", "content": "Also accepted."}],
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]},
    ])
    write_lines(root / "story_dataset_test.jsonl", [good, chat("Another prompt.", "Another gold.")])
    write_lines(root / "story_dataset_val.jsonl", [chat("Val prompt.", "Val gold.", system=False)])
    return root


def test_bad_lines_are_counted_and_written_to_rejects(tokenizer_dir, tmp_path, capsys):
    source = bad_input(tmp_path / "in")
    out = tmp_path / "rl_data"
    assert run(tokenizer_dir, source, out, "--messages_layout", "as_is") == 0
    assert len(read_jsonl(out / "train.jsonl")) == 2
    assert len(read_jsonl(out / "test.jsonl")) == 1
    assert len(read_jsonl(out / "val.jsonl")) == 1
    rejects = read_jsonl(out / "rejects.jsonl")
    got = {(Path(r["file"]).name, r["line"], r["reason"]) for r in rejects}
    train, test = "story_dataset_train.jsonl", "story_dataset_test.jsonl"
    assert got == {
        (train, 2, "malformed_json"), (train, 3, "missing_key"), (train, 4, "empty_gold"), (train, 5, "role_order"),
        (train, 6, "multi_turn"), (train, 7, "duplicate_id"), (train, 9, "missing_key"), (test, 1, "duplicate_id"),
    }
    assert all(r["raw"] for r in rejects)
    printed = capsys.readouterr().out
    assert "train: kept 2, rejected 7" in printed and "test: kept 1, rejected 1 (duplicate_id=1)" in printed
    summary = json.loads((out / "setup_summary.json").read_text())
    assert summary["splits"]["train"]["reasons"]["missing_key"] == 2


def test_strict_fails_on_first_bad_line_naming_file_and_line(tokenizer_dir, tmp_path, capsys):
    source = bad_input(tmp_path / "in")
    assert run(tokenizer_dir, source, tmp_path / "out", "--strict", "--messages_layout", "as_is") == 2
    assert "story_dataset_train.jsonl:2: malformed_json" in capsys.readouterr().err
    assert not (tmp_path / "out" / "train.jsonl").exists()
    with pytest.raises(DataError, match=r"story_dataset_train.jsonl:2"):
        setup_rl_data.run(setup_rl_data.parse_args(
            ["--tokenizer_name", str(tokenizer_dir), "--input_dir", str(source), "--data_dir", str(tmp_path), "--strict",
             "--messages_layout", "as_is"]))


def test_max_prompt_tokens_skips_exactly_the_long_prompts(tokenizer_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = read_jsonl(SAMPLE / "story_dataset_train.jsonl")
    texts = [tokenizer.apply_chat_template(r["messages"][:-1], add_generation_prompt=True, tokenize=False) for r in rows]
    lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
    limit = sorted(lengths)[len(lengths) // 2]
    out = tmp_path / "rl_data"
    assert run(tokenizer_dir, SAMPLE, out, "--splits", "train", "--max_prompt_tokens", str(limit),
               "--messages_layout", "as_is") == 0
    kept = read_jsonl(out / "train.jsonl")
    assert len(kept) == sum(n <= limit for n in lengths) and 0 < len(kept) < len(rows)
    rejects = read_jsonl(out / "rejects.jsonl")
    assert [r["line"] for r in rejects] == [i + 1 for i, n in enumerate(lengths) if n > limit]
    assert all(r["reason"] == "too_long" for r in rejects)


def test_text_prompts_and_merged_system(tokenizer_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = tmp_path / "rl_data"
    assert run(tokenizer_dir, SAMPLE, out, "--splits", "val", "--prompt_format", "text", "--merge_system",
               "--messages_layout", "as_is") == 0
    source = read_jsonl(SAMPLE / "story_dataset_val.jsonl")[0]["messages"]
    row = read_jsonl(out / "val.jsonl")[0]
    merged = [{"role": "user", "content": source[0]["content"] + "\n\n" + source[1]["content"]}]
    assert row["prompt"] == tokenizer.apply_chat_template(merged, add_generation_prompt=True, tokenize=False)
    assert "<|system|>" not in row["prompt"]
    assert row["label"]["system"] == source[0]["content"] and row["label"]["context"] == source[1]["content"]


def test_user_template_changes_policy_prompt_not_context(tokenizer_dir, tmp_path):
    out = tmp_path / "rl_data"
    template = "{context}\n\nPlan first; end with 'In summary:'."
    assert run(tokenizer_dir, SAMPLE, out, "--splits", "val", "--user_template", template) == 0
    row = read_jsonl(out / "val.jsonl")[0]
    assert row["prompt"][-1]["content"] == template.format(context=row["label"]["context"])
    with pytest.raises(SystemExit):
        setup_rl_data.parse_args(["--tokenizer_name", str(tokenizer_dir), "--user_template", "{synopsis}"])


def test_template_without_system_role_asks_for_merge(tokenizer_dir, tmp_path):
    no_system = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, no_system)
    tokenizer = AutoTokenizer.from_pretrained(no_system)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    tokenizer.save_pretrained(no_system)
    with pytest.raises(SystemExit, match="--merge_system"):
        run(no_system, SAMPLE, tmp_path / "out", "--splits", "val")
    assert run(no_system, SAMPLE, tmp_path / "out", "--splits", "val", "--merge_system") == 0
    assert read_jsonl(tmp_path / "out" / "val.jsonl")[0]["prompt"][0]["role"] == "user"
