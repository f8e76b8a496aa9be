"""The whole pipeline end to end on a CPU in minutes: `python -m trl_ext.demo` (what `make demo` runs).

Stages (each cached by the settings it reads, see `trl_ext.stage_cache`; `--fresh` starts over):
  data    synthetic instruction task with a rule-based gold reward (setup_data.synthetic_task)
  sft     tokenizer trained on the task text, tiny random policy, SFT through TRL
  pairs   two SFT samples per prompt, or for `contrast_pairs` of them one sample and the same with one item edited,
          labelled by each proxy RM's own biased annotator (gold plus a liking for one kind of wrong item) with
          `label_noise` flipped; clean held-out pairs of SFT samples ranked by gold and by each annotator, and SFT
          samples every proxy RM is standardised on
  rms     3 proxy RMs (seeds 1-3) from the SFT policy, RM j on annotator j's labels; beside them one multi-head RM
          with a head per annotator (and with --full a LoRA ensemble, an adapter per annotator), head_data: labelled
  bon     best-of-n from the SFT policy on the eval prompts with each RM, the mean / WCO / UWO ensembles and the
          one-model ensembles' UWO
  rl      PPO (Coste et al.'s algorithm) at a small KL penalty with one proxy RM, the WCO and the UWO ensemble and
          the multi-head UWO,
          each for every seed in `rl_seeds`; rewards z-scored on SFT samples, so one KL coefficient means the same;
          every run watched by the over-optimisation monitor (a shadow ensemble for single-RM runs), which also
          scores gold at every eval
  gold    checks that every eval row has its gold score
  report  plots (each run's gold peak and monitor alarm marked), the summary tables (standard errors everywhere),
          example completions and the monitor's table (evaluation.monitor_eval)
  vrcli   VR-CLI on a synthetic next-chapter task (trl_ext.demo_vrcli): held-out improvement curve and a row

Best-of-n's n=1 and RL's step 0 sample the same eval prompts from the same SFT policy with the same settings
(temperature, max_new_tokens), so both start from the same gold up to sampling noise. Every stage is seeded
and runs with `threads` torch threads, so the tables repeat on any machine with the same package versions.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Literal

from reward_plugins.cli import help_first


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trl_ext.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--fresh", action="store_true", help="delete OUT first and run every stage")
    parser.add_argument("--full", action="store_true", help="also the LoRA ensemble (an adapter per annotator), in best-of-n and PPO")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. rl_steps=40; only the stages that read it run again")
    return parser


if __name__ == "__main__":
    help_first(build_parser)

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from evaluation import monitor_eval
from evaluation import plots as plots_mod
from evaluation.bon_analysis import analyse, ensemble_run_name
from evaluation.eval_files import list_eval_files, read_eval_file
from reward_plugins import build_pipeline, tiny_models
from reward_plugins.config import parse_pipeline_config
from reward_plugins.config_loader import ConfigError
from reward_plugins.io import DataError, read_jsonl, write_json, write_jsonl
from reward_plugins.reward_model import RewardModelConfig, RewardModelScorer
from reward_plugins.types import Sample
from setup_data import synthetic_task as st

from . import demo_report as report_mod
from . import demo_vrcli
from . import sft as sft_mod
from . import stage_cache as cache
from . import train as train_mod
from . import train_rm as rm_mod
from .config import load_config
from .generation import sample
from .run_config import TrainConfig
from .stage_cache import Stage

RL_OBJECTIVES = ("single_rm", "wco", "uwo", "multihead_uwo")
CHEAP_OBJECTIVES = {"multihead_uwo": "multihead", "lora_uwo": "lora"}  # one-model ensembles of the k annotators' RMs
ENSEMBLE_OBJECTIVES = ("mean", "wco", "uwo")
RUNNER_SETTINGS = ("out", "workers")  # read by the runner itself; they change no result


class DemoConfig(BaseModel):
    """Sizes and settings of every stage; the defaults fit in a few minutes on 2 CPU cores."""

    model_config = ConfigDict(extra="forbid")

    out: str = "runs/demo"
    seed: int = 0
    threads: int = Field(default=1, gt=0)
    workers: int = Field(default=2, gt=0)  # independent runs (proxy RMs, PPO runs) trained side by side, one process each
    # the task and the SFT data
    n_sft: int = Field(default=4000, gt=0)
    sft_quality: float = Field(default=0.5, ge=0, le=1)  # share of good SFT answers (see synthetic_task.demo_response)
    # share of SFT answers with a wrong count that are too long; the others are too short, so that completing a list
    # (which every RM and the gold reward pay for) is what PPO learns first: gold rises before an RM's taste is
    # exploited
    sft_longer: float = Field(default=0.1, ge=0, le=1)
    sft_filler_share: float = Field(default=0.5, ge=0, le=1)  # share of wrong SFT items that are fillers, not other words
    n_rl: int = Field(default=512, gt=0)
    n_eval: int = Field(default=128, gt=0)
    eval_samples: int = Field(default=4, gt=0)  # completions per eval prompt at each RL eval step
    # the tiny policy
    vocab_size: int = 512  # enough merges that every task word is one token (300 spelt words in bytes)
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    sft_epochs: float = 2.0
    sft_lr: float = 3e-3
    # the proxy RMs' data: pairs of SFT samples ranked by gold, labels flipped with label_noise
    n_pref: int = Field(default=8000, gt=0)
    n_pref_test: int = Field(default=1000, gt=0)
    label_noise: float = Field(default=0.25, ge=0, lt=0.5)
    # share of training pairs whose second answer is the first with one item edited (synthetic_task.edited_response)
    contrast_pairs: float = Field(default=0.65, ge=0, le=1)
    # proxy RM j learns from annotator j: gold + annotator_bias per unit of annotator_features[j] (synthetic_task)
    annotator_bias: float = Field(default=0.4, ge=0)
    annotator_features: list[Literal["continuation", "vague", "off_category", "fillers", "extra"]] = Field(
        default=["continuation", "vague", "off_category"], min_length=1)
    n_reference: int = Field(default=1024, ge=2)  # SFT samples each proxy RM is standardised on
    # the proxy RMs
    rm_seeds: list[int] = Field(default=[1, 2, 3], min_length=1)
    rm_epochs: float = 6.0
    rm_lr: float = 2e-3
    # one-model ensembles of the same k annotators (reward_plugins.multihead / lora_ensemble, head_data: labelled):
    # multihead = one backbone with a head per annotator, lora = a LoRA adapter per annotator on the SFT policy
    cheap_ensembles: list[Literal["multihead", "lora"]] = Field(default=["multihead"])
    lora_r: int = Field(default=8, gt=0)
    # sampling, shared by pairs, best-of-n, RL rollouts and RL eval
    max_new_tokens: int = Field(default=24, gt=0)
    temperature: float = Field(default=1.0, gt=0)
    # best-of-n
    bon_n: int = Field(default=32, gt=0)
    uwo_weight_bon: float = Field(default=0.5, ge=0)
    # PPO
    rl_objectives: list[Literal["single_rm", "mean", "wco", "uwo", "multihead_uwo", "lora_uwo"]] = Field(
        default=list(RL_OBJECTIVES), min_length=1)
    # single-RM seed i optimises RM i (cycling); 5 seeds: with 3, the single RM's spread over seeds (each optimises
    # another RM) hid the ensembles' lead with 2 torch threads
    rl_seeds: list[int] = Field(default=[1, 2, 3, 4, 5], min_length=1)
    rl_steps: int = Field(default=60, gt=0)
    rl_batch: int = Field(default=32, gt=0)
    rl_mini_batch: int = Field(default=16, gt=0)
    rl_epochs: int = Field(default=4, gt=0)
    rl_lr: float = Field(default=3e-4, gt=0)
    rl_kl_coef: float = Field(default=0.05, ge=0)
    rl_vf_coef: float = Field(default=0.1, ge=0)
    rl_uwo_weight: float = Field(default=0.5, ge=0)
    rl_value_init: Literal["reward_model", "policy"] = "reward_model"  # reward_model: the run's first proxy RM
    missing_eos_penalty: float | None = 1.0
    eval_every: int = Field(default=5, gt=0)
    # the over-optimisation monitor on every PPO run (reward_plugins.monitor): a single-RM run is watched by a shadow
    # UWO ensemble of all proxy RMs, an ensemble run by its own members; gold (the rule) at every eval
    monitor_reference_steps: int = Field(default=5, gt=0)  # steps that fix each member's scale (one batch is noisy)
    monitor_window: int = Field(default=20, gt=0)
    monitor_patience: int = Field(default=5, gt=0)
    monitor_divergence: float | None = 1.0
    monitor_disagreement_rise: float | None = Field(default=0.05, gt=0)
    monitor_worst_member_drop: float | None = Field(default=0.1, gt=0)  # at evals, on the eval prompts
    # warn: the demo measures when the monitor would act (evaluation.monitor_eval replays `stop`); the others act,
    # with a checkpoint at every eval for `stop` to choose from
    monitor_action: Literal["warn", "checkpoint", "adapt_kl", "stop"] = "warn"
    monitor_kl_factor: float = Field(default=10.0, gt=1)  # adapt_kl multiplies rl_kl_coef by this (x2 was too weak)

    @model_validator(mode="after")
    def _consistent(self) -> DemoConfig:
        problems = []
        if self.rl_batch % self.rl_mini_batch:
            problems.append(f"rl_mini_batch {self.rl_mini_batch} must divide rl_batch {self.rl_batch}")
        if len(set(self.rm_seeds)) != len(self.rm_seeds) or len(set(self.rl_seeds)) != len(self.rl_seeds):
            problems.append("rm_seeds and rl_seeds must not repeat a seed")
        if len(set(self.rl_objectives)) != len(self.rl_objectives):
            problems.append(f"rl_objectives lists an objective twice: {self.rl_objectives}")
        if len(self.rm_seeds) < 2 and set(self.rl_objectives) & set(ENSEMBLE_OBJECTIVES):
            problems.append(f"rl_objectives {self.rl_objectives} has an ensemble, which needs at least 2 rm_seeds")
        for objective in self.rl_objectives:
            if objective in CHEAP_OBJECTIVES and CHEAP_OBJECTIVES[objective] not in self.cheap_ensembles:
                problems.append(f"rl_objectives has {objective}, which needs {CHEAP_OBJECTIVES[objective]} in "
                                f"cheap_ensembles {self.cheap_ensembles}")
        if self.cheap_ensembles and len(self.rm_seeds) < 2:
            problems.append(f"cheap_ensembles {self.cheap_ensembles} needs at least 2 rm_seeds (one member each)")
        if self.annotator_bias > 0 and len(self.annotator_features) < len(self.rm_seeds):
            problems.append(f"annotator_features {self.annotator_features} names fewer annotators than rm_seeds "
                            f"{self.rm_seeds}: proxy RM j learns from annotator j")
        if self.eval_every > self.rl_steps:
            problems.append(f"eval_every {self.eval_every} is larger than rl_steps {self.rl_steps}: only steps 0 and "
                            f"{self.rl_steps} would be evaluated, too few to see a peak")
        if self.monitor_reference_steps >= self.rl_steps:
            problems.append(f"monitor_reference_steps {self.monitor_reference_steps} must be below rl_steps "
                            f"{self.rl_steps}: the monitor's signals start after its reference steps")
        if problems:
            raise ValueError("; ".join(problems))
        return self


FULL = {"cheap_ensembles": ["multihead", "lora"], "rl_objectives": [*RL_OBJECTIVES, "lora_uwo"]}
"""What `--full` changes: the LoRA ensemble beside the multi-head one, in best-of-n and PPO (given `--set` values
win)."""


def uses_uwo(cfg: DemoConfig) -> bool:
    return bool({"uwo", *CHEAP_OBJECTIVES} & set(cfg.rl_objectives))


def uses_lora(cfg: DemoConfig) -> bool:
    return "lora" in cfg.cheap_ensembles


STAGES: list[Stage] = [
    Stage("data", ("seed", "n_sft", "sft_quality", "sft_longer", "sft_filler_share", "n_rl", "n_eval", "eval_samples"),
          folder="data", version=2),
    Stage("sft", ("seed", "threads", "vocab_size", "hidden_size", "layers", "heads", "sft_epochs", "sft_lr"),
          after=("data",), folder="sft", version=2),
    Stage("pairs", ("seed", "threads", "n_pref", "n_pref_test", "label_noise", "contrast_pairs", "n_reference",
                    "max_new_tokens", "temperature", "rm_seeds", "annotator_bias"), after=("data", "sft"), folder="pairs",
          version=4,
          reads_if={"annotator_features": ("annotator_bias > 0", lambda cfg: cfg.annotator_bias > 0)}),
    Stage("rms", ("threads", "rm_seeds", "rm_epochs", "rm_lr", "cheap_ensembles"), after=("sft", "pairs"), folder="rms",
          version=2, reads_if={"lora_r": ("cheap_ensembles includes lora", uses_lora)}),
    Stage("bon", ("seed", "threads", "bon_n", "uwo_weight_bon", "max_new_tokens", "temperature"),
          after=("data", "sft", "pairs", "rms"), folder="bon"),
    Stage("rl", ("threads", "rl_objectives", "rl_seeds", "rl_steps", "rl_batch", "rl_mini_batch", "rl_epochs", "rl_lr",
                 "rl_kl_coef", "rl_vf_coef", "rl_value_init", "missing_eos_penalty", "eval_every", "max_new_tokens",
                 "temperature", "monitor_reference_steps", "monitor_window", "monitor_patience", "monitor_divergence",
                 "monitor_disagreement_rise", "monitor_worst_member_drop", "monitor_action", "monitor_kl_factor"),
          after=("data", "sft", "pairs", "rms"), folder="rl",
          reads_if={"rl_uwo_weight": ("rl_objectives includes uwo", uses_uwo)}),
    Stage("gold", (), after=("rl",), marker="rl/gold.json", version=2),
    Stage("report", (), after=("rms", "bon", "gold"), version=3),
    Stage("vrcli", ("seed", "threads"), folder="vrcli"),
]
"""The demo's stages in order: the settings each reads and the stages whose outputs it reads."""


