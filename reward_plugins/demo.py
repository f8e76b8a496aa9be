"""A CPU smoke run of the reward plugins: `python -m reward_plugins.demo [--out runs/demo_rewards]`.

Builds tiny random models (a tokenizer, five reward models, a reference LM), writes a small rollout set,
computes VR-CLI baselines with the same code the reward uses, then scores the rollouts with every shipped
reward configuration and prints one table. Stages already done are skipped on a rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from .cli import help_first


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m reward_plugins.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo_rewards")
    parser.add_argument("--configs", default="configs/rewards")
    return parser


if __name__ == "__main__":
    help_first(build_parser)

from rich.console import Console
from rich.table import Table

from . import tiny_models
from .io import write_jsonl
from .pipeline import RewardPipeline, build_first_of_type
from .score import read_samples
from .vrcli import baseline_perplexities

CONFIGS = ("reward_model", "ensemble_uwo5", "multihead_uwo5", "lora_uwo5", "rm_eos_penalty", "weighted_sum", "vrcli")
STORIES = [
    ("A dragon wants to paint the sea.", "She opened the door, looked at the sea, and smiled at the morning light."),
    ("A ship is caught in a storm.", "Chapter two begins with a storm over the harbour and a ship in trouble."),
    ("A fox challenges a dog to a race.", "The quick brown fox jumps over the lazy dog."),
]
RESPONSES = [
    "I will think first. In summary: the dragon paints the sea at dawn.<eos>",
    "The hero leaves the village. In summary: a storm, a ship, a rescue.<eos>",
    "Detailed Plan: introduce the villain, reveal the secret, end on a cliffhanger.<eos>",
    "A rambling answer that never ends and has no plan",
]


def build_models(models_dir: Path) -> None:
    """Tokenizer, RMs rm_seed1..5, a 5-head RM, a 5-adapter LoRA ensemble and ref_lm, unless already built."""
    tokenizer_dir = models_dir / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").exists():
        tiny_models.build_tokenizer(tokenizer_dir)
    for seed in range(1, 6):
        if not (models_dir / f"rm_seed{seed}" / "config.json").exists():
            tiny_models.build_reward_model(models_dir / f"rm_seed{seed}", tokenizer_dir, seed=seed)
    if not (models_dir / "rm_multihead_seed1" / "heads.safetensors").exists():
        tiny_models.build_multihead_rm(models_dir / "rm_multihead_seed1", tokenizer_dir, k=5, seed=1)
    if not (models_dir / "rm_lora_seed1" / "lora_ensemble.json").exists():
        tiny_models.build_lora_ensemble(models_dir / "rm_lora_seed1", tokenizer_dir, k=5, seed=1)
    if not (models_dir / "ref_lm" / "config.json").exists():
        tiny_models.build_causal_lm(models_dir / "ref_lm", tokenizer_dir, seed=0)


def build_rollouts(path: Path, vrcli_config: Path) -> None:
    """Rollouts whose labels carry the VR-CLI gold text and its precomputed baseline perplexity."""
    if path.exists():
        return
    plugin = build_first_of_type(vrcli_config, "vrcli")
    labels = [{"id": f"story-{i}", "context": context, "gold": gold, "instruction": "Write the next chapter.",
               "plan_instruction": "Use the plan to write the next chapter."} for i, (context, gold) in enumerate(STORIES)]
    baselines = baseline_perplexities(plugin.scorer, plugin.config.prompt, labels)
    rows = []
    for label, baseline in zip(labels, baselines):
        label = {**label, "baseline_ppl": float(baseline), "baseline_temperature": plugin.scorer.temperature,
                 "baseline_fingerprint": plugin.fingerprint()}
        for response in RESPONSES:
            rows.append({"prompt": f"Plan the next chapter. {label['context']}\n", "response": response, "label": label})
    write_jsonl(path, rows)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out)
    models_dir = out / "models"
    os.environ["MODELS_DIR"] = str(models_dir)
    build_models(models_dir)
    rollouts = out / "rollouts.jsonl"
    build_rollouts(rollouts, Path(args.configs) / "vrcli.yaml")
    samples = read_samples(str(rollouts))

    table = Table(title=f"{len(samples)} rollouts scored by every shipped reward config (tiny random models)")
    table.add_column("#", justify="right")
    table.add_column("response", no_wrap=True, max_width=34)
    for name in CONFIGS:
        table.add_column(name, justify="right")
    columns, summaries = [], {}
    for name in CONFIGS:
        scored = RewardPipeline.from_yaml(Path(args.configs) / f"{name}.yaml").score(samples)
        columns.append(scored)
        summaries[name] = scored.logs
    for i, sample in enumerate(samples):
        cells = [f"{c.rewards[i]:+.3f}" + ("" if c.results[i].is_ok else " err") for c in columns]
        improvement = columns[-1].results[i].components.get("improvement")
        if improvement is not None:
            cells[-1] += f" (I={improvement:+.2f}%)"
        table.add_row(str(i), sample.response[:40], *cells)
    console = Console(width=160)
    console.print(table)
    totals = Table(title="batch logs: mean reward and error count per config")
    for column in ("config", "reward/mean", "reward/errors"):
        totals.add_column(column, justify="right")
    for name, logs in summaries.items():
        totals.add_row(name, f"{logs['reward/mean']:+.3f}", f"{logs['reward/errors']:.0f}")
    console.print(totals)
    (out / "summary.json").write_text(json.dumps(summaries, indent=2))
    console.print(f"logs per config in {out / 'summary.json'}; finished in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
