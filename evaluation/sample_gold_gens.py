"""Gold-labelled generations for best-of-n: N sampled answers per prompt from a policy, each scored by a gold RM.

    python -m evaluation.sample_gold_gens --policy models/sft/final --prompts data/eval_prompts.jsonl --n 64 \
        --gold-rm models/gold_seed0 --template '{prompt}{response}' -o data/gold_gens.jsonl

Writes JSONL rows with the columns of `tlc4418/gold_labelled_gens` (`instruction`, `input`, `answers`,
`gold_scores`), which `evaluation.run_bon_pipeline --gold-gens` reads. Prompts are `{"prompt": text or chat
messages}` rows (chat prompts are rendered with the policy's chat template); the file is written atomically.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from reward_plugins.cli import help_first

from .rm_text import OA_TEMPLATE, check_template, rm_text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluation.sample_gold_gens", description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True, help="causal LM folder to sample from")
    parser.add_argument("--prompts", required=True, help="JSONL or Parquet rows with `prompt`")
    parser.add_argument("--gold-rm", required=True, help="gold reward model folder (HF sequence classifier or OpenRLHF)")
    parser.add_argument("-o", "--output", required=True, help="output JSONL")
    parser.add_argument("--n", type=int, default=64, help="answers per prompt")
    parser.add_argument("--max-prompts", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--template", type=check_template, default=OA_TEMPLATE,
                        help="gold-RM input; fields {prompt} {instruction} {input} {response}")
    parser.add_argument("--max-length", type=int, default=1024, help="gold-RM input tokens")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    return parser


if __name__ == "__main__":
    help_first(build_parser)

import torch

from reward_plugins.cli import check_model_dir, check_tokenizer_dir, run_cli
from reward_plugins.io import DataError, write_jsonl

from .eval_checkpoints import load_prompts, render_prompt

logger = logging.getLogger(__name__)


def _main(argv: Sequence[str]) -> None:
    args = build_parser().parse_args(argv)
    if args.n < 1:
        raise DataError("--n must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reward_plugins.reward_model import RewardModelConfig, RewardModelScorer
    from trl_ext.generation import sample

    args.policy = check_model_dir(args.policy, "--policy", causal_lm=True)
    args.gold_rm = check_model_dir(args.gold_rm, "--gold-rm")
    tokenizer = AutoTokenizer.from_pretrained(check_tokenizer_dir(args.policy, "--policy"))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32).eval()
    rows = load_prompts(args.prompts, args.max_prompts)
    texts = [render_prompt(tokenizer, row.prompt) for row in rows]
    gens = sample(model, tokenizer, [t for t in texts for _ in range(args.n)], args.max_new_tokens, args.temperature,
                  batch_size=args.batch_size, seed=args.seed)
    scorer = RewardModelScorer(RewardModelConfig(path=args.gold_rm, max_length=args.max_length,
                                                 batch_size=args.batch_size))
    gold, _ = scorer.score_texts([rm_text(t, "", a, args.template) for t, a in zip(gens.prompts, gens.texts)])
    out = []
    for index, text in enumerate(texts):
        block = slice(index * args.n, (index + 1) * args.n)
        out.append({"instruction": text, "input": "", "answers": gens.texts[block],
                    "gold_scores": [float(g) for g in gold[block]]})
    write_jsonl(args.output, out)
    print(f"{args.output}: {len(out)} prompts x {args.n} answers, gold from {args.gold_rm}")


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, "evaluation.sample_gold_gens", argv)


if __name__ == "__main__":
    sys.exit(main())