class Paths:
    """Where every stage writes, under `out` (one folder per stage)."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.data = self.out / "data"
        self.sft = self.out / "sft"
        self.tokenizer = self.sft / "tokenizer"
        self.base = self.sft / "base"
        self.sft_run = self.sft / "run"  # the SFT run's own folder (its settings file guards it)
        self.policy = self.sft_run / "final"
        self.pairs = self.out / "pairs"
        self.reference = self.pairs / "reference.jsonl"
        self.rms = self.out / "rms"
        self.eval_prompts = self.data / "eval_prompts_rl.jsonl"
        self.bon = self.out / "bon"
        self.runs = self.out / "rl"
        self.summary = self.out / "summary.md"

    def rm(self, seed: int) -> Path:
        return self.rms / f"rm_seed{seed}"

    def cheap(self, kind: str) -> Path:
        return self.rms / f"{kind}_seed1"

    def rl(self, objective: str, seed: int) -> Path:
        return self.runs / objective / f"seed{seed}"


def stage_data(cfg: DemoConfig, paths: Paths) -> None:
    """Synthetic task files: SFT rows, RL and eval prompts (and the eval prompts repeated `eval_samples` times,
    what the RL eval files sample)."""
    rng = random.Random(cfg.seed)
    write_jsonl(paths.data / "sft.jsonl", st.demo_sft_rows(st.sample_tasks(cfg.n_sft, rng), rng, cfg.sft_quality,
                                                                cfg.sft_longer, cfg.sft_filler_share))
    write_jsonl(paths.data / "prompts.jsonl", st.prompt_rows(st.sample_tasks(cfg.n_rl, rng)))
    eval_rows = list(st.prompt_rows(st.sample_tasks(cfg.n_eval, rng)))
    write_jsonl(paths.data / "eval_prompts.jsonl", eval_rows)
    write_jsonl(paths.eval_prompts, [row for row in eval_rows for _ in range(cfg.eval_samples)])


def stage_sft(cfg: DemoConfig, paths: Paths) -> None:
    """A tokenizer trained on the task text, a tiny random policy, then SFT on the task."""
    tiny_models.build_tokenizer(paths.tokenizer, st.tokenizer_corpus(random.Random(cfg.seed)), vocab_size=cfg.vocab_size)
    tiny_models.build_causal_lm(paths.base, paths.tokenizer, seed=cfg.seed, hidden_size=cfg.hidden_size,
                                intermediate_size=2 * cfg.hidden_size, max_position_embeddings=128,
                                num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads // 2)
    run_cfg = sft_mod.SFTRunConfig(
        model=str(paths.base), train_data=str(paths.data / "sft.jsonl"), output_dir=str(paths.sft_run), seed=cfg.seed,
        torch_threads=cfg.threads,
        trl={"num_train_epochs": cfg.sft_epochs, "per_device_train_batch_size": 32, "learning_rate": cfg.sft_lr,
             "lr_scheduler_type": "cosine", "warmup_steps": 5, "logging_steps": 20, "report_to": []},
    )
    sft_mod.run(run_cfg)


def load_policy(paths: Paths):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(paths.policy).eval(), AutoTokenizer.from_pretrained(paths.policy)


def annotators(cfg: DemoConfig) -> dict[int, Callable[[str, int, str], float]]:
    """Each proxy RM's labeller, by RM seed: the j-th RM's is gold plus `annotator_bias` per unit of the j-th
    feature (the gold itself at bias 0)."""
    if cfg.annotator_bias == 0:
        return {seed: st.gold_reward for seed in cfg.rm_seeds}
    return {seed: st.annotator(feature, cfg.annotator_bias) for seed, feature in zip(cfg.rm_seeds, cfg.annotator_features)}


def annotator_name(cfg: DemoConfig, seed: int) -> str:
    if cfg.annotator_bias == 0:
        return "gold"
    return f"gold + {cfg.annotator_bias:g} x {cfg.annotator_features[cfg.rm_seeds.index(seed)]}"


def stage_pairs(cfg: DemoConfig, paths: Paths) -> None:
    """The proxy RMs' data as in RLHF: two SFT samples per prompt (for `contrast_pairs` of the training prompts, one
    sample and the same with one item edited), each pair labelled by every RM's own annotator
    (`annotators`; ties dropped) with `label_noise` of the labels flipped (`prefs_rm_seed{i}.jsonl`); held-out pairs
    the same way without noise, ranked by gold (`prefs_test.jsonl`) and by each annotator
    (`prefs_test_rm_seed{i}.jsonl`); and `n_reference` SFT samples on the RL prompts."""
    model, tokenizer = load_policy(paths)
    rng = random.Random(cfg.seed + 1)
    judges = annotators(cfg)
    for name, n, noise, held_out in (("prefs", cfg.n_pref, cfg.label_noise, False),
                                     ("prefs_test", cfg.n_pref_test, 0.0, True)):
        tasks = st.sample_tasks(n, rng)
        gens = sample(model, tokenizer, [t.prompt for t in tasks for _ in range(2)], cfg.max_new_tokens, cfg.temperature,
                      batch_size=256, seed=rng.randrange(2**31))
        first, second = gens.texts[0::2], gens.texts[1::2]
        if not held_out:  # the held-out pairs stay pairs of two SFT samples
            second = [st.edited_response(a, task, rng) if rng.random() < cfg.contrast_pairs else b
                      for task, a, b in zip(tasks, first, second, strict=True)]
        labelled = {f"{name}_rm_seed{seed}": list(st.judged_pairs(tasks, first, second, random.Random(f"{cfg.seed}-{seed}"),
                                                                  noise, judge))
                    for seed, judge in judges.items()}
        if held_out:
            labelled[name] = list(st.judged_pairs(tasks, first, second, rng, 0.0))
        for file, rows in labelled.items():
            if not rows:
                raise DataError(f"{paths.pairs / file}.jsonl: the SFT policy's two answers tie on all {n} prompts, so "
                                "there is no pair to learn from; raise n_pref / n_pref_test or train the SFT policy longer")
            write_jsonl(paths.pairs / f"{file}.jsonl", rows)
    prompts = read_jsonl(paths.data / "prompts.jsonl")
    picked = rng.choices(prompts, k=cfg.n_reference)
    gens = sample(model, tokenizer, [r["prompt"] for r in picked], cfg.max_new_tokens, cfg.temperature, batch_size=256,
                  seed=rng.randrange(2**31))
    write_jsonl(paths.reference, [{"prompt": r["prompt"], "response": text, "label": r["label"]}
                                  for r, text in zip(picked, gens.texts) if text.strip()])


def run_side_by_side(function: Callable[..., Any], jobs: Sequence[tuple], cfg: DemoConfig, desc: str) -> list[Any]:
    """`function(*job)` for every job, in `cfg.workers` fresh processes (spawned: no forked torch state) set up like
    this one (`seed_everything`); results in job order. Every job seeds itself, so they do not depend on `workers`."""
    if cfg.workers == 1 or len(jobs) <= 1:
        return [function(*job) for job in tqdm(jobs, desc=desc, leave=False)]
    results: list[Any] = [None] * len(jobs)
    with ProcessPoolExecutor(min(cfg.workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=seed_everything, initargs=(cfg,)) as pool:
        futures = {pool.submit(function, *job): index for index, job in enumerate(jobs)}
        for future in tqdm(as_completed(futures), total=len(futures), desc=desc, leave=False):
            results[futures[future]] = future.result()
    return results


def call(function: Callable[..., Any], *args: Any) -> Any:
    """`function(*args)`: lets one pool run jobs of several kinds."""
    return function(*args)


def train_proxy_rm(cfg: DemoConfig, paths: Paths, seed: int) -> dict[str, Any]:
    """One proxy RM (resumable: a finished one is read back)."""
    eval_file = paths.rm(seed) / rm_mod.EVAL_FILE
    if eval_file.exists():
        return json.loads(eval_file.read_text())
    run_cfg = rm_mod.RMRunConfig(
        base=str(paths.policy), train_data=str(paths.pairs / f"prefs_rm_seed{seed}.jsonl"),
        test_data=str(paths.pairs / "prefs_test.jsonl"), output_root=str(paths.rms), name="rm", seed=seed,
        max_length=128, torch_threads=cfg.threads,
        trl={"num_train_epochs": cfg.rm_epochs, "per_device_train_batch_size": 32, "learning_rate": cfg.rm_lr,
             "logging_steps": 20, "report_to": [], "disable_tqdm": cfg.workers > 1},
    )
    return rm_mod.train_rm(run_cfg)


def member_rows(cfg: DemoConfig, paths: Paths) -> Path:
    """Every annotator's labelled pairs in one file, each row naming its member (RM seed j -> member j), for the
    one-model ensembles (head_data: labelled)."""
    out = paths.pairs / "prefs_members.jsonl"
    rows = [{**row, "member": member} for member, seed in enumerate(cfg.rm_seeds)
            for row in read_jsonl(paths.pairs / f"prefs_rm_seed{seed}.jsonl")]
    write_jsonl(out, rows)
    return out


def train_cheap_rm(cfg: DemoConfig, paths: Paths, kind: str) -> dict[str, Any]:
    """A multi-head RM (a head per annotator) or a LoRA ensemble (an adapter per annotator), from the SFT policy,
    on `member_rows`, with the proxy RMs' training settings (resumable: a finished one is read back)."""
    eval_file = paths.cheap(kind) / rm_mod.EVAL_FILE
    if eval_file.exists():
        return json.loads(eval_file.read_text())
    k = len(cfg.rm_seeds)
    layout: dict[str, Any] = ({"heads": k} if kind == "multihead" else
                              {"lora": {"adapters": k, "r": cfg.lora_r, "alpha": 2.0 * cfg.lora_r}})
    run_cfg = rm_mod.RMRunConfig(
        base=str(paths.policy), train_data=str(paths.pairs / "prefs_members.jsonl"),
        test_data=str(paths.pairs / "prefs_test.jsonl"), output_root=str(paths.rms), name=kind, seed=1,
        head_data="labelled", max_length=128, torch_threads=cfg.threads, **layout,
        trl={"num_train_epochs": cfg.rm_epochs, "per_device_train_batch_size": 32, "learning_rate": cfg.rm_lr,
             "logging_steps": 20, "report_to": [], "disable_tqdm": cfg.workers > 1},
    )
    return rm_mod.train_rm(run_cfg)


