"""The whole pipeline end to end on a CPU in minutes: `python -m trl_ext.demo` (what `make demo` runs).

Stages, each skipped when its output already exists (rerun to resume; `--fresh` starts over):
  data  synthetic instruction task with a rule-based gold reward (setup_data.synthetic_task)
  sft   tokenizer trained on the task text, tiny random policy, SFT through TRL
  rms   3 proxy RMs (seeds 1-3) on gold-labelled preference pairs with 25% label noise
  bon   best-of-n from the SFT policy on the eval prompts with each RM and the mean / WCO / UWO ensembles
  rl    PPO (Coste et al.'s algorithm) at a small KL penalty with one proxy RM, the WCO and the UWO ensemble,
        each for every seed in `rl_seeds` (the shipped reward YAML files)
  gold  gold evaluation of every run's eval files
  report  plots (mean over seeds with the spread, points in KL order) and a summary table, printed at the end
  vrcli  VR-CLI on a synthetic next-chapter task (trl_ext.demo_vrcli): held-out improvement curve and a row

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
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a size, e.g. rl_steps=20")
    return parser


if __name__ == "__main__":
    help_first(build_parser)

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from evaluation import plots as plots_mod
from evaluation.bon_analysis import analyse
from evaluation.run_ppo_gold_eval import add_gold_scores
from reward_plugins import tiny_models
from reward_plugins.io import read_jsonl, write_json, write_jsonl
from reward_plugins.reward_model import RewardModelConfig, RewardModelScorer
from reward_plugins.types import Sample
from setup_data import synthetic_task as st

from . import demo_vrcli
from . import sft as sft_mod
from . import train as train_mod
from . import train_rm as rm_mod
from .config import load_config
from .generation import sample
from .run_config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
SINGLE_RM_REWARD = REPO / "configs" / "rewards" / "reward_model.yaml"
UWO_REWARD = REPO / "configs" / "train" / "demo_reward_uwo3.yaml"
WCO_REWARD = REPO / "configs" / "train" / "demo_reward_wco3.yaml"
RL_OBJECTIVES = ("single_rm", "wco", "uwo")
GOLD_NAME = "synthetic_task.gold_reward"


class DemoConfig(BaseModel):
    """Sizes of every stage; the defaults fit in a few minutes on 2 CPU cores."""

    model_config = ConfigDict(extra="forbid")

    out: str = "runs/demo"
    seed: int = 0
    threads: int = Field(default=1, gt=0)
    workers: int = Field(default=2, gt=0)  # independent runs (proxy RMs, PPO runs) trained side by side, one process each
    n_sft: int = 2000
    n_pref: int = 10000
    n_rl: int = 512
    n_eval: int = 64
    label_noise: float = Field(default=0.25, ge=0, le=0.5)
    pref_min_gap: float = Field(default=0.0, ge=0)
    vocab_size: int = 512  # enough merges that every task word is one token (300 spelt words in bytes)
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    sft_epochs: float = 2.0
    sft_lr: float = 3e-3
    rm_epochs: float = 6.0
    rm_lr: float = 2e-3
    rm_seeds: list[int] = [1, 2, 3]
    bon_n: int = 32
    max_new_tokens: int = 24
    temperature: float = 1.0  # best-of-n, RL rollouts and RL eval all sample at this temperature
    rl_seeds: list[int] = [1, 2, 3]  # single-RM seed i optimises RM i, so its curve averages over all the RMs
    rl_steps: int = 120
    rl_batch: int = 32
    rl_mini_batch: int = 16
    rl_epochs: int = 4
    rl_lr: float = 1e-4
    rl_kl_coef: float = 0.02
    rl_vf_coef: float = 0.1
    rl_value_init: Literal["reward_model", "policy"] = "reward_model"  # reward_model: the run's first proxy RM
    missing_eos_penalty: float | None = 1.0
    rl_eval_samples: int = 4  # completions per eval prompt at each RL eval step
    eval_every: int = 20
    uwo_weight_bon: float = 0.5


class Paths:
    """Where every stage writes, under `out`."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.data = self.out / "data"
        self.models = self.out / "models"
        self.tokenizer = self.models / "tokenizer"
        self.base = self.models / "base"
        self.sft = self.models / "sft"
        self.policy = self.sft / "final"
        self.eval_prompts = self.data / "eval_prompts_rl.jsonl"
        self.bon = self.out / "bon"
        self.runs = self.out / "rl"
        self.summary = self.out / "summary.md"

    def rm(self, seed: int) -> Path:
        return self.models / f"rm_seed{seed}"

    def rl(self, objective: str, seed: int) -> Path:
        return self.runs / objective / f"seed{seed}"


