"""OpenRLHF 0.11.2's reward wire format, shared by the HTTP server and the `reward_func` shim.

OpenRLHF sends, per sample, `query` (prompt + response decoded with special tokens kept), `prompts` (the
prompt after the chat template) and `labels` (the dataset label, untouched). It expects back an object
with `rewards`, optional `scores` and `extra_logs`. A `None` reward or a missing log key breaks training
far from the cause, so every answer carries a float reward and the pipeline's full, fixed set of log keys.

The response is derived from the query, never guessed:
  1. if the query starts with the prompt, the response is the rest of the query;
  2. otherwise, if the query starts with the last `MIN_OVERLAP` or more characters of the prompt (OpenRLHF
     cut an over-long prompt from the left before generating), the response is what follows that overlap;
     replacement characters (U+FFFD) at the start of the query are skipped first: they are what decoding
     leaves of a multi-byte character (CJK, emoji) whose first bytes the cut removed;
  3. otherwise the sample fails with a message and gets the fallback reward, counted in `reward/errors`.

A sample over the size cap, or whose reward or logs are not finite, fails the same way.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from reward_plugins.config import PipelineConfig
from reward_plugins.config import PluginSpec
from reward_plugins.pipeline import FIXED_LOG_KEYS, LOG_PREFIX, RewardPipeline
from reward_plugins.registry import RewardPlugin, plugin_class
from reward_plugins.types import Sample, Status

logger = logging.getLogger(__name__)

MIN_OVERLAP = 16
REPLACEMENT = "\ufffd"


def longest_prompt_overlap(prompt: str, query: str) -> int:
    """Length of the longest suffix of `prompt` that is a prefix of `query` (KMP failure function, O(n))."""
    text = query[: len(prompt)] + "\x00" + prompt
    fail = [0] * len(text)
    for i in range(1, len(text)):
        k = fail[i - 1]
        while k and text[i] != text[k]:
            k = fail[k - 1]
        if text[i] == text[k]:
            k += 1
        fail[i] = k
    return fail[-1] if text else 0


def derive_response(query: str, prompt: str) -> str:
    """The generated text inside an OpenRLHF query (rules in the module docstring); ValueError if not found."""
    if query.startswith(prompt):
        return query[len(prompt) :]
    rest = query.lstrip(REPLACEMENT)
    overlap = longest_prompt_overlap(prompt, rest)
    if overlap >= MIN_OVERLAP:
        return rest[overlap:]
    raise ValueError(
        f"the query does not start with the prompt (query begins {query[:40]!r}, prompt begins {prompt[:40]!r}); "
        "cannot tell the response apart"
    )


def to_sample(query: str, prompt: str | None, label: Any) -> Sample:
    """Build a Sample from one OpenRLHF (query, prompt, label) triple; no prompt means the query is all response."""
    if prompt is None:
        return Sample(prompt="", response=query, query=query, label=label)
    return Sample(prompt=prompt, response=derive_response(query, prompt), query=query, label=label)


@dataclass(frozen=True)
class Outcome:
    """What OpenRLHF receives for one sample: a float reward, the score for filtering, fixed-key logs."""

    reward: float
    score: float
    logs: dict[str, float]
    error: str | None = None


def config_log_keys(config: PipelineConfig) -> tuple[str, ...]:
    """The pipeline's log keys, from the validated config alone: no model is loaded (leaf plugins stay hollow)."""

    def hollow(spec: PluginSpec) -> RewardPlugin:
        cls = plugin_class(spec.type)
        if spec.children:  # a composite: built around hollow children (its own constructor loads nothing)
            return cls.from_spec(spec, hollow)
        plugin = cls.__new__(cls)  # a leaf, models included (an ensemble's members are part of its config)
        RewardPlugin.__init__(plugin, spec.config, spec.name)
        return plugin

    return FIXED_LOG_KEYS + tuple(LOG_PREFIX + key for key in hollow(config.reward).component_keys)


def resolve_fallback(config: PipelineConfig, explicit: float | None) -> float:
    """The reward an unscorable sample gets: the explicit value, else the config's error_penalty, else 0.0."""
    if explicit is not None:
        if not math.isfinite(float(explicit)):
            raise ValueError(f"the fallback reward must be a finite number, got {explicit!r}")
        return float(explicit)
    if config.error_penalty is not None:
        return float(config.error_penalty)
    logger.warning(
        "%s sets no error_penalty and no fallback was given: failed samples get reward 0.0 (counted in reward/errors)",
        config.source,
    )
    return 0.0


