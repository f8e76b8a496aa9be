"""File I/O used across the project: JSONL with line-numbered errors, and atomic writes (temp file + rename)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO


class DataError(ValueError):
    """Bad input data; the message names the file and line."""


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield `(line_number, value)` for every non-blank line; malformed JSON raises `DataError` naming the line."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: malformed JSON: {exc.msg}") from exc


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    return [value for _, value in iter_jsonl(path)]


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[TextIO]:
    """Open a temp file beside `path`; on clean exit fsync and rename it over `path`, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    """Write rows as JSONL atomically."""
    with atomic_open(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_json(path: str | os.PathLike, value: Any, indent: int | None = 2) -> None:
    """Write one JSON document atomically."""
    with atomic_open(path) as handle:
        json.dump(value, handle, ensure_ascii=False, indent=indent)
        handle.write("\n")
