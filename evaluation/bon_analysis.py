"""Best-of-n curves for several proxy RMs and their ensembles, from scores already computed.

Every member's scores stay aligned with the dataset's answer order (index j is answer j), so an
ensemble's score for answer j is combined from the members' j-th scores and the gold score of answer j
travels with it through the estimator's sort. That fixes two defects of the published code: gold scores
left in seed 1's order, and an O(N^2) text lookup to realign members.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from reward_plugins.ensemble import OBJECTIVES, combine

from .bon import DEFAULT_NS, BonInputError, bon_curve

Scores = np.ndarray | Sequence[Sequence[float]]
_ROWS_PER_CHUNK = 64


def ensemble_run_name(objective: str, uwo_weight: float | None = None) -> str:
    """The published directory name: ensemble_mean, ensemble_WCO, ensemble_UWO-<weight as a float> (UWO-1.0, UWO-0.5)."""
    if objective == "mean":
        return "ensemble_mean"
    if objective == "wco":
        return "ensemble_WCO"
    if objective == "uwo":
        if uwo_weight is None:
            raise ValueError("uwo needs a weight")
        return f"ensemble_UWO-{float(uwo_weight)}"
    raise ValueError(f"unknown ensemble objective {objective!r}; expected one of {OBJECTIVES}")


def ensemble_scores(members: Sequence[Scores], objective: str, uwo_weight: float = 0.5, ddof: int = 0) -> Scores:
    """Per-answer ensemble scores from k members' aligned scores ((P, N) arrays or ragged per-prompt lists)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown ensemble objective {objective!r}; expected one of {OBJECTIVES}")
    if len(members) < 2:
        raise ValueError("an ensemble needs at least 2 members")
    if all(isinstance(m, np.ndarray) and m.ndim == 2 for m in members):
        shapes = {m.shape for m in members}
        if len(shapes) != 1:
            raise BonInputError(f"members' score arrays differ in shape: {sorted(shapes)}")
        P, N = members[0].shape
        out = np.empty((P, N), dtype=np.float64)
        for start in range(0, P, _ROWS_PER_CHUNK):
            rows = slice(start, start + _ROWS_PER_CHUNK)
            block = np.stack([m[rows] for m in members])
            out[rows] = combine(block.reshape(len(members), -1), objective, uwo_weight, ddof).reshape(block.shape[1:])
        return out
    prompts = {len(m) for m in members}
    if len(prompts) != 1:
        raise BonInputError(f"members score different numbers of prompts: {sorted(prompts)}")
    result = []
    for row in range(len(members[0])):
        lengths = {len(m[row]) for m in members}
        if len(lengths) != 1:
            raise BonInputError(f"row {row}: members give different numbers of scores {sorted(lengths)}")
        result.append(combine(np.stack([np.asarray(m[row], dtype=np.float64) for m in members]), objective, uwo_weight, ddof))
    return result


def analyse(
    members: Mapping[str, Scores],
    gold: Scores,
    ns: Sequence[int] = DEFAULT_NS,
    *,
    objectives: Sequence[str] = (),
    uwo_weights: Sequence[float] = (0.5,),
    ddof: int = 0,
    workers: int | None = None,
) -> dict[str, list[dict[str, float]]]:
    """Best-of-n curves keyed by run name: one per member, then one per ensemble objective (and UWO weight)."""
    curves = {name: bon_curve(scores, gold, ns, workers=workers) for name, scores in members.items()}
    for objective in objectives:
        weights = uwo_weights if objective == "uwo" else (None,)
        for weight in weights:
            combined = ensemble_scores(list(members.values()), objective, 0.5 if weight is None else weight, ddof)
            curves[ensemble_run_name(objective, weight)] = bon_curve(combined, gold, ns, workers=workers)
    return curves
