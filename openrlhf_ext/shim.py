"""`reward_func` for OpenRLHF's `--reward.remote_url file.py`: our pipeline inside the rollout workers.

Configured by environment variables (the launcher passes them through Ray's runtime_env):
  REWARD_PLUGINS_CONFIG                    path of the reward pipeline YAML (required)
  REWARD_PLUGINS_FALLBACK                  reward of a sample that cannot be scored, a finite number
                                           (default: the config's error_penalty, else 0.0)
  REWARD_PLUGINS_MAX_CONSECUTIVE_FAILURES  end the worker process (os._exit) after this many failed samples
                                           in a row, so Ray reports the death; 0 (default) never aborts
  REWARD_PLUGINS_MAX_BATCH                 most samples scored together (default 64)

OpenRLHF calls `reward_func` from many threads at once, one sample per call, and swallows exceptions into
a `None` reward that breaks training later. So a sample that fails to score gets the fallback reward,
`reward/errors` = 1 and a WARNING, and every answer carries the pipeline's full set of log keys. What no
sample can fix stops the worker the way the consecutive-failure limit does (CRITICAL log, then os._exit, so
Ray reports the death): a pipeline that cannot be built, or a bad value in one of the variables above.
The pipeline is built once on first use (under a lock); calls that arrive while it is busy are scored
together as one batch when it frees up.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from reward_plugins.config import load_pipeline_config
from reward_plugins.pipeline import FIXED_LOG_KEYS, build_pipeline

from .batcher import ThreadBatcher
from .server_protocol import GuardedScorer, Outcome, config_log_keys, resolve_fallback, to_payload

logger = logging.getLogger(__name__)

CONFIG_ENV = "REWARD_PLUGINS_CONFIG"
FALLBACK_ENV = "REWARD_PLUGINS_FALLBACK"
MAX_FAILURES_ENV = "REWARD_PLUGINS_MAX_CONSECUTIVE_FAILURES"
MAX_BATCH_ENV = "REWARD_PLUGINS_MAX_BATCH"


def _env_float(name: str) -> float | None:
    """A finite number from the variable, None when unset; ValueError naming the variable otherwise."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"${name} must be a finite number, got {value!r}")
    return number


def _env_int(name: str, default: int, minimum: int) -> int:
    """An integer >= `minimum` from the variable, `default` when unset; ValueError naming the variable otherwise."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"${name} must be an integer >= {minimum}, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"${name} must be an integer >= {minimum}, got {value!r}")
    return number


class ShimState:
    """The lazily built scorer plus the consecutive-failure counter of one worker process."""

    def __init__(self, abort: Callable[[int], Any] = os._exit):
        self._lock = threading.Lock()
        self._scorer: GuardedScorer | None = None
        self.batcher: ThreadBatcher | None = None
        self._build_error: str | None = None
        self._log_keys: tuple[str, ...] = FIXED_LOG_KEYS
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
        path = os.environ.get(CONFIG_ENV)
        try:
            if not path:
                raise ValueError(f"${CONFIG_ENV} is not set; point it at a reward pipeline YAML")
            self._derive_log_keys(path)
            self._max_failures = _env_int(MAX_FAILURES_ENV, 0, 0)
            max_batch = _env_int(MAX_BATCH_ENV, 64, 1)
            explicit = _env_float(FALLBACK_ENV)
            self._fallback = explicit if explicit is not None else self._fallback
            config = load_pipeline_config(path)
            self._fallback = resolve_fallback(config, explicit)
            self._scorer = GuardedScorer(build_pipeline(config), self._fallback)
            self.batcher = ThreadBatcher(self._scorer.score, max_batch)
            logger.info("reward_func: pipeline %s ready, log keys %s", path, ", ".join(self._scorer.log_keys))
        except Exception as exc:  # noqa: BLE001 - reported at CRITICAL and the worker stops at this call
            self._build_error = f"{type(exc).__name__}: {exc}"

    def _derive_log_keys(self, path: str) -> None:
        """Log keys and error_penalty from the config alone (no model loads), so even a failed build answers with them."""
        try:
            config = load_pipeline_config(path, check_paths=False)
            self._log_keys = config_log_keys(config)
            if config.error_penalty is not None:
                self._fallback = float(config.error_penalty)
        except Exception:  # noqa: BLE001 - the full load that follows reports the problem
            self._log_keys = FIXED_LOG_KEYS

    def unbuilt_failure(self) -> Outcome:
        logs = dict.fromkeys(self._log_keys, 0.0)
        logs["reward/errors"] = 1.0
        return Outcome(self._fallback, self._fallback, logs, self._build_error)

    def stop_unbuilt(self) -> None:
        """A pipeline that cannot be built stops the worker at its first call, naming the config and the error."""
        logger.critical(
            "reward_func: cannot build the reward pipeline from $%s=%s: %s; ending this worker",
            CONFIG_ENV, os.environ.get(CONFIG_ENV), self._build_error,
        )
        logging.shutdown()
        self._abort(1)

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
                self.stop_unbuilt()
                return to_payload([self.unbuilt_failure()] * len(queries), self._log_keys)
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
            outcomes, keys = [self.unbuilt_failure()] * max(1, len(queries or [])), self._log_keys
            if self._scorer is not None:
                keys = self._scorer.log_keys
                outcomes = [self._scorer.failure(f"{type(exc).__name__}: {exc}")] * len(outcomes)
        self.record(outcomes)
        return to_payload(outcomes, keys)


_STATE = ShimState()


def reward_func(queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any], **kwargs: Any) -> dict[str, Any]:
    """OpenRLHF's per-call reward hook: a dict with `rewards`, `scores` and fixed-key `extra_logs`; never raises."""
    return _STATE(queries, prompts, labels)
