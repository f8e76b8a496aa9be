"""Proxy-RM scores for every answer, cached on disk per RM (.npy, never pickle) and resumable block by block.

The members of a one-model ensemble (heads, adapters) score together but are cached one folder each, like k RMs.
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
MemberScorer = Callable[[Sequence[str]], np.ndarray]  # texts -> (k, n) scores


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

    def make_one_member() -> MemberScorer:
        scorer = make_scorer()
        return lambda batch: np.asarray(scorer(batch), dtype=np.float64)[None, :]

    return cached_member_scores([cache_dir], [settings], texts, lengths, make_one_member, block_answers)[0]


def cached_member_scores(
    cache_dirs: Sequence[str | Path],
    settings: Sequence[dict[str, Any]],
    texts: Callable[[int], list[str]],
    lengths: Sequence[int],
    make_scorer: Callable[[], MemberScorer],
    block_answers: int = 8192,
) -> list[list[np.ndarray]]:
    """Per-member, per-row score arrays of k members that score together (the heads of one model, the adapters on
    one base): `make_scorer()` gives texts -> (k, n) scores. Each member is cached in its own folder exactly as a
    separate RM would be, so every later step treats the members as k RMs; one pass scores a block for all."""
    dirs = [Path(d) for d in cache_dirs]
    for cache_dir, member_settings in zip(dirs, settings):
        meta = {"settings": member_settings, "rows": len(lengths), "answers": int(sum(lengths))}
        meta_path = cache_dir / "meta.json"
        if meta_path.exists():
            if json.loads(meta_path.read_text()) != meta:
                raise DataError(f"{meta_path}: this cache holds scores for other settings; remove it or choose another cache folder")
        else:
            write_json(meta_path, meta)
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(int)
    total = int(offsets[-1])
    flats = [_load(d / "scores.npy", total) if (d / "scores.npy").exists() else None for d in dirs]
    if all(flat is not None for flat in flats):
        return [[flat[offsets[r] : offsets[r + 1]] for r in range(len(lengths))] for flat in flats]
    flats = [np.empty(total, dtype=np.float64) for _ in dirs]
    scorer: MemberScorer | None = None
    blocks = row_blocks(lengths, block_answers)
    for number, (start, end) in enumerate(blocks):
        parts = [d / f"part_{start:07d}.npy" for d in dirs]
        size = int(offsets[end] - offsets[start])
        values = [_load(part, size) if part.exists() else None for part in parts]
        if any(v is None for v in values):
            scorer = scorer or make_scorer()
            scored = np.asarray(scorer([t for row in range(start, end) for t in texts(row)]), dtype=np.float64)
            if scored.shape != (len(dirs), size):
                raise DataError(f"the scorer gave {scored.shape} scores for {len(dirs)} members x {size} answers")
            _check_finite(scored, offsets, start)
            for part, row_values in zip(parts, scored):
                _save(part, row_values)
            values = list(scored)
            logger.info("scored block %d/%d (rows %d-%d)", number + 1, len(blocks), start, end - 1)
        for flat, row_values in zip(flats, values):
            flat[offsets[start] : offsets[end]] = row_values
    for cache_dir, flat in zip(dirs, flats):
        _save(cache_dir / "scores.npy", flat)
        for part in cache_dir.glob("part_*.npy"):
            part.unlink()
    return [[flat[offsets[r] : offsets[r + 1]] for r in range(len(lengths))] for flat in flats]


def _check_finite(scored: np.ndarray, offsets: np.ndarray, start: int) -> None:
    member, bad = np.nonzero(~np.isfinite(scored))
    if bad.size:
        answer = offsets[start] + bad[0]
        row = int(np.searchsorted(offsets, answer, side="right") - 1)
        who = "the RM" if scored.shape[0] == 1 else f"member {member[0]}"
        raise DataError(f"row {row}: {who} returned a non-finite score for answer {answer - offsets[row]}")
