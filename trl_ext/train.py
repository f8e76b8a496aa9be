"""GRPO / RLOO through TRL, and PPO with a value model (trl_ext.ppo), on one machine with our reward pipeline.

    python -m trl_ext.train --config configs/train/grpo_tiny.yaml --set trl.max_steps=20 --reward_config=...
    accelerate launch --cpu --num_processes 2 -m trl_ext.train --config configs/train/grpo_tiny.yaml

Writes TensorBoard logs (`OUT/runs/`), HF-format checkpoints (`OUT/checkpoint-*`, final model in `OUT/final`),
eval files (`OUT/eval/eval_step*.json`) and completion tables (`OUT/completions/*.jsonl`). A rerun resumes
from the last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_utils import get_last_checkpoint

from reward_plugins.config import ConfigError
from reward_plugins.io import DataError, iter_jsonl
from reward_plugins.pipeline import RewardPipeline

from .config import ExistingPath, load_config
from .eval_callback import EvalFileCallback
from .ppo import PPOSettings
from .reward_adapter import PipelineRewardFunc

logger = logging.getLogger(__name__)

CPU_DEFAULTS: dict[str, Any] = {"use_cpu": True, "bf16": False, "fp16": False}


class TrainConfig(BaseModel):
    """A TRL RL run: what to train, on which prompts, with which reward file; `trl` goes to GRPOConfig/RLOOConfig."""

    model_config = ConfigDict(extra="forbid")

    algorithm: Literal["grpo", "rloo", "ppo"] = "grpo"
    policy: ExistingPath
    tokenizer: ExistingPath | None = None
    reward_config: ExistingPath
    train_data: ExistingPath
    eval_data: ExistingPath | None = None
    output_dir: str
    label_key: str = "label"
    eval_every: int = Field(default=10, ge=0)
    eval_max_new_tokens: int | None = Field(default=None, gt=0)
    table_every: int = Field(default=10, ge=0)
    resume: bool = True
    seed: int = 0
    torch_threads: int | None = Field(default=None, gt=0)  # 1 is fastest for tiny models on a busy CPU
    trl: dict[str, Any] = Field(default_factory=dict)
    ppo: PPOSettings | None = None  # algorithm: ppo reads this section (trl_ext.ppo) instead of `trl`

    @model_validator(mode="after")
    def _one_section(self) -> TrainConfig:
        if self.algorithm == "ppo":
            if self.trl:
                raise ValueError("algorithm ppo reads the `ppo` section; `trl` is for grpo/rloo")
            self.ppo = self.ppo or PPOSettings()
        elif self.ppo is not None:
            raise ValueError(f"the `ppo` section is only read with algorithm: ppo (algorithm is {self.algorithm})")
        return self


def trl_classes(algorithm: str):
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    return (GRPOConfig, GRPOTrainer) if algorithm == "grpo" else (RLOOConfig, RLOOTrainer)


def trl_args(cfg: TrainConfig):
    """The TRL config: our defaults (TensorBoard, CPU when there is no GPU, paths), then the preset's `trl` section."""
    config_cls, _ = trl_classes(cfg.algorithm)
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(cfg.trl) - known)
    if unknown:
        raise ConfigError([f"trl.{key}: unknown {config_cls.__name__} field" for key in unknown])
    out = Path(cfg.output_dir)
    values: dict[str, Any] = {
        "output_dir": str(out),
        "report_to": ["tensorboard"],
        "seed": cfg.seed,
        "save_strategy": "steps",
        "logging_steps": 1,
    }
    if not torch.cuda.is_available():
        values.update(CPU_DEFAULTS)
    values.update(cfg.trl)
    try:
        return config_cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError([f"trl: {exc}"]) from exc


