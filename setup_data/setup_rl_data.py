"""Turn chat-message JSONL into RL prompt files whose label carries everything the rewards need.

Input: `{input_dir}/{dataset_name}_{split}.jsonl`, each line `{"messages": [...]}` (or a bare message list):
an optional system turn, one user turn (the story context) and the assistant's gold answer last; or a story
record in the VR-CLI paper's format (converted by `setup_data.story_format`). By default
(`--messages_layout paper`) a chat line's user turn is read as the paper's sections (`### Previous Chapter:
###`, `### Next Chapter Synopsis: ###`, `### Next Chapter Header: ###`, ...; a trailing `### Instructions: ###`
block is dropped) and rebuilt into the paper's prompt, exactly as a story record is: both get the plan-asking
policy prompt of `generate_reasoning_from_story_messages` and labels for the `vrcli` reward's `layout:
paper`. The paper's filters (chapter and prompt lengths, chapter index) apply to story records, the paper's
raw datapoints; chat lines are taken as prepared (`story_format.py` writes them after filtering).
`--messages_layout as_is` keeps other chat data as written.
Output: `{data_dir}/{split}.jsonl`, one row per kept line:

    {"prompt": <message list without the gold, or the chat-template-rendered string>,
     "label": {"id": <content hash>, "gold": <assistant text>, "context": <story part>, "system": <text|null>,
               "baseline_ppl": null, "baseline_temperature": null, "baseline_model": null,
               [paper rows: "instruction", "plan_instruction", "prompt_layout": "paper"], ...--label_fields}}

OpenRLHF reads it with `--data.input_key prompt --data.label_key label [--data.apply_chat_template]`, TRL
as a JSON dataset. `context` is what the `vrcli` prompt templates reference as `{context}`; the baseline
fields are filled in by `compute_baseline_perplexity.py`. The policy's user turn is `--user_template`
rendered over `{context}` and the label fields; by default paper rows get the paper's prompt asking for
`<citation>...</citation>, therefore <reasoning>...</reasoning>` pairs and an "In summary: " plan, as_is rows
their user text as is. `label.context` keeps the story part the baseline is scored on. Bad lines are
skipped, counted per reason and written to `{data_dir}/rejects.jsonl` (`--strict`: fail on the first); a
split left with no rows is an error, and more than `--max_reject_share` (default half) rejected a warning.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reward_plugins.cli import check_tokenizer_dir, run_cli
from reward_plugins.io import DataError, write_json, write_jsonl
from setup_data.story_format import (
    LAYOUT_FIELDS,
    NO_FILTERS,
    PAPER_POLICY_TEMPLATE,
    SYSTEM,
    StoryFilters,
    filter_args,
    filters_from,
    record_from_messages,
    story_messages,
)
from setup_data.validation import RejectLog, RowError, check_messages, iter_json_lines, reject_share_arg, stable_id

SPLITS = ("train", "test", "val")
BASELINE_FIELDS = ("baseline_ppl", "baseline_temperature", "baseline_model")


@dataclass(frozen=True)
class PromptOptions:
    """How prompts are built: message list or rendered text, system-role handling, length limit, extra label fields."""

    render: bool = False
    merge_system: bool = False
    max_prompt_tokens: int | None = None
    label_fields: tuple[str, ...] = ()
    user_template: str | None = None  # None: the paper's plan-asking prompt for story rows, `{context}` otherwise
    story_filters: StoryFilters = StoryFilters()
    messages_layout: str = "paper"  # paper: chat lines are read as the paper's sections; as_is: kept as written

    def template_for(self, record: Mapping[str, Any]) -> str:
        """The policy's user-turn template for one input record."""
        if self.user_template is not None:
            return self.user_template
        return PAPER_POLICY_TEMPLATE if record.get("prompt_layout") == "paper" else "{context}"


