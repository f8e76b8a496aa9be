"""The `vrcli` plugin: reward = how much the policy's plan improves the perplexity of a gold continuation.

Gurung & Lapata (2025): `improvement = 100 * (baseline_ppl - ppl) / baseline_ppl`, where `ppl` is the
perplexity of the gold tokens given the prompt with the plan inserted and `baseline_ppl` (from the label)
the same without the plan, both from one frozen model. The improvement is in percent; shaping maps it to
the training reward, and the raw improvement is always logged.

`VRCLIPrompt.token_ids` builds the scored input for both the reward and the baseline precomputation
(`setup_data/compute_baseline_perplexity.py`), so the two cannot drift apart.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike
from pydantic import Field, field_validator, model_validator

from .config import ExistingPath
from .logprobs import HFLogProbScorer, LogProbScorer, perplexity
from .modeling import DTypeName
from .registry import PluginConfig, RewardPlugin, register_plugin
from .types import LabelError, RewardResult, Sample

Scheme = Literal["stepped", "binary", "clipped_linear", "raw"]
PAPER_MARKERS = ("In summary:", "In summary,", "Detailed Plan:")


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


def extract_plan(response: str, markers: Sequence[str] = PAPER_MARKERS, whole_response_fallback: bool = False) -> str:
    """The text after the last occurrence of the first marker that appears, tried in order.

    With no marker present: the whole response if `whole_response_fallback`, else `ValueError`.
    An empty plan is a `ValueError` either way.
    """
    for marker in markers:
        position = response.rfind(marker)
        if position >= 0:
            plan = response[position + len(marker) :].strip()
            if not plan:
                raise ValueError(f"empty plan after marker {marker!r}")
            return plan
    if whole_response_fallback and response.strip():
        return response.strip()
    raise ValueError(f"no plan marker ({', '.join(map(repr, markers))}) in the response")


def strip_special_suffix(text: str, special_tokens: Sequence[str]) -> str:
    """Drop trailing special-token strings (an OpenRLHF response keeps its EOS text, e.g. `<|im_end|>`)."""
    tokens = [t for t in special_tokens if t]
    stripped = text.rstrip()
    while tokens and (end := next((t for t in tokens if stripped.endswith(t)), None)):
        stripped = stripped[: -len(end)].rstrip()
    return stripped


class VRCLIPrompt(PluginConfig):
    """How the scored input is built from the label (and the plan).

    Templates are `str.format` strings over the label's keys plus `{plan}`; the rendered text is the user
    turn (after an optional system turn) through the scorer tokenizer's chat template, or plain text with
    `chat_template: false`. The gold continuation follows as its own tokens, so exactly the same gold
    tokens are scored with and without the plan.
    """

    system: str | None = "You are a helpful and expert writing assistant."
    baseline_template: str = "{context}"
    plan_template: str = "{context}\n\n### Detailed Plan for the Next Chapter ###\n{plan}"
    chat_template: bool = True
    system_role: bool = True
    gold_key: str = "gold"

    @field_validator("plan_template")
    @classmethod
    def _has_plan(cls, template: str) -> str:
        if "{plan}" not in template:
            raise ValueError("plan_template must contain {plan}")
        return template

    def render(self, label: Mapping[str, Any], plan: str | None) -> str | list[dict[str, str]]:
        template = self.baseline_template if plan is None else self.plan_template
        try:
            text = template.format_map({**label, "plan": plan})
        except KeyError as exc:
            raise LabelError(f"prompt template needs label key {exc}") from None
        if not self.chat_template:
            return text if self.system is None else f"{self.system}\n\n{text}"
        if self.system is None:
            return [{"role": "user", "content": text}]
        if not self.system_role:
            return [{"role": "user", "content": f"{self.system}\n\n{text}"}]
        return [{"role": "system", "content": self.system}, {"role": "user", "content": text}]

    def token_ids(self, tokenizer, label: Any, plan: str | None) -> tuple[list[int], list[int]]:
        """(context ids, gold ids) for one datapoint; `plan=None` gives the baseline input."""
        if not isinstance(label, Mapping):
            raise LabelError(f"label must be an object, got {type(label).__name__}")
        gold = label.get(self.gold_key)
        if not isinstance(gold, str) or not gold.strip():
            raise LabelError(f"label has no non-empty {self.gold_key!r}")
        rendered = self.render(label, plan)
        if isinstance(rendered, list):
            text = tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False)
            context = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            context = tokenizer(rendered, add_special_tokens=True)["input_ids"]
        gold_ids = tokenizer(gold, add_special_tokens=False)["input_ids"]
        if not gold_ids:
            raise LabelError("gold continuation tokenizes to nothing")
        return list(context), list(gold_ids)


class ScorerConfig(PluginConfig):
    """`backend: hf` loads `model` here; `backend: external` expects `attach_scorer` (e.g. OpenRLHF's reference model)."""

    backend: Literal["hf", "external"] = "hf"
    model: ExistingPath | None = None
    tokenizer: ExistingPath | None = None
    dtype: DTypeName = "auto"
    device: str = "auto"
    batch_size: int = Field(default=8, gt=0)
    max_tokens_per_batch: int | None = Field(default=None, gt=0)
    max_length: int = Field(default=4096, gt=1)
    temperature: float = Field(default=1.0, gt=0)
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _model_for_hf(self) -> ScorerConfig:
        if self.backend == "hf" and self.model is None:
            raise ValueError("backend: hf needs model: the frozen scoring model's path")
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
        )