def rm_scorer(path: Path) -> RewardModelScorer:
    return RewardModelScorer(RewardModelConfig(path=str(path), max_length=128, batch_size=256, device="cpu"))


def stage_rms(cfg: DemoConfig, paths: Paths) -> None:
    """Proxy RMs from the SFT policy, one per seed, on the noisy pairs; held-out accuracy on clean pairs; each RM's
    mean and sd on the reference SFT samples (what the rewards are standardised with)."""
    if cfg.cheap_ensembles:
        member_rows(cfg, paths)
    jobs = [(train_proxy_rm, cfg, paths, seed) for seed in cfg.rm_seeds]
    jobs += [(train_cheap_rm, cfg, paths, kind) for kind in cfg.cheap_ensembles]
    run_side_by_side(call, jobs, cfg, "proxy RMs")
    reference = read_jsonl(paths.reference)
    stats = {}
    for seed in cfg.rm_seeds:
        scorer = rm_scorer(paths.rm(seed))
        scores = scorer.score_texts([scorer.format_sample(Sample(r["prompt"], r["response"])) for r in reference])[0]
        own = read_jsonl(paths.pairs / f"prefs_test_rm_seed{seed}.jsonl")
        chosen, rejected = (scorer.score_texts([scorer.format_sample(Sample(r["prompt"], r[side])) for r in own])[0]
                            for side in ("chosen", "rejected"))
        stats[f"rm_seed{seed}"] = {"mean": float(scores.mean()), "std": float(scores.std()),
                                   "annotator": annotator_name(cfg, seed),
                                   "annotator_agreement": float(np.mean(chosen > rejected)), "annotator_pairs": len(own)}
    write_json(paths.rms / "reference_stats.json", stats)


