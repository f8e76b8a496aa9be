"""What the launcher hands to the trainer's experience maker, through Ray's runtime_env env vars."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ENV_CONFIG = "REWARD_PLUGINS_TRAINER_CONFIG"  # the reward_func shim reads its own REWARD_PLUGINS_CONFIG
ENV_EVAL_DIR = "REWARD_PLUGINS_EVAL_DIR"
ENV_EVAL_EVERY = "REWARD_PLUGINS_EVAL_EVERY"
ENV_EVAL_TOP_P = "REWARD_PLUGINS_EVAL_TOP_P"
ENV_EVAL_TOP_K = "REWARD_PLUGINS_EVAL_TOP_K"
ENV_EVAL_AT_START = "REWARD_PLUGINS_EVAL_AT_START"
ENV_MONITOR = "REWARD_PLUGINS_MONITOR_CONFIG"


@dataclass(frozen=True)
class HookSettings:
    """`reward_config`: score the rollout batch with this pipeline (None keeps the rollout-side rewards).

    `eval_every`: record an eval file every this many steps (None: never); `eval_dir`: where.
    Held-out evaluation (`--eval.dataset`): `eval_top_p` / `eval_top_k` replace the rollout's for its sampling
    (OpenRLHF 0.11.2 has no eval flags for them), `eval_at_start` evaluates once before the first step.
    `monitor_config`: a YAML file holding the over-optimisation monitor's settings (`reward_plugins.monitor`).
    """

    reward_config: str | None
    eval_dir: str | None
    eval_every: int | None
    eval_top_p: float | None = None
    eval_top_k: int | None = None
    eval_at_start: bool = False
    monitor_config: str | None = None

    def eval_sampling(self) -> dict[str, Any]:
        """The generate kwargs held-out evaluation overrides."""
        return {key: value for key, value in (("top_p", self.eval_top_p), ("top_k", self.eval_top_k)) if value is not None}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, eval_steps: Any = None, output_dir: str | None = None):
        """Read the env vars; the eval interval defaults to `--eval.steps`, the folder to `<ckpt.output_dir>/eval`."""
        environ = os.environ if environ is None else environ
        config = environ.get(ENV_CONFIG) or None
        every_text = environ.get(ENV_EVAL_EVERY)
        if every_text:
            try:
                every = int(every_text)
            except ValueError:
                raise ValueError(f"{ENV_EVAL_EVERY} must be an integer, got {every_text!r}") from None
        else:
            every = _interval(eval_steps)
        if every is not None and every <= 0:
            every = None
        eval_dir = environ.get(ENV_EVAL_DIR) or (os.path.join(output_dir, "eval") if output_dir else None)
        top_p, top_k = environ.get(ENV_EVAL_TOP_P), environ.get(ENV_EVAL_TOP_K)
        return cls(config, eval_dir, every if eval_dir else None, float(top_p) if top_p else None,
                   int(top_k) if top_k else None, environ.get(ENV_EVAL_AT_START) == "1",
                   environ.get(ENV_MONITOR) or None)

    def env_vars(self) -> dict[str, str]:
        values = {ENV_CONFIG: self.reward_config, ENV_EVAL_DIR: self.eval_dir, ENV_MONITOR: self.monitor_config}
        values[ENV_EVAL_EVERY] = str(self.eval_every) if self.eval_every is not None else None
        values[ENV_EVAL_TOP_P] = str(self.eval_top_p) if self.eval_top_p is not None else None
        values[ENV_EVAL_TOP_K] = str(self.eval_top_k) if self.eval_top_k is not None else None
        values[ENV_EVAL_AT_START] = "1" if self.eval_at_start else None
        return {key: value for key, value in values.items() if value}


def _interval(eval_steps: Any) -> int | None:
    if eval_steps is None:
        return None
    value = float(eval_steps)
    if not math.isfinite(value) or value <= 0:
        return None
    return int(value)
