"""Proxy-RM scores for every answer, cached on disk per RM (.npy, never pickle) and resumable block by block.

Layout of one cache folder: `meta.json` (what was scored, with what), `part_<first row>.npy` for each
finished block of prompts while scoring is under way, and `scores.npy` (all answers, flat, in dataset
order) once complete. A rerun loads `scores.npy` without loading the model; an interrupted run
rescoring only the blocks that have no part file yet.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reward_plugins.io import DataError, atomic_open, write_json

logger = logging.getLogger(__name__)

TextScorer = Callable[[Sequence[str]], np.ndarray]


def model_signature(path: str | Path) -> dict[str, Any]:
    """The model folder's resolved path and its files' sizes and modification times, so a retrained RM misses the cache."""
    folder = Path(path).resolve()
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else [folder]
    return {"path": str(folder), "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def cache_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def row_blocks(lengths: Sequence[int], block_answers: int) -> list[tuple[int, int]]:
    """Consecutive (start, end) row ranges holding at least `block_answers` answers each (the last may hold fewer)."""
    blocks, start, total = [], 0, 0
    for row, length in enumerate(lengths):
        total += length
        if total >= block_answers:
            blocks.append((start, row + 1))
            start, total = row + 1, 0
    if start < len(lengths):
        blocks.append((start, len(lengths)))
    return blocks


def _save(path: Path, values: np.ndarray) -> None:
    with atomic_open(path, "wb") as handle:
        np.save(handle, values, allow_pickle=False)


def _load(path: Path, expected: int) -> np.ndarray | None:
    values = np.load(path, allow_pickle=False)
    if values.shape != (expected,):
        logger.warning("%s holds %s scores, expected %d; rescoring it", path, values.shape, expected)
        return None
    return values


def cached_scores(
    cache_dir: str | Path,
    settings: dict[str, Any],
    texts: Callable[[int], list[str]],
    lengths: Sequence[int],
    make_scorer: Callable[[], TextScorer],
    block_answers: int = 8192,
) -> list[np.ndarray]:
    """Per-row score arrays; `texts(row)` gives that row's RM inputs and `make_scorer()` is called only if something is left to score."""
    cache_dir = Path(cache_dir)
    meta = {"settings": settings, "rows": len(lengths), "answers": int(sum(lengths))}
    meta_path = cache_dir / "meta.json"
    if meta_path.exists():
        if json.loads(meta_path.read_text()) != meta:
            raise DataError(f"{meta_path}: this cache holds scores for other settings; remove it or choose another cache folder")
    else:
        write_json(meta_path, meta)
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(int)
    final = cache_dir / "scores.npy"
    flat = _load(final, int(offsets[-1])) if final.exists() else None
    if flat is None:
        flat = np.empty(int(offsets[-1]), dtype=np.float64)
        scorer: TextScorer | None = None
        blocks = row_blocks(lengths, block_answers)
        for number, (start, end) in enumerate(blocks):
            part = cache_dir / f"part_{start:07d}.npy"
            size = int(offsets[end] - offsets[start])
            values = _load(part, size) if part.exists() else None
            if values is None:
                scorer = scorer or make_scorer()
                values = np.asarray(scorer([t for row in range(start, end) for t in texts(row)]), dtype=np.float64)
                bad = np.flatnonzero(~np.isfinite(values))
                if bad.size:
                    row = int(np.searchsorted(offsets, offsets[start] + bad[0], side="right") - 1)
                    raise DataError(f"row {row}: the RM returned a non-finite score for answer {offsets[start] + bad[0] - offsets[row]}")
                _save(part, values)
                logger.info("scored block %d/%d (rows %d-%d)", number + 1, len(blocks), start, end - 1)
            flat[offsets[start] : offsets[end]] = values
        _save(final, flat)
        for part in cache_dir.glob("part_*.npy"):
            part.unlink()
    return [flat[offsets[r] : offsets[r + 1]] for r in range(len(lengths))]
