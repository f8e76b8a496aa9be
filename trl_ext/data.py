"""Read and check the SFT and RM JSONL formats; every problem names the file and line."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from reward_plugins.io import DataError, iter_jsonl

SFT_FIELDS = ("prompt", "completion")
RM_FIELDS = ("prompt", "chosen", "rejected")


def read_rows(path: str, fields: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of `path` that each hold every field in `fields` as a string (other keys are kept)."""
    rows = []
    for line, row in iter_jsonl(path):
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line}: expected a JSON object, got {type(row).__name__}")
        for name in fields:
            if not isinstance(row.get(name), str):
                raise DataError(f"{path}:{line}: {name!r} must be a string (keys: {sorted(row)})")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows
