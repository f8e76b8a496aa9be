"""`reward_func` for OpenRLHF's `--reward.remote_url file.py`: our pipeline inside the rollout workers.

Configured by environment variables (the launcher passes them through Ray's runtime_env):
  REWARD_PLUGINS_CONFIG                    path of the reward pipeline YAML (required)
  REWARD_PLUGINS_MAX_CONSECUTIVE_FAILURES  stop the run after this many failed samples in a row (with
                                           on_error: penalty); 0 (default) never
  REWARD_PLUGINS_MAX_BATCH                 most samples scored together (default 64)

Here the shim is the side that hands rewards to OpenRLHF, so it applies the YAML's `on_error` itself, once per
sample (the same `ErrorPolicy` the reward client applies to a server's answers): `penalty` gives `error_penalty`,
`reward/errors` = 1 and a WARNING; `raise` stops the run at the first sample that fails; `skip` is refused.

Stopping the run: OpenRLHF's executor turns any `Exception` from `reward_func` into a `None` reward, so the shim
raises `RewardStopped`, a BaseException, which travels through Ray to the driver: the driver's error ends with
one line giving the count of failed samples and the last error. Every later call raises the same. Besides the
policy, the run stops on a pipeline that cannot be built, a bad `REWARD_PLUGINS_*` value, or a pipeline that
fails as a whole (there is no other server to retry on, and a penalty would train on a wrong reward).
The pipeline is built once on first use (under a lock); calls that arrive while it is busy are scored
together as one batch when it frees up.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from typing import Any, NoReturn

from reward_plugins.config import load_pipeline_config
from reward_plugins.pipeline import build_pipeline

from .batcher import ThreadBatcher
from .server_protocol import ErrorPolicy, GuardedScorer, Outcome, to_payload

logger = logging.getLogger(__name__)

CONFIG_ENV = "REWARD_PLUGINS_CONFIG"
FALLBACK_ENV = "REWARD_PLUGINS_FALLBACK"  # gone: refused when set
MAX_FAILURES_ENV = "REWARD_PLUGINS_MAX_CONSECUTIVE_FAILURES"
MAX_BATCH_ENV = "REWARD_PLUGINS_MAX_BATCH"


class RewardStopped(BaseException):
    """The shim stopped the run; a BaseException so that OpenRLHF's executor does not turn it into a None reward."""


def _env_int(name: str, default: int, minimum: int) -> int:
    """An integer >= `minimum` from the variable, `default` when unset; ValueError naming the variable otherwise."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise ValueError(f"${name} must be an integer >= {minimum}, got {value!r}")
    return number


class ShimState:
    """The lazily built scorer and policy, and the failure counts, of one worker process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._scorer: GuardedScorer | None = None
        self.batcher: ThreadBatcher | None = None
        self.policy: ErrorPolicy | None = None
        self._stopped: str | None = None
        self._logged = False
        self._max_failures = 0
        self.failures = 0
        self._consecutive = 0

    def scorer(self) -> GuardedScorer:
        """The scorer, built on first use; a configuration that cannot be built stops the run."""
        with self._lock:
            if self._scorer is None and self._stopped is None:
                self._build()
        if self._scorer is None:
            self.stop(self._stopped or "no reward pipeline")
        return self._scorer

    def _build(self) -> None:
        path = os.environ.get(CONFIG_ENV)
        try:
            if not path:
                raise ValueError(f"${CONFIG_ENV} is not set; point it at a reward pipeline YAML")
            if os.environ.get(FALLBACK_ENV, "").strip():
                raise ValueError(
                    f"${FALLBACK_ENV} is no longer read: the config's on_error and error_penalty decide what a failed "
                    "sample gets; unset it"
                )
            self._max_failures = _env_int(MAX_FAILURES_ENV, 0, 0)
            max_batch = _env_int(MAX_BATCH_ENV, 64, 1)
            config = load_pipeline_config(path)
            self.policy = ErrorPolicy.of(config)
            self._scorer = GuardedScorer(build_pipeline(config))
            self.batcher = ThreadBatcher(self._scorer.score, max_batch)
            logger.info("reward_func: pipeline %s ready, log keys %s", path, ", ".join(self._scorer.log_keys))
        except Exception as exc:  # noqa: BLE001 - the run stops at this call, with the reason
            self._stopped = f"cannot build the reward pipeline from ${CONFIG_ENV}={path}: {type(exc).__name__}: {exc}"

    def stop(self, reason: str) -> NoReturn:
        """Stop the run: this call and every later one raise RewardStopped with the first reason, in one line."""
        with self._lock:
            if self._stopped is None:
                self._stopped = reason
            self._stopped = " ".join(part.strip() for part in self._stopped.splitlines() if part.strip())
            if not self._logged:
                self._logged = True
                logger.critical("reward_func: stopping the run: %s", self._stopped)
            reason = self._stopped
        raise RewardStopped(f"reward_func stopped the run: {reason}")

    def settle(self, outcomes: Sequence[Outcome]) -> list[Outcome]:
        """Apply the policy to failed samples, count failures; stop the run when the policy or the limit says so.

        The first reason found (under the lock) is the one every call reports, however the threads interleave."""
        settled, reason = [], None
        with self._lock:
            for outcome in outcomes:
                if outcome.error is None:
                    self._consecutive = 0
                    settled.append(outcome)
                    continue
                self.failures += 1
                self._consecutive += 1
                last = f"{outcome.error.code}: {outcome.error.message}"
                count = f"{self.failures} sample(s) failed to score"
                if outcome.error.retry:
                    reason = reason or f"the reward pipeline failed as a whole; {count}; last error: {last}"
                elif self.policy.on_error == "raise":
                    reason = reason or f"on_error: raise and a sample failed; {count}; last error: {last}"
                else:
                    logger.warning("reward_func: sample failed (%s); reward %s", last, self.policy.error_penalty)
                    settled.append(self.policy.penalised(outcome))
                if not reason and self._max_failures and self._consecutive >= self._max_failures:
                    reason = (f"{self._consecutive} samples in a row failed to score (${MAX_FAILURES_ENV}="
                              f"{self._max_failures}); {count}; last error: {last}")
            if reason and self._stopped is None:
                self._stopped = reason
            stopped = self._stopped
        if stopped is not None:
            self.stop(stopped)
        return settled

    def __call__(self, queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any]) -> dict[str, Any]:
        if self._stopped is not None:
            self.stop(self._stopped)
        scorer = self.scorer()
        try:
            outcomes, samples, positions = scorer.prepare(queries, prompts, labels)
            for i, outcome in zip(positions, self.batcher.submit(samples) if samples else []):
                outcomes[i] = outcome
        except Exception as exc:  # noqa: BLE001 - OpenRLHF would turn it into a None reward
            self.stop(f"unexpected {type(exc).__name__}: {exc}")
        return to_payload(self.settle(outcomes), scorer.log_keys, errors=False)


_STATE = ShimState()


def reward_func(queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any], **kwargs: Any) -> dict[str, Any]:
    """OpenRLHF's per-call reward hook: a dict with `rewards`, `scores` and fixed-key `extra_logs`, or RewardStopped."""
    return _STATE(queries, prompts, labels)