def merge_system_turn(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """Fold a leading system message into the first user turn, for chat templates without a system role."""
    messages = [dict(m) for m in messages]
    if len(messages) > 1 and messages[0]["role"] == "system":
        system, first = messages[0], messages[1]
        return [{"role": "user", "content": f"{system['content']}\n\n{first['content']}"}, *messages[2:]]
    return messages


def build_row(value: Any, options: PromptOptions, tokenizer=None) -> tuple[dict[str, Any], int | None]:
    """One output row from one parsed input line, and its prompt length in tokens when a tokenizer is given."""
    if isinstance(value, list):
        record: Mapping[str, Any] = {"messages": value}
    elif isinstance(value, Mapping):
        record = value
    else:
        raise RowError("bad_type", f"a line must be an object with 'messages' or a message list, got {type(value).__name__}")
    if "messages" not in record and "next_chapter" in record:  # a story record in the paper's format
        record = story_messages(record, filters=options.story_filters, policy_template=options.user_template or PAPER_POLICY_TEMPLATE)
    if "messages" not in record:
        raise RowError("missing_key", "missing key 'messages'")
    messages = check_messages(record["messages"], final_role="assistant")
    if options.messages_layout == "paper" and "prompt_layout" not in record:  # a chat line with the paper's sections
        system = messages[0]["content"] if messages[0]["role"] == "system" else SYSTEM
        line = {key: value for key, value in record.items() if key != "messages"}
        story = record_from_messages(messages, line)
        record = {**line, **story_messages(story, system, NO_FILTERS, options.user_template or PAPER_POLICY_TEMPLATE)}
        messages = record["messages"]
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if len(turns) != 2:
        raise RowError("multi_turn", f"expected one user turn and the gold answer, got {len(turns)} turns")
    gold = messages[-1]["content"]
    if not gold.strip():
        raise RowError("empty_gold", "the gold (last assistant) message is empty")
    context = messages[-2]["content"]
    if not context.strip():
        raise RowError("empty_value", "the user message is empty")
    extra = {key: record[key] for key in (*LAYOUT_FIELDS, *options.label_fields) if key in record}
    missing = [key for key in options.label_fields if key not in record]
    if missing:
        raise RowError("missing_key", f"missing label field(s) {missing}")
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    prompt_messages = messages[:-1]
    template = options.template_for(record)
    if template != "{context}":
        try:
            user_text = template.format_map({**extra, "context": context})
        except KeyError as exc:
            raise RowError("missing_key", f"--user_template needs {exc}") from None
        prompt_messages[-1] = {"role": "user", "content": user_text}
    if options.merge_system:
        prompt_messages = merge_system_turn(prompt_messages)
    label = {
        "id": stable_id({"messages": messages, **extra}),
        "gold": gold,
        "context": context,
        "system": system,
        **{key: None for key in BASELINE_FIELDS},
        **extra,
    }
    length = None
    prompt: Any = prompt_messages
    if tokenizer is not None:
        text = tokenizer.apply_chat_template(prompt_messages, add_generation_prompt=True, tokenize=False)
        length = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if options.render:
            prompt = text
    if options.max_prompt_tokens is not None and length is not None and length > options.max_prompt_tokens:
        raise RowError("too_long", f"prompt has {length} tokens, more than --max_prompt_tokens {options.max_prompt_tokens}")
    return {"prompt": prompt, "label": label}, length


def prepare_split(
    path: Path, split: str, options: PromptOptions, rejects: RejectLog, seen: dict[str, str], tokenizer=None
) -> list[dict[str, Any]]:
    """Validated rows of one input file; `seen` maps ids to their first file:line (duplicates across splits too)."""
    rows = []
    for line, raw, value in iter_json_lines(path):
        try:
            if isinstance(value, RowError):
                raise value
            row, _ = build_row(value, options, tokenizer)
            first = seen.get(row["label"]["id"])
            if first is not None:
                raise RowError("duplicate_id", f"same content (id {row['label']['id']}) as {first}")
        except RowError as error:
            rejects.reject(path, line, error, raw, split=split)
            continue
        seen[row["label"]["id"]] = f"{path}:{line}"
        rows.append(row)
    return rows


def load_chat_tokenizer(name: str, merge_system: bool, trust_remote_code: bool = False):
    """Load the tokenizer and check its chat template handles the turns we will give it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(check_tokenizer_dir(name, "--tokenizer_name"), trust_remote_code=trust_remote_code)
    if not tokenizer.chat_template:
        raise SystemExit(f"tokenizer {name} has no chat template; prompts cannot be rendered or measured")
    probe = [{"role": "user", "content": "hi"}] if merge_system else [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
    try:
        tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # chat templates raise their own TemplateError subclasses
        hint = "" if merge_system else " (no system role? use --merge_system)"
        raise SystemExit(f"tokenizer {name}: chat template fails: {exc}{hint}") from exc
    return tokenizer


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Prepare every split, write outputs and the rejects file atomically; return the per-split counts."""
    options = PromptOptions(
        render=args.prompt_format == "text",
        merge_system=args.merge_system,
        max_prompt_tokens=args.max_prompt_tokens,
        label_fields=tuple(args.label_fields),
        user_template=args.user_template,
        story_filters=filters_from(args),
        messages_layout=args.messages_layout,
    )
    tokenizer = load_chat_tokenizer(args.tokenizer_name, args.merge_system, args.trust_remote_code)
    input_dir, data_dir = Path(args.input_dir), Path(args.data_dir)
    paths = {split: input_dir / f"{args.dataset_name}_{split}.jsonl" for split in args.splits}
    absent = [str(p) for p in paths.values() if not p.is_file()]
    if absent:
        raise DataError(f"input file(s) not found: {', '.join(absent)}")
    rejects, seen, summary = RejectLog(strict=args.strict), {}, {}
    prepared, per_split = {}, {}
    for split, path in paths.items():
        snapshot = rejects.counts.copy()
        prepared[split] = prepare_split(path, split, options, rejects, seen, tokenizer)
        per_split[split] = rejects.counts - snapshot
        per_reason = dict(per_split[split])
        summary[split] = {"kept": len(prepared[split]), "rejected": sum(per_reason.values()), "reasons": per_reason}
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(per_reason.items())) or "none"
        print(f"{split}: kept {len(prepared[split])}, rejected {sum(per_reason.values())} ({reasons}) from {path}")
    rejects_path = rejects.write(data_dir / "rejects.jsonl")
    if rejects_path:
        print(f"rejected lines written to {rejects_path}")
    for split, rows in prepared.items():
        rejects.check_kept(str(paths[split]), len(rows), per_split[split], args.max_reject_share, rejects_path)
    for split, rows in prepared.items():
        write_jsonl(data_dir / f"{split}.jsonl", rows)
    write_json(data_dir / "setup_summary.json", {"args": vars(args), "splits": summary})
    return summary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer_name", required=True, help="the policy tokenizer (path): renders and measures prompts")
    parser.add_argument("--data_dir", default="rl_data/", help="output directory for {train,test,val}.jsonl")
    parser.add_argument("--dataset_name", default="story_dataset", help="input files are {dataset_name}_{split}.jsonl")
    parser.add_argument("--input_dir", default=".", help="directory holding the input files")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS))
    parser.add_argument("--prompt_format", choices=("messages", "text"), default="messages",
                        help="messages: a list for --data.apply_chat_template; text: rendered with the chat template")
    parser.add_argument("--merge_system", action="store_true", help="merge the system message into the first user turn")
    parser.add_argument("--max_prompt_tokens", type=int, default=None, help="report and skip longer prompts")
    parser.add_argument("--label_fields", nargs="*", default=[], help="top-level input keys to copy into the label")
    parser.add_argument("--user_template", default=None,
                        help="policy user turn as a str.format template over {context} and --label_fields; default: "
                        "the paper's prompt asking for a plan for story rows, the user text as is otherwise. "
                        "The label's context stays the raw user text")
    parser.add_argument("--messages_layout", choices=("paper", "as_is"), default="paper",
                        help="paper (default): a `messages` line's user turn holds the paper's '### Section: ###' parts "
                        "and gets the paper's plan-asking prompt and layout labels, as story records do; as_is: the "
                        "prompt and label context are the user turn as written (other chat data, layout: append)")
    filter_args(parser)
    reject_share_arg(parser)
    parser.add_argument("--strict", action="store_true", help="fail on the first bad line instead of skipping it")
    parser.add_argument("--trust_remote_code", action="store_true")
    args = parser.parse_args(argv)
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        parser.error("--max_prompt_tokens must be positive")
    try:
        if args.user_template is not None:
            args.user_template.format_map({key: "" for key in ["context", *LAYOUT_FIELDS, *args.label_fields]})
    except (KeyError, ValueError, IndexError) as exc:
        parser.error(f"--user_template {args.user_template!r}: {exc!r} (fields: context and --label_fields)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: bad input (an empty or unreadable file, a missing tokenizer) exits 2 with one message; --debug re-raises."""
    return run_cli(lambda args: run(parse_args(args)), "setup_rl_data", argv)


if __name__ == "__main__":
    sys.exit(main())