def rm_reports(cfg: DemoConfig, paths: Paths) -> list[dict[str, Any]]:
    """Each proxy RM's held-out accuracy on clean pairs, agreement with its own annotator, and reference stats."""
    stats = json.loads((paths.rms / "reference_stats.json").read_text())
    return [{**json.loads((paths.rm(seed) / rm_mod.EVAL_FILE).read_text()), **stats[f"rm_seed{seed}"]}
            for seed in cfg.rm_seeds]


def cheap_plugin(cfg: DemoConfig, paths: Paths, kind: str) -> dict[str, Any]:
    """The reward plugin of a one-model ensemble: one member per annotator, read in one pass."""
    k = len(cfg.rm_seeds)
    count = {"heads": k} if kind == "multihead" else {"adapters": k}
    return {"type": f"{kind}_ensemble", "path": str(paths.cheap(kind).resolve()), **count, "max_length": 128,
            "batch_size": 64}


def cheap_member_scores(cfg: DemoConfig, paths: Paths, kind: str, prompts: Sequence[str],
                        texts: Sequence[str]) -> np.ndarray:
    """(k, N) member scores of a one-model ensemble, each z-scored on the reference SFT samples like the proxy
    RMs' (what the RL reward does with `standardize: reference_set`)."""
    pipeline = build_pipeline(parse_pipeline_config({"reward": {**cheap_plugin(cfg, paths, kind), "objective": "mean"}},
                                                     source=f"the demo's {kind} ensemble"))
    scorer = pipeline.root.scorer  # scored as texts, like the proxy RMs' (an empty answer is scored too)

    def members(samples: list[Sample]) -> np.ndarray:
        return np.asarray(scorer.member_scores_texts([scorer.format_sample(sample) for sample in samples])[0])

    reference = read_jsonl(paths.reference)
    ref = members([Sample(r["prompt"], r["response"]) for r in reference])
    scores = members([Sample(p, t) for p, t in zip(prompts, texts)])
    return (scores - ref.mean(1, keepdims=True)) / ref.std(1, keepdims=True)


