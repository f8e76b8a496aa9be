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


def not_utf8(data: bytes) -> str | None:
    """Why `data` is not UTF-8 (the first bad byte and its column), or None when it decodes."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not UTF-8 (byte 0x{data[exc.start:exc.start + 1].hex()} at column {exc.start + 1})"
    return None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield `(line_number, value)` for every non-blank line; malformed JSON or non-UTF-8 raises `DataError` naming the line."""
    with open(path, "rb") as handle:
        for number, data in enumerate(handle, 1):
            problem = not_utf8(data)
            if problem:
                raise DataError(f"{path}:{number}: {problem}")
            line = data.decode("utf-8")
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: malformed JSON: {exc.msg}") from exc


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    return [value for _, value in iter_jsonl(path)]


def current_umask() -> int:
    """The process umask, read without changing it where the OS shows it (Linux), else set and restored at once."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as status:
            return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[TextIO]:
    """Open a temp file beside `path`; on clean exit fsync and rename it over `path`, else delete it.

    The file gets the mode a plain `open` would give it (0644 under the usual umask 022)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; a finished file gets the usual mode
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
