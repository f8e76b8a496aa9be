"""Story records in the paper's format -> the paper's prompts, checked against hand-written strings."""

from __future__ import annotations

import json

import pytest

from reward_plugins.io import read_jsonl
from reward_plugins.vrcli import VRCLIPrompt
from setup_data import setup_rl_data, story_format
from setup_data.validation import RowError

FILLER = " ".join(["word"] * 230)
RECORD = {
    "story_id": "s1", "chapter_index": 3, "last_n_chapters": 1,
    "story_text": "Chapter 2: The fox crossed the river.",
    "high_level_plot_summary": "A fox seeks a map.", "prior_plot_summary": "The fox left home.",
    "character_sheets": {"Fox": "clever, restless", "Owl": "old"},
    "next_chapter_synopsis": "The fox finds the map.", "next_chapter_header": " Chapter 3: The Map ",
    "next_chapter": "Chapter 3: The Map\n\nThe fox dug by the oak. " + FILLER,
}

# Written out by hand from the paper's prompt_utils.py templates (GENERIC_PROMPT_PREFIX and its parts).
CONTEXT = (
    "Instructions: You will be given the most recent chapter of the story, a high-level plan of the entire story, "
    "a summary of the previously written chapters, character sheets for the three main characters and a brief "
    "synopsis of what should happen in the next chapter. You will also be given a chapter header for the next "
    "chapter, containing the chapter's title and any other epigraph-type text. You will first reason about the "
    "given story and about what should come next. Next, you will write the next chapter of the story.\n"
    "\n"
    "### High-Level Story Summary/Plan: ###\n"
    "A fox seeks a map.\n"
    "\n"
    "### Summary of Already Written Chapters: ###\n"
    "The fox left home.\n"
    "\n"
    "### Character Sheets: ###\n"
    "## Character Sheet (Fox): ##\n"
    "clever, restless\n"
    "\n"
    "## Character Sheet (Owl): ##\n"
    "old\n"
    "\n"
    "\n"
    "### Previous Chapter: ###\n"
    "Chapter 2: The fox crossed the river.\n"
    "\n"
    "\n"
    "### Next Chapter Synopsis: ###\n"
    "The fox finds the map.\n"
    "\n"
    "\n"
    "### Next Chapter Header: ###\n"
    "Chapter 3: The Map\n"
)
POLICY_TAIL = (
    "\n### Instructions: ###\n"
    "Instructions: Based on the next chapter's synopsis and header, please reason step by step to come up with a "
    "more detailed plan for the next chapter. Format your reasoning with \"<citation>source A says X</citation>, "
    "therefore <reasoning>reasoning</reasoning>\" pairs, where the sources can be the character sheets, the "
    "high-level story plan, the previous-chapters summary, the next chapter synopsis, and the previous few "
    "chapters. Add and modify your conclusions as you remember more information. End your response with a "
    "detailed paragraph explaining your reasoning as to how next chapter will unfold (including plot and "
    "character points), beginning this paragraph with \"In summary: \"."
)
BASELINE_TAIL = (
    "\n### Instructions: ###\n"
    "Instructions: Use all of the information provided to write the next chapter. Your response should begin "
    "with the chapter header."
)
PLAN_TAIL = (
    "\n\n### Detailed Plan for the Next Chapter ###\n"
    "The fox digs under the oak.\n"
    "\n"
    "### Instructions: ###\n"
    "Instructions: Use all of the preliminary thoughts and information provided to write the next chapter. Your "
    "response should begin with the chapter header."
)


def test_context_matches_the_papers_prompt_by_hand():
    row = story_format.story_messages(RECORD)
    assert row["messages"][1]["content"] == CONTEXT
    assert row["messages"][2]["content"] == RECORD["next_chapter"]
    assert row["instruction"] == BASELINE_TAIL.split("###\n")[-1]
    assert row["plan_instruction"] == PLAN_TAIL.split("###\n")[-1]
    assert story_format.PAPER_POLICY_TEMPLATE.format(context=CONTEXT) == CONTEXT + POLICY_TAIL


def test_preamble_and_story_heading_variants():
    few = {k: v for k, v in RECORD.items() if k not in ("high_level_plot_summary", "character_sheets")}
    text = story_format.story_context({**few, "last_n_chapters": 3, "prior_plot_summary": None})
    assert text.startswith("Instructions: You will be given the last 3 chapters of the story and a brief synopsis of "
                           "what should happen in the next chapter. You will also be given a chapter header")
    assert "\n\n### Previous 3 Chapters: ###\nChapter 2: The fox crossed the river.\n\n\n### Next Chapter Synopsis" in text
    whole = story_format.story_context({**few, "last_n_chapters": -1})
    assert "the entire story, a summary of the previously written chapters and a brief synopsis" in whole
    assert "### Prior Story: ###\n" in whole
    nothing = story_format.story_context({"story_text": "x", "next_chapter_header": "H", "last_n_chapters": None})
    assert nothing == ("Instructions: You will first reason about the given story and about what should come next. "
                       "Next, you will write the next chapter of the story.\n\n\n\n\n\n### Next Chapter Header: ###\nH\n")
    with pytest.raises(RowError, match="integer count"):
        story_format.story_context({**RECORD, "last_n_chapters": "2"})


