"""Eval files for saved policy checkpoints on held-out prompts, so any run can be evaluated after training.

    python -m evaluation.eval_checkpoints --checkpoints ckpt/global_step100 ckpt/global_step200 \
        --initial-policy M --prompts heldout.jsonl --reward-config configs/rewards/ensemble_uwo5.yaml -o EVAL_DIR

For each checkpoint (step = the last number in its folder name; the initial policy is step 0 unless
`--no-initial`): sample answers with `generate`, score them with the reward pipeline, and estimate each
answer's KL to the initial policy as `sum_t log pi(y_t) - log pi_init(y_t)` over the answer tokens (k1,
both at the sampling temperature, so the estimate is unbiased for `KL(pi_T || pi_init_T)` when top-p/top-k
are off). Writes `EVAL_DIR/eval_step{step:06d}.json` (`evaluation.eval_files`); finished steps are skipped.
Prompts: JSONL or Parquet rows with `prompt` (text, or chat messages rendered with the chat template) or
`instruction` [+ `input`], and an optional `label` passed to the reward.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reward_plugins.cli import help_first


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluation.eval_checkpoints", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", nargs="+", required=True, help="Hugging Face checkpoint folders")
    parser.add_argument("--initial-policy", required=True)
    parser.add_argument("--prompts", required=True, help="held-out prompts, JSONL or Parquet")
    parser.add_argument("--reward-config", required=True, help="reward pipeline YAML (configs/rewards/*.yaml)")
    parser.add_argument("-o", "--output-dir", required=True)
    parser.add_argument("--tokenizer", default=None, help="default: the initial policy's")
    parser.add_argument("--samples-per-prompt", type=int, default=1)
    parser.add_argument("--max-prompts", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=4096, help="prompt + answer tokens for the log-probs")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every checkpoint")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-initial", action="store_true", help="do not evaluate the initial policy as step 0")
    parser.add_argument("--overwrite", action="store_true", help="redo steps that already have an eval file")
    return parser


if __name__ == "__main__":
    help_first(build_parser)

import numpy as np
import torch

from reward_plugins.io import DataError, iter_jsonl
from reward_plugins.types import Sample
from trl_ext.generation import completion_ids, generate_following, sampling_config

from .eval_files import EvalFile, eval_file_path, read_eval_file, rows_from_scores, write_eval_file
from .rm_text import prompt_text

logger = logging.getLogger(__name__)


@dataclass
class PromptRow:
    prompt: Any  # str or a list of chat messages
    label: Any = None


def load_prompts(path: str | Path, max_prompts: int | None = None) -> list[PromptRow]:
    """Held-out prompts; a row without a usable prompt is an error naming its line."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        raw = [(f"{path}: row {i}", row) for i, row in enumerate(pq.read_table(path).to_pylist())]
    else:
        raw = [(f"{path}:{line}", row) for line, row in iter_jsonl(path)]
    rows = []
    for where, row in raw[:max_prompts]:
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object")
        prompt = row.get("prompt")
        if prompt is None and isinstance(row.get("instruction"), str):
            prompt = prompt_text(row["instruction"], row.get("input") or "")
        valid_chat = isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt)
        if not (isinstance(prompt, str) and prompt) and not valid_chat:
            raise DataError(f"{where}: needs a non-empty `prompt` (text or chat messages) or an `instruction`")
        rows.append(PromptRow(prompt, row.get("label")))
    if not rows:
        raise DataError(f"{path}: no prompts")
    return rows


def checkpoint_steps(checkpoints: Sequence[str]) -> list[tuple[int, str]]:
    """(step, path) pairs in step order; the step is the last number in the folder name, else its position (1-based)."""
    numbers = [re.findall(r"\d+", Path(c).name) for c in checkpoints]
    if all(numbers):
        steps = [int(n[-1]) for n in numbers]
    else:
        steps = list(range(1, len(checkpoints) + 1))
    if len(set(steps)) != len(steps):
        raise ValueError(f"checkpoints give repeated steps {steps}; name them by step (e.g. global_step200)")
    return sorted(zip(steps, checkpoints))


