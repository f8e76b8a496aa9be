"""The `ensemble` plugin: k reward models combined conservatively (Coste et al., ICLR 2024).

Objectives, per sample over the k member scores:
- `mean`: the mean;
- `wco`: worst case, the minimum;
- `uwo`: the mean minus `uwo_weight` times the variance (population variance by default, `ddof`
  configurable; the reference PPO code used ddof=1). `uwo_weight: 0` means zero.

Where the members come from is the plugin's business: k reward models here, one backbone with k heads
(`multihead.py`), k LoRA adapters on one base (`lora_ensemble.py`). Each gives a (k, B) score matrix to
`MemberEnsemble`, the one path to standardisation, the combiner and the member/spread components.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
from numpy.typing import ArrayLike
from pydantic import Field, ValidationInfo, model_validator

from .config import ExistingPath, Placement, PluginSpec
from .io import DataError, iter_jsonl
from .placement import PlacedMember, Placer, warn_unplaced
from .registry import PluginConfig, RewardPlugin, register_plugin
from .reward_model import RewardModelConfig, RewardModelScorer, TextInputConfig, TextScorer
from .types import RewardResult, Sample

Objective = Literal["mean", "wco", "uwo"]
OBJECTIVES = ("mean", "wco", "uwo")


def combine(member_scores: ArrayLike, objective: str, uwo_weight: float = 0.5, ddof: int = 0) -> np.ndarray:
    """Combine a (k, B) array of member scores into (B,) ensemble rewards with `objective`."""
    scores = np.asarray(member_scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] < 1:
        raise ValueError(f"member_scores must have shape (k, B) with k >= 1, got {scores.shape}")
    if objective == "mean":
        return scores.mean(axis=0)
    if objective == "wco":
        return scores.min(axis=0)
    if objective == "uwo":
        if uwo_weight is None:
            raise ValueError("uwo needs a uwo_weight (0 is allowed and means plain mean)")
        return scores.mean(axis=0) - uwo_weight * member_variance(scores, ddof)
    raise ValueError(f"unknown ensemble objective {objective!r}; expected one of {OBJECTIVES}")


def member_variance(member_scores: ArrayLike, ddof: int = 0) -> np.ndarray:
    """Per-sample variance across members of a (k, B) array; zero for a single member."""
    scores = np.asarray(member_scores, dtype=np.float64)
    if scores.shape[0] - ddof <= 0:
        return np.zeros(scores.shape[1])
    return scores.var(axis=0, ddof=ddof)


def standardize(member_scores: ArrayLike, means: ArrayLike, stds: ArrayLike) -> np.ndarray:
    """Z-score each member's row with its own reference mean and std."""
    scores = np.asarray(member_scores, dtype=np.float64)
    means = np.asarray(means, dtype=np.float64)[:, None]
    stds = np.asarray(stds, dtype=np.float64)[:, None]
    return (scores - means) / stds


class MemberStats(PluginConfig):
    mean: float
    std: float = Field(gt=0)


class CombinerConfig(PluginConfig):
    """How k member scores become one reward: the settings every ensemble kind shares."""

    member_names: list[str]
    objective: Objective = "mean"
    uwo_weight: float = Field(default=0.5, ge=0)
    ddof: int = Field(default=0, ge=0)
    standardize: Literal["none", "reference_stats", "reference_set"] = "none"
    reference_stats: list[MemberStats] | None = None
    reference_set: ExistingPath | None = None

    @property
    def member_count(self) -> int:
        return len(self.member_names)

    @model_validator(mode="after")
    def _combiner_consistent(self) -> CombinerConfig:
        k = self.member_count
        if len(set(self.member_names)) != len(self.member_names) or len(self.member_names) != k:
            raise ValueError(f"member_names must be unique, one per member ({k}): {self.member_names}")
        if k <= self.ddof:
            raise ValueError(f"ddof={self.ddof} needs more than {self.ddof} member(s) for a variance; this ensemble has {k}")
        if self.standardize == "reference_stats" and (self.reference_stats is None or len(self.reference_stats) != k):
            raise ValueError("standardize: reference_stats needs one {mean, std} per member")
        if self.standardize == "reference_set" and self.reference_set is None:
            raise ValueError("standardize: reference_set needs reference_set: a JSONL file of samples")
        return self


