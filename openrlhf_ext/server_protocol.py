"""OpenRLHF 0.11.2's reward wire format, shared by the HTTP server, our reward client and the `reward_func` shim.

OpenRLHF sends, per sample, `query` (prompt + response decoded with special tokens kept), `prompts` (the
prompt after the chat template) and `labels` (the dataset label, untouched). It expects back an object
with `rewards`, optional `scores` and `extra_logs`. A `None` reward or a missing log key breaks training
far from the cause, so every answer carries the pipeline's full, fixed set of log keys.

**Who owns `on_error`: the side that hands rewards to OpenRLHF, never the server.** The server marks a sample
it could not score as an error (`errors[i] = {"code", "retry", "message"}`, reward `null`) and announces the
YAML's `on_error` / `error_penalty` in `/health`; the reward client retries the samples whose code says a retry
can help on the next server and applies the policy once, at the end (`ErrorPolicy`). The `reward_func` shim
applies the same policy in-process. `on_error: skip` is refused on every OpenRLHF path: OpenRLHF 0.11.2 cannot
leave one sample out of a batch (a `None` reward crashes the step, any number trains on it).

Every number on the wire is finite in float32 (OpenRLHF stores rewards and logs as float32 tensors).

The response is derived from the query, never guessed:
  1. if the query starts with the prompt, the response is the rest of the query;
  2. otherwise, if the query starts with the last `MIN_OVERLAP` or more characters of the prompt (OpenRLHF
     cut an over-long prompt from the left before generating), the response is what follows that overlap;
     replacement characters (U+FFFD) at the start of the query are skipped first: they are what decoding
     leaves of a multi-byte character (CJK, emoji) whose first bytes the cut removed;
  3. otherwise that sample (only that one) fails with the code `no_response`.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reward_plugins.config import PipelineConfig
from reward_plugins.pipeline import FIXED_LOG_KEYS, RewardPipeline
from reward_plugins.types import Sample, ScoringUnavailable, Status

logger = logging.getLogger(__name__)

MIN_OVERLAP = 16
REPLACEMENT = "\ufffd"
FLOAT32_MAX = float(np.finfo(np.float32).max)

# Error codes on the wire. A retry (on another server, or later) can help the first group, never the second.
RETRYABLE_CODES = frozenset({"timeout", "unavailable", "internal", "bad_answer"})
FINAL_CODES = frozenset({"no_response", "too_large", "plugin_error", "skipped", "non_finite"})
SKIP_REFUSED = (
    "on_error: skip cannot be used with OpenRLHF 0.11.2: it has no way to leave one sample out of a rollout batch "
    "(a None reward crashes the step, any number trains on it); use on_error: penalty (counted in reward/errors) "
    "or raise (stops the run)"
)


def finite_float32(value: Any) -> bool:
    """True for an int or float (not a bool) that float32 holds as a finite number (10**400, 3.5e38, NaN: False)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, int):
        return abs(value) <= FLOAT32_MAX
    return math.isfinite(value) and abs(value) <= FLOAT32_MAX


def read_token_file(path: str, what: str) -> str:
    """The bearer token in `path`, surrounding whitespace stripped; ValueError naming `what` (never the content)."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} names {path}, which cannot be read ({getattr(exc, 'strerror', None) or 'not UTF-8'})") from None
    if not token:
        raise ValueError(f"{what} names {path}, which is empty")
    return token


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
    return fail[-1]  # text holds at least the separator


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
class SampleError:
    """Why one sample has no reward: a code from RETRYABLE_CODES or FINAL_CODES and a message for the server's log."""

    code: str
    message: str = ""

    @property
    def retry(self) -> bool:
        """Whether another attempt (another server, later) can score it; unknown codes are retried, never penalised."""
        return self.code not in FINAL_CODES

    def wire(self) -> dict[str, Any]:
        return {"code": self.code, "retry": self.retry, "message": self.message[:500]}


@dataclass(frozen=True)
class Outcome:
    """One sample's answer: a reward (None exactly when `error` is set) and the pipeline's fixed-key logs."""

    reward: float | None
    logs: dict[str, float]
    error: SampleError | None = None


