"""Turn story records (the VR-CLI paper's story JSONL) into the chat-message lines `setup_rl_data.py` reads.

Input line, as in the paper's data (`rl_training/instructions.md`): `{"story_id", "chapter_index",
"story_text" (the previous chapter(s)), "last_n_chapters" (how many chapters `story_text` holds; -1: the
whole story), "next_chapter", "next_chapter_synopsis", "next_chapter_header", and optionally
"high_level_plot_summary", "prior_plot_summary", "character_sheets" (name -> sheet)}`; an optional part
that is missing or null is left out of the prompt, as the paper's `include_*` flags do.

Output line: `{"messages": [system, user = the story part, assistant = next chapter], "story_id",
"chapter_index", "next_chapter_synopsis", "instruction", "plan_instruction", "prompt_layout": "paper"}`. The
user turn is the paper's prompt up to and including the chapter header, without the instruction block:
`setup_rl_data.py` adds the policy's instruction (asking for a plan), and the `vrcli` reward's `paper`
layout adds the plan block and `instruction` / `plan_instruction` (kept in the label) when it scores.

The paper's filters (`rl_training/setup_rl_data.py`) are on by default, each with its own reject reason;
words are counted as the paper does (splitting on single spaces).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reward_plugins.cli import run_cli
from reward_plugins.io import write_jsonl
from setup_data.validation import RejectLog, RowError, iter_json_lines, reject_share_arg, require_text

SYSTEM = "You are a helpful and expert writing assistant."
INSTRUCTION = (
    "Instructions: Use all of the information provided to write the next chapter. "
    "Your response should begin with the chapter header."
)
PLAN_INSTRUCTION = (
    "Instructions: Use all of the preliminary thoughts and information provided to write the next chapter. "
    "Your response should begin with the chapter header."
)
REASONING_INSTRUCTION = (
    "Instructions: Based on the next chapter's synopsis and header, please reason step by step to come up with "
    "a more detailed plan for the next chapter. Format your reasoning with \"<citation>source A says X</citation>, "
    "therefore <reasoning>reasoning</reasoning>\" pairs, where the sources can be the character sheets, the "
    "high-level story plan, the previous-chapters summary, the next chapter synopsis, and the previous few "
    "chapters. Add and modify your conclusions as you remember more information. End your response with a "
    "detailed paragraph explaining your reasoning as to how next chapter will unfold (including plot and "
    "character points), beginning this paragraph with \"In summary: \"."
)
# The policy's user turn for story rows (setup_rl_data.py's default for them); any str.format template over
# {context} and the label fields can replace it.
PAPER_POLICY_TEMPLATE = "{context}\n### Instructions: ###\n" + REASONING_INSTRUCTION
LAYOUT_FIELDS = ("instruction", "plan_instruction", "prompt_layout")
CARRIED = ("story_id", "chapter_index", "next_chapter_synopsis")


@dataclass(frozen=True)
class StoryFilters:
    """The paper's filters; None switches one off. Bounds are exclusive, as in the paper's script."""

    min_chapter_words: int | None = 200
    max_chapter_words: int | None = 5000
    max_story_words: int | None = 5000
    max_prompt_words: int | None = 10000
    min_chapter_index: int | None = 2


NO_FILTERS = StoryFilters(None, None, None, None, None)


def paper_words(text: str) -> int:
    """Word count as the paper's filters take it: pieces between single spaces."""
    return len(text.split(" "))


def given_text(last_n_chapters: int | None, parts: Sequence[str]) -> str | None:
    """What the preamble says the model is given; None when nothing is."""
    given = []
    if last_n_chapters is not None:
        given.append("the most recent chapter of the story" if last_n_chapters == 1
                     else f"the last {last_n_chapters} chapters of the story" if last_n_chapters > 1
                     else "the entire story")
    given.extend(parts)
    if not given:
        return None
    listed = given[0] if len(given) == 1 else ", ".join(given[:-1]) + " and " + given[-1]
    return listed + (". You will also be given a chapter header for the next chapter, containing the chapter's "
                     "title and any other epigraph-type text")


def preamble(last_n_chapters: int | None, parts: Sequence[str]) -> str:
    """The opening instruction of the paper's prompt."""
    given = given_text(last_n_chapters, parts)
    start = "Instructions: " if given is None else f"Instructions: You will be given {given}. "
    return start + ("You will first reason about the given story and about what should come next. "
                    "Next, you will write the next chapter of the story.")


def story_heading(last_n_chapters: int) -> str:
    if last_n_chapters == 1:
        return "### Previous Chapter: ###"
    if last_n_chapters > 1:
        return f"### Previous {last_n_chapters} Chapters: ###"
    return "### Prior Story: ###"


def optional_text(record: Mapping[str, Any], key: str) -> str | None:
    value = record.get(key)
    if value is not None and not isinstance(value, str):
        raise RowError("bad_type", f"{key!r} must be a string or null, got {type(value).__name__}")
    return value