class EnsembleConfig(CombinerConfig):
    """Members as a list, or as `path_template` (with `{seed}`) plus `seeds` and shared `member` settings."""

    members: list[RewardModelConfig] = Field(min_length=1)
    placement: Placement | None = None

    @property
    def member_count(self) -> int:
        return len(self.members)

    @model_validator(mode="before")
    @classmethod
    def _expand_template(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        template, seeds = data.pop("path_template", None), data.pop("seeds", None)
        shared = data.pop("member", {}) or {}
        if template is not None or seeds is not None:
            if data.get("members"):
                raise ValueError("give either members or path_template + seeds, not both")
            if template is None or not seeds or "{seed}" not in str(template):
                raise ValueError("path_template must contain {seed} and seeds must be a non-empty list")
            data["members"] = [{**shared, "path": str(template).replace("{seed}", str(s))} for s in seeds]
            data.setdefault("member_names", [f"seed{s}" for s in seeds])
        else:
            members = data.get("members") or []
            data["members"] = [{**shared, **m} if isinstance(m, dict) else m for m in members]
            names = [m.pop("name", None) if isinstance(m, dict) else None for m in data["members"]]
            data.setdefault("member_names", [n or f"member{i}" for i, n in enumerate(names)])
        return data

    @model_validator(mode="after")
    def _placed_once(self) -> EnsembleConfig:
        if self.placement is not None and any(m.placement is not None for m in self.members):
            raise ValueError(
                "give placement once: on the ensemble (all members per replica) or on its members, not both"
            )
        return self


class MemberEnsemble(RewardPlugin):
    """The one path from a (k, B) matrix of member scores to rewards, shared by every ensemble kind.

    Subclasses say how the k members score a batch (`member_scores`); this class standardises, combines with
    the objective and reports the components: each member's raw score (by member name), `variance` (across
    the combined inputs, with `ddof`) and `combined`.
    """

    config: CombinerConfig

    def __init__(self, config: CombinerConfig, name: str):
        super().__init__(config, name)
        self.means: np.ndarray | None = None
        self.stds: np.ndarray | None = None

    @property
    def component_keys(self) -> tuple[str, ...]:
        return (*self.config.member_names, "variance", "combined")

    @property
    @abstractmethod
    def allows_empty_response(self) -> bool: ...

    @abstractmethod
    def member_scores(self, samples: Sequence[Sample]) -> np.ndarray:
        """Raw (k, B) scores of every member on the same batch."""

    def load_reference_statistics(self) -> None:
        """Per-member mean and std for `standardize` (call once the members can score)."""
        cfg = self.config
        if cfg.standardize == "reference_stats":
            self.means = np.array([s.mean for s in cfg.reference_stats])
            self.stds = np.array([s.std for s in cfg.reference_stats])
        elif cfg.standardize == "reference_set":
            scores = self.member_scores(read_reference_samples(cfg.reference_set))
            stds = scores.std(axis=1)
            if np.any(stds == 0) or not np.all(np.isfinite(scores)):
                raise ValueError(f"{cfg.reference_set}: a member scores the reference set with zero or non-finite spread")
            self.means, self.stds = scores.mean(axis=1), stds

    def score(self, samples: Sequence[Sample]) -> list[RewardResult]:
        results: list[RewardResult | None] = [None] * len(samples)
        valid = []
        for i, sample in enumerate(samples):
            if not sample.response.strip() and not self.allows_empty_response:
                results[i] = RewardResult.failed(f"{self.name}: empty response")
            else:
                valid.append(i)
        if not valid:
            return results  # type: ignore[return-value]
        try:
            raw = self.member_scores([samples[i] for i in valid])
        except (KeyError, IndexError, TypeError) as exc:
            raise ValueError(f"{self.name}: a member template needs {exc} from the sample/label") from exc
        inputs = raw if self.means is None else standardize(raw, self.means, self.stds)
        cfg = self.config
        combined = combine(inputs, cfg.objective, cfg.uwo_weight, cfg.ddof)
        variance = member_variance(inputs, cfg.ddof)
        for column, i in enumerate(valid):
            components = {name: float(raw[m, column]) for m, name in enumerate(cfg.member_names)}
            bad = [name for name, value in components.items() if not np.isfinite(value)]
            if bad:
                results[i] = RewardResult.failed(f"{self.name}: non-finite score from {', '.join(bad)}")
                continue
            components.update(variance=float(variance[column]), combined=float(combined[column]))
            results[i] = RewardResult.ok(combined[column], components)
        return results  # type: ignore[return-value]


@register_plugin("ensemble")
class EnsemblePlugin(MemberEnsemble):
    """k reward models, each scoring every sample; members that read the same tokens share one tokenisation."""

    Config = EnsembleConfig

    def __init__(self, config: EnsembleConfig, name: str, placer: Placer | None = None):
        super().__init__(config, name)
        self.members = [_member(m, f"{name}.{n}", placer) for m, n in zip(config.members, config.member_names)]
        self.load_reference_statistics()

    @classmethod
    def from_spec(cls, spec: PluginSpec, build: Callable[[PluginSpec], RewardPlugin]) -> RewardPlugin:
        return cls(spec.config, spec.name, getattr(build, "placer", None))

    @property
    def allows_empty_response(self) -> bool:
        return all(m.allow_empty_response for m in self.config.members)

    def member_scores(self, samples: Sequence[Sample]) -> np.ndarray:
        """Placed members score in parallel in their replicas; local members sharing a tokenizer and text
        settings tokenise the batch once."""
        pending = [m.submit(samples) if isinstance(m, PlacedMember) else None for m in self.members]
        rows: list[np.ndarray | None] = [None] * len(self.members)
        for group in _encoding_groups([m if p is None else None for m, p in zip(self.members, pending)]):
            first = self.members[group[0]]
            ids, _ = first.encode([first.format_sample(s) for s in samples])
            for index in group:
                rows[index] = self.members[index].score_ids(ids)
        for index, p in enumerate(pending):
            if p is not None:
                rows[index] = np.asarray(p.result(), dtype=np.float64)
        return np.array(rows, dtype=np.float64)


class OneModelConfig(TextInputConfig, CombinerConfig):
    """k members in one model folder, read like a `reward_model` (same text settings), combined like an `ensemble`.
    The count field (`COUNT_KEY`) is the k this reward expects; a folder holding another number is refused, and
    the members are named `MEMBER_PREFIX`0.. unless `member_names` says otherwise."""

    COUNT_KEY: ClassVar[str]
    MEMBER_PREFIX: ClassVar[str]

    @property
    def member_count(self) -> int:
        return getattr(self, self.COUNT_KEY)

    @model_validator(mode="before")
    @classmethod
    def _default_names(cls, data: Any) -> Any:
        if isinstance(data, dict) and "member_names" not in data and isinstance(data.get(cls.COUNT_KEY), int):
            return {**data, "member_names": [f"{cls.MEMBER_PREFIX}{i}" for i in range(data[cls.COUNT_KEY])]}
        return data


class OneModelEnsemble(MemberEnsemble):
    """An ensemble whose k members live in one model: one formatting, one tokenisation, one pass per batch."""

    scorer: TextScorer

    @property
    def allows_empty_response(self) -> bool:
        return self.config.allow_empty_response

    def member_scores(self, samples: Sequence[Sample]) -> np.ndarray:
        return self.scorer.member_scores_texts([self.scorer.format_sample(s) for s in samples])[0]


def _encoding_groups(scorers: Sequence[RewardModelScorer | None]) -> list[list[int]]:
    """Indices of the local scorers grouped by what they turn a sample into (None entries skipped)."""
    groups: dict[tuple, list[int]] = {}
    for index, scorer in enumerate(scorers):
        if scorer is not None:
            groups.setdefault(scorer.encoding_key, []).append(index)
    return list(groups.values())


def _member(config: RewardModelConfig, name: str, placer: Placer | None) -> RewardModelScorer | PlacedMember:
    if config.placement is None:
        return RewardModelScorer(config)
    if placer is None:
        warn_unplaced(name)
        return RewardModelScorer(config)
    return PlacedMember(config, name, placer)


def read_reference_samples(path: str) -> list[Sample]:
    """Samples from a JSONL file of {prompt, response[, label]} rows, for reference statistics."""
    samples = []
    for number, row in iter_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("response"), str):
            raise DataError(f"{path}:{number}: expected an object with string prompt and response")
        samples.append(Sample(prompt=row["prompt"], response=row["response"], label=row.get("label")))
    if len(samples) < 2:
        raise DataError(f"{path}: a reference set needs at least 2 samples")
    return samples