@dataclass(frozen=True)
class ErrorPolicy:
    """The YAML's `on_error` as OpenRLHF can honour it: `penalty` (a fixed, counted reward) or `raise` (stop)."""

    on_error: str
    error_penalty: float | None = None

    def __post_init__(self) -> None:
        if self.on_error == "skip":
            raise ValueError(SKIP_REFUSED)
        if self.on_error not in ("penalty", "raise"):
            raise ValueError(f"on_error must be penalty or raise, got {self.on_error!r}")
        if self.on_error == "penalty" and not finite_float32(self.error_penalty):
            raise ValueError(f"on_error: penalty needs a finite error_penalty, got {self.error_penalty!r}")

    @classmethod
    def of(cls, config: PipelineConfig) -> ErrorPolicy:
        """The policy of a pipeline config; ValueError naming the file for `skip`."""
        try:
            return cls(config.on_error, config.error_penalty)
        except ValueError as exc:
            raise ValueError(f"{config.source}: {exc}") from None

    @classmethod
    def from_wire(cls, value: Any) -> ErrorPolicy:
        """The policy a server announced in /health; ValueError (without the value) when it is not one."""
        if not isinstance(value, Mapping) or not isinstance(value.get("on_error"), str):
            raise ValueError("the announced on_error is not an object with a string 'on_error'")
        penalty = value.get("error_penalty")
        return cls(value["on_error"], float(penalty) if finite_float32(penalty) else None)

    def wire(self) -> dict[str, Any]:
        return {"on_error": self.on_error, "error_penalty": self.error_penalty}

    def penalised(self, outcome: Outcome) -> Outcome:
        """A failed sample's final answer under `penalty`: the penalty as reward, `reward/errors` = 1."""
        assert self.on_error == "penalty" and self.error_penalty is not None
        logs = {**outcome.logs, "reward/mean": float(self.error_penalty), "reward/errors": 1.0}
        return Outcome(float(self.error_penalty), logs, outcome.error)


class GuardedScorer:
    """Scores samples through a pipeline and never raises: a sample it cannot score gets a coded error, no reward.

    The pipeline's own policy is not applied here (it is `policy`, announced to the client); `score` is
    serialised with a lock, since tokenizers and models are shared.
    """

    def __init__(self, pipeline: RewardPipeline):
        self.policy = ErrorPolicy(pipeline.on_error, pipeline.error_penalty)
        self.pipeline = RewardPipeline(pipeline.root, on_error="skip")
        self.log_keys: tuple[str, ...] = pipeline.log_keys
        self._lock = threading.Lock()

    def failure(self, code: str, message: str) -> Outcome:
        """The answer for a sample that could not be scored at all."""
        logs = dict.fromkeys(self.log_keys, 0.0)
        logs["reward/errors"] = 1.0
        return Outcome(None, logs, SampleError(code, message))

    def score(self, samples: Sequence[Sample]) -> list[Outcome]:
        """One outcome per sample, in order; an exception anywhere fails the whole batch with a retryable code."""
        if not samples:
            return []
        try:
            with self._lock:
                batch = self.pipeline.score(samples)
        except ScoringUnavailable as exc:
            logger.warning("reward pipeline unavailable for a batch of %d: %s", len(samples), exc)
            return [self.failure("unavailable", str(exc))] * len(samples)
        except Exception as exc:  # noqa: BLE001 - a retryable error for every sample of the batch, logged
            logger.warning("reward pipeline failed on a batch of %d: %s: %s", len(samples), type(exc).__name__, exc)
            return [self.failure("internal", f"{type(exc).__name__}: {exc}")] * len(samples)
        outcomes = []
        for i, result in enumerate(batch.results):
            reward = batch.rewards[i]
            logs = {key: value if finite_float32(value) else 0.0 for key, value in batch.sample_logs(i).items()}
            if result.status is not Status.OK:
                code = "plugin_error" if result.status is Status.ERROR else "skipped"
                outcomes.append(Outcome(None, {**logs, "reward/errors": 1.0}, SampleError(code, result.error or code)))
                continue
            bad = [key for key, value in batch.sample_logs(i).items() if not finite_float32(value)]
            if not finite_float32(reward) or bad:
                message = f"not finite in float32: reward {reward}, logs {', '.join(bad) or 'finite'}"
                logger.warning("sample %d: %s", i, message)
                outcomes.append(self.failure("non_finite", message))
                continue
            outcomes.append(Outcome(float(reward), logs))
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
            return [self.failure("internal", message)] * n, [], []
        outcomes: list[Outcome | None] = [None] * n
        samples, positions = [], []
        cap = max_sample_chars
        for i, (query, prompt, label) in enumerate(zip(queries, prompts, labels)):
            if cap is not None and len(query) + len(prompt or "") > cap:
                message = f"sample of {len(query) + len(prompt or '')} characters (query + prompt) is over the {cap} cap"
                logger.warning("sample %d: %s", i, message)
                outcomes[i] = self.failure("too_large", message)
                continue
            try:
                samples.append(to_sample(query, prompt, label))
                positions.append(i)
            except (ValueError, TypeError) as exc:
                logger.warning("sample %d: %s", i, exc)
                outcomes[i] = self.failure("no_response", str(exc))
        return outcomes, samples, positions

    def score_raw(
        self, queries: Sequence[str], prompts: Sequence[str | None] | None, labels: Sequence[Any] | None
    ) -> list[Outcome]:
        """Score OpenRLHF's parallel lists, one outcome per query."""
        outcomes, samples, positions = self.prepare(queries, prompts, labels)
        for i, outcome in zip(positions, self.score(samples)):
            outcomes[i] = outcome
        return outcomes  # type: ignore[return-value]


