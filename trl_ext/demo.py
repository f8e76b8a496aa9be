"""The whole pipeline end to end on a CPU in minutes: `python -m trl_ext.demo` (what `make demo` runs).

Stages, each skipped when its output already exists (rerun to resume; `--fresh` starts over):
  data  synthetic instruction task with a rule-based gold reward (setup_data.synthetic_task)
  sft   tokenizer trained on the task text, tiny random policy, SFT through TRL
  rms   3 proxy RMs (seeds 1-3) on gold-labelled preference pairs with 25% label noise
  bon   best-of-n from the SFT policy with each RM and the mean / WCO / UWO ensembles (unbiased estimator)
  grpo  GRPO with one proxy RM and with the UWO ensemble (the shipped reward YAML files)
  gold  gold evaluation of both runs' eval files against KL
  report  plots and a summary table in runs/demo/, printed at the end
  vrcli   VR-CLI on a synthetic next-chapter task (trl_ext.demo_vrcli): held-out improvement curve and a row
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from evaluation import plots as plots_mod
from evaluation.bon_analysis import analyse
from evaluation.eval_files import list_eval_files, read_eval_file
from evaluation.run_ppo_gold_eval import add_gold_scores
from reward_plugins import tiny_models
from reward_plugins.io import read_jsonl, write_json
from reward_plugins.reward_model import RewardModelConfig, RewardModelScorer
from reward_plugins.types import Sample
from setup_data import synthetic_task as st

from . import demo_vrcli
from . import sft as sft_mod
from . import train as train_mod
from . import train_rm as rm_mod
from .config import load_config
from .generation import sample

REPO = Path(__file__).resolve().parent.parent
SINGLE_RM_REWARD = REPO / "configs" / "rewards" / "reward_model.yaml"
UWO_REWARD = REPO / "configs" / "train" / "demo_reward_uwo3.yaml"
GOLD_NAME = "synthetic_task.gold_reward"


class DemoConfig(BaseModel):
    """Sizes of every stage; the defaults fit in a few minutes on 2 CPU cores."""

    model_config = ConfigDict(extra="forbid")

    out: str = "runs/demo"
    seed: int = 0
    threads: int = Field(default=1, gt=0)
    n_sft: int = 2000
    n_pref: int = 10000
    n_rl: int = 512
    n_eval: int = 32
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
    bon_prompts: int = 64
    bon_n: int = 32
    max_new_tokens: int = 24
    grpo_steps: int = 300
    grpo_batch: int = 32
    grpo_generations: int = 8
    grpo_lr: float = 5e-4
    grpo_beta: float = 0.05
    eval_every: int = 30
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
        self.bon = self.out / "bon"
        self.runs = self.out / "runs"
        self.summary = self.out / "summary.md"

    def rm(self, seed: int) -> Path:
        return self.models / f"rm_seed{seed}"

    def run(self, name: str) -> Path:
        return self.runs / name


def stage_data(cfg: DemoConfig, paths: Paths) -> None:
    """Synthetic task files: SFT rows, noisy preference pairs, clean held-out pairs, RL and eval prompts."""
    if (paths.data / "eval_prompts.jsonl").exists():
        return
    st.write_task_files(paths.data, cfg.seed, cfg.n_sft, cfg.n_pref, cfg.n_rl, cfg.n_eval, cfg.label_noise,
                         cfg.pref_min_gap)


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


def stage_rms(cfg: DemoConfig, paths: Paths) -> list[dict[str, Any]]:
    """Proxy RMs from the SFT policy, one per seed, on the noisy pairs; held-out accuracy on clean pairs."""
    reports = []
    for seed in tqdm(cfg.rm_seeds, desc="proxy RMs", leave=False):
        eval_file = paths.rm(seed) / rm_mod.EVAL_FILE
        if eval_file.exists():
            reports.append(read_jsonl_obj(eval_file))
            continue
        run_cfg = rm_mod.RMRunConfig(
            base=str(paths.policy), train_data=str(paths.data / "prefs.jsonl"),
            test_data=str(paths.data / "prefs_test.jsonl"), output_root=str(paths.models), name="rm", seed=seed,
            max_length=128, torch_threads=cfg.threads,
            trl={"num_train_epochs": cfg.rm_epochs, "per_device_train_batch_size": 32, "learning_rate": cfg.rm_lr,
                 "logging_steps": 20, "report_to": []},
        )
        reports.append(rm_mod.train_rm(run_cfg))
    return reports


def read_jsonl_obj(path: Path) -> Any:
    import json

    return json.loads(path.read_text())


def stage_bon(cfg: DemoConfig, paths: Paths) -> dict[str, list[dict[str, float]]]:
    """N samples per prompt from the SFT policy, scored by every RM and by gold; unbiased best-of-n curves."""
    curves_file = paths.bon / "curves.json"
    if curves_file.exists():
        return read_jsonl_obj(curves_file)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = read_jsonl(paths.data / "prompts.jsonl")[: cfg.bon_prompts]
    tokenizer = AutoTokenizer.from_pretrained(paths.policy)
    model = AutoModelForCausalLM.from_pretrained(paths.policy).eval()
    prompts = [r["prompt"] for r in rows for _ in range(cfg.bon_n)]
    gens = sample(model, tokenizer, prompts, cfg.max_new_tokens, 1.0, batch_size=256, seed=cfg.seed)
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


def grpo_config(cfg: DemoConfig, paths: Paths, name: str, reward_config: Path) -> train_mod.TrainConfig:
    return train_mod.TrainConfig(
        algorithm="grpo", policy=str(paths.policy), reward_config=str(reward_config),
        train_data=str(paths.data / "prompts.jsonl"), eval_data=str(paths.data / "eval_prompts.jsonl"),
        output_dir=str(paths.run(name)), eval_every=cfg.eval_every, table_every=cfg.eval_every, seed=cfg.seed,
        torch_threads=cfg.threads,
        trl={"max_steps": cfg.grpo_steps, "per_device_train_batch_size": cfg.grpo_batch,
             "num_generations": cfg.grpo_generations, "max_completion_length": cfg.max_new_tokens,
             "learning_rate": cfg.grpo_lr, "beta": cfg.grpo_beta, "loss_type": "grpo", "logging_steps": 5,
             "save_steps": cfg.grpo_steps, "save_only_model": True, "disable_tqdm": False},
    )


def grpo_runs(paths: Paths) -> dict[str, Path]:
    return {"grpo_rm_seed1": SINGLE_RM_REWARD, "grpo_uwo3": UWO_REWARD}


def stage_grpo(cfg: DemoConfig, paths: Paths) -> None:
    """GRPO with one proxy RM and with the UWO ensemble, through the same reward YAML files as OpenRLHF."""
    os.environ["MODELS_DIR"] = str(paths.models)
    for name, reward in tqdm(grpo_runs(paths).items(), desc="GRPO runs", leave=False):
        if (paths.run(name) / "final" / "model.safetensors").exists():
            continue
        train_mod.run(grpo_config(cfg, paths, name, reward))


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
    for name in grpo_runs(paths):
        add_gold_scores(paths.run(name) / "eval", _gold_scorer, GOLD_NAME, lambda p, a: p + a, "prompt+answer")


def run_curve(eval_dir: Path) -> list[dict[str, float]]:
    """Per eval step: KL, mean proxy and mean gold."""
    points = []
    for path in list_eval_files(eval_dir):
        f = read_eval_file(path)
        proxy = [r.proxy_score for r in f.rows if r.proxy_score is not None]
        gold = [r.gold_score for r in f.rows if r.gold_score is not None]
        points.append({"step": f.step, "kl": float(f.kl or 0.0), "proxy": float(np.mean(proxy)) if proxy else float("nan"),
                       "gold": float(np.mean(gold)) if gold else float("nan")})
    return points


def summary_table(rm_reports: list[dict], curves: dict[str, list[dict]], runs: dict[str, list[dict]]) -> str:
    lines = ["## Proxy reward models (held-out accuracy on clean pairs)", "", "| RM | accuracy | pairs |", "|---|---|---|"]
    lines += [f"| rm_seed{r['seed']} | {r.get('accuracy', float('nan')):.3f} | {r.get('test_pairs', 0)} |" for r in rm_reports]
    lines += ["", "## Best-of-n from the SFT policy (unbiased estimator; KL_bon is an upper bound)", "",
              "| proxy | n | KL_bon | proxy n=1 -> n | gold n=1 -> n | peak gold (n) |", "|---|---|---|---|---|---|"]
    for name, curve in curves.items():
        first, last = curve[0], curve[-1]
        peak = max(curve, key=lambda p: p["gold_score"])
        lines.append(f"| {name} | {last['n']} | {last['kl_bon']:.2f} | {first['proxy_score']:.3f} -> {last['proxy_score']:.3f} | "
                     f"{first['gold_score']:.3f} -> {last['gold_score']:.3f} | {peak['gold_score']:.3f} ({peak['n']}) |")
    lines += ["", "## GRPO (eval prompts; KL = mean sequence KL to the SFT policy)", "",
              "| run | steps | final KL | proxy start -> end | gold start -> end | peak gold (step) |", "|---|---|---|---|---|---|"]
    for name, points in runs.items():
        if not points:
            continue
        a, b = points[0], points[-1]
        peak = max(points, key=lambda p: p["gold"])
        lines.append(f"| {name} | {b['step']} | {b['kl']:.2f} | {a['proxy']:.3f} -> {b['proxy']:.3f} | "
                     f"{a['gold']:.3f} -> {b['gold']:.3f} | {peak['gold']:.3f} ({peak['step']}) |")
    return "\n".join(lines) + "\n"


def bon_run_dirs(curves: dict[str, list[dict]], bon_dir: Path) -> None:
    """Each best-of-n curve as `bon_sampled_results.json` in the folder layout `evaluation.plots` reads
    (`seed{S}` folders are averaged into one single-RM curve, `ensemble_*` folders are curves of their own)."""
    for name, curve in curves.items():
        write_json(bon_dir / name.removeprefix("rm_") / plots_mod.BON_FILE, curve)


def stage_report(cfg: DemoConfig, paths: Paths, rm_reports: list[dict], curves: dict) -> str:
    """Plots with `evaluation.plots` (best-of-n, GRPO, both overlaid; each PNG with its CSV) and the summary table."""
    runs = {name: run_curve(paths.run(name) / "eval") for name in grpo_runs(paths)}
    bon_run_dirs(curves, paths.bon)
    rl_dirs = [paths.run(name) / "eval" for name in grpo_runs(paths)]
    plots_mod.plots([paths.bon], paths.out / "bon")
    plots_mod.plots(rl_dirs, paths.out / "grpo")
    plots_mod.plots([paths.bon, *rl_dirs], paths.out / "overoptimisation")
    table = summary_table(rm_reports, curves, runs)
    paths.summary.write_text(table)
    return table


def run_demo(cfg: DemoConfig) -> str:
    """Every stage in order (skipping finished ones); returns the summary table."""
    torch.set_num_threads(cfg.threads)
    paths = Paths(cfg.out)
    paths.out.mkdir(parents=True, exist_ok=True)
    stages = ["data", "sft", "rms", "bon", "grpo", "gold", "report", "vrcli"]
    timings: dict[str, float] = {}
    rm_reports: list[dict] = []
    curves: dict = {}
    table = ""
    with tqdm(stages, desc="demo", unit="stage") as bar:
        for stage in bar:
            bar.set_postfix_str(stage)
            start = time.perf_counter()
            if stage == "data":
                stage_data(cfg, paths)
            elif stage == "sft":
                stage_sft(cfg, paths)
            elif stage == "rms":
                rm_reports = stage_rms(cfg, paths)
            elif stage == "bon":
                curves = stage_bon(cfg, paths)
            elif stage == "grpo":
                stage_grpo(cfg, paths)
            elif stage == "gold":
                stage_gold(cfg, paths)
            elif stage == "vrcli":
                vrcli_cfg = demo_vrcli.VRCLIDemoConfig(out=str(paths.out / "vrcli"), seed=cfg.seed, threads=cfg.threads)
                table += "\n" + demo_vrcli.run_stage(vrcli_cfg)
                paths.summary.write_text(table)
            else:
                table = stage_report(cfg, paths, rm_reports, curves)
            timings[stage] = round(time.perf_counter() - start, 1)
    write_json(paths.out / "timings.json", timings)
    return table


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--fresh", action="store_true", help="delete OUT first and run every stage")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a size, e.g. grpo_steps=20")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    cfg = load_config(DemoConfig, None, [f"out={args.out}", *args.set])
    if args.fresh and Path(cfg.out).exists():
        shutil.rmtree(cfg.out)
    start = time.perf_counter()
    table = run_demo(cfg)
    print(table)
    print(f"demo finished in {time.perf_counter() - start:.0f} s; plots and tables in {cfg.out}/ "
          "(summary.md, bon.png, grpo.png, overoptimisation.png and their .csv)")


if __name__ == "__main__":
    main()
