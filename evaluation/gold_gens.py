"""Load best-of-n generations with gold labels (the columns of `tlc4418/gold_labelled_gens`) and validate them.

Accepts JSONL, Parquet, a folder saved with `datasets.save_to_disk` (a DatasetDict uses `split`), or a Hugging
Face dataset id (`org/name`, loaded with `datasets.load_dataset`; offline, only from its cache). Every problem
names the file and the row.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reward_plugins.io import DataError, iter_jsonl

COLUMNS = ("instruction", "input", "answers", "gold_scores")


@dataclass
class GoldGens:
    """Prompts with N answers each (N may differ), gold scores aligned with answers."""

    source: str
    instructions: list[str]
    inputs: list[str]
    answers: list[list[str]]
    gold: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.answers)

    def fingerprint(self) -> str:
        """A hash of every prompt and answer, to key score caches."""
        digest = hashlib.sha256()
        for instruction, input, answers in zip(self.instructions, self.inputs, self.answers):
            digest.update(json.dumps([instruction, input, len(answers)]).encode())
            for answer in answers:
                digest.update(answer.encode())
                digest.update(b"\0")
        return digest.hexdigest()


def _hub_rows(dataset_id: str, split: str) -> Iterator[tuple[str, Any]]:
    """Rows of a Hugging Face dataset id; one that cannot be fetched (offline, unknown) is a `DataError`."""
    import datasets

    try:
        dataset = datasets.load_dataset(dataset_id, split=split)
    except Exception as exc:  # datasets raises connection, hub and FileNotFound errors of many types
        raise DataError(
            f"{dataset_id}: not a local file or folder, and the Hugging Face dataset could not be fetched "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); where there is network, save it "
            f"with datasets.load_dataset({dataset_id!r}).save_to_disk(DIR) and pass DIR"
        ) from None
    for index, row in enumerate(dataset):
        yield f"{dataset_id}[{split}]: row {index}", row


def _raw_rows(path: Path, split: str) -> Iterator[tuple[str, Any]]:
    if path.is_dir():
        from datasets import DatasetDict, load_from_disk

        dataset = load_from_disk(str(path))
        if isinstance(dataset, DatasetDict):
            if split not in dataset:
                raise DataError(f"{path}: no split {split!r} (has {sorted(dataset)})")
            dataset = dataset[split]
        for index, row in enumerate(dataset):
            yield f"{path}: row {index}", row
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for index, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}: row {index}", row
    else:
        for line, row in iter_jsonl(path):
            yield f"{path}:{line}", row


def load_gold_gens(path: str | Path, big_n: int | None = None, split: str = "validation", max_prompts: int | None = None) -> GoldGens:
    """Read and validate the data, keeping only the first `big_n` answers of each prompt."""
    from reward_plugins.cli import looks_local

    name, path = str(path), Path(path)
    if not path.exists() and (looks_local(name) or "/" not in name):
        raise DataError(f"{path}: no such file or directory")
    if big_n is not None and big_n < 1:
        raise ValueError("big_n must be at least 1")
    data = GoldGens(name, [], [], [], [])
    for where, row in (_raw_rows(path, split) if path.exists() else _hub_rows(name, split)):
        if max_prompts is not None and len(data) >= max_prompts:
            break
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with columns {COLUMNS}")
        missing = [c for c in ("instruction", "answers", "gold_scores") if row.get(c) is None]
        if missing:
            raise DataError(f"{where}: missing column(s) {missing}")
        instruction, input = row["instruction"], row.get("input") or ""
        answers, gold = row["answers"], row["gold_scores"]
        if not isinstance(instruction, str) or not isinstance(input, str):
            raise DataError(f"{where}: instruction and input must be strings")
        if not isinstance(answers, (list, tuple)) or not all(isinstance(a, str) for a in answers):
            raise DataError(f"{where}: answers must be a list of strings")
        if not isinstance(gold, (list, tuple)) or len(gold) != len(answers):
            raise DataError(f"{where}: {len(gold) if isinstance(gold, (list, tuple)) else 'no'} gold scores for {len(answers)} answers")
        if not answers:
            raise DataError(f"{where}: no answers")
        for index, value in enumerate(gold):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise DataError(f"{where}: gold score of answer {index} is missing or not finite ({value!r})")
        keep = len(answers) if big_n is None else big_n
        data.instructions.append(instruction)
        data.inputs.append(input)
        data.answers.append(list(answers[:keep]))
        data.gold.append(np.asarray(gold[:keep], dtype=np.float64))
    if not data.answers:
        raise DataError(f"{path}: no rows")
    return data