class PlanConfig(PluginConfig):
    markers: list[str] = Field(default_factory=lambda: list(PAPER_MARKERS), min_length=1)
    whole_response_fallback: bool = False


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


class VRCLIConfig(PluginConfig):
    scorer: ScorerConfig
    prompt: VRCLIPrompt = Field(default_factory=VRCLIPrompt)
    plan: PlanConfig = Field(default_factory=PlanConfig)
    shaping: ShapingConfig = Field(default_factory=ShapingConfig)
    baseline_key: str = "baseline_ppl"


def baseline_perplexities(scorer: LogProbScorer, prompt: VRCLIPrompt, labels: Sequence[Any]) -> np.ndarray:
    """Perplexity of each label's gold continuation without a plan: the VR-CLI baseline."""
    pairs = [prompt.token_ids(scorer.tokenizer, label, None) for label in labels]
    logprobs = scorer.continuation_logprobs([c for c, _ in pairs], [g for _, g in pairs])
    return np.array([perplexity(row) for row in logprobs])


def _positive_finite(value: Any) -> bool:
    """True for a real number (not a bool) that is finite and positive as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value)) and value > 0
    except OverflowError:
        return False


@register_plugin("vrcli")
class VRCLIPlugin(RewardPlugin):
    """Components: `improvement` (raw, percent), `ppl` (with the plan) and `baseline_ppl`."""

    Config = VRCLIConfig

    def __init__(self, config: VRCLIConfig, name: str, scorer: LogProbScorer | None = None):
        super().__init__(config, name)
        self.scorer = scorer if scorer is not None else (config.scorer.build() if config.scorer.backend == "hf" else None)

    def attach_scorer(self, scorer: LogProbScorer) -> None:
        """Use an external log-prob backend (e.g. the trainer's reference model)."""
        self.scorer = scorer

    @property
    def component_keys(self) -> tuple[str, ...]:
        return ("improvement", "ppl", "baseline_ppl")

    def _prepare(self, sample: Sample) -> tuple[list[int], list[int], float]:
        label = sample.label
        if not isinstance(label, Mapping):
            raise LabelError(f"label must be an object, got {type(label).__name__}")
        baseline = label.get(self.config.baseline_key)
        if not _positive_finite(baseline):
            raise LabelError(f"label has no positive finite number {self.config.baseline_key!r} (got {baseline!r})")
        baseline_temperature = label.get("baseline_temperature")
        if baseline_temperature is not None and not math.isclose(baseline_temperature, self.scorer.temperature):
            raise LabelError(
                f"baseline computed at temperature {baseline_temperature}, scorer runs at {self.scorer.temperature}"
            )
        plan = strip_special_suffix(
            extract_plan(sample.response, self.config.plan.markers, self.config.plan.whole_response_fallback),
            self.scorer.tokenizer.all_special_tokens,
        )
        if not plan:
            raise ValueError("the plan is empty once end-of-turn tokens are removed")
        context, gold = self.config.prompt.token_ids(self.scorer.tokenizer, label, plan)
        return context, gold, float(baseline)

    def score(self, samples: Sequence[Sample]) -> list[RewardResult]:
        if self.scorer is None:
            raise RuntimeError(f"{self.name}: scorer backend is external but no scorer was attached")
        results: list[RewardResult | None] = [None] * len(samples)
        prepared, positions = [], []
        for i, sample in enumerate(samples):
            try:
                prepared.append(self._prepare(sample))
                positions.append(i)
            except ValueError as exc:
                results[i] = RewardResult.failed(f"{self.name}: {exc}")
        if prepared:
            logprobs = self.scorer.continuation_logprobs([c for c, _, _ in prepared], [g for _, g, _ in prepared])
            ppl = np.array([perplexity(row) for row in logprobs])
            baselines = np.array([b for _, _, b in prepared])
            raw = improvement(baselines, ppl)
            shaped = self.config.shaping.apply(raw)
            for i, value, imp, p, b in zip(positions, shaped, raw, ppl, baselines):
                components = {"improvement": float(imp), "ppl": float(p), "baseline_ppl": float(b)}
                if np.isfinite(value):
                    results[i] = RewardResult.ok(value, components)
                else:
                    results[i] = RewardResult.failed(f"{self.name}: non-finite perplexity {p}", {"baseline_ppl": float(b)})
        return results  # type: ignore[return-value]


def load_vrcli_plugin(path: str | os.PathLike) -> VRCLIPlugin:
    """Build the first `vrcli` plugin in a reward YAML: baselines then use exactly the reward's settings."""
    from .config import load_pipeline_config
    from .pipeline import build_plugin

    stack = [load_pipeline_config(path).reward]
    while stack:
        spec = stack.pop(0)
        if spec.type == "vrcli":
            return build_plugin(spec)  # type: ignore[return-value]
        stack.extend(spec.children.values())
    raise ValueError(f"{path}: no plugin of type vrcli in this reward configuration")
