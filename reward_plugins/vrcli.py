"""The `vrcli` plugin: reward = how much the policy's plan improves the perplexity of a gold continuation.

Gurung & Lapata (2025): `improvement = 100 * (baseline_ppl - ppl) / baseline_ppl`, where `ppl` is the
perplexity of the gold tokens given the prompt with the plan inserted and `baseline_ppl` (from the label)
the same without the plan, both from one frozen model. The improvement is in percent; shaping maps it to
the training reward, and the raw improvement is always logged.

`VRCLIPrompt.scored_input` builds the scored input for both the reward and the baseline precomputation
(`setup_data/compute_baseline_perplexity.py`): the story context is cut identically with and without the
plan, the gold never. The baseline script records the reward's fingerprint (scorer model name, temperature,
max_length, prompt-settings hash) in every label, and the reward refuses labels whose fingerprint differs.
The plan is extracted with the paper's chain (`find_plan`); a response without a marker is the plan.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike
from pydantic import Field, field_validator, model_validator

from .config import Placement
from .logprobs import HFLogProbScorer, LogProbScorer, perplexity
from .model_ref import ModelRef, repo_of, revision_of
from .modeling import DTypeName
from .registry import PluginConfig, RewardPlugin, plugin_tree, register_plugin
from .types import LabelError, RewardResult, Sample

Scheme = Literal["stepped", "binary", "clipped_linear", "raw"]
PAPER_MARKERS = ("In summary:", "In summary,", "Detailed Plan:")
FINGERPRINT_KEY = "baseline_fingerprint"
logger = logging.getLogger(__name__)


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


def find_plan(response: str, markers: Sequence[str] = PAPER_MARKERS) -> tuple[str, bool]:
    """The paper's extraction chain: keep the text after the last occurrence of each marker in turn.

    "In summary: A. Detailed Plan: B" gives "B" (the chain goes on inside what the first marker left).
    Returns (plan, whether any marker occurred); with no marker the plan is the whole response, stripped.
    """
    plan, found = response.strip(), False
    for marker in markers:
        if marker in plan:
            plan, found = plan.rsplit(marker, 1)[1].strip(), True
    return plan, found


def extract_plan(response: str, markers: Sequence[str] = PAPER_MARKERS, whole_response_fallback: bool = True) -> str:
    """`find_plan`, with no marker an error unless `whole_response_fallback` (the paper's behaviour, the default).

    An empty plan is a `ValueError` either way.
    """
    plan, found = find_plan(response, markers)
    if not found and not whole_response_fallback:
        raise ValueError(f"no plan marker ({', '.join(map(repr, markers))}) in the response")
    if not plan:
        raise ValueError("empty plan" + (" after the last marker" if found else ": the response is empty"))
    return plan


def strip_special_suffix(text: str, special_tokens: Sequence[str]) -> str:
    """Drop trailing special-token strings (an OpenRLHF response keeps its EOS text, e.g. `<|im_end|>`)."""
    tokens = [t for t in special_tokens if t]
    stripped = text.rstrip()
    while tokens and (end := next((t for t in tokens if stripped.endswith(t)), None)):
        stripped = stripped[: -len(end)].rstrip()
    return stripped


PLAN_HEADING = "### Detailed Plan for the Next Chapter ###"
APPEND_TEMPLATES = ("{context}", "{context}\n\n" + PLAN_HEADING + "\n{plan}")
# The paper's layout (prompt_utils.py): the plan block sits before the instruction block, whose text changes;
# the label carries the story part (`context`, no instruction) and both instructions.
PAPER_TEMPLATES = (
    "{context}\n### Instructions: ###\n{instruction}",
    "{context}\n\n" + PLAN_HEADING + "\n{plan}\n\n### Instructions: ###\n{plan_instruction}",
)
LAYOUTS = {"append": APPEND_TEMPLATES, "paper": PAPER_TEMPLATES}
_STORY, _PLAN = "\x00story\x00", "\x00plan\x00"


@dataclass(frozen=True)
class ScoredInput:
    """The scored token ids of one datapoint and whether the story context or the plan was cut to fit."""

    context: list[int]
    gold: list[int]
    story_cut: bool = False
    plan_cut: bool = False

    @property
    def truncated(self) -> bool:
        return self.story_cut or self.plan_cut


class VRCLIPrompt(PluginConfig):
    """How the scored input is built from the label (and the plan).

    Templates are `str.format` strings over the label's keys plus `{plan}`, each holding `{context}` (the
    story part, `context_key`) exactly once; `layout` picks the preset pair (`append`: the plan after the
    context; `paper`: the plan block before the instruction block, instructions from the label) unless the
    templates are given. The rendered text is the user turn (after an optional system turn) through the
    scorer tokenizer's chat template, or plain text with `chat_template: false`. The gold continuation
    follows as its own tokens and is never cut. When the input would exceed the scorer's `max_length`, the
    story context loses its oldest tokens, by an amount that does not depend on the plan (room for
    `plan_token_reserve` plan tokens is kept), so the baseline and the with-plan input see the same story
    tokens; a plan longer than the room left is cut at its end.
    """

    layout: Literal["append", "paper"] = "append"
    system: str | None = "You are a helpful and expert writing assistant."
    baseline_template: str = APPEND_TEMPLATES[0]
    plan_template: str = APPEND_TEMPLATES[1]
    chat_template: bool = True
    system_role: bool = True
    gold_key: str = "gold"
    context_key: str = "context"
    plan_token_reserve: int = Field(default=256, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _layout_templates(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            layout = data.get("layout", "append")
            if layout in LAYOUTS:
                baseline, plan = LAYOUTS[layout]
                given = {k: v for k, v in data.items() if v is not None or k not in ("baseline_template", "plan_template")}
                data = {"baseline_template": baseline, "plan_template": plan, **given}
        return data

    @model_validator(mode="after")
    def _templates(self) -> VRCLIPrompt:
        if "{plan}" not in self.plan_template:
            raise ValueError("plan_template must contain {plan}")
        story = "{" + self.context_key + "}"
        for name, template in (("baseline_template", self.baseline_template), ("plan_template", self.plan_template)):
            if template.count(story) != 1:
                raise ValueError(f"{name} must contain {story} exactly once (the story part that may be cut)")
        return self

    def settings_hash(self) -> str:
        """A short hash of every setting that shapes the scored input (part of the baseline fingerprint)."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def render(self, label: Mapping[str, Any], plan: str | None) -> str | list[dict[str, str]]:
        """The scored input as text or messages, before tokenization (the gold is not part of it)."""
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

    def _pieces(self, tokenizer, label: Mapping[str, Any], plan: bool) -> list[list[int] | str]:
        """Token ids of the fixed text around the placeholders `_STORY` and `_PLAN` (kept as markers)."""
        rendered = self.render({**label, self.context_key: _STORY}, _PLAN if plan else None)
        if isinstance(rendered, list):
            text = tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False)
            lead: list[int] = []
        else:
            text = rendered
            lead = list(tokenizer("", add_special_tokens=True)["input_ids"])
        pieces: list[list[int] | str] = [lead] if lead else []
        for part in re.split(f"({_STORY}|{_PLAN})", text):
            if part in (_STORY, _PLAN):
                pieces.append(part)
            elif part:
                pieces.append(list(tokenizer(part, add_special_tokens=False)["input_ids"]))
        return pieces

    def scored_input(self, tokenizer, label: Any, plan: str | None, max_length: int | None = None) -> ScoredInput:
        """The (context, gold) ids of one datapoint, fitted to `max_length`; `plan=None` gives the baseline input.

        Fixed text, the story context and the plan are tokenized separately and concatenated, so the story
        tokens are the same with and without the plan.
        """
        if not isinstance(label, Mapping):
            raise LabelError(f"label must be an object, got {type(label).__name__}")
        gold = label.get(self.gold_key)
        if not isinstance(gold, str) or not gold.strip():
            raise LabelError(f"label has no non-empty {self.gold_key!r}")
        story = label.get(self.context_key)
        if not isinstance(story, str) or not story.strip():
            raise LabelError(f"label has no non-empty {self.context_key!r}")
        gold_ids = list(tokenizer(gold, add_special_tokens=False)["input_ids"])
        if not gold_ids:
            raise LabelError("gold continuation tokenizes to nothing")
        story_ids = list(tokenizer(story, add_special_tokens=False)["input_ids"])
        pieces = {False: self._pieces(tokenizer, label, False), True: self._pieces(tokenizer, label, True)}
        story_cut = plan_cut = False
        plan_ids = list(tokenizer(plan, add_special_tokens=False)["input_ids"]) if plan is not None else []
        if max_length is not None:
            fixed = max(sum(len(p) for p in ps if isinstance(p, list)) for ps in pieces.values())
            budget = max_length - len(gold_ids) - fixed - self.plan_token_reserve
            if budget < 1:
                raise LabelError(
                    f"gold ({len(gold_ids)} tokens), fixed prompt text ({fixed}) and plan_token_reserve "
                    f"({self.plan_token_reserve}) leave no room for the story within max_length {max_length}"
                )
            if len(story_ids) > budget:
                story_ids, story_cut = story_ids[-budget:], True
            if plan is not None:
                fixed_plan = sum(len(p) for p in pieces[True] if isinstance(p, list))
                room = max_length - len(gold_ids) - fixed_plan - len(story_ids)
                if len(plan_ids) > room:
                    plan_ids, plan_cut = plan_ids[:room], True
        if plan is not None and not plan_ids:
            raise ValueError("the plan tokenizes to nothing")
        context: list[int] = []
        for piece in pieces[plan is not None]:
            context.extend(story_ids if piece == _STORY else plan_ids if piece == _PLAN else piece)
        return ScoredInput(context, gold_ids, story_cut, plan_cut)

    def token_ids(self, tokenizer, label: Any, plan: str | None, max_length: int | None = None) -> tuple[list[int], list[int]]:
        """(context ids, gold ids) for one datapoint; `plan=None` gives the baseline input."""
        scored = self.scored_input(tokenizer, label, plan, max_length)
        return scored.context, scored.gold


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