def stage_bon(cfg: DemoConfig, paths: Paths) -> None:
    """N samples per eval prompt from the SFT policy, scored by every RM (standardised as in RL) and by gold;
    unbiased best-of-n curves."""
    rows = read_jsonl(paths.data / "eval_prompts.jsonl")
    model, tokenizer = load_policy(paths)
    prompts = [r["prompt"] for r in rows for _ in range(cfg.bon_n)]
    # generation.sample's default batching, as the RL eval files use, so n=1 and RL step 0 sample alike
    gens = sample(model, tokenizer, prompts, cfg.max_new_tokens, cfg.temperature, seed=cfg.seed)
    labels = [r["label"] for r in rows for _ in range(cfg.bon_n)]
    shape = (len(rows), cfg.bon_n)
    gold = st.gold_rewards(gens.texts, labels).reshape(shape)
    stats = json.loads((paths.rms / "reference_stats.json").read_text())
    members = {}
    for seed in tqdm(cfg.rm_seeds, desc="best-of-n scoring", leave=False):
        scorer = rm_scorer(paths.rm(seed))
        texts = [scorer.format_sample(Sample(p, t)) for p, t in zip(prompts, gens.texts)]
        ref = stats[f"rm_seed{seed}"]
        members[f"rm_seed{seed}"] = ((scorer.score_texts(texts)[0] - ref["mean"]) / ref["std"]).reshape(shape)
    ns = [n for n in (1, 2, 4, 8, 16, 32, 64, 128) if n <= cfg.bon_n]
    objectives = ("mean", "wco", "uwo") if len(cfg.rm_seeds) > 1 else ()
    sets = {"": (members, objectives)}  # the proxy RMs and their ensembles; then each one-model ensemble's UWO
    for kind in cfg.cheap_ensembles:
        scores = cheap_member_scores(cfg, paths, kind, prompts, gens.texts)
        sets[kind] = ({f"{kind}{j}": column.reshape(shape) for j, column in enumerate(scores)}, ("uwo",))
    curves: dict[str, Any] = {}
    for kind, (scored, wanted) in sets.items():
        found = analyse(scored, gold, ns, objectives=wanted, uwo_weights=(cfg.uwo_weight_bon,))
        per_prompt = [analyse({name: m[i : i + 1] for name, m in scored.items()}, gold[i : i + 1], ns,
                              objectives=wanted, uwo_weights=(cfg.uwo_weight_bon,), workers=1) for i in range(len(rows))]
        for name, curve in found.items():  # one SE over prompts of each point's gold
            for j, point in enumerate(curve):
                values = [prompt_curves[name][j]["gold_score"] for prompt_curves in per_prompt]
                point["gold_se"] = float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
        if kind:  # only the combined curve, named after the model: multihead_UWO-0.5
            uwo = ensemble_run_name("uwo", cfg.uwo_weight_bon)
            found = {uwo.replace("ensemble", kind): found[uwo]}
        curves.update(found)
    write_json(paths.bon / "curves.json", curves)
    for name, curve in curves.items():  # the folder layout evaluation.plots reads
        write_json(paths.bon / name.removeprefix("rm_") / plots_mod.BON_FILE, curve)