def test_both_layouts_render_the_hand_written_strings():
    label = {"context": CONTEXT, "gold": RECORD["next_chapter"], **{k: story_format.story_messages(RECORD)[k]
             for k in ("instruction", "plan_instruction")}}
    paper = VRCLIPrompt(layout="paper", system=None)
    assert paper.render(label, None) == [{"role": "user", "content": CONTEXT + BASELINE_TAIL}]
    assert paper.render(label, "The fox digs under the oak.") == [{"role": "user", "content": CONTEXT + PLAN_TAIL}]
    append = VRCLIPrompt(chat_template=False, system="SYS")
    plain = {"context": "Write chapter 3.", "gold": "g"}
    assert append.render(plain, None) == "SYS\n\nWrite chapter 3."
    assert append.render(plain, "a plan") == "SYS\n\nWrite chapter 3.\n\n### Detailed Plan for the Next Chapter ###\na plan"


def test_paper_filters_with_reasons():
    def reason(**changes):
        try:
            story_format.story_messages({**RECORD, **changes})
        except RowError as error:
            return error.reason
        return None

    assert reason() is None
    assert reason(next_chapter=" ".join(["w"] * 200)) == "chapter_too_short"   # 200 words: not more than 200
    assert reason(next_chapter=" ".join(["w"] * 201)) is None
    assert reason(next_chapter=" ".join(["w"] * 5000)) == "chapter_too_long"
    assert reason(story_text=" ".join(["w"] * 5000)) == "story_too_long"
    assert reason(story_text=" ".join(["w"] * 4999), high_level_plot_summary=" ".join(["w"] * 5000)) == "prompt_too_long"
    assert reason(chapter_index=1) == "chapter_index_too_low"
    assert reason(chapter_index=2) is None
    assert story_format.story_messages({**RECORD, "chapter_index": 0}, filters=story_format.NO_FILTERS)


def test_main_counts_rejects_per_reason(tmp_path, capsys):
    lines = [RECORD, {**RECORD, "chapter_index": 1}, {**RECORD, "next_chapter": "too short"}, "{broken",
             {**RECORD, "next_chapter_synopsis": "### oops"}, {k: v for k, v in RECORD.items() if k != "story_id"}]
    source = tmp_path / "stories.jsonl"
    source.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    out = tmp_path / "story_dataset_val.jsonl"
    assert story_format.main(["--input", str(source), "--output", str(out)]) == 0
    kept = read_jsonl(out)
    assert [r["next_chapter_synopsis"] for r in kept] == [RECORD["next_chapter_synopsis"], "### oops"]  # no '###' filter
    rejects = read_jsonl(f"{out}.rejects.jsonl")
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (2, "chapter_index_too_low"), (3, "chapter_too_short"), (4, "malformed_json"), (6, "missing_key")]
    assert "chapter_index_too_low=1" in capsys.readouterr().out
    assert story_format.main(["--input", str(source), "--output", str(out), "--no_filters"]) == 0
    assert len(read_jsonl(out)) == 4


def test_setup_rl_data_asks_for_a_plan_and_keeps_the_layout_parts(tokenizer_dir, tmp_path):
    source = tmp_path / "in" / "story_dataset_val.jsonl"
    source.parent.mkdir()
    source.write_text(json.dumps(RECORD) + "\n" + json.dumps({**RECORD, "chapter_index": 1}) + "\n")
    argv = ["--tokenizer_name", str(tokenizer_dir), "--input_dir", str(source.parent), "--data_dir",
            str(tmp_path / "rl"), "--splits", "val", "--label_fields", *story_format.CARRIED]
    assert setup_rl_data.main(argv) == 0
    rows = read_jsonl(tmp_path / "rl" / "val.jsonl")
    assert len(rows) == 1
    prompt, label = rows[0]["prompt"], rows[0]["label"]
    assert prompt == [{"role": "system", "content": story_format.SYSTEM}, {"role": "user", "content": CONTEXT + POLICY_TAIL}]
    assert label["context"] == CONTEXT and label["gold"] == RECORD["next_chapter"]
    assert label["prompt_layout"] == "paper" and label["story_id"] == "s1"
    assert label["instruction"] + "" == BASELINE_TAIL.split("###\n")[-1]
    assert [r["reason"] for r in read_jsonl(tmp_path / "rl" / "rejects.jsonl")] == ["chapter_index_too_low"]
    custom = [*argv[:-4], "--data_dir", str(tmp_path / "custom"), "--user_template", "{context}\nPlan, then: In summary:"]
    assert setup_rl_data.main(custom) == 0
    assert read_jsonl(tmp_path / "custom" / "val.jsonl")[0]["prompt"][1]["content"] == CONTEXT + "\nPlan, then: In summary:"
