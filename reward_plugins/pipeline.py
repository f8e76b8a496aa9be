"""A configured reward pipeline: the root plugin, the error policy and a fixed set of log keys."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .config import PipelineConfig, PluginSpec, load_pipeline_config
from .placement import PlacedPlugin, Placer, placement_requests, plugin_placement, warn_unplaced
from .registry import RewardPlugin, plugin_class, score_safely
from .types import RewardResult, Sample, Status

logger = logging.getLogger(__name__)

ErrorPolicy = Literal["raise", "penalty", "skip"]
LOG_PREFIX = "reward/"
FIXED_LOG_KEYS = ("reward/mean", "reward/errors", "reward/skipped")


class RewardError(RuntimeError):
    """Raised by `on_error: raise` when any sample of a batch failed; lists the failures."""


@dataclass
class ScoredBatch:
    """Per-sample results, the rewards after the error policy, and batch logs with the pipeline's keys.

    `logs["reward/errors"]` and `logs["reward/skipped"]` are counts over the batch; component logs are
    means over the samples that carry the component.
    """

    results: list[RewardResult]
    rewards: list[float | None]
    logs: dict[str, float]
    log_keys: tuple[str, ...]

    def sample_logs(self, index: int, missing: float = 0.0) -> dict[str, float]:
        """The same keys for one sample (OpenRLHF averages per-sample `extra_logs` across the batch).

        A component the sample lacks (it errored) reads `missing`; `reward/errors` says it errored.
        """
        result = self.results[index]
        reward = self.rewards[index]
        values = {
            "reward/mean": reward if reward is not None else missing,
            "reward/errors": float(result.status is Status.ERROR),
            "reward/skipped": float(result.status is Status.SKIPPED),
        }
        for key in self.log_keys[len(FIXED_LOG_KEYS) :]:
            values[key] = float(result.components.get(key[len(LOG_PREFIX) :], missing))
        return values


class RewardPipeline:
    """Scores batches with one root plugin and applies the error policy; never returns a silent 0."""

    def __init__(self, root: RewardPlugin, on_error: ErrorPolicy = "raise", error_penalty: float | None = None):
        if on_error == "penalty" and error_penalty is None:
            raise ValueError("on_error='penalty' needs error_penalty")
        self.root = root
        self.on_error = on_error
        self.error_penalty = error_penalty
        components = tuple(root.component_keys)
        duplicates = {key for key in components if components.count(key) > 1}
        if duplicates:
            raise ValueError(f"component keys collide: {sorted(duplicates)}; give the plugins distinct names")
        self.log_keys: tuple[str, ...] = FIXED_LOG_KEYS + tuple(LOG_PREFIX + key for key in components)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, placer: Placer | None = None) -> RewardPipeline:
        return build_pipeline(load_pipeline_config(path), placer)

    def score(self, samples: Sequence[Sample]) -> ScoredBatch:
        results = score_safely(self.root, samples)
        errors = [(i, r.error) for i, r in enumerate(results) if r.status is Status.ERROR]
        if errors:
            logger.warning("%d of %d samples failed to score; first: %s", len(errors), len(samples), errors[0][1])
        if errors and self.on_error == "raise":
            shown = "; ".join(f"sample {i}: {message}" for i, message in errors[:5])
            raise RewardError(f"{len(errors)} of {len(samples)} samples failed: {shown}")
        rewards = [self._final_reward(result) for result in results]
        return ScoredBatch(results, rewards, self.batch_logs(results, rewards), self.log_keys)

    __call__ = score

    def _final_reward(self, result: RewardResult) -> float | None:
        if result.status is Status.OK:
            return result.reward
        if result.status is Status.ERROR and self.on_error == "penalty":
            return self.error_penalty
        return None

    def batch_logs(self, results: list[RewardResult], rewards: list[float | None]) -> dict[str, float]:
        """The pipeline's log keys aggregated over `results` (for example several batches of one step)."""
        present = [r for r in rewards if r is not None]
        logs = {
            "reward/mean": float(np.mean(present)) if present else 0.0,
            "reward/errors": float(sum(r.status is Status.ERROR for r in results)),
            "reward/skipped": float(sum(r.status is Status.SKIPPED for r in results)),
        }
        for key in self.log_keys[len(FIXED_LOG_KEYS) :]:
            name = key[len(LOG_PREFIX) :]
            values = [r.components[name] for r in results if name in r.components]
            finite = [v for v in values if math.isfinite(v)]
            logs[key] = float(np.mean(finite)) if finite else 0.0
        return logs


def build_plugin(spec: PluginSpec, placer: Placer | None = None) -> RewardPlugin:
    """Construct a plugin (and its children) from a validated spec; this is where models load.

    With a `placer`, plugins with a `placement` are built in its replicas (after one up-front check that the
    cluster can hold every placement); without one, placements are ignored with a warning.
    """
    if placer is not None:
        placer.check(placement_requests(spec))
    return _Builder(placer)(spec)


def build_local_plugin(spec: PluginSpec) -> RewardPlugin:
    """Build in this process, ignoring placements quietly (what each replica of a placed plugin runs)."""
    return _Builder(None, quiet=True)(spec)


@dataclass(frozen=True)
class _Builder:
    """The `build` callable handed to `from_spec`; composites reach the placer through it."""

    placer: Placer | None = None
    quiet: bool = False

    def __call__(self, spec: PluginSpec) -> RewardPlugin:
        placement = plugin_placement(spec.config)
        if placement is not None and self.placer is not None:
            return PlacedPlugin.build(spec, placement, self.placer, build_local_plugin)
        if placement is not None and not self.quiet:
            warn_unplaced(spec.name)
        return plugin_class(spec.type).from_spec(spec, self)


def build_pipeline(config: PipelineConfig, placer: Placer | None = None) -> RewardPipeline:
    return RewardPipeline(build_plugin(config.reward, placer), config.on_error, config.error_penalty)


def build_first_of_type(path: str | os.PathLike, type_name: str) -> RewardPlugin:
    """Build (in this process) the first plugin of `type_name` in a reward YAML, breadth first; e.g. the `vrcli`
    plugin whose exact settings baseline perplexities must use."""
    stack = [load_pipeline_config(path).reward]
    while stack:
        spec = stack.pop(0)
        if spec.type == type_name:
            return build_plugin(spec)
        stack.extend(spec.children.values())
    raise ValueError(f"{path}: no plugin of type {type_name} in this reward configuration")