def model_id(name_or_path: str | os.PathLike) -> str:
    """A model's name for fingerprints: the last path component (`Qwen/Qwen2.5-7B-Instruct` -> `Qwen2.5-7B-Instruct`)."""
    return PurePath(str(name_or_path).rstrip("/\\")).name or str(name_or_path)


def fingerprint(model: str | None, temperature: float, max_length: int, prompt: VRCLIPrompt,
                revision: str | None = None) -> dict[str, Any]:
    """What must agree between a baseline and the reward that uses it: scorer model (and its hub commit, when it
    came from a hub id), temperature, max_length, prompt."""
    out = {"model": model, "temperature": float(temperature), "max_length": int(max_length),
           "prompt_hash": prompt.settings_hash()}
    if revision is not None:
        out["revision"] = revision
    return out


def fingerprint_differences(expected: Mapping[str, Any], found: Any) -> list[str]:
    """Human-readable differences between the reward's fingerprint and a label's (empty when they agree).

    A `None` model on the reward side (an external scorer that did not say its name) is not compared.
    """
    if not isinstance(found, Mapping):
        return [f"{FINGERPRINT_KEY} is {found!r}, not an object"]
    out = []
    for key, value in expected.items():
        other = found.get(key)
        if key == "model" and value is None:
            continue
        same = (isinstance(other, (int, float)) and not isinstance(other, bool) and math.isclose(other, value)
                if key == "temperature" else other == value)
        if not same:
            out.append(f"{key}: baseline {other!r}, reward {value!r}")
    return out


