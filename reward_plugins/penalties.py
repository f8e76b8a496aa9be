"""Cheap rule terms: the EOS trick, a length penalty and a regex format check."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from .config import PluginSpec
from .registry import PluginConfig, RewardPlugin, register_plugin, score_safely
from .types import RewardResult, Sample


def length_penalty(lengths: np.ndarray, coef: float, free_length: int = 0, max_penalty: float | None = None) -> np.ndarray:
    """-coef per unit beyond `free_length`, optionally capped at -max_penalty."""
    penalty = coef * np.maximum(0, np.asarray(lengths, dtype=np.float64) - free_length)
    if max_penalty is not None:
        penalty = np.minimum(penalty, max_penalty)
    return -penalty


class EOSPenaltyConfig(PluginConfig):
    inner: dict[str, Any]
    penalty: float
    eos_token_ids: list[int] = Field(default_factory=list)
    eos_texts: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _needs_eos(self) -> EOSPenaltyConfig:
        if not self.eos_token_ids and not self.eos_texts:
            raise ValueError("give eos_token_ids and/or eos_texts")
        return self


@register_plugin("eos_penalty")
class EOSPenaltyPlugin(RewardPlugin):
    """The EOS trick: a completion that does not end in EOS gets `penalty`, and `inner` is not run on it.

    With response token ids the last id is checked against `eos_token_ids`; otherwise the text (trailing
    whitespace ignored) against `eos_texts`. Components: `missing_eos` (0/1) and the inner's, prefixed.
    """

    Config = EOSPenaltyConfig

    def __init__(self, config: EOSPenaltyConfig, name: str, inner: RewardPlugin):
        super().__init__(config, name)
        self.inner = inner

    @classmethod
    def child_specs(cls, fields: Mapping[str, Any]) -> dict[tuple, Any]:
        return {("inner",): fields["inner"]} if "inner" in fields else {}

    @classmethod
    def from_spec(cls, spec: PluginSpec, build: Callable[[PluginSpec], RewardPlugin]) -> RewardPlugin:
        return cls(spec.config, spec.name, build(spec.children[("inner",)]))

    @property
    def component_keys(self) -> tuple[str, ...]:
        return ("missing_eos", *prefixed(self.inner))

    def ends_with_eos(self, sample: Sample) -> bool:
        if sample.response_ids is not None and self.config.eos_token_ids:
            return len(sample.response_ids) > 0 and sample.response_ids[-1] in self.config.eos_token_ids
        text = sample.response.rstrip()
        return any(text.endswith(eos) for eos in self.config.eos_texts)

    def score(self, samples: Sequence[Sample]) -> list[RewardResult]:
        ended = [self.ends_with_eos(s) for s in samples]
        inner_results = iter(score_safely(self.inner, [s for s, e in zip(samples, ended) if e]))
        results = []
        for has_eos in ended:
            if not has_eos:
                results.append(RewardResult.ok(self.config.penalty, {"missing_eos": 1.0}))
                continue
            inner = next(inner_results)
            components = {"missing_eos": 0.0, **prefix_components(self.inner.name, inner)}
            results.append(_with_components(inner, components))
        return results


class LengthPenaltyConfig(PluginConfig):
    coef: float = Field(ge=0)
    free_length: int = Field(default=0, ge=0)
    max_penalty: float | None = Field(default=None, ge=0)
    unit: Literal["tokens", "words", "chars"] = "tokens"


@register_plugin("length_penalty")
class LengthPenaltyPlugin(RewardPlugin):
    """-coef * max(0, length - free_length); `tokens` needs response token ids. Component: `length`."""

    Config = LengthPenaltyConfig

    @property
    def component_keys(self) -> tuple[str, ...]:
        return ("length",)

    def _length(self, sample: Sample) -> int | None:
        if self.config.unit == "tokens":
            return None if sample.response_ids is None else len(sample.response_ids)
        return len(sample.response.split()) if self.config.unit == "words" else len(sample.response)

    def score(self, samples: Sequence[Sample]) -> list[RewardResult]:
        lengths = [self._length(s) for s in samples]
        known = np.array([n for n in lengths if n is not None], dtype=np.float64)
        penalties = iter(length_penalty(known, self.config.coef, self.config.free_length, self.config.max_penalty))
        return [
            RewardResult.failed(f"{self.name}: unit=tokens needs response token ids")
            if n is None
            else RewardResult.ok(next(penalties), {"length": float(n)})
            for n in lengths
        ]


class FormatCheckConfig(PluginConfig):
    pattern: str
    mode: Literal["search", "fullmatch"] = "search"
    dotall: bool = True
    reward_match: float = 1.0
    reward_mismatch: float = 0.0

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"invalid regular expression: {exc}") from None
        return pattern


@register_plugin("format_check")
class FormatCheckPlugin(RewardPlugin):
    """`reward_match` when the response matches `pattern`, else `reward_mismatch`. Component: `matched`."""

    Config = FormatCheckConfig

    def __init__(self, config: FormatCheckConfig, name: str):
        super().__init__(config, name)
        self.regex = re.compile(config.pattern, re.DOTALL if config.dotall else 0)

    @property
    def component_keys(self) -> tuple[str, ...]:
        return ("matched",)

    def score(self, samples: Sequence[Sample]) -> list[RewardResult]:
        match = self.regex.search if self.config.mode == "search" else self.regex.fullmatch
        results = []
        for sample in samples:
            matched = match(sample.response) is not None
            reward = self.config.reward_match if matched else self.config.reward_mismatch
            results.append(RewardResult.ok(reward, {"matched": float(matched)}))
        return results


def prefixed(plugin: RewardPlugin) -> tuple[str, ...]:
    """A child's log keys inside a composite: its reward plus its components, under its name."""
    return (f"{plugin.name}/reward", *(f"{plugin.name}/{key}" for key in plugin.component_keys))


def prefix_components(name: str, result: RewardResult) -> dict[str, float]:
    components = {f"{name}/{key}": value for key, value in result.components.items()}
    if result.reward is not None:
        components[f"{name}/reward"] = result.reward
    return components


def _with_components(result: RewardResult, components: dict[str, float]) -> RewardResult:
    return RewardResult(result.reward, components, result.status, result.error)