def to_payload(outcomes: Sequence[Outcome], log_keys: Sequence[str], errors: bool = True) -> dict[str, Any]:
    """The answer object: scalars for a one-sample call (OpenRLHF's tensors are then shape (1,)), lists otherwise.

    `errors` adds our per-sample error list (always a list); OpenRLHF itself ignores the key.
    """
    keys = list(log_keys) or list(FIXED_LOG_KEYS)
    if len(outcomes) == 1:
        (only,) = outcomes
        payload = {"rewards": only.reward, "scores": only.reward, "extra_logs": {k: only.logs[k] for k in keys}}
    else:
        payload = {
            "rewards": [o.reward for o in outcomes],
            "scores": [o.reward for o in outcomes],
            "extra_logs": {k: [o.logs[k] for o in outcomes] for k in keys},
        }
    if errors:
        payload["errors"] = [o.error.wire() if o.error is not None else None for o in outcomes]
    return payload


def read_answer(body: Any, n: int, log_keys: Sequence[str] | None) -> list[Outcome]:
    """The `n` outcomes in a server's answer, every value checked; ValueError when the answer as a whole is unusable.

    A sample whose reward, score or log values are not finite float32 numbers gets the retryable `bad_answer` code
    (the server misbehaved, another may not). `log_keys`: the keys every answer must carry exactly (None: any
    one fixed set). Messages name fields and types only, never a value from the body.
    """
    if not isinstance(body, dict) or "rewards" not in body:
        raise ValueError(f"answer is not an object with 'rewards' (got {type(body).__name__})")
    rewards = _per_sample(body, "rewards", n)
    scores = _per_sample(body, "scores", n) if body.get("scores") is not None else rewards
    logs = body.get("extra_logs", {})
    if not isinstance(logs, dict) or not all(isinstance(key, str) for key in logs):
        raise ValueError(f"answer's 'extra_logs' is not an object (got {type(logs).__name__})")
    if log_keys is not None and list(logs) != list(log_keys):
        missing, extra = set(log_keys) - set(logs), set(logs) - set(log_keys)
        raise ValueError(
            f"answer's 'extra_logs' keys differ from the declared ones ({len(missing)} missing, {len(extra)} unknown"
            f"{', other order' if not missing and not extra else ''})"
        )
    columns = {key: _per_sample(logs, key, n) for key in logs}
    errors = body.get("errors")
    if errors is not None and (not isinstance(errors, list) or len(errors) != n):
        raise ValueError(f"answer's 'errors' is not a list of {n}")
    outcomes = []
    for i in range(n):
        sample_logs = {key: column[i] for key, column in columns.items()}
        flag = errors[i] if errors is not None else None
        if flag is not None:
            code = flag.get("code") if isinstance(flag, dict) else None
            code = code if isinstance(code, str) and code in RETRYABLE_CODES | FINAL_CODES else "bad_answer"
            clean = {key: float(value) if finite_float32(value) else 0.0 for key, value in sample_logs.items()}
            outcomes.append(Outcome(None, clean, SampleError(code, "marked by the server")))
            continue
        bad = [name for name, value in (("rewards", rewards[i]), ("scores", scores[i])) if not finite_float32(value)]
        bad += [f"extra_logs.{key}" for key, value in sample_logs.items() if not finite_float32(value)]
        if bad:
            kinds = ", ".join(f"{name} ({type_name(value)})" for name, value in _named(bad, rewards[i], scores[i], sample_logs))
            outcomes.append(Outcome(None, dict.fromkeys(sample_logs, 0.0), SampleError("bad_answer", f"not a finite float32: {kinds}")))
            continue
        outcomes.append(Outcome(float(rewards[i]), {key: float(value) for key, value in sample_logs.items()}))
    return outcomes


def type_name(value: Any) -> str:
    """What a bad value is, without the value: 'str', 'list', 'int over float32', 'float nan', ..."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return type(value).__name__
    if isinstance(value, int):
        return "int over float32"
    return "float nan" if math.isnan(value) else "float over float32"


def _named(names: list[str], reward: Any, score: Any, logs: Mapping[str, Any]):
    for name in names:
        yield name, reward if name == "rewards" else score if name == "scores" else logs[name[len("extra_logs.") :]]


def _per_sample(container: Mapping[str, Any], key: str, n: int) -> list[Any]:
    """`container[key]` as n per-sample values: a scalar when n == 1, else a list of n."""
    value = container.get(key)
    values = value if isinstance(value, list) else [value]
    if len(values) != n:
        raise ValueError(f"answer's {key!r} holds {len(values)} value(s) for {n} sample(s)")
    return values
