"""The eval-file format shared by every training backend (OpenRLHF hook, TRL) and the gold evaluation.

One JSON file per eval step, `EVAL_DIR/eval_step{step:06d}.json`:

    {"format": "reward_plugins.eval/1", "step": 200, "kl": 1.73, "kl_history": [0.0, 0.9, 1.73],
     "meta": {"reward_config": "...", "kl_estimator": "k1", ...},
     "rows": [{"prompt": "...", "answer": "...", "proxy_score": 0.41,
               "components": {"seed1": 0.5, "seed2": 0.3, "variance": 0.01, "combined": 0.41},
               "ensemble_variance": 0.01, "kl": 1.9, "gold_score": null, "status": "ok", "error": null}, ...]}

`kl` is the mean over rows of the sequence KL to the initial policy (sum over response tokens of
log pi - log pi_init), `kl_history` every eval step's `kl` so far. `gold_score` is filled in after
training by `evaluation.run_ppo_gold_eval`. `status` is the reward's `ok` / `skipped` / `error` for the row
and `error` its message: an errored row's `proxy_score` is the on_error penalty, not a score, so plots and
summaries leave such rows out. Files are written atomically.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from reward_plugins.io import DataError, write_json

FORMAT = "reward_plugins.eval/1"
_NAME = re.compile(r"eval_step(\d+)\.json$")


@dataclass
class EvalRow:
    prompt: str
    answer: str
    proxy_score: float | None
    components: dict[str, float] = field(default_factory=dict)
    ensemble_variance: float | None = None
    kl: float | None = None
    gold_score: float | None = None
    status: str = "ok"
    error: str | None = None

    @property
    def scored(self) -> bool:
        """Whether the proxy reward really scored this row (not an error penalty, not a skip)."""
        return self.status == "ok"


@dataclass
class EvalFile:
    step: int
    rows: list[EvalRow]
    kl: float | None = None
    kl_history: list[float] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "step": self.step,
            "kl": self.kl,
            "kl_history": list(self.kl_history),
            "meta": dict(self.meta),
            "rows": [asdict(row) for row in self.rows],
        }


def eval_file_path(eval_dir: str | os.PathLike, step: int) -> Path:
    return Path(eval_dir) / f"eval_step{step:06d}.json"


def write_eval_file(eval_dir: str | os.PathLike, eval_file: EvalFile) -> Path:
    path = eval_file_path(eval_dir, eval_file.step)
    write_json(path, eval_file.to_json(), indent=None)
    return path


def list_eval_files(eval_dir: str | os.PathLike) -> list[Path]:
    """Eval files in `eval_dir`, in step order."""
    found = [(int(m.group(1)), p) for p in Path(eval_dir).glob("eval_step*.json") if (m := _NAME.search(p.name))]
    return [path for _, path in sorted(found)]


def read_eval_file(path: str | os.PathLike) -> EvalFile:
    """Read and validate one eval file; problems name the file and row."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON: {exc.msg}") from exc
    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
        raise DataError(f"{path}: not an eval file (expected format {FORMAT!r})")
    rows = []
    for index, raw in enumerate(data.get("rows", [])):
        try:
            row = EvalRow(**raw)
        except TypeError as exc:
            raise DataError(f"{path}: row {index}: {exc}") from exc
        if not isinstance(row.prompt, str) or not isinstance(row.answer, str):
            raise DataError(f"{path}: row {index}: prompt and answer must be strings")
        for name in ("proxy_score", "gold_score", "kl", "ensemble_variance"):
            value = getattr(row, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise DataError(f"{path}: row {index}: {name} must be a finite number or null, got {value!r}")
        rows.append(row)
    return EvalFile(
        step=int(data["step"]),
        rows=rows,
        kl=data.get("kl"),
        kl_history=list(data.get("kl_history") or []),
        meta=dict(data.get("meta") or {}),
    )


def rows_from_scores(
    prompts: Sequence[str],
    answers: Sequence[str],
    rewards: Sequence[float | None],
    components: Sequence[Mapping[str, float]],
    kls: Sequence[float | None] | None = None,
    results: Sequence[Any] | None = None,
) -> list[EvalRow]:
    """Eval rows from a reward pipeline's output (its rewards, per-sample components and `RewardResult`s' status)."""
    kls = kls if kls is not None else [None] * len(prompts)
    results = results if results is not None else [None] * len(prompts)
    rows = []
    for prompt, answer, reward, comps, kl, result in zip(prompts, answers, rewards, components, kls, results, strict=True):
        variance = next((v for k, v in comps.items() if k == "variance" or k.endswith("/variance")), None)
        status = "ok" if result is None else getattr(result.status, "value", str(result.status))
        error = None if result is None else result.error
        rows.append(EvalRow(prompt, answer, reward, dict(comps), variance, kl, None, status, error))
    return rows