def stage_data(cfg: DemoConfig, paths: Paths) -> None:
    """Synthetic task files: SFT rows, noisy preference pairs, clean held-out pairs, RL and eval prompts
    (and the eval prompts repeated `rl_eval_samples` times, what the RL eval files sample)."""
    if paths.eval_prompts.exists():
        return
    files = st.write_task_files(paths.data, cfg.seed, cfg.n_sft, cfg.n_pref, cfg.n_rl, cfg.n_eval, cfg.label_noise,
                                cfg.pref_min_gap)
    write_jsonl(paths.eval_prompts, [row for row in read_jsonl(files["eval_prompts"]) for _ in range(cfg.rl_eval_samples)])


def stage_sft(cfg: DemoConfig, paths: Paths) -> None:
    """A tokenizer trained on the task text, a tiny random policy, then SFT on the task."""
    if (paths.policy / "model.safetensors").exists():
        return
    tiny_models.build_tokenizer(paths.tokenizer, st.tokenizer_corpus(random.Random(cfg.seed)), vocab_size=cfg.vocab_size)
    tiny_models.build_causal_lm(paths.base, paths.tokenizer, seed=cfg.seed, hidden_size=cfg.hidden_size,
                                intermediate_size=2 * cfg.hidden_size, max_position_embeddings=128,
                                num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads // 2)
    run_cfg = sft_mod.SFTRunConfig(
        model=str(paths.base), train_data=str(paths.data / "sft.jsonl"), output_dir=str(paths.sft), seed=cfg.seed,
        torch_threads=cfg.threads,
        trl={"num_train_epochs": cfg.sft_epochs, "per_device_train_batch_size": 32, "learning_rate": cfg.sft_lr,
             "lr_scheduler_type": "cosine", "warmup_steps": 5, "logging_steps": 20, "report_to": []},
    )
    sft_mod.run(run_cfg)


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


def train_proxy_rm(cfg: DemoConfig, paths: Paths, seed: int) -> dict[str, Any]:
    """One proxy RM (resumable: a finished one is read back)."""
    eval_file = paths.rm(seed) / rm_mod.EVAL_FILE
    if eval_file.exists():
        return read_jsonl_obj(eval_file)
    run_cfg = rm_mod.RMRunConfig(
        base=str(paths.policy), train_data=str(paths.data / "prefs.jsonl"),
        test_data=str(paths.data / "prefs_test.jsonl"), output_root=str(paths.models), name="rm", seed=seed,
        max_length=128, torch_threads=cfg.threads,
        trl={"num_train_epochs": cfg.rm_epochs, "per_device_train_batch_size": 32, "learning_rate": cfg.rm_lr,
             "logging_steps": 20, "report_to": [], "disable_tqdm": cfg.workers > 1},
    )
    return rm_mod.train_rm(run_cfg)


def stage_rms(cfg: DemoConfig, paths: Paths) -> list[dict[str, Any]]:
    """Proxy RMs from the SFT policy, one per seed, on the noisy pairs; held-out accuracy on clean pairs."""
    return run_side_by_side(train_proxy_rm, [(cfg, paths, seed) for seed in cfg.rm_seeds], cfg, "proxy RMs")


def read_jsonl_obj(path: Path) -> Any:
    return json.loads(path.read_text())


def stage_bon(cfg: DemoConfig, paths: Paths) -> dict[str, list[dict[str, float]]]:
    """N samples per eval prompt from the SFT policy, scored by every RM and by gold; unbiased best-of-n curves."""
    curves_file = paths.bon / "curves.json"
    if curves_file.exists():
        return read_jsonl_obj(curves_file)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = read_jsonl(paths.data / "eval_prompts.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(paths.policy)
    model = AutoModelForCausalLM.from_pretrained(paths.policy).eval()
    prompts = [r["prompt"] for r in rows for _ in range(cfg.bon_n)]
    # generation.sample's default batching, as the RL eval files use, so n=1 and RL step 0 sample alike
    gens = sample(model, tokenizer, prompts, cfg.max_new_tokens, cfg.temperature, seed=cfg.seed)
    labels = [r["label"] for r in rows for _ in range(cfg.bon_n)]
    shape = (len(rows), cfg.bon_n)
    gold = st.gold_rewards(gens.texts, labels).reshape(shape)
    members = {}
    for seed in tqdm(cfg.rm_seeds, desc="best-of-n scoring", leave=False):
        scorer = RewardModelScorer(RewardModelConfig(path=str(paths.rm(seed)), max_length=128, batch_size=256, device="cpu"))
        texts = [scorer.format_sample(Sample(p, t)) for p, t in zip(prompts, gens.texts)]
        members[f"rm_seed{seed}"] = scorer.score_texts(texts)[0].reshape(shape)
    ns = [n for n in (1, 2, 4, 8, 16, 32, 64, 128) if n <= cfg.bon_n]
    curves = analyse(members, gold, ns, objectives=("mean", "wco", "uwo"), uwo_weights=(cfg.uwo_weight_bon,))
    write_json(curves_file, curves)
    return curves


def rl_config(cfg: DemoConfig, paths: Paths, objective: str, seed: int) -> TrainConfig:
    """PPO with the objective's reward file (Coste et al.'s algorithm) at a small fixed KL penalty."""
    return TrainConfig(
        algorithm="ppo", policy=str(paths.policy), reward_config=str(rl_reward(cfg, paths, objective, seed)),
        train_data=str(paths.data / "prompts.jsonl"), eval_data=str(paths.eval_prompts),
        output_dir=str(paths.rl(objective, seed)), eval_every=cfg.eval_every, table_every=cfg.rl_steps, seed=seed,
        torch_threads=cfg.threads,
        ppo={"max_steps": cfg.rl_steps, "batch_size": cfg.rl_batch, "mini_batch_size": cfg.rl_mini_batch,
             "ppo_epochs": cfg.rl_epochs, "learning_rate": cfg.rl_lr, "max_new_tokens": cfg.max_new_tokens,
             "temperature": cfg.temperature, "kl_coef": cfg.rl_kl_coef, "vf_coef": cfg.rl_vf_coef,
             "missing_eos_penalty": cfg.missing_eos_penalty, "logging_steps": 5, "sample_rows": 0,
             "value_init": cfg.rl_value_init,
             "value_model": str(paths.rm(run_rm_seeds(cfg, objective, seed)[0])) if cfg.rl_value_init == "reward_model" else None},
    )


def run_rm_seeds(cfg: DemoConfig, objective: str, seed: int) -> list[int]:
    """The proxy RMs one run optimises: all of them for an ensemble, the i-th for the i-th seed of a single-RM run."""
    return [cfg.rm_seeds[cfg.rl_seeds.index(seed) % len(cfg.rm_seeds)]] if objective == "single_rm" else list(cfg.rm_seeds)


def rl_reward(cfg: DemoConfig, paths: Paths, objective: str, seed: int) -> Path:
    """The reward file of one run: the shipped ensemble files, or the shipped single-RM file pointed at one proxy
    RM per seed (seed s uses the s-th RM), so the single-RM curve averages over RMs as in Coste et al."""
    if objective != "single_rm":
        return {"wco": WCO_REWARD, "uwo": UWO_REWARD}[objective]
    rm_seed = run_rm_seeds(cfg, objective, seed)[0]
    spec = yaml.safe_load(SINGLE_RM_REWARD.read_text())
    spec["reward"]["path"] = str(paths.rm(rm_seed))
    out = paths.out / "rewards" / f"single_rm_seed{seed}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def rl_runs(cfg: DemoConfig, paths: Paths) -> dict[str, list[Path]]:
    """Each objective's run folders, one per seed."""
    return {objective: [paths.rl(objective, seed) for seed in cfg.rl_seeds] for objective in RL_OBJECTIVES}


def train_rl_run(config: TrainConfig) -> None:
    """One PPO run (skipped when its final model exists)."""
    if not (Path(config.output_dir) / "final" / "model.safetensors").exists():
        train_mod.run(config)


def stage_rl(cfg: DemoConfig, paths: Paths) -> None:
    """PPO with one proxy RM and with the WCO and UWO ensembles, each for every seed (shipped reward YAML files)."""
    os.environ["MODELS_DIR"] = str(paths.models)  # the shipped reward files' ${MODELS_DIR}; workers inherit it
    jobs = [(rl_config(cfg, paths, objective, seed),) for objective in RL_OBJECTIVES for seed in cfg.rl_seeds]
    run_side_by_side(train_rl_run, jobs, cfg, "PPO runs")


def _gold_scorer() -> Callable[[Sequence[str]], np.ndarray]:
    """Gold scores of texts `prompt + answer`; the synthetic prompt always ends with 'Response:'."""

    def score(texts: Sequence[str]) -> np.ndarray:
        values = []
        for text in texts:
            prompt, sep, answer = text.partition("\nResponse:")
            if not sep:
                raise ValueError(f"not a synthetic-task text: {text[:80]!r}")
            task = st.task_from_prompt(prompt + sep)
            values.append(st.gold_reward(answer, task.k, task.category))
        return np.array(values)

    return score


def stage_gold(cfg: DemoConfig, paths: Paths) -> None:
    """Gold scores for every row of every eval file (resumable: already scored rows are kept)."""
    for run_dirs in rl_runs(cfg, paths).values():
        for run_dir in run_dirs:
            add_gold_scores(run_dir / "eval", _gold_scorer, GOLD_NAME, lambda p, a: p + a, "prompt+answer")


def gold_at_kl(curve: plots_mod.Curve, kl: float) -> float:
    """Gold interpolated at `kl` along the curve's points sorted by KL."""
    order = np.argsort(curve.kl, kind="stable")
    return float(np.interp(kl, curve.kl[order], curve.gold[order]))


def rl_summary(cfg: DemoConfig, paths: Paths) -> tuple[dict[str, plots_mod.Curve], float, dict[str, list[float]]]:
    """Seed-averaged RL curves per objective, the largest KL every objective reaches, and each seed's gold there."""
    runs = rl_runs(cfg, paths)
    curves = {obj: plots_mod.rl_curve_from_dirs(obj, obj, [d / "eval" for d in dirs]) for obj, dirs in runs.items()}
    matched = min(float(c.kl.max()) for c in curves.values())
    per_seed = {obj: [gold_at_kl(plots_mod.rl_curve(obj, d.name, d / "eval"), matched) for d in dirs]
                for obj, dirs in runs.items()}
    return curves, matched, per_seed


def summary_table(rm_reports: list[dict], bon: dict[str, list[dict]], rl: dict[str, plots_mod.Curve], matched_kl: float,
                  per_seed: dict[str, list[float]]) -> str:
    lines = ["## Proxy reward models (held-out accuracy on clean pairs)", "", "| RM | accuracy | pairs |", "|---|---|---|"]
    lines += [f"| rm_seed{r['seed']} | {r.get('accuracy', float('nan')):.3f} | {r.get('test_pairs', 0)} |" for r in rm_reports]
    lines += ["", "## Best-of-n from the SFT policy on the eval prompts (unbiased estimator; KL_bon is an upper bound)", "",
              "| proxy | n | KL_bon | proxy n=1 -> n | gold n=1 -> n | peak gold (n) |", "|---|---|---|---|---|---|"]
    for name, curve in bon.items():
        first, last = curve[0], curve[-1]
        peak = max(curve, key=lambda p: p["gold_score"])
        lines.append(f"| {name} | {last['n']} | {last['kl_bon']:.2f} | {first['proxy_score']:.3f} -> {last['proxy_score']:.3f} | "
                     f"{first['gold_score']:.3f} -> {last['gold_score']:.3f} | {peak['gold_score']:.3f} ({peak['n']}) |")
    seeds = len(next(iter(per_seed.values()), []))
    lines += ["", f"## PPO, mean of {seeds} seeds (eval prompts; KL = mean sequence KL to the SFT policy, k1)", "",
              "| objective | steps | final KL | proxy start -> end | gold start -> end | peak gold (step) | "
              f"gold at KL {matched_kl:.2f} (mean +- sd) |", "|---|---|---|---|---|---|---|"]
    for name, c in rl.items():
        peak = int(np.nanargmax(c.gold))
        golds = per_seed[name]
        lines.append(f"| {name} | {int(c.x[-1])} | {c.kl[-1]:.2f} | {c.proxy[0]:.3f} -> {c.proxy[-1]:.3f} | "
                     f"{c.gold[0]:.3f} -> {c.gold[-1]:.3f} | {c.gold[peak]:.3f} ({int(c.x[peak])}) | "
                     f"{np.mean(golds):.3f} +- {np.std(golds):.3f} |")
    matched = ", ".join(f"{name} {np.mean(golds):.3f}" for name, golds in per_seed.items())
    start = next(iter(bon.values()))[0]["gold_score"] if bon else float("nan")
    rl_start = np.mean([c.gold[0] for c in rl.values()]) if rl else float("nan")
    lines += ["", f"**Gold at the largest KL every objective reaches ({matched_kl:.2f} nats):** {matched}.  ",
              f"**Same start:** best-of-n n=1 gold {start:.3f}, PPO step-0 gold {rl_start:.3f} (same prompts, SFT policy and "
              "sampling settings; different random draws)."]
    return "\n".join(lines) + "\n"


def bon_run_dirs(curves: dict[str, list[dict]], bon_dir: Path) -> None:
    """Each best-of-n curve as `bon_sampled_results.json` in the folder layout `evaluation.plots` reads
    (`seed{S}` folders are averaged into one single-RM curve, `ensemble_*` folders are curves of their own)."""
    for name, curve in curves.items():
        write_json(bon_dir / name.removeprefix("rm_") / plots_mod.BON_FILE, curve)


def stage_report(cfg: DemoConfig, paths: Paths, rm_reports: list[dict], bon: dict) -> str:
    """Plots with `evaluation.plots` (best-of-n, PPO, both overlaid; each PNG with its CSV) and the summary table."""
    bon_run_dirs(bon, paths.bon)
    rl_dirs = [paths.runs / objective for objective in RL_OBJECTIVES]
    plots_mod.plots([paths.bon], paths.out / "bon")
    plots_mod.plots(rl_dirs, paths.out / "ppo")
    plots_mod.plots([paths.bon, *rl_dirs], paths.out / "overoptimisation")
    table = summary_table(rm_reports, bon, *rl_summary(cfg, paths))
    paths.summary.write_text(table)
    return table


def stage_vrcli(cfg: DemoConfig, paths: Paths, report: str) -> str:
    """VR-CLI on the synthetic next-chapter task; its row joins the summary table."""
    vrcli_cfg = demo_vrcli.VRCLIDemoConfig(out=str(paths.out / "vrcli"), seed=cfg.seed, threads=cfg.threads)
    table = report + "\n" + demo_vrcli.run_stage(vrcli_cfg)
    paths.summary.write_text(table)
    return table


STAGES: dict[str, Callable[[DemoConfig, Paths, dict[str, Any]], Any]] = {
    "data": lambda cfg, paths, done: stage_data(cfg, paths),
    "sft": lambda cfg, paths, done: stage_sft(cfg, paths),
    "rms": lambda cfg, paths, done: stage_rms(cfg, paths),
    "bon": lambda cfg, paths, done: stage_bon(cfg, paths),
    "rl": lambda cfg, paths, done: stage_rl(cfg, paths),
    "gold": lambda cfg, paths, done: stage_gold(cfg, paths),
    "report": lambda cfg, paths, done: stage_report(cfg, paths, done["rms"], done["bon"]),
    "vrcli": lambda cfg, paths, done: stage_vrcli(cfg, paths, done["report"]),
}
"""The demo's stages in order; each gets the config, the paths and the earlier stages' results by name."""


def seed_everything(cfg: DemoConfig) -> None:
    """Fixed seeds and torch thread count, so the tables repeat on any machine with the same package versions."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


def run_demo(cfg: DemoConfig) -> str:
    """Every stage in order (skipping finished ones); returns the summary table. Writes each stage's seconds."""
    seed_everything(cfg)
    paths = Paths(cfg.out)
    paths.out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    done: dict[str, Any] = {}
    with tqdm(list(STAGES), desc="demo", unit="stage") as bar:
        for stage in bar:
            bar.set_postfix_str(stage)
            start = time.perf_counter()
            done[stage] = STAGES[stage](cfg, paths, done)
            timings[stage] = round(time.perf_counter() - start, 1)
    write_json(paths.out / "timings.json", timings)
    return done["vrcli"]


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    cfg = load_config(DemoConfig, None, [f"out={args.out}", *args.set])
    if args.fresh and Path(cfg.out).exists():
        shutil.rmtree(cfg.out)
    start = time.perf_counter()
    table = run_demo(cfg)
    print(table)
    print("stage seconds:", json.dumps(json.loads((Path(cfg.out) / "timings.json").read_text())))
    print(f"demo finished in {time.perf_counter() - start:.0f} s; plots and tables in {cfg.out}/ "
          "(summary.md, timings.json, bon.png, ppo.png, overoptimisation.png and their .csv)")


if __name__ == "__main__":
    main()
