"""Best-of-n over gold-labelled generations with one proxy RM per seed, and their ensembles.

    python -m evaluation.run_bon_pipeline models/rm_seed{seed} --seeds 1,2,3,4,5 --ensembles \
        --uwo-weights 0.5 --big-n 12600 --gold-gens DATA [-o runs/NAME]

llm_optimization's spellings work too: `-gold` / `--gold-labelled-generations` for `--gold-gens`, `-ns` for
`--sample-ns`, `--no-ensembles`. `-o` defaults to `runs/bon_<RM folder name without {seed}>`. DATA is a local
JSONL / Parquet file, a folder saved with `datasets`, or a Hugging Face dataset id (`tlc4418/gold_labelled_gens`)
loaded through `datasets` (its cache, or the network when there is one).

Each proxy RM scores every answer (batched, cached per RM under OUT/scores, resumable), then
`OUT/seed{s}/bon_sampled_results.json` and `OUT/ensemble_<mean|WCO|UWO-w>/bon_sampled_results.json` get
`[{n, proxy_score, gold_score, kl_bon}, ...]`, with a `bon_meta.json` beside each recording the settings.

A multi-head RM or LoRA ensemble folder (no `{seed}`, no `--seeds`) gives its k members as k proxy RMs: one pass
scores all of them, each member is cached like a separate RM, and the runs are `OUT/head{i}` (`OUT/adapter{i}`)
next to the ensembles over the members:

    python -m evaluation.run_bon_pipeline models/rm_multihead_seed1 --ensembles --gold-gens DATA -o runs/bon_mh
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reward_plugins.cli import help_first

from .bon import DEFAULT_NS
from .rm_text import OA_TEMPLATE, check_template


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("UWO weights must be >= 0")
    return values


def _objectives(text: str) -> list[str]:
    from reward_plugins.ensemble import OBJECTIVES

    values = [v.strip().lower() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in OBJECTIVES]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"unknown ensemble objective(s) {unknown or text!r}; expected some of {OBJECTIVES}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluation.run_bon_pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("proxy_rm_path", help="proxy RM folder; {seed} is replaced by each seed")
    parser.add_argument("--seeds", type=_int_list, default=None,
                        help="default 1,2,3,4,5; not with a multi-head or LoRA ensemble folder (its members are the RMs)")
    parser.add_argument("--ensembles", action=argparse.BooleanOptionalAction, default=False,
                        help="also evaluate ensembles of the seeds' RMs (--no-ensembles: only single RMs)")
    parser.add_argument("--objectives", type=_objectives, default=None, help="some of mean,wco,uwo (default: all)")
    parser.add_argument("--uwo-weights", type=_float_list, default=[0.5], help="lambda values for UWO (0 allowed)")
    parser.add_argument("--ddof", type=int, default=0, help="UWO variance ddof (0: the paper's population variance)")
    parser.add_argument("-ns", "--sample-ns", type=_int_list, default=list(DEFAULT_NS))
    parser.add_argument("--big-n", type=int, default=12600, help="keep only the first BIG_N answers of each prompt")
    parser.add_argument("-gold", "--gold-gens", "--gold-labelled-generations", dest="gold_gens", required=True,
                        help="JSONL, Parquet, a saved HF dataset folder, or a Hugging Face dataset id")
    parser.add_argument("--split", default="validation", help="split of a saved DatasetDict")
    parser.add_argument("--max-prompts", type=int, default=None, help="use only the first prompts (unbiased subsample)")
    parser.add_argument("-o", "--output-dir", default=None, help="default: runs/bon_<RM folder name without {seed}>")
    parser.add_argument("--template", type=check_template, default=OA_TEMPLATE,
                        help="RM input; fields {prompt} {instruction} {input} {response}")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder if not the RM's own ({seed} allowed)")
    parser.add_argument("--max-length", type=int, default=776, help="RM input tokens (the published 520 + 256)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache-dir", default=None, help="score cache root (default OUTPUT_DIR/scores)")
    parser.add_argument("--block-answers", type=int, default=8192, help="answers scored between cache checkpoints")
    parser.add_argument("--save-sorted", action="store_true", help="also write proxy_labelled_sorted.json per run")
    return parser


if __name__ == "__main__":
    help_first(build_parser)

import numpy as np

from reward_plugins.ensemble import OBJECTIVES
from reward_plugins.cli import run_cli
from reward_plugins.io import DataError, write_json
from reward_plugins.member_info import MemberInfo

from .bon import bon_curve
from .bon_analysis import ensemble_run_name, ensemble_scores
from .gold_gens import GoldGens, load_gold_gens
from .rm_text import rm_text
from .score_cache import cache_key, cached_member_scores, cached_scores, model_signature

logger = logging.getLogger(__name__)


def score_with_rm(args: argparse.Namespace, seed: int, gens: GoldGens, fingerprint: str) -> list[np.ndarray]:
    """Every answer's score from the seed's proxy RM, through the score cache."""
    from reward_plugins.reward_model import RewardModelConfig, RewardModelScorer

    path = args.proxy_rm_path.replace("{seed}", str(seed))
    tokenizer = args.tokenizer.replace("{seed}", str(seed)) if args.tokenizer else None
    if not Path(path).exists():
        raise DataError(f"proxy RM for seed {seed}: {path} does not exist")
    settings = {
        "rm": model_signature(path), "tokenizer": tokenizer, "template": args.template, "max_length": args.max_length,
        "dtype": args.dtype, "data": fingerprint,
    }

    def make_scorer():
        config = RewardModelConfig(path=path, tokenizer=tokenizer, max_length=args.max_length,
                                   batch_size=args.batch_size, dtype=args.dtype, device=args.device)
        scorer = RewardModelScorer(config)
        logger.info("scoring %d answers with %s", sum(len(a) for a in gens.answers), path)
        return lambda texts: scorer.score_texts(texts)[0]

    def texts(row: int) -> list[str]:
        return [rm_text(gens.instructions[row], gens.inputs[row], a, args.template) for a in gens.answers[row]]

    cache_root = Path(args.cache_dir) if args.cache_dir else Path(args.output_dir) / "scores"
    return cached_scores(cache_root / f"seed{seed}-{cache_key(settings)}", settings, texts,
                         [len(a) for a in gens.answers], make_scorer, args.block_answers)


def one_model_members(path: str) -> tuple[str, MemberInfo] | None:
    """("multihead" | "lora", the members' record) for a one-model ensemble folder, None for a plain reward model."""
    from reward_plugins.lora_ensemble import INDEX_FILE, read_lora_index
    from reward_plugins.multihead import HEADS_FILE, read_member_info

    folder = Path(path)
    if (folder / HEADS_FILE).is_file():
        return "multihead", read_member_info(folder)
    if (folder / INDEX_FILE).is_file():
        return "lora", read_lora_index(folder)[1]
    return None


def score_with_members(args: argparse.Namespace, kind: str, info: MemberInfo, gens: GoldGens,
                       fingerprint: str) -> dict[str, list[np.ndarray]]:
    """Every answer's score from each member of a multi-head RM or LoRA ensemble (one pass for all), cached per
    member like separate RMs; keyed by member name (head0, ... / adapter0, ...)."""
    from reward_plugins.lora_ensemble import LoraEnsembleScorer
    from reward_plugins.multihead import MultiHeadScorer
    from reward_plugins.reward_model import TextInputConfig

    path = args.proxy_rm_path
    names = [f"{'head' if kind == 'multihead' else 'adapter'}{i}" for i in range(info.k)]
    base = {"rm": model_signature(path), "kind": kind, "tokenizer": args.tokenizer, "template": args.template,
            "max_length": args.max_length, "dtype": args.dtype, "data": fingerprint}
    settings = [{**base, "member": i, "member_seed": seed} for i, seed in enumerate(info.seeds)]

    def make_scorer():
        config = TextInputConfig(path=path, tokenizer=args.tokenizer, max_length=args.max_length,
                                 batch_size=args.batch_size, dtype=args.dtype, device=args.device)
        scorer = MultiHeadScorer(config) if kind == "multihead" else LoraEnsembleScorer(config)
        logger.info("scoring %d answers with the %d members of %s", sum(len(a) for a in gens.answers), info.k, path)
        return lambda texts: scorer.member_scores_texts(texts)[0]

    def texts(row: int) -> list[str]:
        return [rm_text(gens.instructions[row], gens.inputs[row], a, args.template) for a in gens.answers[row]]

    cache_root = Path(args.cache_dir) if args.cache_dir else Path(args.output_dir) / "scores"
    scores = cached_member_scores([cache_root / f"{n}-{cache_key(s)}" for n, s in zip(names, settings)], settings,
                                  texts, [len(a) for a in gens.answers], make_scorer, args.block_answers)
    return dict(zip(names, scores))


def write_run(run_dir: Path, gens: GoldGens, scores: Sequence[np.ndarray], ns: Sequence[int], meta: dict[str, Any],
              save_sorted: bool) -> list[dict[str, float]]:
    """Compute and write one run's curve (and optionally the published sorted file, gold permuted with the proxy)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        curve = bon_curve(list(scores), gens.gold, ns)
    for warning in caught:
        logger.warning("%s: %s", run_dir.name, warning.message)
    write_json(run_dir / "bon_sampled_results.json", curve)
    done = {c["n"] for c in curve}
    write_json(run_dir / "bon_meta.json", {**meta, "ns": [c["n"] for c in curve],
                                            "ns_skipped": [n for n in ns if n not in done]})
    if save_sorted:
        rows = []
        for row, proxy in enumerate(scores):
            order = np.argsort(proxy, kind="stable")
            rows.append({"instruction": gens.instructions[row], "input": gens.inputs[row],
                         "answers": [gens.answers[row][i] for i in order],
                         "gold_scores": gens.gold[row][order].tolist(), "proxy_scores": np.asarray(proxy)[order].tolist()})
        write_json(run_dir / "proxy_labelled_sorted.json", rows, indent=None)
    return curve


def default_output_dir(proxy_rm_path: str) -> str:
    """`runs/bon_<name>` from the RM path template: models/rm-pythia-44m_seed{seed} -> runs/bon_rm-pythia-44m."""
    name = Path(proxy_rm_path.rstrip("/")).name.replace("{seed}", "").rstrip("_-.") or "rm"
    return str(Path("runs") / f"bon_{name.removesuffix('_seed').removesuffix('-seed')}")


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, float]]]:
    """Run the pipeline; returns the curves keyed by run folder name."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.output_dir is None:
        args.output_dir = default_output_dir(args.proxy_rm_path)
    kind, info = (None, None) if "{seed}" in args.proxy_rm_path else one_model_members(args.proxy_rm_path) or (None, None)
    if kind is not None and args.seeds is not None:
        parser.error(f"{args.proxy_rm_path} is a {kind} ensemble: its members are the RMs, so --seeds does not apply")
    seeds = args.seeds or [1, 2, 3, 4, 5]
    if kind is None and len(seeds) > 1 and "{seed}" not in args.proxy_rm_path:
        parser.error("proxy_rm_path must contain {seed} when several seeds are given")
    if args.ensembles and (info.k if kind else len(seeds)) < 2:
        parser.error("--ensembles needs at least two seeds" if kind is None else
                     f"--ensembles needs at least two members; {args.proxy_rm_path} holds one")
    if args.big_n < 1 or any(n < 1 for n in args.sample_ns):
        parser.error("--big-n and --sample-ns must be positive")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.output_dir)
    gens = load_gold_gens(args.gold_gens, args.big_n, args.split, args.max_prompts)
    sizes = [len(a) for a in gens.answers]
    base_meta = {"data": gens.source, "prompts": len(gens), "answers_min": min(sizes), "answers_max": max(sizes),
                 "big_n": args.big_n, "template": args.template, "max_length": args.max_length}
    fingerprint = gens.fingerprint()
    members: dict[str, list[np.ndarray]] = {}
    metas: dict[str, dict[str, Any]] = {}
    if kind is None:
        for seed in seeds:
            members[f"seed{seed}"] = score_with_rm(args, seed, gens, fingerprint)
            metas[f"seed{seed}"] = {"proxy_rm": args.proxy_rm_path.replace("{seed}", str(seed)), "seed": seed}
    else:
        members = score_with_members(args, kind, info, gens, fingerprint)
        metas = {name: {"proxy_rm": args.proxy_rm_path, "kind": kind, "member": name, "member_seed": seed}
                 for name, seed in zip(members, info.seeds)}
    curves = {name: write_run(out / name, gens, scores, args.sample_ns, {**base_meta, **metas[name]}, args.save_sorted)
              for name, scores in members.items()}
    if args.ensembles:
        ensemble_meta = {"proxy_rm": args.proxy_rm_path, **({"seeds": seeds} if kind is None else
                                                            {"kind": kind, "members": list(members)})}
        for objective in args.objectives or OBJECTIVES:
            for weight in args.uwo_weights if objective == "uwo" else [None]:
                name = ensemble_run_name(objective, weight)
                combined = ensemble_scores(list(members.values()), objective, 0.0 if weight is None else weight, args.ddof)
                meta = {**base_meta, **ensemble_meta, "objective": objective, "uwo_weight": weight, "ddof": args.ddof}
                curves[name] = write_run(out / name, gens, combined, args.sample_ns, meta, args.save_sorted)
    for name, curve in curves.items():
        if curve:
            logger.info("%s: n=%d proxy %.4f gold %.4f", name, curve[-1]["n"], curve[-1]["proxy_score"], curve[-1]["gold_score"])
    return curves


def cli(argv: list[str] | None = None) -> int:
    """CLI: bad data, a missing RM or an unreachable dataset id exit 2 with one message (--debug: traceback)."""
    return run_cli(main, "evaluation.run_bon_pipeline", argv)


if __name__ == "__main__":
    sys.exit(cli())
