"""GRPO / RLOO through TRL, and PPO with a value model (trl_ext.ppo), on one machine with our reward pipeline.

    python -m trl_ext.train --config configs/train/grpo_uwo3_tiny.yaml --set trl.max_steps=20 [--debug]
    torchrun --nproc_per_node 2 -m trl_ext.train --config configs/train/grpo_uwo3_tiny.yaml   # 2 processes

Prompt rows are `{"prompt": text or chat messages, "label": ...}`: setup_data.setup_rl_data's output, the
synthetic task's prompts and `setup_data.convert --to prompt` all work as written.

Writes TensorBoard logs (`OUT/runs/`), HF-format checkpoints (`OUT/checkpoint-*`, final model in `OUT/final`),
eval files (`OUT/eval/eval_step*.json`) and completion tables (`OUT/completions/*.jsonl`). A rerun with the same
settings resumes from the last checkpoint; other settings are refused (`--fresh` starts over, moving the old
folder aside; `--resume force` continues anyway; see trl_ext/run_dir.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reward_plugins.cli import help_first

from .run_dir import add_resume_flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trl_ext.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML preset (configs/train/*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any field, dotted")
    add_resume_flags(parser)
    return parser


if __name__ == "__main__":
    help_first(build_parser)

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_utils import get_last_checkpoint

from reward_plugins.cli import check_model_dir, check_tokenizer_dir, loading, run_cli
from reward_plugins.config import ConfigError
from reward_plugins.io import DataError
from reward_plugins.model_ref import describe
from reward_plugins.monitor import MonitorError
from reward_plugins.monitor_session import MonitorSession
from reward_plugins.pipeline import RewardPipeline
from reward_plugins.registry import check_baselines
from reward_plugins.vrcli import BaselineMismatchError

from .config import CPU_DEFAULTS, load_config, split_overrides, unknown_fields
from .console import current_step, is_main_process, setup_output, use_bar_and_table
from .data import PROMPT_FIELDS, read_rows
from .monitor_hooks import MonitorCallback
from .reward_adapter import PipelineRewardFunc, RewardFailure
from .run_config import RunInputs, TrainConfig, trl_classes
from .run_dir import (ResumeMode, content_hash, open_run_dir, ppo_settings, resume_mode, stop_cleanly,
                      trainer_settings)

logger = logging.getLogger(__name__)

def trl_args(cfg: TrainConfig):
    """The TRL config: our defaults (TensorBoard, CPU when there is no GPU, paths), then the preset's `trl` section."""
    config_cls, _ = trl_classes(cfg.algorithm)
    unknown = unknown_fields(config_cls, cfg.trl)  # a config built in code, not through the located loader
    if unknown:
        raise ConfigError([f"{'.'.join(path)}: {message}" for path, message in unknown], "train")
    try:
        return config_cls(**trl_values(cfg))
    except (TypeError, ValueError) as exc:
        raise ConfigError([f"trl: {exc}"], "train") from exc


def trl_values(cfg: TrainConfig) -> dict[str, Any]:
    """The values `trl_args` passes to the TRL config class (building it may start torch.distributed)."""
    values: dict[str, Any] = {
        "output_dir": str(Path(cfg.output_dir)),
        "report_to": ["tensorboard"],
        "seed": cfg.seed,
        "save_strategy": "steps",
        "logging_steps": 1,
    }
    if not torch.cuda.is_available():
        values.update(CPU_DEFAULTS)
    values.update(cfg.trl)
    return values


def load_prompt_rows(path: str, label_key: str) -> list[dict[str, Any]]:
    """Prompt rows {prompt (text or chat messages), label, ...}; a row without either is an error naming its line."""
    return read_rows(path, PROMPT_FIELDS, label_key)


def to_dataset(rows: list[dict[str, Any]], path: str):
    from datasets import Dataset

    try:
        return Dataset.from_list(rows)
    except Exception as exc:  # pyarrow raises several types for inconsistent columns
        raise DataError(f"{path}: rows do not share one schema (every label needs the same keys and types): {exc}") from exc


def prepare_run(cfg: TrainConfig) -> RunInputs:
    """Check the model folders, load the tokenizer and reward pipeline, read the prompt rows and refuse baselines
    computed with other settings: the set-up GRPO, RLOO and PPO share."""
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    check_model_dir(cfg.policy, "policy", causal_lm=True)
    tokenizer_key = "tokenizer" if cfg.tokenizer else "policy"
    with loading(tokenizer_key, cfg.tokenizer or cfg.policy):
        tokenizer = AutoTokenizer.from_pretrained(check_tokenizer_dir(cfg.tokenizer or cfg.policy, tokenizer_key))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    pipeline = RewardPipeline.from_yaml(cfg.reward_config)
    main_process = int(os.environ.get("RANK", "0")) == 0
    monitor = None
    if cfg.monitor is not None:
        monitor = MonitorSession(cfg.monitor, pipeline, cfg.output_dir, main=main_process,
                                 source_name=f"reward_config {cfg.reward_config}")
    reward_fn = PipelineRewardFunc(
        pipeline, name=Path(cfg.reward_config).stem, label_key=cfg.label_key,
        table_dir=Path(cfg.output_dir) / "completions" if main_process else None, table_every=cfg.table_every,
        stop_after=cfg.stop_after_failed_steps, tokenizer=tokenizer,
        observer=monitor.observe_scored if monitor is not None else None,
    )
    rows = load_prompt_rows(cfg.train_data, cfg.label_key)
    eval_rows = load_prompt_rows(cfg.eval_data, cfg.label_key) if cfg.eval_data else []
    for path, checked in ((cfg.train_data, rows), (cfg.eval_data, eval_rows)):
        try:
            check_baselines(pipeline.root, [r[cfg.label_key] for r in checked])
        except BaselineMismatchError as exc:
            raise DataError(f"{path}: {exc}") from None
    return RunInputs(tokenizer, pipeline, reward_fn, rows, eval_rows, monitor)