def reward_spec(cfg: DemoConfig, paths: Paths, objective: str, seed: int) -> dict[str, Any]:
    """One run's reward file: the proxy RMs it optimises as an ensemble plugin (one member for a single RM), each
    z-scored on the reference SFT samples, so the KL coefficient weighs the same for every objective."""
    name = "rm" if objective == "single_rm" else objective
    if objective in CHEAP_OBJECTIVES:
        reward: dict[str, Any] = {**cheap_plugin(cfg, paths, CHEAP_OBJECTIVES[objective]), "name": name,
                                  "objective": "uwo"}
    else:
        reward = {"type": "ensemble", "name": name, "objective": "mean" if objective == "single_rm" else objective,
                  "path_template": str(paths.rms.resolve() / "rm_seed{seed}"), "seeds": run_rm_seeds(cfg, objective, seed),
                  "member": {"max_length": 128, "batch_size": 64}}
    reward.update(standardize="reference_set", reference_set=str(paths.reference.resolve()))
    if objective == "uwo" or objective in CHEAP_OBJECTIVES:
        reward["uwo_weight"] = cfg.rl_uwo_weight
    return {"on_error": "penalty", "error_penalty": -1.0, "reward": reward}


def run_rm_seeds(cfg: DemoConfig, objective: str, seed: int) -> list[int]:
    """The proxy RMs one run optimises: all of them for an ensemble, the i-th for the i-th seed of a single-RM run."""
    if objective == "single_rm":
        return [cfg.rm_seeds[cfg.rl_seeds.index(seed) % len(cfg.rm_seeds)]]
    return list(cfg.rm_seeds)


def rl_reward(cfg: DemoConfig, paths: Paths, objective: str, seed: int) -> Path:
    """The reward file of one run, written under rl/rewards/ (the same file works for OpenRLHF and TRL)."""
    name = f"single_rm_seed{seed}" if objective == "single_rm" else objective
    out = paths.runs / "rewards" / f"{name}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    header = "# written by trl_ext.demo: members z-scored on the SFT samples of reference_set\n"
    out.write_text(header + yaml.safe_dump(reward_spec(cfg, paths, objective, seed), sort_keys=False))
    return out


def shadow_reward(cfg: DemoConfig, paths: Paths) -> Path:
    """The shadow ensemble that watches a single-RM run: every proxy RM, z-scored as in training (its UWO
    objective is not used: the monitor reads the member scores)."""
    out = (paths.runs / "rewards" / "shadow.yaml").resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = reward_spec(cfg, paths, "uwo", cfg.rl_seeds[0])
    spec["reward"]["name"] = "shadow"
    out.write_text("# written by trl_ext.demo: the monitor's shadow ensemble for single-RM runs\n"
                   + yaml.safe_dump(spec, sort_keys=False))
    return out


