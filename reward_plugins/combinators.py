"""The `weighted_sum` plugin: compose any plugins into one reward."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import Field, model_validator

from .config import PluginSpec
from .penalties import prefix_components, prefixed
from .registry import PluginConfig, RewardPlugin, register_plugin, score_safely
from .types import RewardResult, Sample, Status


class Term(PluginConfig):
    weight: float
    plugin: dict[str, Any]


class WeightedSumConfig(PluginConfig):
    terms: list[Term] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct_names(self) -> WeightedSumConfig:
        names = [term.plugin.get("name", term.plugin.get("type")) for term in self.terms]
        if len(set(names)) != len(names):
            raise ValueError(f"terms need distinct names (set name: on repeated types): {names}")
        return self


@register_plugin("weighted_sum")
class WeightedSumPlugin(RewardPlugin):
    """reward = sum of weight * term reward.

    A term's error makes the sample an error (naming the term); a skipped term makes it skipped, since a
    partial sum would be a different reward. Components: each term's reward and components, by name.
    """

    Config = WeightedSumConfig

    def __init__(self, config: WeightedSumConfig, name: str, terms: list[RewardPlugin]):
        super().__init__(config, name)
        self.terms = terms
        self.weights = [term.weight for term in config.terms]

    @classmethod
    def child_specs(cls, fields: Mapping[str, Any]) -> dict[tuple, Any]:
        terms = fields.get("terms")
        if not isinstance(terms, list):
            return {}
        return {("terms", i, "plugin"): t["plugin"] for i, t in enumerate(terms) if isinstance(t, Mapping) and "plugin" in t}

    @classmethod
    def from_spec(cls, spec: PluginSpec, build: Callable[[PluginSpec], RewardPlugin]) -> RewardPlugin:
        terms = [build(spec.children[("terms", i, "plugin")]) for i in range(len(spec.config.terms))]
        return cls(spec.config, spec.name, terms)

    @property
    def component_keys(self) -> tuple[str, ...]:
        return tuple(key for term in self.terms for key in prefixed(term))

    def score(self, samples: Sequence[Sample]) -> list[RewardResult]:
        per_term = [score_safely(term, samples) for term in self.terms]
        results = []
        for i in range(len(samples)):
            row = [results_of_term[i] for results_of_term in per_term]
            components: dict[str, float] = {}
            for term, result in zip(self.terms, row):
                components.update(prefix_components(term.name, result))
            errors = [r.error or term.name for term, r in zip(self.terms, row) if r.status is Status.ERROR]
            if errors:
                results.append(RewardResult.failed("; ".join(errors), components))
            elif any(r.status is Status.SKIPPED for r in row):
                reasons = [r.error or t.name for t, r in zip(self.terms, row) if r.status is Status.SKIPPED]
                results.append(RewardResult.skipped("; ".join(reasons), components))
            else:
                total = sum(w * r.reward for w, r in zip(self.weights, row))
                results.append(RewardResult.ok(total, components))
        return results
