"""Seeded reward-model training on our RM format ({"prompt", "chosen", "rejected"} JSONL), through TRL.

    python -m trl_ext.train_rm --config configs/rm/tiny.yaml --seed 1 2 3 [--debug]
    python -m trl_ext.train_rm --config configs/rm/multihead_tiny.yaml     # one backbone, `heads: k` heads
    python -m trl_ext.train_rm --config configs/rm/lora_tiny.yaml          # `lora: {adapters: k}` on one base

The seed sets the head initialisation and the data order (a multi-head or LoRA run derives each member's own
seed from it; see `trl_ext.rm_members` for how members differ). Texts are built and tokenised exactly as the
reward plugins build them at scoring time (same template, special tokens and truncation side), so nothing the RM
reads in RL differs from what it learnt on. Writes `OUTPUT_ROOT/NAME_seed{S}`: an HF sequence classifier the
`reward_model` plugin loads, or a folder the `multihead_ensemble` / `lora_ensemble` plugin loads; and
`rm_eval.json` there with the held-out preference accuracy (per member and of the members' mean, with the
members' pairwise score correlation) and the training time. Several seeds train one after another in one process.
Chat-message rows (`setup_data.convert --style chat`) are rendered with the tokenizer's chat template for the
prompt and the answer's text as the response.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from reward_plugins.cli import check_model_dir, check_tokenizer_dir, loading, run_cli
from reward_plugins.io import write_json
from reward_plugins.member_info import held_out_stats, mean_off_diagonal
from reward_plugins.model_ref import describe
from reward_plugins.reward_model import RewardModelConfig, RewardModelScorer
from reward_plugins.types import Sample

from .config import load_config, split_overrides
from .console import is_main_process, setup_output, use_bar_and_table
from .data import RM_FIELDS, read_rows
from .rm_config import LoraSettings, RMRunConfig, encode_pairs, rm_args, rm_values, text_rows
from .rm_members import record_held_out, train_lora, train_multihead
from .run_dir import ResumeMode, content_hash, open_run_dir, resume_mode, stop_cleanly, trainer_settings

__all__ = ["EVAL_FILE", "LoraSettings", "RMRunConfig", "encode_pairs", "rm_args", "rm_values", "text_rows", "train_rm"]

logger = logging.getLogger(__name__)
EVAL_FILE = "rm_eval.json"


def member_scorer(cfg: RMRunConfig, folder: str | Path):
    """The scorer the reward plugins would build for the trained folder, with the run's text settings."""
    from reward_plugins.lora_ensemble import LoraEnsembleScorer
    from reward_plugins.multihead import MultiHeadScorer
    from reward_plugins.reward_model import TextInputConfig

    settings = {"path": str(folder), "template": cfg.template, "max_length": cfg.max_length,
                "truncation_side": cfg.truncation_side, "device": "cpu"}
    if cfg.kind == "multihead":
        return MultiHeadScorer(TextInputConfig(**settings))
    if cfg.kind == "lora":
        return LoraEnsembleScorer(TextInputConfig(**settings))
    return RewardModelScorer(RewardModelConfig(**settings))