class GuardedScorer:
    """Scores samples through a pipeline and never raises: a failed or skipped sample gets the fallback reward.

    `on_error: raise` cannot reach a trainer through OpenRLHF (it swallows exceptions), so it is served like
    `skip`: the sample gets the fallback and `reward/errors` is 1. `score` is serialised with a lock, since
    tokenizers and models are shared.
    """

    def __init__(self, pipeline: RewardPipeline, fallback: float):
        if pipeline.on_error == "raise":
            pipeline = RewardPipeline(pipeline.root, on_error="skip")
        if not math.isfinite(float(fallback)):
            raise ValueError(f"the fallback reward must be a finite number, got {fallback!r}")
        self.pipeline = pipeline
        self.fallback = float(fallback)
        self.log_keys: tuple[str, ...] = pipeline.log_keys
        self._lock = threading.Lock()

    def failure(self, message: str) -> Outcome:
        """The answer for a sample that could not be scored at all."""
        logs = dict.fromkeys(self.log_keys, 0.0)
        logs["reward/errors"] = 1.0
        return Outcome(self.fallback, self.fallback, logs, message)

    def score(self, samples: Sequence[Sample]) -> list[Outcome]:
        """One outcome per sample, in order; an exception anywhere fails the whole batch with the fallback."""
        if not samples:
            return []
        try:
            with self._lock:
                batch = self.pipeline.score(samples)
        except Exception as exc:  # noqa: BLE001 - turned into counted fallbacks, logged at WARNING
            logger.warning("reward pipeline failed on a batch of %d: %s: %s", len(samples), type(exc).__name__, exc)
            return [self.failure(f"{type(exc).__name__}: {exc}")] * len(samples)
        outcomes = []
        for i, result in enumerate(batch.results):
            reward = batch.rewards[i]
            logs = batch.sample_logs(i)
            if reward is None:
                reward = self.fallback
                if result.status is Status.ERROR:
                    logs["reward/errors"] = 1.0
            bad = [key for key, value in logs.items() if not math.isfinite(value)]
            if not math.isfinite(reward) or bad:
                message = f"non-finite result (reward {reward}, logs {', '.join(bad) or 'finite'})"
                logger.warning("sample %d: %s", i, message)
                outcomes.append(self.failure(message))
                continue
            outcomes.append(Outcome(float(reward), float(reward), logs, result.error))
        return outcomes

    def prepare(
        self, queries: Sequence[str], prompts: Sequence[str | None] | None, labels: Sequence[Any] | None,
        max_sample_chars: int | None = None,
    ) -> tuple[list[Outcome | None], list[Sample], list[int]]:
        """Turn OpenRLHF's parallel lists into samples; a sample whose response cannot be derived, or whose query and
        prompt together exceed `max_sample_chars`, fails alone.

        Returns the outcomes so far (failures filled in), the samples to score and their positions.
        """
        n = len(queries)
        prompts = list(prompts) if prompts is not None else [None] * n
        labels = list(labels) if labels is not None else [None] * n
        if len(prompts) != n or len(labels) != n:
            message = f"query, prompts and labels differ in length ({n}, {len(prompts)}, {len(labels)})"
            logger.warning(message)
            return [self.failure(message)] * n, [], []
        outcomes: list[Outcome | None] = [None] * n
        samples, positions = [], []
        cap = max_sample_chars
        for i, (query, prompt, label) in enumerate(zip(queries, prompts, labels)):
            if cap is not None and len(query) + len(prompt or "") > cap:
                message = f"sample of {len(query) + len(prompt or '')} characters (query + prompt) is over the {cap} cap"
                logger.warning("sample %d: %s", i, message)
                outcomes[i] = self.failure(message)
                continue
            try:
                samples.append(to_sample(query, prompt, label))
                positions.append(i)
            except (ValueError, TypeError) as exc:
                logger.warning("sample %d: %s", i, exc)
                outcomes[i] = self.failure(str(exc))
        return outcomes, samples, positions

    def score_raw(
        self, queries: Sequence[str], prompts: Sequence[str | None] | None, labels: Sequence[Any] | None
    ) -> list[Outcome]:
        """Score OpenRLHF's parallel lists, one outcome per query."""
        outcomes, samples, positions = self.prepare(queries, prompts, labels)
        for i, outcome in zip(positions, self.score(samples)):
            outcomes[i] = outcome
        return outcomes  # type: ignore[return-value]


def to_payload(outcomes: Sequence[Outcome], log_keys: Sequence[str]) -> dict[str, Any]:
    """OpenRLHF's answer object: scalars for a one-sample call (its tensors are then shape (1,)), lists otherwise."""
    keys = list(log_keys) or list(FIXED_LOG_KEYS)
    if len(outcomes) == 1:
        (only,) = outcomes
        return {"rewards": only.reward, "scores": only.score, "extra_logs": {k: only.logs[k] for k in keys}}
    return {
        "rewards": [o.reward for o in outcomes],
        "scores": [o.score for o in outcomes],
        "extra_logs": {k: [o.logs[k] for o in outcomes] for k in keys},
    }
