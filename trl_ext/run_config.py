"""The typed run settings GRPO, RLOO and PPO share (`TrainConfig`, its `ppo:` section) and what every algorithm starts
from (`RunInputs`); kept apart from `train` and `ppo` so that neither imports the other for its types."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from reward_plugins.model_ref import ModelRef, describe
from reward_plugins.monitor import MonitorConfig
from reward_plugins.monitor_session import MonitorSession
from reward_plugins.pipeline import RewardPipeline

from .config import ExistingPath, unknown_fields
from .data import as_text
from .eval_callback import EvalFileCallback
from .generation import following_trainer
from .reward_adapter import DEFAULT_STOP_AFTER, PipelineRewardFunc


def trl_classes(algorithm: str):
    """TRL's config class and trainer for `algorithm`; the trainer samples from exactly TRL's generation settings
    (`generation.FollowsPolicySampling`), never from fields of the checkpoint's own generation config."""
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if algorithm == "grpo" else (RLOOConfig, RLOOTrainer)
    return config_cls, following_trainer(trainer_cls)


class PPOSettings(BaseModel):
    """The `ppo:` section of a train preset (sizes are per process; one response per prompt)."""

    model_config = ConfigDict(extra="forbid")

    max_steps: int = Field(default=100, gt=0)
    batch_size: int = Field(default=8, gt=0)
    mini_batch_size: int = Field(default=4, gt=0)
    ppo_epochs: int = Field(default=4, gt=0)
    learning_rate: float = Field(default=1e-6, gt=0)
    lr_schedule: Literal["constant", "linear"] = "constant"
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    max_new_tokens: int = Field(default=64, gt=0)
    temperature: float = Field(default=1.0, gt=0)
    kl_coef: float = Field(default=0.05, ge=0)
    kl_target: float | None = Field(default=None, gt=0)  # set: adaptive coefficient towards this sequence KL
    kl_horizon: int = Field(default=10000, gt=0)
    gamma: float = Field(default=1.0, ge=0, le=1)
    lam: float = Field(default=0.95, ge=0, le=1)
    cliprange: float = Field(default=0.2, gt=0)
    cliprange_value: float = Field(default=0.2, gt=0)
    vf_coef: float = Field(default=0.1, ge=0)
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = None
    value_init: Literal["policy", "reward_model"] = "policy"
    value_model: ModelRef | None = None  # the reward model the value model starts from (multi-head: the mean head)
    save_steps: int = Field(default=0, ge=0)  # 0: checkpoint only at the end
    logging_steps: int = Field(default=1, gt=0)
    sample_rows: int = Field(default=4, ge=0)  # rows of the rich-printed sample table

    @model_validator(mode="after")
    def _consistent(self) -> PPOSettings:
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"mini_batch_size {self.mini_batch_size} must divide batch_size {self.batch_size}")
        if self.value_init == "reward_model" and self.value_model is None:
            raise ValueError("value_init: reward_model needs value_model (the reward model's folder)")
        if self.value_init == "policy" and self.value_model is not None:
            raise ValueError("value_model is only read with value_init: reward_model")
        if self.kl_target is not None and self.kl_coef == 0:
            raise ValueError("kl_target adapts kl_coef by multiplying it, so kl_coef: 0 would stay 0; "
                             "start from a positive kl_coef (e.g. 0.05) or drop kl_target")
        return self


class TrainConfig(BaseModel):
    """A TRL RL run: what to train, on which prompts, with which reward file; `trl` goes to GRPOConfig/RLOOConfig."""

    model_config = ConfigDict(extra="forbid")
    CONFIG_KIND: ClassVar[str] = "train"

    algorithm: Literal["grpo", "rloo", "ppo"] = "grpo"
    policy: ModelRef
    tokenizer: ModelRef | None = None
    reward_config: ExistingPath
    train_data: ExistingPath
    eval_data: ExistingPath | None = None
    output_dir: str
    label_key: str = "label"
    eval_every: int = Field(default=10, ge=0)
    eval_max_new_tokens: int | None = Field(default=None, gt=0)
    table_every: int = Field(default=10, ge=0)
    resume: bool = True  # false: every run starts fresh, an existing run folder moved aside (trl_ext.run_dir)
    seed: int = 0
    torch_threads: int | None = Field(default=None, gt=0)  # 1 is fastest for tiny models on a busy CPU
    stop_after_failed_steps: int = Field(default=DEFAULT_STOP_AFTER, ge=0)  # every sample errored N steps running; 0: never
    trl: dict[str, Any] = Field(default_factory=dict)
    ppo: PPOSettings | None = None  # algorithm: ppo reads this section (trl_ext.ppo) instead of `trl`
    monitor: MonitorConfig | None = None  # the over-optimisation monitor (reward_plugins.monitor)

    @model_validator(mode="after")
    def _one_section(self) -> TrainConfig:
        if self.algorithm == "ppo":
            if self.trl:
                raise ValueError("algorithm ppo reads the `ppo` section; `trl` is for grpo/rloo")
            self.ppo = self.ppo or PPOSettings()
        elif self.ppo is not None:
            raise ValueError(f"the `ppo` section is only read with algorithm: ppo (algorithm is {self.algorithm})")
        return self

    def kl_coefficient(self) -> tuple[tuple[str, ...], float]:
        """Where the KL coefficient the loss uses is set, and its value (TRL's own default when `trl` omits it)."""
        if self.algorithm == "ppo":
            return ("ppo", "kl_coef"), self.ppo.kl_coef
        default = {field.name: field.default for field in dataclasses.fields(trl_classes(self.algorithm)[0])}["beta"]
        return ("trl", "beta"), float(self.trl.get("beta", default))

    def config_problems(self) -> list[tuple[tuple[str, ...], str]]:
        """`trl` keys the algorithm's TRL config class does not have, located by the loader."""
        problems = [] if self.algorithm == "ppo" else unknown_fields(trl_classes(self.algorithm)[0], self.trl)
        if self.monitor is not None and not problems:
            where, coefficient = self.kl_coefficient()
            if self.algorithm != "ppo" and coefficient == 0:
                problems.append((where, "the monitor needs the KL to the initial policy, which TRL computes only with "
                                        "beta > 0; set trl.beta (e.g. 0.01)"))
            elif self.monitor.action == "adapt_kl" and coefficient == 0:
                problems.append((where, "monitor.action adapt_kl multiplies this coefficient, which is 0"))
        return problems


@dataclasses.dataclass
class RunInputs:
    """What every algorithm starts from: checked tokenizer, reward pipeline and function, prompt rows."""

    tokenizer: Any
    pipeline: RewardPipeline
    reward_fn: PipelineRewardFunc
    rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    monitor: MonitorSession | None = None

    def eval_callback(self, cfg: TrainConfig, max_new_tokens: int, temperature: float, backend: str,
                      ref_model=None) -> EvalFileCallback:
        """Eval files on the rendered eval prompts, written like every algorithm writes them."""
        meta = {"reward_config": str(cfg.reward_config), "kl_estimator": "k1", "algorithm": cfg.algorithm,
                "policy": describe(cfg.policy), "backend": backend}
        return EvalFileCallback(
            Path(cfg.output_dir) / "eval", self.pipeline, cfg.policy,
            [as_text(r["prompt"], self.tokenizer) for r in self.eval_rows], [r[cfg.label_key] for r in self.eval_rows],
            cfg.eval_every, max_new_tokens, temperature, meta, cfg.seed, ref_model=ref_model, monitor=self.monitor,
        )