def load_prompt_rows(path: str, label_key: str) -> list[dict[str, Any]]:
    """Prompt rows {prompt, label, ...}; a row without a string prompt or without the label is an error."""
    rows = []
    for line, row in iter_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise DataError(f"{path}:{line}: expected an object with a string 'prompt'")
        if label_key not in row:
            raise DataError(f"{path}:{line}: no {label_key!r} (keys: {sorted(row)})")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def to_dataset(rows: list[dict[str, Any]], path: str):
    from datasets import Dataset

    try:
        return Dataset.from_list(rows)
    except Exception as exc:  # pyarrow raises several types for inconsistent columns
        raise DataError(f"{path}: rows do not share one schema (every label needs the same keys and types): {exc}") from exc


def build_trainer(cfg: TrainConfig):
    """The TRL trainer with our reward function and eval-file callback, ready to `.train()`."""
    args = trl_args(cfg)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    _, trainer_cls = trl_classes(cfg.algorithm)
    out = Path(cfg.output_dir)
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.policy)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    pipeline = RewardPipeline.from_yaml(cfg.reward_config)
    main_process = int(os.environ.get("RANK", "0")) == 0
    reward_fn = PipelineRewardFunc(
        pipeline, name=Path(cfg.reward_config).stem, label_key=cfg.label_key,
        table_dir=out / "completions" if main_process else None, table_every=cfg.table_every,
    )
    rows = load_prompt_rows(cfg.train_data, cfg.label_key)
    callbacks = []
    if cfg.eval_data:
        eval_rows = load_prompt_rows(cfg.eval_data, cfg.label_key)
        meta = {"reward_config": str(cfg.reward_config), "kl_estimator": "k1", "algorithm": cfg.algorithm,
                "policy": str(cfg.policy), "backend": "trl"}
        callbacks.append(EvalFileCallback(
            out / "eval", pipeline, cfg.policy, [r["prompt"] for r in eval_rows], [r[cfg.label_key] for r in eval_rows],
            cfg.eval_every, cfg.eval_max_new_tokens or args.max_completion_length, args.temperature, meta, cfg.seed,
        ))
    model = AutoModelForCausalLM.from_pretrained(cfg.policy, dtype=torch.float32)
    return trainer_cls(
        model=model, reward_funcs=reward_fn, args=args, train_dataset=to_dataset(rows, cfg.train_data),
        processing_class=tokenizer, callbacks=callbacks,
    )


def run(cfg: TrainConfig) -> Path:
    """Train (resuming from the last checkpoint if any) and save the final HF model; returns its folder."""
    out = Path(cfg.output_dir)
    if cfg.algorithm == "ppo":
        from .ppo import train_ppo

        eval_rows = load_prompt_rows(cfg.eval_data, cfg.label_key) if cfg.eval_data else None
        return train_ppo(cfg, load_prompt_rows(cfg.train_data, cfg.label_key), eval_rows)
    trainer = build_trainer(cfg)
    last = get_last_checkpoint(str(out)) if cfg.resume and out.is_dir() else None
    if last:
        logger.info("resuming from %s", last)
    trainer.train(resume_from_checkpoint=last)
    final = out / "final"
    trainer.save_model(str(final))
    if trainer.accelerator.is_main_process:
        (out / "train_config.json").write_text(json.dumps(cfg.model_dump(), indent=2))
    return final


def split_overrides(extra: Sequence[str]) -> list[str]:
    """Turn dotted flags (`--trl.learning_rate=1e-5`, `--trl.max_steps 5`) into `key=value` overrides."""
    overrides, items = [], list(extra)
    while items:
        flag = items.pop(0)
        if not flag.startswith("--"):
            raise ConfigError([f"unexpected argument {flag!r}; use --key=value or --set key=value"])
        key = flag[2:]
        if "=" in key:
            overrides.append(key)
        elif items and not items[0].startswith("--"):
            overrides.append(f"{key}={items.pop(0)}")
        else:
            raise ConfigError([f"{flag}: missing value"])
    return overrides


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML preset (configs/train/*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any field, dotted")
    args, extra = parser.parse_known_args(argv)
    return load_config(TrainConfig, args.config, [*args.set, *split_overrides(extra)])


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    print(f"final model: {run(parse_args(argv))}")


if __name__ == "__main__":
    main()