def render_prompt(tokenizer, prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


@torch.inference_mode()
def sample_answers(model, tokenizer, prompt_ids: list[list[int]], args: argparse.Namespace) -> list[list[int]]:
    """One sampled continuation per prompt (token ids up to and including the first EOS), in batches, drawn
    with exactly the sampling settings given (the checkpoint's own generation config never applies)."""
    config = sampling_config(tokenizer, args.max_new_tokens, args.temperature, args.top_p, args.top_k)
    out: list[list[int]] = []
    for start in range(0, len(prompt_ids), args.batch_size):
        batch = prompt_ids[start : start + args.batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):  # left padding, so every continuation starts at `width`
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            mask[row, width - len(ids) :] = 1
        generated = generate_following(model, input_ids.to(model.device), mask.to(model.device), config)
        out.extend(completion_ids(ids, tokenizer.eos_token_id) for ids in generated[:, width:].tolist())
    return out


def sequence_kls(policy, initial, contexts: list[list[int]], answers: list[list[int]]) -> np.ndarray:
    """Per-answer k1 KL estimate: the sum over answer tokens of log pi - log pi_init."""
    mine = policy.continuation_logprobs(contexts, answers)
    theirs = initial.continuation_logprobs(contexts, answers)
    return np.array([float(np.sum(a - b)) for a, b in zip(mine, theirs)])


def main(argv: list[str] | None = None) -> list[Path]:
    """Evaluate the checkpoints; returns the eval files written."""
    from reward_plugins.logprobs import HFLogProbScorer
    from reward_plugins.pipeline import RewardPipeline

    args = build_parser().parse_args(argv)
    if args.temperature <= 0 or args.samples_per_prompt < 1 or args.max_new_tokens < 1:
        raise SystemExit("--temperature, --samples-per-prompt and --max-new-tokens must be positive")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.output_dir)
    prompts = [row for row in load_prompts(args.prompts, args.max_prompts) for _ in range(args.samples_per_prompt)]
    from reward_plugins.cli import check_model_dir

    args.initial_policy = check_model_dir(args.initial_policy, "--initial-policy", causal_lm=True)
    for path in args.checkpoints:
        check_model_dir(path, "--checkpoints", causal_lm=True)
    steps = checkpoint_steps(args.checkpoints)
    if not args.no_initial:
        if steps[0][0] == 0:
            raise ValueError("a checkpoint has step 0, which is the initial policy's; pass --no-initial")
        steps.insert(0, (0, args.initial_policy))
    todo = [(s, p) for s, p in steps if args.overwrite or not eval_file_path(out, s).exists()]
    if not todo:
        logger.info("every step already has an eval file in %s", out)
        return []
    tokenizer_path = args.tokenizer or args.initial_policy
    scorer_kwargs = dict(tokenizer_path=tokenizer_path, dtype=args.dtype, device=args.device,
                         batch_size=args.batch_size, max_length=args.max_length, temperature=args.temperature)
    initial = HFLogProbScorer(args.initial_policy, **scorer_kwargs)
    tokenizer = initial.tokenizer
    texts = [render_prompt(tokenizer, row.prompt) for row in prompts]
    prompt_ids = [tokenizer(text, add_special_tokens=isinstance(row.prompt, str))["input_ids"] for text, row in zip(texts, prompts)]
    pipeline = RewardPipeline.from_yaml(args.reward_config)
    history: list[float] = []
    written = []
    for step, path in steps:
        target = eval_file_path(out, step)
        if (step, path) not in todo:
            history.append(read_eval_file(target).kl)
            continue
        policy = initial if step == 0 else HFLogProbScorer(path, **scorer_kwargs)
        torch.manual_seed(args.seed)
        answer_ids = sample_answers(policy.model, tokenizer, prompt_ids, args)
        answers = [tokenizer.decode(ids, skip_special_tokens=True) for ids in answer_ids]
        kls = np.zeros(len(answers)) if step == 0 else sequence_kls(policy, initial, prompt_ids, answer_ids)
        samples = [Sample(prompt=t, response=a, label=row.label, response_ids=ids, group_id=i // args.samples_per_prompt)
                   for i, (t, a, row, ids) in enumerate(zip(texts, answers, prompts, answer_ids))]
        scored = pipeline.score(samples)
        rows = rows_from_scores(texts, answers, scored.rewards, [r.components for r in scored.results], kls.tolist(),
                                scored.results)
        history.append(float(kls.mean()))
        meta = {"checkpoint": str(path), "initial_policy": str(args.initial_policy), "reward_config": str(args.reward_config),
                "kl_estimator": "k1", "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
                "max_new_tokens": args.max_new_tokens, "seed": args.seed, "samples_per_prompt": args.samples_per_prompt,
                "prompts": str(args.prompts), "reward_logs": scored.logs}
        written.append(write_eval_file(out, EvalFile(step=step, rows=rows, kl=history[-1], kl_history=list(history), meta=meta)))
        logger.info("step %d: KL %.4f, mean reward %s", step, history[-1], scored.logs.get("reward/mean"))
    return written


if __name__ == "__main__":
    import sys

    from reward_plugins.cli import run_cli

    sys.exit(run_cli(main, "evaluation.eval_checkpoints"))