def character_sheets_text(sheets: Any) -> str | None:
    """The character-sheet section, or None when the record has no sheets."""
    if sheets is None:
        return None
    if not isinstance(sheets, Mapping) or not all(isinstance(v, str) for v in sheets.values()):
        raise RowError("bad_type", "'character_sheets' must map names to strings")
    body = "\n".join(f"## Character Sheet ({name}): ##\n{sheet}\n" for name, sheet in sheets.items())
    return f"\n### Character Sheets: ###\n{body}\n"


def last_n_chapters_of(record: Mapping[str, Any]) -> int | None:
    value = record.get("last_n_chapters")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RowError("bad_type", f"'last_n_chapters' must be an integer count (or null), got {value!r}")
    return value


def story_context(record: Mapping[str, Any]) -> str:
    """The paper's prompt from its preamble to the chapter-header section, without the instruction block."""
    story = require_text(record, "story_text")
    last_n = last_n_chapters_of(record)
    high_level = optional_text(record, "high_level_plot_summary")
    prior = optional_text(record, "prior_plot_summary")
    sheets = character_sheets_text(record.get("character_sheets"))
    synopsis = optional_text(record, "next_chapter_synopsis")
    header = require_text(record, "next_chapter_header").strip()
    parts = [text for present, text in (
        (high_level is not None, "a high-level plan of the entire story"),
        (prior is not None, "a summary of the previously written chapters"),
        (sheets is not None, "character sheets for the three main characters"),
        (synopsis is not None, "a brief synopsis of what should happen in the next chapter"),
    ) if present]
    information = "".join([
        f"\n### High-Level Story Summary/Plan: ###\n{high_level}\n" if high_level is not None else "",
        f"\n### Summary of Already Written Chapters: ###\n{prior}\n" if prior is not None else "",
        sheets or "",
        f"\n{story_heading(last_n)}\n{story}\n" if last_n is not None else "",
    ]).strip()
    synopsis_text = f"\n### Next Chapter Synopsis: ###\n{synopsis}\n" if synopsis is not None else ""
    return f"{preamble(last_n, parts)}\n\n{information}\n\n{synopsis_text}\n\n### Next Chapter Header: ###\n{header}\n"


SECTIONS = {  # the paper's section headings (and the sample data's shorter summary one) -> story record fields
    "High-Level Story Summary/Plan": "high_level_plot_summary",
    "High-Level Summary": "high_level_plot_summary",
    "Summary of Already Written Chapters": "prior_plot_summary",
    "Character Sheets": "character_sheets",
    "Next Chapter Synopsis": "next_chapter_synopsis",
    "Next Chapter Header": "next_chapter_header",
}
STORY_HEADING = re.compile(r"Previous Chapter|Previous (\d+) Chapters|Prior Story")
HEADING = re.compile(r"^### (.+?): ###[ \t]*$", re.MULTILINE)
SHEET = re.compile(r"^## Character Sheet \((.+?)\): ##[ \t]*$", re.MULTILINE)


def record_from_messages(messages: Sequence[Mapping[str, str]], extra: Mapping[str, Any]) -> dict[str, Any]:
    """A story record from a chat line whose user turn holds the paper's sections (`### Previous Chapter: ###`,
    `### Next Chapter Synopsis: ###`, `### Next Chapter Header: ###`, ...) and whose last turn is the gold chapter.

    A leading "Instructions: ..." preamble and an `### Instructions: ###` block are dropped: the paper's prompt
    is rebuilt from the sections (`story_context`), so the policy gets the reasoning prompt and the label the
    `paper` layout's parts. `extra`: the line's other keys (story_id, chapter_index, ...), carried along.
    """
    user, gold = messages[-2]["content"], messages[-1]["content"]
    parts = HEADING.split(user)
    lead = parts[0].strip()
    if len(parts) < 3 or (lead and not lead.startswith("Instructions:")):
        raise RowError("not_story_sections", "the user turn does not hold the paper's '### Section: ###' parts "
                                             "(use --messages_layout as_is for other chat data)")
    record: dict[str, Any] = {key: None for key in CARRIED} | dict(extra) | {"next_chapter": gold}
    for heading, body in zip(parts[1::2], parts[2::2]):
        body = body.strip()
        story = STORY_HEADING.fullmatch(heading)
        if story:
            count = story.group(1)
            record["story_text"] = body
            record["last_n_chapters"] = int(count) if count else 1 if heading == "Previous Chapter" else -1
        elif heading == "Character Sheets":
            pieces = SHEET.split(body)
            record["character_sheets"] = {name: sheet.strip() for name, sheet in zip(pieces[1::2], pieces[2::2])}
        elif heading in SECTIONS:
            record[SECTIONS[heading]] = body
        elif heading != "Instructions":
            raise RowError("unknown_section", f"unknown section '### {heading}: ###' in the user turn")
    for key, heading in (("story_text", "Previous Chapter"), ("next_chapter_header", "Next Chapter Header")):
        if not record.get(key):
            raise RowError("missing_section", f"the user turn has no '### {heading}: ###' section"
                                              + (" (or Previous N Chapters / Prior Story)" if key == "story_text" else ""))
    return record


