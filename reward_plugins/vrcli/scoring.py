"""VR-CLI's numbers: the percent improvement in perplexity, its shaping into rewards, held-out metrics.

Gurung & Lapata (2025): `improvement = 100 * (baseline_ppl - ppl) / baseline_ppl`, where `ppl` is the
perplexity of the gold tokens given the prompt with the plan inserted and `baseline_ppl` (from the label)
the same without the plan, both from one frozen model. The improvement is in percent; shaping maps it to
the training reward, and the raw improvement is always logged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

Scheme = Literal["stepped", "binary", "clipped_linear", "raw"]


def improvement(baseline_ppl: ArrayLike, ppl: ArrayLike) -> np.ndarray:
    """Percent improvement in perplexity: 100 * (baseline - ppl) / baseline, elementwise."""
    baseline = np.asarray(baseline_ppl, dtype=np.float64)
    ppl = np.asarray(ppl, dtype=np.float64)
    if np.any(~np.isfinite(baseline) | (baseline <= 0)):
        raise ValueError("baseline perplexities must be finite and positive")
    return 100.0 * (baseline - ppl) / baseline


def shape(
    improvement: ArrayLike,
    scheme: Scheme = "stepped",
    *,
    thresholds: Sequence[float] = (0.05, 1.0, 2.0),
    levels: Sequence[float] = (0.5, 0.9, 1.0),
    below: float = 0.0,
    binary_threshold: float = 0.0,
    clip_max: float = 5.0,
) -> np.ndarray:
    """Map percent improvements to rewards, elementwise.

    - `stepped` (the paper): `below` under thresholds[0]; levels[j] from thresholds[j] (inclusive) up;
      the defaults give 0 / 0.5 / 0.9 / 1.0 at 0.05 / 1 / 2 percent.
    - `binary`: 1 where improvement >= `binary_threshold`, else 0.
    - `clipped_linear`: improvement / clip_max, clipped to [0, 1].
    - `raw`: the improvement itself, in percent.
    """
    values = np.asarray(improvement, dtype=np.float64)
    if scheme == "stepped":
        if len(thresholds) != len(levels) or list(thresholds) != sorted(thresholds):
            raise ValueError("stepped shaping needs ascending thresholds, one level per threshold")
        table = np.array([below, *levels], dtype=np.float64)
        shaped = table[np.searchsorted(np.asarray(thresholds, dtype=np.float64), values, side="right")]
    elif scheme == "binary":
        shaped = (values >= binary_threshold).astype(np.float64)
    elif scheme == "clipped_linear":
        if clip_max <= 0:
            raise ValueError("clip_max must be positive")
        shaped = np.clip(values / clip_max, 0.0, 1.0)
    elif scheme == "raw":
        shaped = values.copy()
    else:
        raise ValueError(f"unknown shaping scheme {scheme!r}")
    return np.where(np.isnan(values), np.nan, shaped)


EVAL_METRICS = ("vrcli_reward", "vrcli_improvement", "vrcli_improved_share")


def eval_metrics(rewards: Sequence[float | None], components: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Held-out VR-CLI metrics (the paper's eval_reward / eval_pct_improvements, plus the improved share).

    `vrcli_reward`: mean reward of the scored samples; `vrcli_improvement`: mean raw percent improvement;
    `vrcli_improved_share`: the share of samples whose plan lowered the gold perplexity (improvement > 0).
    Samples without an improvement (errors) are left out of the last two; NaN when nothing is left.
    """
    scored = [float(r) for r in rewards if r is not None]
    gains = np.array([c["improvement"] for c in components if "improvement" in c and math.isfinite(c["improvement"])])
    return {
        "vrcli_reward": float(np.mean(scored)) if scored else float("nan"),
        "vrcli_improvement": float(gains.mean()) if gains.size else float("nan"),
        "vrcli_improved_share": float((gains > 0).mean()) if gains.size else float("nan"),
    }