def held_out_scores(scorer, rows: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(k, N) member scores of the chosen and of the rejected answers of N pairs, as the plugin formats them."""
    chosen = [scorer.format_sample(Sample(r["prompt"], r["chosen"], label=r.get("label"))) for r in rows]
    rejected = [scorer.format_sample(Sample(r["prompt"], r["rejected"], label=r.get("label"))) for r in rows]
    scores, _ = scorer.member_scores_texts(chosen + rejected)
    return scores[:, : len(rows)], scores[:, len(rows) :]


def run_settings(cfg: RMRunConfig) -> dict[str, Any]:
    """What shapes this RM run, recorded in its run folder: TRL's settings, the data, and the member layout."""
    from trl import RewardConfig

    algorithm = {"single": "rm", "multihead": "rm_multihead", "lora": "rm_lora"}[cfg.kind]
    settings = trainer_settings(RewardConfig, rm_values(cfg), algorithm=algorithm, base=describe(cfg.base),
                                train_data=content_hash(cfg.train_data), template=cfg.template,
                                max_length=cfg.max_length, truncation_side=cfg.truncation_side)
    if cfg.kind == "multihead":
        settings.update(heads=cfg.heads, backbone=cfg.backbone, head_data=cfg.head_data)
    elif cfg.kind == "lora":
        settings.update(lora=cfg.lora.model_dump())
        if cfg.head_data == "labelled":
            settings.update(head_data=cfg.head_data)
    return settings


def preference_accuracy(scorer: RewardModelScorer, rows: Sequence[dict]) -> float:
    """Share of pairs where chosen outscores rejected (a tie counts one half)."""
    return held_out_stats(*held_out_scores(scorer, rows))[0][0]


def train_rm(cfg: RMRunConfig, mode: ResumeMode = "auto") -> dict[str, Any]:
    """Train one seeded RM, multi-head RM or LoRA ensemble, save it, and return (and write) its held-out metrics.
    Its folder is a run folder (`trl_ext.run_dir`): other settings than those it was trained with are refused."""
    from datasets import Dataset
    from transformers.trainer_utils import get_last_checkpoint
    from trl import RewardTrainer

    last = open_run_dir(cfg.output_dir, run_settings(cfg), mode, lambda folder: get_last_checkpoint(str(folder)))
    args = rm_args(cfg)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    check_model_dir(cfg.base, "base")
    tokenizer_key = "tokenizer" if cfg.tokenizer else "base"
    with loading(tokenizer_key, cfg.tokenizer or cfg.base):
        tokenizer = AutoTokenizer.from_pretrained(check_tokenizer_dir(cfg.tokenizer or cfg.base, tokenizer_key))
    train_rows = text_rows(read_rows(cfg.train_data, RM_FIELDS), tokenizer)
    out = cfg.output_dir
    if cfg.kind == "multihead":
        seconds = train_multihead(cfg, tokenizer, train_rows, last)
    elif cfg.kind == "lora":
        seconds = train_lora(cfg, tokenizer, train_rows)
    else:
        torch.manual_seed(cfg.seed)
        with loading("base", cfg.base):
            model = AutoModelForSequenceClassification.from_pretrained(cfg.base, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        trainer = RewardTrainer(model=model, args=args, processing_class=tokenizer,
                                train_dataset=Dataset.from_dict(encode_pairs(train_rows, tokenizer, cfg)))
        use_bar_and_table(trainer)
        start = time.perf_counter()
        with stop_cleanly(out, lambda: trainer.state.global_step):
            trainer.train(resume_from_checkpoint=last)
        seconds = time.perf_counter() - start
        trainer.save_model(str(out))
    report: dict[str, Any] = {"seed": cfg.seed, "path": str(out), "kind": cfg.kind, "train_pairs": len(train_rows),
                              "train_seconds": round(seconds, 3)}
    if cfg.kind != "single":
        report["member_seeds"] = cfg.member_seeds
    if cfg.test_data:
        test_rows = text_rows(read_rows(cfg.test_data, RM_FIELDS), tokenizer)
        scorer = member_scorer(cfg, out)
        chosen, rejected = held_out_scores(scorer, test_rows)
        accuracy, correlation = held_out_stats(chosen, rejected)
        report.update(test_pairs=len(test_rows), accuracy=held_out_stats(chosen.mean(0), rejected.mean(0))[0][0])
        if cfg.kind != "single":
            report.update(member_accuracy=accuracy, correlation=correlation,
                          mean_correlation=round(mean_off_diagonal(correlation), 6))
            record_held_out(out, cfg.kind, dataclasses.replace(scorer.info, accuracy=accuracy, correlation=correlation))
    write_json(out / EVAL_FILE, report)
    return report


def summary(report: dict[str, Any]) -> str:
    """One line per trained folder: held-out accuracy (of the members' mean), per member, and how alike they score."""
    if "accuracy" not in report:
        return f"{report['path']}: no held-out pairs (test_data not set); trained in {report['train_seconds']:.1f} s"
    line = f"{report['path']}: held-out accuracy {report['accuracy']:.3f} on {report['test_pairs']} pairs"
    if "member_accuracy" in report:
        members = " ".join(f"{a:.3f}" for a in report["member_accuracy"])
        line += f" (members {members}; mean pairwise score correlation {report['mean_correlation']:.3f})"
    return line + f"; trained in {report['train_seconds']:.1f} s"


def _main(argv: Sequence[str]) -> None:
    args, extra = build_parser().parse_known_args(argv)
    setup_output()
    overrides = [*args.set, *split_overrides(extra)]
    seeds = [[f"seed={seed}"] for seed in args.seed] if args.seed else [[]]
    configs = [load_config(RMRunConfig, args.config, [*overrides, *seed]) for seed in seeds]
    for cfg in configs:
        report = train_rm(cfg, resume_mode(args))
        if is_main_process():
            print(summary(report))


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: bad configs, data and model folders exit 2 with one message (a traceback with --debug)."""
    return run_cli(_main, "trl_ext.train_rm", argv)


if __name__ == "__main__":
    sys.exit(main())
