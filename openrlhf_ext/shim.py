"""`reward_func` for OpenRLHF's `--reward.remote_url file.py`: our pipeline inside the rollout workers.

Configured by environment variables (the launcher passes them through Ray's runtime_env):
  REWARD_PLUGINS_CONFIG                    path of the reward pipeline YAML (required)
  REWARD_PLUGINS_FALLBACK                  reward of a sample that cannot be scored (default: the config's
                                           error_penalty, else 0.0)
  REWARD_PLUGINS_MAX_CONSECUTIVE_FAILURES  end the worker process (os._exit) after this many failed samples
                                           in a row, so Ray reports the death; 0 (default) never aborts
  REWARD_PLUGINS_MAX_BATCH                 most samples scored together (default 64)

OpenRLHF calls `reward_func` from many threads at once, one sample per call, and swallows exceptions into
a `None` reward that breaks training later. So this never raises: the pipeline is built once on first use
(under a lock), and every failure gives the fallback reward, `reward/errors` = 1 and a WARNING. Calls that
arrive while the pipeline is busy are scored together as one batch when it frees up.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from reward_plugins.config import load_pipeline_config
from reward_plugins.pipeline import FIXED_LOG_KEYS, build_pipeline

from .batcher import ThreadBatcher
from .server_protocol import GuardedScorer, Outcome, resolve_fallback, to_payload

logger = logging.getLogger(__name__)

CONFIG_ENV = "REWARD_PLUGINS_CONFIG"
FALLBACK_ENV = "REWARD_PLUGINS_FALLBACK"
MAX_FAILURES_ENV = "REWARD_PLUGINS_MAX_CONSECUTIVE_FAILURES"
MAX_BATCH_ENV = "REWARD_PLUGINS_MAX_BATCH"


def _env_float(name: str) -> float | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"${name} must be a number, got {value!r}") from None


class ShimState:
    """The lazily built scorer plus the consecutive-failure counter of one worker process."""

    def __init__(self, abort: Callable[[int], Any] = os._exit):
        self._lock = threading.Lock()
        self._scorer: GuardedScorer | None = None
        self.batcher: ThreadBatcher | None = None
        self._build_error: str | None = None
        self._fallback = 0.0
        self._max_failures = 0
        self._consecutive = 0
        self._abort = abort

    def scorer(self) -> GuardedScorer | None:
        """The scorer, built on first use; None (with the reason kept) if the configuration cannot be built."""
        with self._lock:
            if self._scorer is None and self._build_error is None:
                self._build()
            return self._scorer

    def _build(self) -> None:
        try:
            self._max_failures = int(_env_float(MAX_FAILURES_ENV) or 0)
            explicit = _env_float(FALLBACK_ENV)
            self._fallback = explicit if explicit is not None else 0.0
            path = os.environ.get(CONFIG_ENV)
            if not path:
                raise ValueError(f"${CONFIG_ENV} is not set; point it at a reward pipeline YAML")
            config = load_pipeline_config(path)
            self._fallback = resolve_fallback(config, explicit)
            max_batch = int(_env_float(MAX_BATCH_ENV) or 64)
            self._scorer = GuardedScorer(build_pipeline(config), self._fallback)
            self.batcher = ThreadBatcher(self._scorer.score, max_batch)
            logger.info("reward_func: pipeline %s ready, log keys %s", path, ", ".join(self._scorer.log_keys))
        except Exception as exc:  # noqa: BLE001 - every call then answers the fallback and counts an error
            self._build_error = f"{type(exc).__name__}: {exc}"
            logger.warning("reward_func: cannot build the reward pipeline: %s", self._build_error)

    def unbuilt_failure(self) -> Outcome:
        logs = dict.fromkeys(FIXED_LOG_KEYS, 0.0)
        logs["reward/errors"] = 1.0
        return Outcome(self._fallback, self._fallback, logs, self._build_error)

    def record(self, outcomes: Sequence[Outcome]) -> None:
        """Count failed samples in a row; abort the process once the configured limit is reached."""
        with self._lock:
            for outcome in outcomes:
                self._consecutive = self._consecutive + 1 if outcome.logs.get("reward/errors") else 0
            reached = self._max_failures > 0 and self._consecutive >= self._max_failures
            count = self._consecutive
        if reached:
            logger.critical("reward_func: %d consecutive samples failed to score; ending this worker", count)
            logging.shutdown()
            self._abort(1)

    def __call__(self, queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any]) -> dict[str, Any]:
        try:
            scorer = self.scorer()
            if scorer is None:
                outcomes, keys = [self.unbuilt_failure()] * len(queries), FIXED_LOG_KEYS
                logger.warning("reward_func: pipeline unavailable (%s); answering %s", self._build_error, self._fallback)
            else:
                outcomes, samples, positions = scorer.prepare(queries, prompts, labels)
                for i, outcome in zip(positions, self.batcher.submit(samples) if samples else []):
                    outcomes[i] = outcome
                keys = scorer.log_keys
                for outcome in outcomes:
                    if outcome.logs.get("reward/errors"):
                        logger.warning("reward_func: sample failed (%s); reward %s", outcome.error, outcome.reward)
        except Exception as exc:  # noqa: BLE001 - last line of defence: OpenRLHF would turn this into None
            logger.warning("reward_func: unexpected %s: %s", type(exc).__name__, exc)
            outcomes, keys = [self.unbuilt_failure()] * max(1, len(queries or [])), FIXED_LOG_KEYS
            if self._scorer is not None:
                keys = self._scorer.log_keys
                outcomes = [self._scorer.failure(f"{type(exc).__name__}: {exc}")] * len(outcomes)
        self.record(outcomes)
        return to_payload(outcomes, keys)


_STATE = ShimState()


def reward_func(queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any], **kwargs: Any) -> dict[str, Any]:
    """OpenRLHF's per-call reward hook: a dict with `rewards`, `scores` and fixed-key `extra_logs`; never raises."""
    return _STATE(queries, prompts, labels)
