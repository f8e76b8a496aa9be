"""Supervised fine-tuning through TRL on our SFT format ({"prompt", "completion"} JSONL), loss on completions only.

    python -m trl_ext.sft --config configs/sft/tiny.yaml --set trl.num_train_epochs=3 [--debug]

Prompt and completion are strings or chat message lists (what `setup_data.convert --to sft` writes in either
style); the final model and tokenizer go to `output_dir/final`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from reward_plugins.cli import help_first

from .run_dir import add_resume_flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trl_ext.sft", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML preset (configs/sft/*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any field, dotted")
    add_resume_flags(parser)
    return parser


if __name__ == "__main__":
    help_first(build_parser)

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_utils import get_last_checkpoint

from reward_plugins.cli import check_model_dir, check_tokenizer_dir, loading, run_cli
from reward_plugins.config import ConfigError
from reward_plugins.model_ref import ModelRef, describe

from .config import CPU_DEFAULTS, ExistingPath, load_config, split_overrides, unknown_fields
from .console import is_main_process, setup_output, use_bar_and_table
from .data import SFT_FIELDS, read_rows
from .run_dir import ResumeMode, content_hash, open_run_dir, resume_mode, stop_cleanly, trainer_settings

logger = logging.getLogger(__name__)


class SFTRunConfig(BaseModel):
    """An SFT run: base model, data, where the final HF model goes; `trl` goes to TRL's SFTConfig."""

    model_config = ConfigDict(extra="forbid")
    CONFIG_KIND: ClassVar[str] = "SFT"

    model: ModelRef
    tokenizer: ModelRef | None = None
    train_data: ExistingPath
    eval_data: ExistingPath | None = None
    output_dir: str
    seed: int = 0
    torch_threads: int | None = Field(default=None, gt=0)
    trl: dict[str, Any] = Field(default_factory=dict)

    def config_problems(self) -> list[tuple[tuple[str, ...], str]]:
        from trl import SFTConfig

        return unknown_fields(SFTConfig, self.trl)


def sft_args(cfg: SFTRunConfig):
    from trl import SFTConfig

    known = {f.name for f in dataclasses.fields(SFTConfig)}
    unknown = sorted(set(cfg.trl) - known)
    if unknown:
        raise ConfigError([f"trl.{key}: unknown SFTConfig field" for key in unknown], "SFT")
    try:
        return SFTConfig(**sft_values(cfg))
    except (TypeError, ValueError) as exc:
        raise ConfigError([f"trl: {exc}"], "SFT") from exc


def sft_values(cfg: SFTRunConfig) -> dict[str, Any]:
    """What `sft_args` passes to SFTConfig: our defaults, then the preset's `trl` section."""
    values: dict[str, Any] = {"output_dir": cfg.output_dir, "report_to": ["tensorboard"], "seed": cfg.seed,
                              "logging_steps": 10, "save_strategy": "no", "completion_only_loss": True}
    if not torch.cuda.is_available():
        values.update(CPU_DEFAULTS)
    values.update(cfg.trl)
    return values


def build_trainer(cfg: SFTRunConfig):
    from datasets import Dataset
    from trl import SFTTrainer

    args = sft_args(cfg)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    check_model_dir(cfg.model, "model", causal_lm=True)
    tokenizer_key = "tokenizer" if cfg.tokenizer else "model"
    with loading(tokenizer_key, cfg.tokenizer or cfg.model):
        tokenizer = AutoTokenizer.from_pretrained(check_tokenizer_dir(cfg.tokenizer or cfg.model, tokenizer_key))
    keep = list(SFT_FIELDS)
    train = Dataset.from_list([{k: r[k] for k in keep} for r in read_rows(cfg.train_data, SFT_FIELDS)])
    evals = None
    if cfg.eval_data:
        evals = Dataset.from_list([{k: r[k] for k in keep} for r in read_rows(cfg.eval_data, SFT_FIELDS)])
    with loading("model", cfg.model):
        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    return SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=evals, processing_class=tokenizer)


def run(cfg: SFTRunConfig, mode: ResumeMode = "auto") -> Path:
    """Train (resuming from the last checkpoint of a run with the same settings, see `trl_ext.run_dir`) and save
    the final model and tokenizer to `output_dir/final`."""
    out = Path(cfg.output_dir)
    from trl import SFTConfig

    settings = trainer_settings(SFTConfig, sft_values(cfg), algorithm="sft", model=describe(cfg.model),
                                train_data=content_hash(cfg.train_data))
    last = open_run_dir(out, settings, mode, lambda folder: get_last_checkpoint(str(folder)))
    trainer = build_trainer(cfg)
    use_bar_and_table(trainer)
    with stop_cleanly(out, lambda: trainer.state.global_step):
        trainer.train(resume_from_checkpoint=last)
    final = out / "final"
    trainer.save_model(str(final))
    return final


def _main(argv: Sequence[str]) -> None:
    args, extra = build_parser().parse_known_args(argv)
    setup_output()
    cfg = load_config(SFTRunConfig, args.config, [*args.set, *split_overrides(extra)])
    final = run(cfg, resume_mode(args))
    if is_main_process():
        print(f"final model: {final}")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: bad configs, data and model folders exit 2 with one message (a traceback with --debug)."""
    return run_cli(_main, "trl_ext.sft", argv)


if __name__ == "__main__":
    sys.exit(main())