FingerprintPolicy = Literal["require", "check", "off"]


class BaselineMismatchError(RuntimeError):
    """Labels carry baselines computed with other settings than this reward's: the run must stop."""


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


def baseline_inputs(scorer: LogProbScorer, prompt: VRCLIPrompt, labels: Sequence[Any]) -> list[ScoredInput]:
    """The baseline (no plan) inputs of each label, fitted to the scorer's max_length."""
    max_length = getattr(scorer, "max_length", None)
    return [prompt.scored_input(scorer.tokenizer, label, None, max_length) for label in labels]


def baseline_perplexities(scorer: LogProbScorer, prompt: VRCLIPrompt, labels: Sequence[Any]) -> np.ndarray:
    """Perplexity of each label's gold continuation without a plan: the VR-CLI baseline."""
    inputs = baseline_inputs(scorer, prompt, labels)
    logprobs = scorer.continuation_logprobs([i.context for i in inputs], [i.gold for i in inputs])
    return np.array([perplexity(row) for row in logprobs])


def valid_baseline(value: Any) -> bool:
    """A usable baseline perplexity: a real number (not a bool) that is finite and positive as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value)) and value > 0
    except OverflowError:
        return False


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
        response = strip_special_suffix(sample.response, self.scorer.tokenizer.all_special_tokens)
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
