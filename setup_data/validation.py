"""Line-level validation shared by the data scripts: read JSONL tolerantly, count rejects, fail fast on --strict.

Every bad line is either fatal (`strict`) or recorded with its file, line, reason and raw text in a rejects
file, and counted per reason, so nothing is dropped silently.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reward_plugins.io import DataError, not_utf8, write_jsonl

ROLES = ("system", "user", "assistant")
DEFAULT_MAX_REJECT_SHARE = 0.5


def reject_share_arg(parser: argparse.ArgumentParser) -> None:
    """`--max_reject_share`: the share of rejected input rows above which a data command warns (one line)."""
    parser.add_argument("--max_reject_share", type=float, default=DEFAULT_MAX_REJECT_SHARE,
                        help="warn in one line when more than this share of the input rows is rejected (default 0.5)")


class RowError(ValueError):
    """One input row is unusable; `reason` is a short key used for the per-reason counts."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def iter_json_lines(path: str | os.PathLike) -> Iterator[tuple[int, str, Any | RowError]]:
    """Yield `(line_number, raw_line, value)` for each non-blank line; malformed JSON or a line that is not UTF-8
    yields a `RowError` value. A file without a single non-blank line is a `DataError` naming it."""
    seen = False
    with open(path, "rb") as handle:
        for number, data in enumerate(handle, 1):
            problem = not_utf8(data)
            if problem:
                seen = True
                yield number, data.decode("utf-8", "replace").rstrip("\n"), RowError("not_utf8", problem)
                continue
            raw = data.decode("utf-8")
            if not raw.strip():
                continue
            seen = True
            try:
                value: Any = json.loads(raw)
            except json.JSONDecodeError as exc:
                value = RowError("malformed_json", f"malformed JSON: {exc.msg} (column {exc.colno})")
            yield number, raw.rstrip("\n"), value
    if not seen:
        raise DataError(f"{path}: empty input (no JSON lines)")


def stable_id(value: Any, length: int = 16) -> str:
    """A content hash of a JSON value (keys sorted), stable across runs, machines and Python versions."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def require_text(row: Mapping[str, Any], key: str, *, allow_empty: bool = False, empty_reason: str = "empty_value") -> str:
    """`row[key]` as a string; a missing key, a non-string or (unless allowed) blank text is a `RowError`."""
    if key not in row:
        raise RowError("missing_key", f"missing key {key!r}")
    value = row[key]
    if not isinstance(value, str):
        raise RowError("bad_type", f"{key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowError(empty_reason, f"{key!r} is empty")
    return value


def check_messages(messages: Any, *, final_role: str | None = "assistant") -> list[dict[str, str]]:
    """Validate a chat: optional leading system turn, then user/assistant alternating from user.

    `final_role` pins the role of the last turn (None: either). Returns the messages as plain dicts with
    only `role` and `content`.
    """
    if not isinstance(messages, list) or not messages:
        raise RowError("bad_type", f"messages must be a non-empty list, got {type(messages).__name__}")
    clean = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise RowError("bad_type", f"messages[{index}] must be an object")
        for key in ("role", "content"):
            if key not in message:
                raise RowError("missing_key", f"messages[{index}] has no {key!r}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise RowError("role_order", f"messages[{index}] has unknown role {role!r}")
        if not isinstance(content, str):
            raise RowError("bad_type", f"messages[{index}].content must be a string")
        clean.append({"role": role, "content": content})
    turns = clean[1:] if clean[0]["role"] == "system" else clean
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            where = index + len(clean) - len(turns)
            raise RowError("role_order", f"messages[{where}] is {message['role']!r}, expected {expected!r}")
    if not turns:
        raise RowError("role_order", "no user turn")
    if final_role is not None and turns[-1]["role"] != final_role:
        raise RowError("role_order", f"the last message must be {final_role!r}, got {turns[-1]['role']!r}")
    return clean


@dataclass
class RejectLog:
    """Counts rejected lines per reason and keeps them for the rejects file; `strict` raises on the first."""

    strict: bool = False
    counts: Counter = field(default_factory=Counter)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def reject(self, path: str | os.PathLike, line: int, error: RowError, raw: str, **extra: Any) -> None:
        if self.strict:
            raise DataError(f"{path}:{line}: {error.reason}: {error}")
        self.counts[error.reason] += 1
        self.rows.append({"file": str(path), "line": line, "reason": error.reason, "message": str(error), "raw": raw, **extra})

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def main_reason(self, counts: Counter | None = None) -> str:
        """`reason (count)` of the commonest reject reason."""
        reason, count = (counts if counts is not None else self.counts).most_common(1)[0]
        return f"{reason} ({count})"

    def check_kept(self, where: str, kept: int, counts: Counter | None = None, max_share: float = DEFAULT_MAX_REJECT_SHARE,
                   rejects_path: str | os.PathLike | None = None) -> None:
        """Refuse an output of 0 rows (`DataError`, one line) and warn in one line when more than `max_share` of
        the rows were rejected; `counts`: the rejects behind `where` (default: all of them)."""
        counts = self.counts if counts is None else counts
        rejected = sum(counts.values())
        total = kept + rejected
        see = f"; see {rejects_path}" if rejects_path else ""
        if kept == 0:
            reasons = f", mostly {self.main_reason(counts)}" if rejected else ""
            raise DataError(f"{where}: 0 rows to write ({rejected} of {total} rejected{reasons}){see}")
        if rejected / total > max_share:
            print(f"warning: {where}: {rejected} of {total} rows rejected ({100 * rejected / total:.0f}%), mostly "
                  f"{self.main_reason(counts)}{see}", file=sys.stderr)

    def summary(self) -> str:
        if not self.counts:
            return "no rejected lines"
        parts = ", ".join(f"{reason}={count}" for reason, count in sorted(self.counts.items()))
        return f"{self.total} rejected ({parts})"

    def write(self, path: str | os.PathLike) -> Path | None:
        """Write the rejects file atomically (removing a stale one when there is nothing to reject)."""
        path = Path(path)
        if not self.rows:
            path.unlink(missing_ok=True)
            return None
        write_jsonl(path, self.rows)
        return path