def monitor_section(cfg: DemoConfig, paths: Paths, objective: str) -> dict[str, Any]:
    """The run's `monitor:` section (evaluation.monitor_eval replays it)."""
    return {"shadow": str(shadow_reward(cfg, paths)) if objective == "single_rm" else None,
            "reference_steps": cfg.monitor_reference_steps, "window": cfg.monitor_window, "patience": cfg.monitor_patience,
            "thresholds": {"worst_member_drop": cfg.monitor_worst_member_drop, "divergence": cfg.monitor_divergence,
                           "trend": None, "disagreement_rise": cfg.monitor_disagreement_rise, "gold_drop": None},
            "action": cfg.monitor_action, "kl_factor": cfg.monitor_kl_factor,
            "gold": {"function": "setup_data.synthetic_task:gold_rewards"}}


def rl_config(cfg: DemoConfig, paths: Paths, objective: str, seed: int) -> TrainConfig:
    """PPO with the objective's reward file (Coste et al.'s algorithm) at a small fixed KL penalty, monitored."""
    value_from = paths.cheap("multihead") if objective == "multihead_uwo" else paths.rm(run_rm_seeds(cfg, objective, seed)[0])
    value_model = str(value_from) if cfg.rl_value_init == "reward_model" else None  # a multi-head: the heads' mean
    return TrainConfig(
        algorithm="ppo", policy=str(paths.policy), reward_config=str(rl_reward(cfg, paths, objective, seed)),
        train_data=str(paths.data / "prompts.jsonl"), eval_data=str(paths.eval_prompts),
        output_dir=str(paths.rl(objective, seed)), eval_every=cfg.eval_every, table_every=cfg.rl_steps, seed=seed,
        torch_threads=cfg.threads,
        ppo={"max_steps": cfg.rl_steps, "batch_size": cfg.rl_batch, "mini_batch_size": cfg.rl_mini_batch,
             "ppo_epochs": cfg.rl_epochs, "learning_rate": cfg.rl_lr, "max_new_tokens": cfg.max_new_tokens,
             "temperature": cfg.temperature, "kl_coef": cfg.rl_kl_coef, "vf_coef": cfg.rl_vf_coef,
             "missing_eos_penalty": cfg.missing_eos_penalty, "logging_steps": 5, "sample_rows": 0,
             "value_init": cfg.rl_value_init, "value_model": value_model,
             "save_steps": cfg.eval_every if cfg.monitor_action in ("checkpoint", "stop") else 0},
        monitor=monitor_section(cfg, paths, objective),
    )


def rl_runs(cfg: DemoConfig, paths: Paths) -> dict[str, list[Path]]:
    """Each objective's run folders, one per seed."""
    return {objective: [paths.rl(objective, seed) for seed in cfg.rl_seeds] for objective in cfg.rl_objectives}


def train_rl_run(config: TrainConfig) -> None:
    """One PPO run (skipped when its final model exists)."""
    if not (Path(config.output_dir) / "final" / "model.safetensors").exists():
        train_mod.run(config)


def stage_rl(cfg: DemoConfig, paths: Paths) -> None:
    """PPO with one proxy RM and with the WCO and UWO ensembles, each for every seed."""
    jobs = [(rl_config(cfg, paths, objective, seed),) for objective in cfg.rl_objectives for seed in cfg.rl_seeds]
    run_side_by_side(train_rl_run, jobs, cfg, "PPO runs")


def stage_gold(cfg: DemoConfig, paths: Paths) -> None:
    """Check that every eval row has its gold score: the monitor of each run scores the rule
    (`monitor.gold`, setup_data.synthetic_task:gold_rewards) at every eval."""
    for run_dirs in rl_runs(cfg, paths).values():
        for run_dir in run_dirs:
            for path in list_eval_files(run_dir / "eval"):
                missing = [i for i, row in enumerate(read_eval_file(path).rows) if row.gold_score is None]
                if missing:
                    raise DataError(f"{path}: rows {missing[:5]} have no gold score; the run's monitor.gold scores them")


def mistakes_of(prompt: str, answer: str) -> dict[str, int]:
    task = st.task_from_prompt(prompt)
    return st.mistakes(answer, task.k, task.category)


def monitor_results(cfg: DemoConfig, paths: Paths) -> list[monitor_eval.RunResult]:
    """`evaluation.monitor_eval` over every PPO run, named objective/seedN."""
    results = []
    for objective, dirs in rl_runs(cfg, paths).items():
        for run_dir in dirs:
            result = monitor_eval.evaluate_run(run_dir)
            result.name = f"{objective}/{run_dir.name}"
            results.append(result)
    return results


def monitor_marks(curves: dict[str, list[report_mod.RunCurve]],
                  results: Sequence[monitor_eval.RunResult]) -> list[plots_mod.Mark]:
    """Each run's gold peak and its alarm on the plot's axis, the eval prompts' KL (at the alarm step, interpolated
    between the eval steps around it)."""
    marks = [plots_mod.Mark(objective, "peak", float(c.kl[i]), float(c.gold[i]))
             for objective, runs in curves.items() for c in runs for i in [int(np.argmax(c.gold))]]
    by_name = {c.name: c for runs in curves.values() for c in runs}
    for r in results:
        if r.alarm_step is not None:
            c = by_name[r.name]
            kl = float(np.interp(r.alarm_step, c.steps, report_mod.kl_path(c)))
            marks.append(plots_mod.Mark(r.name.split("/")[0], "alarm", kl))
    return marks


