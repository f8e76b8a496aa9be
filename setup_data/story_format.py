"""Turn story records (the published VR-CLI story JSONL) into the chat-message lines `setup_rl_data.py` reads.

Input line: `{"story_id", "chapter_index", "high_level_plot_summary", "prior_plot_summary", "character_sheets"
(name -> sheet), "last_n_chapters" (or "story_text"), "next_chapter_synopsis", "next_chapter_header",
"next_chapter"}`. Output line: `{"messages": [system, user, assistant = next chapter], "story_id",
"chapter_index", "next_chapter_synopsis"}`; pass `--label_fields story_id chapter_index next_chapter_synopsis`
to `setup_rl_data.py` to carry those into the label.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from reward_plugins.io import DataError, write_jsonl
from setup_data.validation import RejectLog, RowError, iter_json_lines, require_text

SYSTEM = "You are a helpful and expert writing assistant."
PREAMBLE = "You are continuing a story. Here is what you know about it so far."
INSTRUCTION = (
    "Use all of the information provided to write the next chapter. "
    "Your response should begin with the chapter header."
)
CARRIED = ("story_id", "chapter_index", "next_chapter_synopsis")


def character_text(sheets: Any) -> str:
    """Character sheets as `name: sheet` paragraphs."""
    if not isinstance(sheets, Mapping) or not all(isinstance(v, str) for v in sheets.values()):
        raise RowError("bad_type", "'character_sheets' must map names to strings")
    return "\n\n".join(f"{name}: {sheet}" for name, sheet in sheets.items())


def story_user_turn(record: Mapping[str, Any]) -> str:
    """The user turn: story information, then the next chapter's synopsis and header, then the instruction."""
    previous = record.get("last_n_chapters") or record.get("story_text")
    if not isinstance(previous, str) or not previous.strip():
        raise RowError("missing_key", "missing 'last_n_chapters' (or 'story_text')")
    synopsis = require_text(record, "next_chapter_synopsis")
    if "###" in synopsis:
        raise RowError("bad_value", "'next_chapter_synopsis' contains '###', which marks sections")
    sections = [
        ("High-Level Plot Summary", require_text(record, "high_level_plot_summary")),
        ("Summary of Prior Chapters", require_text(record, "prior_plot_summary", allow_empty=True)),
        ("Character Sheets", character_text(record.get("character_sheets", {}))),
        ("Previous Chapters", previous),
        ("Next Chapter Synopsis", synopsis),
        ("Next Chapter Header", require_text(record, "next_chapter_header")),
        ("Instructions", INSTRUCTION),
    ]
    body = "\n\n".join(f"### {title}: ###\n{text}" for title, text in sections if text.strip())
    return f"{PREAMBLE}\n\n{body}"


def story_messages(record: Any, system: str = SYSTEM) -> dict[str, Any]:
    """One `setup_rl_data` input line from one story record."""
    if not isinstance(record, Mapping):
        raise RowError("bad_type", f"a line must be a JSON object, got {type(record).__name__}")
    missing = [key for key in CARRIED if key not in record]
    if missing:
        raise RowError("missing_key", f"missing key(s) {missing}")
    gold = require_text(record, "next_chapter", empty_reason="empty_gold")
    messages = [{"role": "system", "content": system}, {"role": "user", "content": story_user_turn(record)},
                {"role": "assistant", "content": gold}]
    return {"messages": messages, **{key: record[key] for key in CARRIED}}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="story JSONL")
    parser.add_argument("--output", required=True, help="messages JSONL for setup_rl_data.py (written atomically)")
    parser.add_argument("--system", default=SYSTEM)
    parser.add_argument("--strict", action="store_true", help="fail on the first bad line instead of skipping it")
    args = parser.parse_args(argv)
    rejects, rows = RejectLog(strict=args.strict), []
    try:
        for line, raw, value in iter_json_lines(args.input):
            try:
                if isinstance(value, RowError):
                    raise value
                rows.append(story_messages(value, args.system))
            except RowError as error:
                rejects.reject(args.input, line, error, raw)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    write_jsonl(args.output, rows)
    rejects_path = rejects.write(f"{args.output}.rejects.jsonl")
    print(f"{args.input} -> {args.output}: wrote {len(rows)}, {rejects.summary()}"
          + (f"; see {rejects_path}" if rejects_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