def check_filters(record: Mapping[str, Any], gold: str, policy_turns: Sequence[str], filters: StoryFilters) -> None:
    """Raise a `RowError` whose reason names the first paper filter the record fails."""
    words = paper_words(gold)
    if filters.min_chapter_words is not None and words <= filters.min_chapter_words:
        raise RowError("chapter_too_short", f"next chapter has {words} words, not more than {filters.min_chapter_words}")
    if filters.max_chapter_words is not None and words >= filters.max_chapter_words:
        raise RowError("chapter_too_long", f"next chapter has {words} words, not fewer than {filters.max_chapter_words}")
    story_words = paper_words(record["story_text"])
    if filters.max_story_words is not None and story_words >= filters.max_story_words:
        raise RowError("story_too_long", f"story_text has {story_words} words, not fewer than {filters.max_story_words}")
    prompt_words = paper_words(" ".join(policy_turns))
    if filters.max_prompt_words is not None and prompt_words >= filters.max_prompt_words:
        raise RowError("prompt_too_long", f"the policy prompt has {prompt_words} words, not fewer than {filters.max_prompt_words}")
    index = record.get("chapter_index")
    if filters.min_chapter_index is not None:
        if isinstance(index, bool) or not isinstance(index, int):
            raise RowError("bad_type", f"'chapter_index' must be an integer, got {index!r}")
        if index < filters.min_chapter_index:
            raise RowError("chapter_index_too_low", f"chapter_index {index} < {filters.min_chapter_index}")


def story_messages(record: Any, system: str = SYSTEM, filters: StoryFilters = StoryFilters(),
                   policy_template: str = PAPER_POLICY_TEMPLATE) -> dict[str, Any]:
    """One `setup_rl_data` input line from one story record (filters applied to the paper's policy prompt)."""
    if not isinstance(record, Mapping):
        raise RowError("bad_type", f"a line must be a JSON object, got {type(record).__name__}")
    missing = [key for key in CARRIED if key not in record]
    if missing:
        raise RowError("missing_key", f"missing key(s) {missing}")
    gold = require_text(record, "next_chapter", empty_reason="empty_gold")
    context = story_context(record)
    check_filters(record, gold, [system, policy_template.format_map({**record, "context": context})], filters)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": context},
                {"role": "assistant", "content": gold}]
    return {"messages": messages, **{key: record[key] for key in CARRIED},
            "instruction": INSTRUCTION, "plan_instruction": PLAN_INSTRUCTION, "prompt_layout": "paper"}


def filter_args(parser: argparse.ArgumentParser) -> None:
    """The filter options (shared with setup_rl_data.py, which reads story records too)."""
    defaults = StoryFilters()
    group = parser.add_argument_group("story filters (the paper's defaults; 0 or a negative value switches one off)")
    for name in StoryFilters.__dataclass_fields__:
        group.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
    group.add_argument("--no_filters", action="store_true", help="switch every story filter off")


def filters_from(args: argparse.Namespace) -> StoryFilters:
    if args.no_filters:
        return NO_FILTERS
    values = {name: getattr(args, name) for name in StoryFilters.__dataclass_fields__}
    return StoryFilters(**{k: (v if v is not None and (v > 0 or k == "min_chapter_index") else None)
                           for k, v in values.items()})


def run(args: argparse.Namespace) -> int:
    filters = filters_from(args)
    rejects, rows = RejectLog(strict=args.strict), []
    for line, raw, value in iter_json_lines(args.input):
        try:
            if isinstance(value, RowError):
                raise value
            rows.append(story_messages(value, args.system, filters))
        except RowError as error:
            rejects.reject(args.input, line, error, raw)
    rejects_path = rejects.write(f"{args.output}.rejects.jsonl")
    rejects.check_kept(args.input, len(rows), max_share=args.max_reject_share, rejects_path=rejects_path)
    write_jsonl(args.output, rows)
    print(f"{args.input} -> {args.output}: wrote {len(rows)}, {rejects.summary()}"
          + (f"; see {rejects_path}" if rejects_path else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: bad input (an empty or unreadable file, no row left) exits 2 with one message; --debug re-raises."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="story JSONL")
    parser.add_argument("--output", required=True, help="messages JSONL for setup_rl_data.py (written atomically)")
    parser.add_argument("--system", default=SYSTEM)
    parser.add_argument("--strict", action="store_true", help="fail on the first bad line instead of skipping it")
    filter_args(parser)
    reject_share_arg(parser)
    return run_cli(lambda args: run(parser.parse_args(args)), "story_format", argv)


if __name__ == "__main__":
    sys.exit(main())
