"""The `vrcli` plugin: reward = how much the policy's plan improves the perplexity of a gold continuation.

Its configuration (scorer, prompt, plan extraction, shaping, fingerprint policy) and the plugin that
checks each label's baseline, extracts the plan (`find_plan`; a response without a marker is the plan),
scores the gold continuation with the plan in the prompt and shapes the improvement.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike
from pydantic import Field, field_validator, model_validator

from ..config import Placement
from ..logprobs import HFLogProbScorer, LogProbScorer, perplexity
from ..model_ref import ModelRef, repo_of, revision_of
from ..modeling import DTypeName
from ..registry import PluginConfig, RewardPlugin, plugin_tree, register_plugin
from ..types import LabelError, RewardResult, Sample
from .baselines import FINGERPRINT_KEY, BaselineMismatchError, fingerprint, fingerprint_differences, model_id, valid_baseline
from .plan import PAPER_MARKERS, extract_plan, strip_special_tokens
from .prompts import ScoredInput, VRCLIPrompt
from .scoring import Scheme, improvement, shape

logger = logging.getLogger(__name__)


class ScorerConfig(PluginConfig):
    """`backend: hf` loads `model` here; `backend: external` expects `attach_scorer` (e.g. OpenRLHF's reference model)."""

    backend: Literal["hf", "external"] = "hf"
    model: ModelRef | None = None
    tokenizer: ModelRef | None = None
    dtype: DTypeName = "auto"
    device: str = "auto"
    batch_size: int = Field(default=8, gt=0)
    max_tokens_per_batch: int | None = Field(default=None, gt=0)
    max_length: int = Field(default=4096, gt=1)
    temperature: float = Field(default=1.0, gt=0)
    trust_remote_code: bool = False
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3"] | None = None  # None: transformers' default
    placement: Placement | None = None
    model_id: str | None = None  # the scorer's name in baseline fingerprints; default: the model folder's name

    @model_validator(mode="after")
    def _model_for_hf(self) -> ScorerConfig:
        if self.backend == "hf" and self.model is None:
            raise ValueError("backend: hf needs model: the frozen scoring model's path")
        if self.backend == "external" and self.placement is not None:
            raise ValueError("backend: external scores on OpenRLHF's reference model; a placement applies to backend: hf")
        return self

    def build(self) -> HFLogProbScorer:
        return HFLogProbScorer(
            self.model,
            self.tokenizer,
            dtype=self.dtype,
            device=self.device,
            batch_size=self.batch_size,
            max_tokens_per_batch=self.max_tokens_per_batch,
            max_length=self.max_length,
            temperature=self.temperature,
            trust_remote_code=self.trust_remote_code,
            attn_implementation=self.attn_implementation,
        )


class PlanConfig(PluginConfig):
    markers: list[str] = Field(default_factory=lambda: list(PAPER_MARKERS), min_length=1)
    whole_response_fallback: bool = True  # the paper's behaviour; `reward/vrcli_no_plan` counts its uses


class ShapingConfig(PluginConfig):
    scheme: Scheme = "stepped"
    thresholds: list[float] = Field(default_factory=lambda: [0.05, 1.0, 2.0])
    levels: list[float] = Field(default_factory=lambda: [0.5, 0.9, 1.0])
    below: float = 0.0
    binary_threshold: float = 0.0
    clip_max: float = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _steps(self) -> ShapingConfig:
        if len(self.thresholds) != len(self.levels) or self.thresholds != sorted(self.thresholds):
            raise ValueError("thresholds must be ascending with one level each")
        return self

    def apply(self, values: ArrayLike) -> np.ndarray:
        return shape(
            values,
            self.scheme,
            thresholds=self.thresholds,
            levels=self.levels,
            below=self.below,
            binary_threshold=self.binary_threshold,
            clip_max=self.clip_max,
        )


FingerprintPolicy = Literal["require", "check", "off"]


class VRCLIConfig(PluginConfig):
    """`fingerprint`: `require` refuses labels without a matching `baseline_fingerprint`; `check` refuses
    mismatches but accepts labels without one (hand-made data); `off` trusts the labels."""

    scorer: ScorerConfig
    prompt: VRCLIPrompt = Field(default_factory=VRCLIPrompt)
    plan: PlanConfig = Field(default_factory=PlanConfig)
    shaping: ShapingConfig = Field(default_factory=ShapingConfig)
    baseline_key: str = "baseline_ppl"
    fingerprint: FingerprintPolicy = "check"

    @field_validator("fingerprint", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        """YAML 1.1 reads a bare `off` as false; take it as the policy the user wrote."""
        return "off" if value is False else value


@register_plugin("vrcli")
class VRCLIPlugin(RewardPlugin):
    """Components: `improvement` (raw, percent), `ppl` (with the plan), `baseline_ppl`, and per-sample flags
    `vrcli_no_plan` (no marker: the whole response was the plan) and `vrcli_truncated` (story or plan cut)."""

    Config = VRCLIConfig

    def __init__(self, config: VRCLIConfig, name: str, scorer: LogProbScorer | None = None):
        super().__init__(config, name)
        self.scorer = scorer if scorer is not None else (config.scorer.build() if config.scorer.backend == "hf" else None)
        self._warned_unfingerprinted = False

    def attach_scorer(self, scorer: LogProbScorer) -> None:
        """Use an external log-prob backend (e.g. the trainer's reference model)."""
        self.scorer = scorer

    @property
    def component_keys(self) -> tuple[str, ...]:
        return ("improvement", "ppl", "baseline_ppl", "vrcli_no_plan", "vrcli_truncated")

    @property
    def scorer_model_id(self) -> str | None:
        """The scorer's name: `scorer.model_id`, else an attached scorer's `model_id`, else the hf model's folder name."""
        if self.config.scorer.model_id:
            return self.config.scorer.model_id
        attached = getattr(self.scorer, "model_id", None)
        if attached:
            return str(attached)
        return model_id(repo_of(self.config.scorer.model)) if self.config.scorer.model is not None else None

    @property
    def max_length(self) -> int:
        """Tokens the scorer takes (an attached scorer's own limit, else the config's): inputs are cut to it."""
        return getattr(self.scorer, "max_length", None) or self.config.scorer.max_length

    def fingerprint(self) -> dict[str, Any]:
        """This reward's fingerprint, as `compute_baseline_perplexity.py` records it in each label."""
        scorer = self.scorer
        temperature = scorer.temperature if scorer is not None else self.config.scorer.temperature
        return fingerprint(self.scorer_model_id, temperature, self.max_length, self.config.prompt,
                           getattr(scorer, "dtype", None), getattr(scorer, "attn_implementation", None),
                           revision_of(self.config.scorer.model))

    def check_labels(self, labels: Sequence[Any]) -> None:
        """Refuse (raise `BaselineMismatchError`) labels whose baseline fingerprint differs from this reward's."""
        if self.config.fingerprint == "off":
            return
        expected, problems, missing = self.fingerprint(), {}, 0
        for label in labels:
            if not isinstance(label, Mapping):
                continue
            found = label.get(FINGERPRINT_KEY)
            if found is None:
                missing += 1
                continue
            for difference in fingerprint_differences(expected, found):
                problems.setdefault(difference, label.get("id"))
        if problems:
            shown = "; ".join(f"{d} (e.g. label {i!r})" for d, i in problems.items())
            raise BaselineMismatchError(
                f"{self.name}: baseline perplexities were computed with other settings than this reward uses: {shown}. "
                "Recompute them with setup_data/compute_baseline_perplexity.py and this reward config"
            )
        if missing and self.config.fingerprint == "require":
            raise BaselineMismatchError(
                f"{self.name}: {missing} label(s) have no {FINGERPRINT_KEY!r}; compute the baselines with "
                "setup_data/compute_baseline_perplexity.py and this reward config (or set fingerprint: check)"
            )
        if missing and not self._warned_unfingerprinted:
            self._warned_unfingerprinted = True
            logger.warning("%s: %d label(s) carry no %s; their baselines cannot be checked", self.name, missing,
                           FINGERPRINT_KEY)

    def _prepare(self, sample: Sample, expected: dict[str, Any]) -> tuple[ScoredInput, float, bool]:
        label = sample.label
        if not isinstance(label, Mapping):
            raise LabelError(f"label must be an object, got {type(label).__name__}")
        baseline = label.get(self.config.baseline_key)
        if not valid_baseline(baseline):
            raise LabelError(f"label has no positive finite number {self.config.baseline_key!r} (got {baseline!r})")
        baseline_temperature = label.get("baseline_temperature")
        if baseline_temperature is not None and not valid_baseline(baseline_temperature):
            raise LabelError(f"label 'baseline_temperature' must be a positive number, got {baseline_temperature!r}")
        if baseline_temperature is not None and not math.isclose(baseline_temperature, self.scorer.temperature):
            raise LabelError(
                f"baseline computed at temperature {baseline_temperature}, scorer runs at {self.scorer.temperature}"
            )
        found = label.get(FINGERPRINT_KEY)
        if self.config.fingerprint != "off" and (found is not None or self.config.fingerprint == "require"):
            differences = fingerprint_differences(expected, found)
            if differences:
                raise LabelError("baseline fingerprint differs from this reward: " + "; ".join(differences))
        response = strip_special_tokens(sample.response, self.scorer.tokenizer.all_special_tokens)
        markers = self.config.plan.markers
        plan = extract_plan(response, markers, self.config.plan.whole_response_fallback)
        found_marker = any(marker in response for marker in markers)
        scored = self.config.prompt.scored_input(self.scorer.tokenizer, label, plan, self.max_length)
        return scored, float(baseline), not found_marker

    def score(self, samples: Sequence[Sample]) -> list[RewardResult]:
        if self.scorer is None:
            raise RuntimeError(f"{self.name}: scorer backend is external but no scorer was attached")
        results: list[RewardResult | None] = [None] * len(samples)
        prepared, positions, expected = [], [], self.fingerprint()
        for i, sample in enumerate(samples):
            try:
                prepared.append(self._prepare(sample, expected))
                positions.append(i)
            except ValueError as exc:
                results[i] = RewardResult.failed(f"{self.name}: {exc}")
        if prepared:
            inputs = [p[0] for p in prepared]
            logprobs = self.scorer.continuation_logprobs([i.context for i in inputs], [i.gold for i in inputs])
            ppl = np.array([perplexity(row) for row in logprobs])
            baselines = np.array([b for _, b, _ in prepared])
            raw = improvement(baselines, ppl)
            shaped = self.config.shaping.apply(raw)
            for i, value, imp, p, b, (scored, _, no_plan) in zip(positions, shaped, raw, ppl, baselines, prepared):
                components = {"improvement": float(imp), "ppl": float(p), "baseline_ppl": float(b),
                              "vrcli_no_plan": float(no_plan), "vrcli_truncated": float(scored.truncated)}
                if np.isfinite(value):
                    results[i] = RewardResult.ok(value, components)
                else:
                    flags = {k: components[k] for k in ("baseline_ppl", "vrcli_no_plan", "vrcli_truncated")}
                    results[i] = RewardResult.failed(f"{self.name}: non-finite perplexity {p}", flags)
        return results  # type: ignore[return-value]


def has_vrcli(plugin: RewardPlugin) -> bool:
    """Whether the tree scores with VR-CLI, here or in placed replicas (a placed plugin keeps its `type_name`)."""
    return any(isinstance(n, VRCLIPlugin) or getattr(n, "type_name", None) == "vrcli" for n in plugin_tree(plugin))