def stage_report(cfg: DemoConfig, paths: Paths) -> None:
    """Plots with `evaluation.plots` (best-of-n, PPO, both overlaid, the last with each run's gold peak and monitor
    alarm; each PNG with its CSV), the summary tables and the monitor's table (`evaluation.monitor_eval`)."""
    rl_dirs = [paths.runs / objective for objective in cfg.rl_objectives]
    curves = {objective: [report_mod.run_curve(f"{objective}/{d.name}", d / "eval", mistakes_of) for d in dirs]
              for objective, dirs in rl_runs(cfg, paths).items()}
    results = monitor_results(cfg, paths)
    plots_mod.plots([paths.bon], paths.out / "bon")
    plots_mod.plots(rl_dirs, paths.out / "ppo", marks=monitor_marks(curves, results))
    plots_mod.plots([paths.bon, *rl_dirs], paths.out / "overoptimisation", marks=monitor_marks(curves, results))
    bon = json.loads((paths.bon / "curves.json").read_text())
    text = report_mod.summary(rm_reports(cfg, paths), bon, curves)
    seconds = {f"{len(cfg.rm_seeds)} separate RMs": sum(r["train_seconds"] for r in rm_reports(cfg, paths))}
    seconds.update({f"{kind} (one model)": json.loads((paths.cheap(kind) / rm_mod.EVAL_FILE).read_text())["train_seconds"]
                    for kind in cfg.cheap_ensembles})
    text += "\n".join(report_mod.cheap_section(curves, list(CHEAP_OBJECTIVES), train_seconds=seconds)) + "\n"
    text += report_mod.monitor_section(monitor_eval.summary(results, [], report_mod.FALL),
                                       monitor_section(cfg, paths, "single_rm"))
    (paths.out / "report.md").write_text(text)


def stage_vrcli(cfg: DemoConfig, paths: Paths) -> None:
    """VR-CLI on the synthetic next-chapter task; its section joins the summary."""
    demo_vrcli.run_stage(demo_vrcli.VRCLIDemoConfig(out=str(paths.out / "vrcli"), seed=cfg.seed, threads=cfg.threads))


RUNNERS: dict[str, Callable[[DemoConfig, Paths], None]] = {
    "data": stage_data, "sft": stage_sft, "pairs": stage_pairs, "rms": stage_rms, "bon": stage_bon, "rl": stage_rl,
    "gold": stage_gold, "report": stage_report, "vrcli": stage_vrcli,
}


def seed_everything(cfg: DemoConfig) -> None:
    """Fixed seeds and torch thread count, so the tables repeat on any machine with the same package versions."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


def check_settings(cfg: DemoConfig, given: Sequence[str]) -> None:
    """Refuse, in one line each, a given setting that no stage reads with these settings."""
    problems = []
    for name in cache.unread(STAGES, cfg, given, RUNNER_SETTINGS):
        conditions = [f"{stage.name} reads it only when {stage.reads_if[name][0]}"
                      for stage in STAGES if name in stage.reads_if]
        why = "; ".join(conditions) or "no stage reads it"
        problems.append(f"{name}: not read with these settings ({why})")
    if problems:
        raise ConfigError(problems, "demo")


def run_demo(cfg: DemoConfig) -> str:
    """Every stage in order, skipping those done with the same settings; returns the summary. `timings.json` keeps
    each stage's seconds from the run that made its outputs; `last_run.json` says what this run did."""
    seed_everything(cfg)
    paths = Paths(cfg.out)
    paths.out.mkdir(parents=True, exist_ok=True)
    keys = cache.stage_keys(STAGES, cfg)
    this_run: dict[str, Any] = {}
    with tqdm(STAGES, desc="demo", unit="stage") as bar:
        for stage in bar:
            bar.set_postfix_str(stage.name)
            key = keys[stage.name]
            if cache.is_done(paths.out, stage, key):
                this_run[stage.name] = "skipped (done with these settings)"
                continue
            if cache.prepare(paths.out, stage, key, cfg) == "restored":
                this_run[stage.name] = "restored from cache/"
                continue
            start = time.perf_counter()
            RUNNERS[stage.name](cfg, paths)
            seconds = time.perf_counter() - start
            cache.finish(paths.out, stage, key, cfg, seconds)
            this_run[stage.name] = round(seconds, 1)
    write_json(paths.out / "timings.json", cache.stage_seconds(paths.out, STAGES))
    write_json(paths.out / "last_run.json", this_run)
    summary = (paths.out / "report.md").read_text() + "\n" + (paths.out / "vrcli" / "summary.md").read_text()
    paths.summary.write_text(summary)
    return summary


def config_from_args(argv: Sequence[str] | None = None) -> tuple[DemoConfig, argparse.Namespace]:
    """The settings the command line asks for (`--full`'s preset under any `--set`), refused in one line each
    when a setting is unknown, contradicts another or is read by nothing."""
    args = build_parser().parse_args(argv)
    given = [item.split("=", 1)[0].strip() for item in args.set]
    preset = [f"{key}={json.dumps(value)}" for key, value in FULL.items() if key not in given] if args.full else []
    try:
        cfg = load_config(DemoConfig, None, [f"out={args.out}", *preset, *args.set])
        check_settings(cfg, given)
    except ConfigError as exc:
        sys.exit(f"trl_ext.demo: {exc}")
    return cfg, args


def main(argv: Sequence[str] | None = None) -> None:
    cfg, args = config_from_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.fresh and Path(cfg.out).exists():
        shutil.rmtree(cfg.out)
    start = time.perf_counter()
    table = run_demo(cfg)
    print(table)
    print("stage seconds (when each ran):", json.dumps(json.loads((Path(cfg.out) / "timings.json").read_text())))
    print("this run:", json.dumps(json.loads((Path(cfg.out) / "last_run.json").read_text())))
    print(f"demo finished in {time.perf_counter() - start:.0f} s; plots and tables in {cfg.out}/ "
          "(summary.md, timings.json, bon.png, ppo.png, overoptimisation.png and their .csv)")


if __name__ == "__main__":
    main()
