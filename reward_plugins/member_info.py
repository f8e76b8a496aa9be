"""What a one-model ensemble records about its k members (seeds, held-out accuracy, how alike they score), and
the checks that refuse a record that does not fit its model, naming the file."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .io import DataError


class MemberFileError(DataError):
    """A heads file or adapter index that cannot describe its model; the message names the file."""


@dataclass
class MemberInfo:
    """k, each member's seed, and (after held-out evaluation) each member's preference accuracy and the
    k x k Pearson correlation of the members' scores on the held-out texts: members that agree perfectly are one RM."""

    seeds: list[int]
    accuracy: list[float] | None = None
    correlation: list[list[float]] | None = None
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return len(self.seeds)

    def as_dict(self) -> dict[str, Any]:
        return {"k": self.k, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str) -> MemberInfo:
        """Validate a record read from `source`; any problem is a one-line `MemberFileError` naming it."""
        k, seeds = data.get("k"), data.get("seeds")
        if not isinstance(k, int) or k < 1:
            raise MemberFileError(f"{source}: k must be a positive integer, got {k!r}")
        if not isinstance(seeds, list) or len(seeds) != k or not all(isinstance(s, int) for s in seeds):
            raise MemberFileError(f"{source}: seeds must list {k} integers (one per member), got {seeds!r}")
        accuracy, correlation = data.get("accuracy"), data.get("correlation")
        if accuracy is not None and (not isinstance(accuracy, list) or len(accuracy) != k):
            raise MemberFileError(f"{source}: accuracy must list {k} numbers, got {accuracy!r}")
        if correlation is not None and np.asarray(correlation, dtype=object).shape != (k, k):
            raise MemberFileError(f"{source}: correlation must be a {k} x {k} matrix")
        training = data.get("training") or {}
        if not isinstance(training, dict):
            raise MemberFileError(f"{source}: training must be a mapping")
        return cls(list(seeds), accuracy, correlation, dict(training))


def check_member_count(found: int, expected: int | None, source: str, key: str) -> None:
    """Refuse a model whose member count differs from what the reward config asks for."""
    if expected is not None and found != expected:
        raise MemberFileError(f"{source}: holds {found} members but the reward config asks for {key}: {expected}")


def held_out_stats(chosen: np.ndarray, rejected: np.ndarray) -> tuple[list[float], list[list[float]]]:
    """Per-member preference accuracy (a tie counts one half) and the members' pairwise score correlation,
    from (k, N) scores of the chosen and rejected texts of N held-out pairs."""
    chosen, rejected = np.atleast_2d(chosen), np.atleast_2d(rejected)
    accuracy = ((chosen > rejected) + 0.5 * (chosen == rejected)).mean(axis=1)
    scores = np.concatenate([chosen, rejected], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation = np.corrcoef(scores) if scores.shape[0] > 1 else np.ones((1, 1))
    rows = [[round(float(v), 6) if np.isfinite(v) else None for v in row] for row in np.atleast_2d(correlation)]
    return [float(a) for a in accuracy], rows


def mean_off_diagonal(correlation: Sequence[Sequence[float]]) -> float:
    """The mean pairwise correlation between distinct members (1.0 for a single member)."""
    matrix = np.array(correlation, dtype=np.float64)  # None (a constant member) becomes nan
    k = matrix.shape[0]
    return 1.0 if k < 2 else float(matrix[~np.eye(k, dtype=bool)].mean())
