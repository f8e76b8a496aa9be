"""Training steps per second on CPU: our PPO (trl_ext.ppo) against TRL's GRPO, same tiny model, reward and sizes.

    python bench/ppo_vs_grpo.py [--steps 6] [--rounds 3] [--completions 16] [--max-new-tokens 16]

Every step of both samples `--completions` responses of `--max-new-tokens` tokens from the same tiny random
policy and scores them with the same tiny reward model. PPO is timed twice: with one update over the whole
batch (the like-for-like shape of GRPO's one optimizer step) and with its default 4 epochs x 2 mini-batches.
GRPO uses `--completions` per step as `num_generations` groups of 4. The variants alternate within each round
(interleaved, so background load hits all alike); each figure is the training loop's steps per second (model
loading excluded: TRL's `train_steps_per_second`, PPO's `eps` over its batch), the median over rounds, and
the ratios to GRPO are printed. CPU only; absolute numbers depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import tempfile
from pathlib import Path

import torch
import yaml

from reward_plugins.io import write_jsonl
from reward_plugins.tiny_models import build_causal_lm, build_reward_model, build_tokenizer
from setup_data import synthetic_task as st
from trl_ext import train
from trl_ext.run_config import TrainConfig


def time_ppo(base: dict, ppo_fields: dict, out: Path) -> float:
    """Steps/s of the training loop (its `eps` over the batch: model loading excluded, as in TRL's runtime)."""
    cfg = TrainConfig(**base, algorithm="ppo", output_dir=str(out), ppo=ppo_fields)
    train.run(cfg)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return last["eps"] / ppo_fields["batch_size"]


def time_grpo(base: dict, trl_fields: dict, out: Path) -> float:
    """Steps/s from TRL's own `train_steps_per_second` (the training loop, model loading excluded)."""
    cfg = TrainConfig(**base, algorithm="grpo", output_dir=str(out), trl=trl_fields)
    return float(train.build_trainer(cfg).train().metrics["train_steps_per_second"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--completions", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tok = build_tokenizer(tmp / "tok")
        policy = build_causal_lm(tmp / "policy", tok, seed=0)
        rm = build_reward_model(tmp / "rm", tok, seed=1)
        reward = tmp / "reward.yaml"
        reward.write_text(yaml.safe_dump({"on_error": "penalty", "error_penalty": -1.0,
                                          "reward": {"type": "reward_model", "path": str(rm), "device": "cpu"}}))
        prompts = tmp / "prompts.jsonl"
        write_jsonl(prompts, st.prompt_rows(st.sample_tasks(256, random.Random(0))))
        base = dict(policy=str(policy), reward_config=str(reward), train_data=str(prompts), eval_every=0, table_every=0,
                    resume=False, torch_threads=args.threads)
        n, tokens = args.completions, args.max_new_tokens
        variants = {
            "grpo": lambda out: time_grpo(base, {
                "max_steps": args.steps, "per_device_train_batch_size": n, "num_generations": 4,
                "max_completion_length": tokens, "learning_rate": 1e-5, "beta": 0.05, "save_strategy": "no",
                "report_to": [], "logging_steps": 1, "disable_tqdm": True}, out),
            "ppo_1x1": lambda out: time_ppo(base, {
                "max_steps": args.steps, "batch_size": n, "mini_batch_size": n, "ppo_epochs": 1,
                "max_new_tokens": tokens, "learning_rate": 1e-5, "sample_rows": 0}, out),
            "ppo_4x2": lambda out: time_ppo(base, {
                "max_steps": args.steps, "batch_size": n, "mini_batch_size": n // 2, "ppo_epochs": 4,
                "max_new_tokens": tokens, "learning_rate": 1e-5, "sample_rows": 0}, out),
        }
        results: dict[str, list[float]] = {name: [] for name in variants}
        for round_index in range(args.rounds):
            for name, run in variants.items():
                results[name].append(run(tmp / f"{name}_{round_index}"))
    medians = {name: statistics.median(values) for name, values in results.items()}
    print(f"steps/s (median of {args.rounds} interleaved rounds, {args.steps} steps each, training loop only; "
          f"{n} completions x {tokens} new tokens per step, tiny random Llama, 1 RM, CPU, {args.threads} thread)")
    for name, value in medians.items():
        print(f"  {name:8s} {value:6.2f} steps/s  ({value * n:6.1f} completions/s)  ratio to grpo {value / medians['grpo']:.2f}"
              f"  rounds: {', '.join(f'{v:.2f}' for v in results[name])}")


if __name__ == "__main__":
    main()
