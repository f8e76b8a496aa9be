"""Convert llm-on-ray, AlpacaFarm and chat-message JSONL into our SFT, RM and prompt formats.

Input formats (`--from`), one JSON object per line:
- `llm_on_ray_sft`: `{"instruction", "context" (optional, may be ""), "response"}`.
- `llm_on_ray_rm`:  `{"prompt" or "instruction", "chosen", "rejected"}` (its docs say `instruction`, its code
  and sample data `prompt`; both are accepted, and a row with both must agree).
- `llm_on_ray_ppo`: `{"prompt"}`.
- `alpaca`:        `{"instruction", "input" (optional, may be ""), "output"}`.
- `alpaca_pref`:   `{"instruction", "input", "answers": [a, b], "preference": 0|1}` (0-based index of the
  preferred answer, as in the gold-labelled Hugging Face sets) or AlpacaFarm's own
  `{"instruction", "input", "output_1", "output_2", "preference": 1|2}` (1-based).
- `messages`:      `{"messages": [...]}` (an optional system turn, then user/assistant alternating from user);
  for RM, `{"chosen": [...], "rejected": [...]}`, two conversations that differ only in the last
  assistant turn.

Output formats (`--to`), one JSON object per line, read directly by TRL (and by `trl_ext`):
- `sft`:    `{"prompt": P, "completion": C}`.
- `rm`:     `{"prompt": P, "chosen": C, "rejected": C}`.
- `prompt`: `{"prompt": P, "label": {"id": <content hash>, "gold": <reference answer or null>}}`, for RL
  (OpenRLHF `--data.input_key prompt --data.label_key label`).

With `--style text` (default for instruction sources) P is a string built by `--template` and C the answer
string; with `--style chat` (default for `messages`) P is a message list and C is
`[{"role": "assistant", "content": ...}]` (TRL's conversational format). Templates:
- `alpaca`: the AlpacaFarm / Stanford Alpaca prompt ("Below is an instruction ... ### Response:\n");
- `llm_on_ray`: llm-on-ray's SFT prompt (like alpaca, with an `Input:` section only when the context is set);
- `plain`: the instruction, then a blank line and the input when there is one (also the chat user turn);
- `chat`: the tokenizer's chat template (`--tokenizer`), the only text template for `messages` sources.

Bad lines (malformed JSON, missing keys, empty answers, identical chosen/rejected, wrong role order, duplicate
rows) are skipped, counted per reason and written to `{output}.rejects.jsonl`; `--strict` fails on the first.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reward_plugins.cli import check_tokenizer_dir, run_cli
from reward_plugins.io import DataError, write_jsonl
from setup_data.validation import (
    RejectLog,
    RowError,
    check_messages,
    iter_json_lines,
    reject_share_arg,
    require_text,
    stable_id,
)

Messages = list[dict[str, str]]

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
LLM_ON_RAY_WITH_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\nInput:\n{input}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Example:
    """A source row in neutral form: the conversation before the answer, plus the answer(s) it has."""

    messages: Messages
    instruction: tuple[str, str] | None = None
    completion: str | None = None
    chosen: str | None = None
    rejected: str | None = None


def instruction_text(instruction: str, extra: str) -> str:
    """The `plain` prompt: the instruction, then the input after a blank line when there is one."""
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def from_instruction(instruction: str, extra: str, **answers: str | None) -> Example:
    user = {"role": "user", "content": instruction_text(instruction, extra)}
    return Example([user], (instruction, extra), **answers)


def optional_text(row: Mapping[str, Any], key: str) -> str:
    return require_text(row, key, allow_empty=True) if key in row and row[key] is not None else ""


def read_llm_on_ray_sft(row: Mapping[str, Any]) -> Example:
    return from_instruction(require_text(row, "instruction"), optional_text(row, "context"),
                            completion=require_text(row, "response"))


def read_llm_on_ray_rm(row: Mapping[str, Any]) -> Example:
    keys = [key for key in ("prompt", "instruction") if key in row]
    if not keys:
        raise RowError("missing_key", "missing key 'prompt' (or 'instruction')")
    texts = {require_text(row, key) for key in keys}
    if len(texts) > 1:
        raise RowError("bad_value", "'prompt' and 'instruction' are both set and differ")
    return pair(from_instruction(texts.pop(), ""), require_text(row, "chosen"), require_text(row, "rejected"))


def read_llm_on_ray_ppo(row: Mapping[str, Any]) -> Example:
    return from_instruction(require_text(row, "prompt"), "")


def read_alpaca(row: Mapping[str, Any]) -> Example:
    return from_instruction(require_text(row, "instruction"), optional_text(row, "input"),
                            completion=require_text(row, "output"))


def read_alpaca_pref(row: Mapping[str, Any]) -> Example:
    base = from_instruction(require_text(row, "instruction"), optional_text(row, "input"))
    if "preference" not in row:
        raise RowError("missing_key", "missing key 'preference'")
    preference = row["preference"]
    if "answers" in row:
        answers = row["answers"]
        if not isinstance(answers, list) or len(answers) != 2:
            raise RowError("bad_value", "'answers' must be a list of two strings")
        answers = [require_text({f"answers[{i}]": text for i, text in enumerate(answers)}, f"answers[{i}]") for i in (0, 1)]
        choices = {0: (0, 1), 1: (1, 0)}
    else:
        answers = [require_text(row, "output_1"), require_text(row, "output_2")]
        choices = {1: (0, 1), 2: (1, 0)}
    if isinstance(preference, bool) or preference not in choices:
        raise RowError("bad_value", f"'preference' must be one of {sorted(choices)}, got {preference!r}")
    better, worse = choices[preference]
    return pair(base, answers[better], answers[worse])


def read_messages(row: Mapping[str, Any]) -> Example:
    if "messages" in row:
        messages = check_messages(row["messages"], final_role=None)
        if messages[-1]["role"] == "assistant":
            if not messages[-1]["content"].strip():
                raise RowError("empty_value", "the last assistant message is empty")
            return Example(messages[:-1], completion=messages[-1]["content"])
        return Example(messages)
    if "chosen" in row and "rejected" in row:
        chosen = check_messages(row["chosen"], final_role="assistant")
        rejected = check_messages(row["rejected"], final_role="assistant")
        if chosen[:-1] != rejected[:-1]:
            raise RowError("bad_value", "'chosen' and 'rejected' must share every turn but the last")
        return pair(Example(chosen[:-1]), chosen[-1]["content"], rejected[-1]["content"])
    raise RowError("missing_key", "missing key 'messages' (or 'chosen' and 'rejected')")


def pair(base: Example, chosen: str, rejected: str) -> Example:
    if not chosen.strip() or not rejected.strip():
        raise RowError("empty_value", "an empty answer in the pair")
    if chosen == rejected:
        raise RowError("identical_pair", "chosen and rejected are the same text")
    return Example(base.messages, base.instruction, chosen=chosen, rejected=rejected)


READERS: dict[str, Callable[[Mapping[str, Any]], Example]] = {
    "llm_on_ray_sft": read_llm_on_ray_sft,
    "llm_on_ray_rm": read_llm_on_ray_rm,
    "llm_on_ray_ppo": read_llm_on_ray_ppo,
    "alpaca": read_alpaca,
    "alpaca_pref": read_alpaca_pref,
    "messages": read_messages,
}
DEFAULT_TEMPLATE = {
    "llm_on_ray_sft": "llm_on_ray",
    "llm_on_ray_rm": "plain",
    "llm_on_ray_ppo": "plain",
    "alpaca": "alpaca",
    "alpaca_pref": "alpaca",
    "messages": "chat",
}
TARGETS = {
    "llm_on_ray_sft": ("sft", "prompt"),
    "llm_on_ray_rm": ("rm", "prompt"),
    "llm_on_ray_ppo": ("prompt",),
    "alpaca": ("sft", "prompt"),
    "alpaca_pref": ("rm", "prompt"),
    "messages": ("sft", "rm", "prompt"),
}


def render_prompt(example: Example, style: str, template: str, tokenizer=None) -> str | Messages:
    """The prompt as a message list (`chat`) or a string built by `template`."""
    if style == "chat":
        return example.messages
    if template == "chat":
        return tokenizer.apply_chat_template(example.messages, add_generation_prompt=True, tokenize=False)
    if example.instruction is None:
        raise RowError("bad_value", "a chat conversation needs --template chat (with --tokenizer) or --style chat")
    instruction, extra = example.instruction
    if template == "plain":
        return instruction_text(instruction, extra)
    if template == "alpaca":
        return (ALPACA_WITH_INPUT if extra.strip() else ALPACA_NO_INPUT).format(instruction=instruction, input=extra)
    return (LLM_ON_RAY_WITH_INPUT if extra.strip() else ALPACA_NO_INPUT).format(instruction=instruction, input=extra)


def answer(text: str, style: str) -> str | Messages:
    return [{"role": "assistant", "content": text}] if style == "chat" else text


def convert_example(example: Example, target: str, style: str, template: str, tokenizer=None) -> dict[str, Any]:
    """One output row in the `target` format."""
    prompt = render_prompt(example, style, template, tokenizer)
    if target == "sft":
        if example.completion is None:
            raise RowError("missing_key", "no answer to train on (the conversation does not end with an assistant turn)")
        return {"prompt": prompt, "completion": answer(example.completion, style)}
    if target == "rm":
        if example.chosen is None:
            raise RowError("missing_key", "no chosen/rejected pair")
        return {"prompt": prompt, "chosen": answer(example.chosen, style), "rejected": answer(example.rejected, style)}
    gold = example.completion if example.completion is not None else example.chosen
    return {"prompt": prompt, "label": {"id": stable_id({"prompt": prompt, "gold": gold}), "gold": gold}}


def convert_file(path: Path, source: str, target: str, style: str, template: str, rejects: RejectLog,
                 tokenizer=None) -> list[dict[str, Any]]:
    """Convert every line of `path`; bad and duplicate lines go to `rejects` with their line numbers."""
    reader, rows, seen = READERS[source], [], {}
    for line, raw, value in iter_json_lines(path):
        try:
            if isinstance(value, RowError):
                raise value
            if not isinstance(value, Mapping):
                raise RowError("bad_type", f"a line must be a JSON object, got {type(value).__name__}")
            row = convert_example(reader(value), target, style, template, tokenizer)
            key = stable_id(row)
            if key in seen:
                raise RowError("duplicate_id", f"same row as line {seen[key]}")
        except RowError as error:
            rejects.reject(path, line, error, raw)
            continue
        seen[key] = line
        rows.append(row)
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Convert, write the output and the rejects file atomically, print the counts."""
    tokenizer = None
    if args.template == "chat" and args.style == "text":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(check_tokenizer_dir(args.tokenizer, "--tokenizer"),
                                                  trust_remote_code=args.trust_remote_code)
    if not Path(args.input).is_file():
        raise DataError(f"--input {args.input}: no such file")
    rejects = RejectLog(strict=args.strict)
    rows = convert_file(Path(args.input), args.source, args.target, args.style, args.template, rejects, tokenizer)
    rejects_path = rejects.write(args.rejects or f"{args.output}.rejects.jsonl")
    rejects.check_kept(args.input, len(rows), max_share=args.max_reject_share, rejects_path=rejects_path)
    write_jsonl(args.output, rows)
    print(f"{args.input} ({args.source}) -> {args.output} ({args.target}, {args.style}): wrote {len(rows)}, "
          f"{rejects.summary()}" + (f"; see {rejects_path}" if rejects_path else ""))
    return {"written": len(rows), "rejected": dict(rejects.counts)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="formats: see the module docstring")
    parser.add_argument("--from", dest="source", required=True, choices=sorted(READERS))
    parser.add_argument("--to", dest="target", required=True, choices=("sft", "rm", "prompt"))
    parser.add_argument("--input", required=True, help="input JSONL")
    parser.add_argument("--output", required=True, help="output JSONL (written atomically)")
    parser.add_argument("--style", choices=("text", "chat"), default=None,
                        help="text: prompt strings; chat: message lists (default: chat for messages, else text)")
    parser.add_argument("--template", choices=("alpaca", "llm_on_ray", "plain", "chat"), default=None,
                        help="text prompt template (default: llm_on_ray for llm_on_ray_sft, plain for llm_on_ray_rm/ppo "
                        "whose prompts are already formatted, alpaca for alpaca*, chat for messages)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer whose chat template renders --template chat")
    parser.add_argument("--rejects", default=None, help="default: {output}.rejects.jsonl")
    parser.add_argument("--strict", action="store_true", help="fail on the first bad line instead of skipping it")
    reject_share_arg(parser)
    parser.add_argument("--trust_remote_code", action="store_true")
    args = parser.parse_args(argv)
    if args.target not in TARGETS[args.source]:
        parser.error(f"--from {args.source} converts to {' or '.join(TARGETS[args.source])}, not {args.target}")
    if args.style is None:
        args.style = "chat" if args.source == "messages" else "text"
    if args.template is None:
        args.template = DEFAULT_TEMPLATE[args.source]
    if args.style == "text" and args.template == "chat" and not args.tokenizer:
        parser.error("--template chat needs --tokenizer (or use --style chat)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: bad input (an empty or unreadable file, a missing tokenizer) exits 2 with one message; --debug re-raises."""
    return run_cli(lambda args: run(parse_args(args)), "setup_data.convert", argv)


if __name__ == "__main__":
    sys.exit(main())
