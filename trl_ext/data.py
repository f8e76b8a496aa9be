"""Read and check the SFT, RM and RL-prompt JSONL formats; every problem names the file and line.

A text field is a string or a chat message list (`[{"role", "content"}, ...]`, TRL's conversational form,
what `setup_data.convert --style chat` and `setup_data.setup_rl_data` write); one file uses one form.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from reward_plugins.io import DataError, iter_jsonl

SFT_FIELDS = ("prompt", "completion")
RM_FIELDS = ("prompt", "chosen", "rejected")
PROMPT_FIELDS = ("prompt",)


def is_messages(value: Any) -> bool:
    """A non-empty chat message list with string roles and contents."""
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in value))


def read_rows(path: str, fields: Sequence[str], label_key: str | None = None) -> list[dict[str, Any]]:
    """Rows of `path` that each hold every field in `fields` as text or messages (and `label_key` if given)."""
    rows, styles = [], {}
    for line, row in iter_jsonl(path):
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line}: expected a JSON object, got {type(row).__name__}")
        for name in fields:
            value = row.get(name)
            if isinstance(value, str):
                style = "text"
            elif is_messages(value):
                style = "messages"
            else:
                raise DataError(f"{path}:{line}: {name!r} must be a string or a list of chat messages "
                                f"(keys: {sorted(row)})")
            first = styles.setdefault(name, (style, line))
            if first[0] != style:
                raise DataError(f"{path}:{line}: {name!r} is {style} but line {first[1]} has {first[0]}; "
                                "use one form per file")
        if label_key is not None and label_key not in row:
            raise DataError(f"{path}:{line}: no {label_key!r} (keys: {sorted(row)})")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows (empty file)")
    return rows


def as_text(value: Any, tokenizer=None, generation_prompt: bool = True) -> str:
    """A prompt as text: strings as they are, message lists through the tokenizer's chat template."""
    if isinstance(value, str):
        return value
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError("chat-message prompts need a tokenizer with a chat template")
    return tokenizer.apply_chat_template(value, add_generation_prompt=generation_prompt, tokenize=False)


def answer_text(value: Any) -> str:
    """An answer as text: a string, or the contents of its (assistant) messages joined."""
    return value if isinstance(value, str) else "".join(m["content"] for m in value)
