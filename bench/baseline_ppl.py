"""Benchmark: batched, length-sorted baseline perplexities (ours) vs one sample at a time (the published script).

Both sides score the same (context, gold) token ids built by `VRCLIPrompt.token_ids` from the shipped sample
stories, with a tiny random causal LM built on the spot. The one-at-a-time side does what the published
script does: one forward pass per datapoint with the context masked out of the labels, perplexity = exp(loss).
Prints tokens per second of each, their ratio, and the largest relative difference between their numbers.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from reward_plugins import tiny_models
from reward_plugins.logprobs import HFLogProbScorer
from reward_plugins.vrcli import VRCLIPrompt
from setup_data.compute_baseline_perplexity import Item, score_chunk
from setup_data.setup_rl_data import PromptOptions, build_row
from setup_data.validation import iter_json_lines

SAMPLE = Path(__file__).resolve().parents[1] / "setup_data" / "sample_data"


def sample_labels(rows: int) -> list[dict]:
    """Labels from the shipped sample stories, repeated with trimmed golds so lengths vary."""
    labels = []
    for split in ("train", "test", "val"):
        labels += [build_row(value, PromptOptions())[0]["label"] for _, _, value in iter_json_lines(SAMPLE / f"story_dataset_{split}.jsonl")]
    out = []
    for i in range(rows):
        label = dict(labels[i % len(labels)])
        words = label["gold"].split(" ")
        label["gold"] = " ".join(words[: max(8, len(words) - (i * 7) % 40)])
        out.append(label)
    return out


@torch.inference_mode()
def one_at_a_time(model, items: list[Item], device: torch.device) -> list[float]:
    """The published approach: a blocking forward pass per datapoint, full logits, loss over the gold tokens."""
    ppls = []
    for it in items:
        ids = torch.tensor([it.context + it.gold], device=device)
        labels = ids.clone()
        labels[0, : len(it.context)] = -100
        ppls.append(float(torch.exp(model(input_ids=ids, labels=labels).loss)))
    return ppls


def timed(fn) -> tuple[float, list[float]]:
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def interleaved(fns: list, repeats: int) -> list[tuple[float, list[float]]]:
    """Best time of each function, alternating them every round so a busy machine slows both alike."""
    best = [(float("inf"), [])] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            seconds, result = timed(fn)
            best[k] = min(best[k], (seconds, result), key=lambda pair: pair[0])
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per side")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--hidden_size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = tiny_models.build_tokenizer(Path(tmp) / "tok")
        lm_dir = tiny_models.build_causal_lm(Path(tmp) / "lm", tokenizer_dir, seed=0, hidden_size=args.hidden_size,
                                             intermediate_size=2 * args.hidden_size)
        scorer = HFLogProbScorer(str(lm_dir), batch_size=args.batch_size, device=args.device, dtype="float32")
        model = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32).to(scorer.device).eval()
        prompt = VRCLIPrompt()
        items = []
        for label in sample_labels(args.rows):
            context, gold = prompt.token_ids(scorer.tokenizer, label, None)
            items.append(Item("bench", 0, "", {"label": label}, context, gold))
        tokens = sum(it.length for it in items)
        score_chunk(scorer, items[:2]), one_at_a_time(model, items[:2], scorer.device)  # warm-up
        (ours_s, ours), (base_s, base) = interleaved(
            [lambda: score_chunk(scorer, items), lambda: one_at_a_time(model, items, scorer.device)], args.repeats)
    diff = float(np.max(np.abs(np.array(ours) - np.array(base)) / np.array(base)))
    print(f"device {scorer.device}, {args.rows} rows, {tokens} tokens, mean length {tokens / args.rows:.0f}, "
          f"batch_size {args.batch_size}, best of {args.repeats}")
    print(f"{'method':<28}{'seconds':>10}{'tokens/s':>14}")
    print(f"{'one at a time (published)':<28}{base_s:>10.3f}{tokens / base_s:>14.0f}")
    print(f"{'batched, length-sorted':<28}{ours_s:>10.3f}{tokens / ours_s:>14.0f}")
    print(f"speed-up: {base_s / ours_s:.2f}x (target >= 3x); max relative difference of the perplexities: {diff:.2e}")


if __name__ == "__main__":
    main()
