"""Seeded reward-model training on our RM format ({"prompt", "chosen", "rejected"} JSONL), through TRL.

    python -m trl_ext.train_rm --config configs/rm/tiny.yaml --seed 1 2 3 [--debug]

The seed sets the head initialisation and the data order. Texts are built and tokenised exactly as the
`reward_model` plugin builds them at scoring time (same template, special tokens and truncation side), so
nothing the RM reads in RL differs from what it learnt on. Writes `OUTPUT_ROOT/NAME_seed{S}` (an HF
sequence classifier the plugin loads) and `rm_eval.json` there with the held-out preference accuracy; several
seeds train one after another in one process. Chat-message rows (`setup_data.convert --style chat`) are
rendered with the tokenizer's chat template for the prompt and the answer's text as the response.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from reward_plugins.cli import help_first

from .run_dir import add_resume_flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trl_ext.train_rm", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML preset (configs/rm/*.yaml)")
    parser.add_argument("--seed", type=int, nargs="+", help="one RM per seed (overrides the config's seed)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any field, dotted")
    add_resume_flags(parser)
    return parser


if __name__ == "__main__":
    help_first(build_parser)

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from reward_plugins.batching import truncate
from reward_plugins.cli import check_model_dir, check_tokenizer_dir, loading, run_cli
from reward_plugins.config import ConfigError
from reward_plugins.io import write_json
from reward_plugins.model_ref import ModelRef, describe
from reward_plugins.reward_model import RewardModelConfig, RewardModelScorer
from reward_plugins.templates import current_names

from .config import CPU_DEFAULTS, ExistingPath, load_config, split_overrides, unknown_fields
from .console import is_main_process, setup_output, use_bar_and_table
from .data import RM_FIELDS, answer_text, as_text, read_rows
from .run_dir import ResumeMode, content_hash, open_run_dir, resume_mode, stop_cleanly, trainer_settings

logger = logging.getLogger(__name__)
EVAL_FILE = "rm_eval.json"


class RMRunConfig(BaseModel):
    """One RM: base model, preference data, seed, and how texts are built (must match the plugin's config)."""

    model_config = ConfigDict(extra="forbid")
    CONFIG_KIND: ClassVar[str] = "RM"

    base: ModelRef
    tokenizer: ModelRef | None = None
    train_data: ExistingPath
    test_data: ExistingPath | None = None
    output_root: str = "models"
    name: str = "rm"
    seed: int = 1
    template: str = "{prompt}{response}"  # the reward_model plugin's fields; {answer} is read as {response}, deprecated
    max_length: int = Field(default=1024, gt=1)
    truncation_side: Literal["left", "right"] = "left"
    torch_threads: int | None = Field(default=None, gt=0)
    trl: dict[str, Any] = Field(default_factory=dict)

    @field_validator("template")
    @classmethod
    def _current_names(cls, template: str) -> str:
        return current_names(template, "template")

    def config_problems(self) -> list[tuple[tuple[str, ...], str]]:
        from trl import RewardConfig

        return unknown_fields(RewardConfig, self.trl)

    @property
    def output_dir(self) -> Path:
        return Path(self.output_root) / f"{self.name}_seed{self.seed}"


def text_rows(rows: Sequence[dict], tokenizer: PreTrainedTokenizerBase) -> list[dict]:
    """Rows with chat-message prompts and answers turned into text (chat template; answer contents)."""
    return [{**r, "prompt": as_text(r["prompt"], tokenizer), "chosen": answer_text(r["chosen"]),
             "rejected": answer_text(r["rejected"])} for r in rows]


def encode_pairs(rows: Sequence[dict], tokenizer: PreTrainedTokenizerBase, cfg: RMRunConfig) -> dict[str, list]:
    """`chosen_ids` / `rejected_ids` built as the reward_model plugin builds its inputs."""
    out: dict[str, list] = {"chosen_ids": [], "rejected_ids": []}
    for side in ("chosen", "rejected"):
        texts = [cfg.template.format(prompt=r["prompt"], response=r[side], query=r["prompt"] + r[side],
                                     label=r.get("label")) for r in rows]
        ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
        out[f"{side}_ids"] = [truncate(x, cfg.max_length, cfg.truncation_side)[0] for x in ids]
    return out


def rm_args(cfg: RMRunConfig):
    from trl import RewardConfig

    known = {f.name for f in dataclasses.fields(RewardConfig)}
    unknown = sorted(set(cfg.trl) - known)
    if unknown:
        raise ConfigError([f"trl.{key}: unknown RewardConfig field" for key in unknown], "RM")
    try:
        return RewardConfig(**rm_values(cfg))
    except (TypeError, ValueError) as exc:
        raise ConfigError([f"trl: {exc}"], "RM") from exc


def rm_values(cfg: RMRunConfig) -> dict[str, Any]:
    """What `rm_args` passes to RewardConfig: our defaults, then the preset's `trl` section."""
    values: dict[str, Any] = {"output_dir": str(cfg.output_dir), "report_to": ["tensorboard"], "seed": cfg.seed,
                              "data_seed": cfg.seed, "max_length": None, "save_strategy": "no", "logging_steps": 10}
    if not torch.cuda.is_available():
        values.update(CPU_DEFAULTS)
    values.update(cfg.trl)
    return values


def preference_accuracy(scorer: RewardModelScorer, rows: Sequence[dict]) -> float:
    """Share of pairs where chosen outscores rejected (a tie counts one half)."""
    from reward_plugins.types import Sample

    chosen = [scorer.format_sample(Sample(r["prompt"], r["chosen"], label=r.get("label"))) for r in rows]
    rejected = [scorer.format_sample(Sample(r["prompt"], r["rejected"], label=r.get("label"))) for r in rows]
    scores, _ = scorer.score_texts(chosen + rejected)
    c, r = scores[: len(rows)], scores[len(rows) :]
    return float(np.mean((c > r) + 0.5 * (c == r)))


def train_rm(cfg: RMRunConfig, mode: ResumeMode = "auto") -> dict[str, Any]:
    """Train one seeded RM, save it, and return (and write) its held-out accuracy. Its folder is a run folder
    (`trl_ext.run_dir`): other settings than those it was trained with are refused."""
    from datasets import Dataset
    from transformers.trainer_utils import get_last_checkpoint
    from trl import RewardConfig, RewardTrainer

    settings = trainer_settings(RewardConfig, rm_values(cfg), algorithm="rm", base=describe(cfg.base), train_data=content_hash(cfg.train_data),
                                template=cfg.template, max_length=cfg.max_length, truncation_side=cfg.truncation_side)
    last = open_run_dir(cfg.output_dir, settings, mode, lambda folder: get_last_checkpoint(str(folder)))
    args = rm_args(cfg)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    check_model_dir(cfg.base, "base")
    tokenizer_key = "tokenizer" if cfg.tokenizer else "base"
    with loading(tokenizer_key, cfg.tokenizer or cfg.base):
        tokenizer = AutoTokenizer.from_pretrained(check_tokenizer_dir(cfg.tokenizer or cfg.base, tokenizer_key))
    train_rows = text_rows(read_rows(cfg.train_data, RM_FIELDS), tokenizer)
    torch.manual_seed(cfg.seed)
    with loading("base", cfg.base):
        model = AutoModelForSequenceClassification.from_pretrained(cfg.base, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_dict(encode_pairs(train_rows, tokenizer, cfg)),
                            processing_class=tokenizer)
    use_bar_and_table(trainer)
    with stop_cleanly(cfg.output_dir, lambda: trainer.state.global_step):
        trainer.train(resume_from_checkpoint=last)
    out = cfg.output_dir
    trainer.save_model(str(out))
    report: dict[str, Any] = {"seed": cfg.seed, "path": str(out), "train_pairs": len(train_rows)}
    if cfg.test_data:
        test_rows = text_rows(read_rows(cfg.test_data, RM_FIELDS), tokenizer)
        scorer = RewardModelScorer(RewardModelConfig(path=str(out), template=cfg.template, max_length=cfg.max_length,
                                                     truncation_side=cfg.truncation_side, device="cpu"))
        report.update(test_pairs=len(test_rows), accuracy=preference_accuracy(scorer, test_rows))
    write_json(out / EVAL_FILE, report)
    return report


def _main(argv: Sequence[str]) -> None:
    args, extra = build_parser().parse_known_args(argv)
    setup_output()
    overrides = [*args.set, *split_overrides(extra)]
    seeds = [[f"seed={seed}"] for seed in args.seed] if args.seed else [[]]
    configs = [load_config(RMRunConfig, args.config, [*overrides, *seed]) for seed in seeds]
    for cfg in configs:
        report = train_rm(cfg, resume_mode(args))
        held_out = (f"held-out accuracy {report['accuracy']:.3f} on {report['test_pairs']} pairs" if "accuracy" in report
                    else "no held-out pairs (test_data not set)")
        if is_main_process():
            print(f"{report['path']}: {held_out}")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: bad configs, data and model folders exit 2 with one message (a traceback with --debug)."""
    return run_cli(_main, "trl_ext.train_rm", argv)


if __name__ == "__main__":
    sys.exit(main())
