"""The two values every plugin speaks: a `Sample` in, a `RewardResult` out."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class Status(str, enum.Enum):
    OK = "ok"
    SKIPPED = "skipped"
    ERROR = "error"


@dataclass(frozen=True)
class Sample:
    """One rollout to score.

    `prompt` is the prompt text as the policy saw it, `response` the generated text, `query` the full
    decoded text (prompt + response, special tokens kept, as OpenRLHF sends it). `label` is whatever the
    dataset carried for this prompt (any JSON value); rewards read their datapoint from it, never from the
    prompt text. `group_id` is shared by the samples of one prompt.
    """

    prompt: str
    response: str
    query: str | None = None
    label: Any = None
    response_ids: Sequence[int] | None = None
    group_id: str | int | None = None

    @property
    def full_text(self) -> str:
        return self.query if self.query is not None else self.prompt + self.response


@dataclass(frozen=True)
class RewardResult:
    """The outcome for one sample: a reward (None means "skip this sample"), named components, a status."""

    reward: float | None
    components: Mapping[str, float] = field(default_factory=dict)
    status: Status = Status.OK
    error: str | None = None

    @classmethod
    def ok(cls, reward: float, components: Mapping[str, float] | None = None) -> RewardResult:
        reward = float(reward)
        if not math.isfinite(reward):
            return cls.failed(f"non-finite reward {reward}", components)
        return cls(reward=reward, components=dict(components or {}))

    @classmethod
    def failed(cls, message: str, components: Mapping[str, float] | None = None) -> RewardResult:
        return cls(reward=None, components=dict(components or {}), status=Status.ERROR, error=message)

    @classmethod
    def skipped(cls, reason: str, components: Mapping[str, float] | None = None) -> RewardResult:
        return cls(reward=None, components=dict(components or {}), status=Status.SKIPPED, error=reason)

    @property
    def is_ok(self) -> bool:
        return self.status is Status.OK


def label_field(sample: Sample, key: str) -> Any:
    """Read `key` from a dict label, raising a message that says what the label holds instead."""
    label = sample.label
    if not isinstance(label, Mapping):
        raise LabelError(f"label must be an object with key {key!r}, got {type(label).__name__}")
    if key not in label or label[key] is None:
        raise LabelError(f"label has no {key!r} (keys: {sorted(label)})")
    return label[key]


class ScoringUnavailable(RuntimeError):
    """What scores the samples is gone (every replica of a placed model, a remote service): not the samples' fault,
    so it is never turned into per-sample errors; the caller retries elsewhere or stops."""


class LabelError(ValueError):
    """A sample's label lacks what a plugin needs; the sample gets an error status, the batch goes on."""
