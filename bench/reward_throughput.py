"""Samples per second on CPU: batched scoring vs one sample per call, same models, side by side.

    python bench/reward_throughput.py [--samples 128] [--hidden 128] [--layers 4] [--batch-size 32]

Three rewards on small random models: one RM, a 5-member ensemble, and VR-CLI (the reference VR-CLI code
scores one sample per call). Each is timed batched (one `score` call over all samples, length-sorted
batches inside) and one sample per call, in the same process, and the ratio is printed. Absolute numbers
only mean something on a quiet machine; the ratio is the figure to report.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import torch

from reward_plugins import Sample
from reward_plugins.config import parse_pipeline_config
from reward_plugins.pipeline import build_plugin
from reward_plugins.tiny_models import DEFAULT_CORPUS, build_causal_lm, build_reward_model, build_tokenizer
from reward_plugins.vrcli import baseline_perplexities


def make_samples(count: int, seed: int = 0) -> list[Sample]:
    rng = random.Random(seed)
    samples = []
    for i in range(count):
        words = " ".join(rng.choice(DEFAULT_CORPUS) for _ in range(rng.randint(1, 6)))
        label = {"context": rng.choice(DEFAULT_CORPUS), "gold": " ".join(rng.choice(DEFAULT_CORPUS) for _ in range(3))}
        samples.append(Sample(prompt=f"Question {i}: ", response=f"{words} In summary: {words[:60]}", label=label))
    return samples


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(name: str, plugin, samples: list[Sample]) -> tuple[str, float, float, float]:
    plugin.score(samples[:4])  # warm-up
    batched = timed(lambda: plugin.score(samples))
    single = timed(lambda: [plugin.score([s]) for s in samples])
    return name, len(samples) / batched, len(samples) / single, single / batched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = dict(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = build_tokenizer(root / "tok")
        for seed in range(1, 6):
            build_reward_model(root / f"rm{seed}", tokenizer, seed=seed, **sizes)
        build_causal_lm(root / "lm", tokenizer, **sizes)
        member = {"batch_size": args.batch_size, "device": "cpu"}
        rm = build_plugin(parse_pipeline_config({"reward": {"type": "reward_model", "path": str(root / "rm1"), **member}}).reward)
        ensemble = build_plugin(parse_pipeline_config({"reward": {
            "type": "ensemble", "objective": "uwo", "path_template": str(root / "rm{seed}"), "seeds": [1, 2, 3, 4, 5],
            "member": member}}).reward)
        vrcli = build_plugin(parse_pipeline_config({"reward": {
            "type": "vrcli", "scorer": {"model": str(root / "lm"), "batch_size": args.batch_size, "device": "cpu"}}}).reward)

        samples = make_samples(args.samples)
        baselines = baseline_perplexities(vrcli.scorer, vrcli.config.prompt, [s.label for s in samples])
        vrcli_samples = [
            Sample(prompt=s.prompt, response=s.response, label={**s.label, "baseline_ppl": float(b)})
            for s, b in zip(samples, baselines)
        ]
        rows = [
            compare("reward_model (1 RM)", rm, samples),
            compare("ensemble (5 RMs, UWO)", ensemble, samples),
            compare("vrcli", vrcli, vrcli_samples),
        ]

    print(f"\n{args.samples} samples, Llama hidden={args.hidden} layers={args.layers}, batch_size={args.batch_size}, "
          f"torch threads={args.threads}")
    print(f"{'reward':<24}{'batched samples/s':>20}{'one-at-a-time samples/s':>26}{'ratio':>9}")
    for name, batched, single, ratio in rows:
        print(f"{name:<24}{batched:>20.1f}{single:>26.1f}{ratio:>8.1f}x")


if __name__ == "__main__":
    main()