def build_trainer(cfg: TrainConfig):
    """The TRL trainer with our reward function and eval-file callback, ready to `.train()`."""
    args = trl_args(cfg)
    _, trainer_cls = trl_classes(cfg.algorithm)
    inputs = prepare_run(cfg)
    callbacks = []
    watcher = MonitorCallback(inputs.monitor) if inputs.monitor is not None else None
    if watcher is not None:
        callbacks.append(watcher)  # before the eval files: an eval's gold comes after the step before it
    if cfg.eval_data:
        callbacks.append(inputs.eval_callback(cfg, cfg.eval_max_new_tokens or args.max_completion_length,
                                              args.temperature, "trl"))
    with loading("policy", cfg.policy):
        model = AutoModelForCausalLM.from_pretrained(cfg.policy, dtype=torch.float32)
    trainer = trainer_cls(
        model=model, reward_funcs=inputs.reward_fn, args=args, train_dataset=to_dataset(inputs.rows, cfg.train_data),
        processing_class=inputs.tokenizer, callbacks=callbacks,
    )
    if watcher is not None:
        watcher.attach(trainer)
    return trainer


def monitor_callback(trainer) -> MonitorCallback | None:
    return next((c for c in trainer.callback_handler.callbacks if isinstance(c, MonitorCallback)), None)


def run(cfg: TrainConfig, mode: ResumeMode = "auto") -> Path:
    """Train (resuming from the last checkpoint of a run with the same settings) and save the final HF model;
    returns its folder. `mode`: see `trl_ext.run_dir.open_run_dir`; `resume: false` in the config means fresh."""
    out = Path(cfg.output_dir)
    mode = mode if cfg.resume else "fresh"
    if cfg.algorithm == "ppo":
        from .ppo import train_ppo

        open_run_dir(out, ppo_settings(cfg), mode, lambda folder: None)  # refuse or set aside before loading models
        with stop_cleanly(out, current_step):
            return train_ppo(cfg, prepare_run(cfg))
    settings = trainer_settings(trl_classes(cfg.algorithm)[0], trl_values(cfg), algorithm=cfg.algorithm,
                                policy=describe(cfg.policy), reward_config=content_hash(cfg.reward_config))
    last = open_run_dir(out, settings, mode, lambda folder: get_last_checkpoint(str(folder)))
    trainer = build_trainer(cfg)
    use_bar_and_table(trainer)
    watcher = monitor_callback(trainer)
    if last:
        logger.info("resuming from %s", last)
        if watcher is not None:
            watcher.restore(last)
    with stop_cleanly(out, lambda: trainer.state.global_step):
        trainer.train(resume_from_checkpoint=last)
    final = out / "final"
    kept = None
    if watcher is not None and watcher.stopped is not None:
        kept = watcher.session.keep_best(lambda step: out / f"checkpoint-{step}", watcher.stopped)
    if kept is not None:  # stop: the final model is the kept checkpoint's
        if trainer.accelerator.is_main_process:
            AutoModelForCausalLM.from_pretrained(kept, dtype=torch.float32).save_pretrained(final)
            trainer.processing_class.save_pretrained(final)
    else:
        trainer.save_model(str(final))
    if trainer.accelerator.is_main_process:
        (out / "train_config.json").write_text(json.dumps(cfg.model_dump(), indent=2))
    return final


def parse_command(argv: Sequence[str] | None = None) -> tuple[TrainConfig, ResumeMode]:
    """The validated config and how to treat an existing run folder (`--fresh`, `--resume force`)."""
    args, extra = build_parser().parse_known_args(argv)
    return load_config(TrainConfig, args.config, [*args.set, *split_overrides(extra)]), resume_mode(args)


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    return parse_command(argv)[0]


def _main(argv: Sequence[str]) -> None:
    setup_output()
    cfg, mode = parse_command(argv)
    final = run(cfg, mode)
    if is_main_process():
        print(f"final model: {final}")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: bad configs, data, model folders and a reward that always fails exit 2 with one message."""
    return run_cli(_main, "trl_ext.train", argv, user_errors=(RewardFailure, MonitorError))


if __name__ == "__main__":
    sys.exit(main())
