"""Add gold-RM scores to every row of an RL run's eval files, after training (the gold RM is loaded only here).

    python -m evaluation.run_ppo_gold_eval EVAL_DIR GOLD_RM [--is-alpacafarm-rm] [--batch-size 32]

Idempotent and resumable: rows that already have a `gold_score` from this gold RM are kept, and each
file is rewritten atomically after every `--checkpoint-rows` scored rows. The gold RM reads
`<|prompter|>{prompt}<|endoftext|><|assistant|>{response}<|endoftext|>` (Open-Assistant), AlpacaFarm's
format with `--is-alpacafarm-rm` (the row's prompt as the instruction, no input), or `--template`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from reward_plugins.io import DataError

from .eval_files import EvalFile, eval_file_path, list_eval_files, read_eval_file, write_eval_file
from .rm_text import OA_TEMPLATE, alpacafarm_text, check_template, rm_text

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluation.run_ppo_gold_eval", description=__doc__.splitlines()[0])
    parser.add_argument("eval_dir")
    parser.add_argument("gold_rm", help="gold reward model folder (HF sequence classifier or OpenRLHF value head)")
    parser.add_argument("--is-alpacafarm-rm", action="store_true", help="format inputs the AlpacaFarm way")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--template", type=check_template, default=None,
                        help="custom gold-RM input; fields {prompt} {instruction} {input} {response}")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--checkpoint-rows", type=int, default=1024, help="rows scored between rewrites of a file")
    parser.add_argument("--overwrite", action="store_true", help="rescore every row, even ones already scored")
    return parser


def gold_formatter(is_alpacafarm_rm: bool, template: str | None) -> tuple[str, Callable[[str, str], str]]:
    """A name for the input format and a function (prompt, answer) -> gold-RM text."""
    if is_alpacafarm_rm and template:
        raise ValueError("give either --is-alpacafarm-rm or --template, not both")
    if is_alpacafarm_rm:
        return "alpacafarm", lambda prompt, answer: alpacafarm_text(prompt, "", answer)
    chosen = template or OA_TEMPLATE
    return chosen, lambda prompt, answer: rm_text(prompt, "", answer, chosen)


def _rows_to_score(path: Path, eval_file: EvalFile, gold_rm: str, text_format: str, overwrite: bool) -> list[int]:
    scored = [i for i, row in enumerate(eval_file.rows) if row.gold_score is not None]
    previous = (eval_file.meta.get("gold_rm"), eval_file.meta.get("gold_format"))
    if scored and not overwrite and previous != (gold_rm, text_format):
        raise DataError(
            f"{path}: rows {scored[:5]} already hold gold scores from {previous[0]!r} (format {previous[1]!r}); "
            "pass --overwrite to rescore with this gold RM"
        )
    return list(range(len(eval_file.rows))) if overwrite else [i for i, r in enumerate(eval_file.rows) if r.gold_score is None]


def add_gold_scores(
    eval_dir: str | Path,
    make_scorer: Callable[[], Callable[[Sequence[str]], np.ndarray]],
    gold_rm: str,
    format_text: Callable[[str, str], str],
    text_format: str,
    checkpoint_rows: int = 1024,
    overwrite: bool = False,
) -> list[Path]:
    """Fill `gold_score` in every eval file of `eval_dir`; `make_scorer` is called once, lazily. Returns files changed."""
    files = list_eval_files(eval_dir)
    if not files:
        raise DataError(f"{eval_dir}: no eval files (eval_step*.json)")
    scorer = None
    changed = []
    for path in files:
        eval_file = read_eval_file(path)
        if eval_file_path(path.parent, eval_file.step) != path:
            raise DataError(f"{path}: holds step {eval_file.step}, which does not match its file name")
        todo = _rows_to_score(path, eval_file, gold_rm, text_format, overwrite)
        if not todo:
            logger.info("%s: every row already has a gold score", path.name)
            continue
        eval_file.meta.update(gold_rm=gold_rm, gold_format=text_format)
        for start in range(0, len(todo), checkpoint_rows):
            chunk = todo[start : start + checkpoint_rows]
            scorer = scorer or make_scorer()
            scores = np.asarray(scorer([format_text(eval_file.rows[i].prompt, eval_file.rows[i].answer) for i in chunk]))
            for i, value in zip(chunk, scores):
                if not np.isfinite(value):
                    raise DataError(f"{path}: row {i}: the gold RM returned {value}")
                eval_file.rows[i].gold_score = float(value)
            write_eval_file(path.parent, eval_file)
        logger.info("%s: %d rows scored", path.name, len(todo))
        changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> list[Path]:
    """Run the gold evaluation; returns the eval files that gained gold scores."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    text_format, format_text = gold_formatter(args.is_alpacafarm_rm, args.template)
    from reward_plugins.cli import check_model_dir

    gold_rm = str(Path(check_model_dir(args.gold_rm, "GOLD_RM")).resolve())

    def load():
        from reward_plugins.reward_model import RewardModelConfig, RewardModelScorer

        scorer = RewardModelScorer(RewardModelConfig(
            path=gold_rm, tokenizer=args.tokenizer, batch_size=args.batch_size, max_length=args.max_length,
            dtype=args.dtype, device=args.device,
        ))
        return lambda texts: scorer.score_texts(texts)[0]

    return add_gold_scores(args.eval_dir, load, gold_rm, format_text, text_format, args.checkpoint_rows, args.overwrite)


if __name__ == "__main__":
    import sys

    from reward_plugins.cli import run_cli

    sys.exit(run_cli(main, "evaluation.run_ppo_gold_eval"))
