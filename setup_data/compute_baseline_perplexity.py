"""Precompute the VR-CLI baseline perplexity of every datapoint, with exactly the reward's prompt and scorer.

The prompt construction (`VRCLIPrompt.scored_input`, which cuts a long story context exactly as the reward
will), the scorer settings (temperature, max_length, dtype, batch size) and the perplexity come from the same
reward YAML the `vrcli` plugin is built from (`--reward_config`, default `configs/rewards/vrcli_reference.yaml`,
the one the training scripts use); `--model_name` replaces the YAML's scorer model. Each label records the
fingerprint the reward checks (`baseline_fingerprint`: scorer model name, temperature, max_length, a hash of
the prompt settings, the weights' dtype and the attention implementation), so a reward configured differently
refuses these baselines instead of using them. `--torch_dtype` and `--attn_implementation` set the numerics to
the reward side's: bfloat16 and flash_attention_2 for OpenRLHF's reference model (`scripts/train_7b.sh`).

For each split in `--data_dir` (`{train,test,val}.jsonl` from `setup_rl_data.py`) it writes, atomically, to
`--out_dir` (default `<data_dir>_with_baseline`; never the input folder, so no input row is lost):
- the split file again, each label with `baseline_ppl`, `baseline_temperature`, `baseline_model` and
  `baseline_fingerprint`; rows that cannot be scored go to `baseline_rejects_{nice_model_name}.jsonl`
  with file, line and reason;
- `baseline_ppl_{nice_model_name}.jsonl` (and `.parquet` with `--table_format parquet`): one row per id.

Rows are scored in fixed length-sorted chunks; each finished chunk is appended to
`baseline_ppl_{nice_model_name}.cache.jsonl`. After an interruption the run skips finished chunks and scores
the rest with exactly the same batches, so the numbers equal those of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reward_plugins.cli import help_first
from setup_data.validation import reject_share_arg

SPLITS = ("train", "test", "val")
DEFAULT_REWARD_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "rewards" / "vrcli_reference.yaml")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compute_baseline_perplexity.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model_name", required=True, help="the frozen reference model (local path, safetensors)")
    parser.add_argument("--nice_model_name", required=True, help="short name recorded in labels and file names")
    parser.add_argument("--data_dir", default="rl_data/", help="holds {split}.jsonl from setup_rl_data.py")
    parser.add_argument("--out_dir", default=None, help="where to write (default: <data_dir>_with_baseline; never --data_dir)")
    parser.add_argument("--reward_config", default=DEFAULT_REWARD_CONFIG, help="reward YAML with the vrcli plugin")
    parser.add_argument("--reward_name", default=None, help="which vrcli plugin, if the YAML has several")
    parser.add_argument("--tokenizer_name", default=None, help="default: the YAML's scorer.tokenizer, else the model's own")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS))
    parser.add_argument("--batch_size", type=int, default=None, help="override the YAML's scorer.batch_size")
    parser.add_argument("--torch_dtype", "--dtype", dest="dtype", default=None,
                        choices=("auto", "float32", "bfloat16", "float16"),
                        help="override the YAML's scorer.dtype; the reward side's (bfloat16 on the OpenRLHF path)")
    parser.add_argument("--attn_implementation", default=None,
                        choices=("eager", "sdpa", "flash_attention_2", "flash_attention_3"),
                        help="override the YAML's scorer.attn_implementation; the reward side's (flash_attention_2 "
                        "on the OpenRLHF path, --ds.attn_implementation)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--temperature", type=float, default=None, help="override; must then match the reward's")
    parser.add_argument("--max_length", type=int, default=None)
    parser.add_argument("--chunk_size", type=int, default=64, help="rows per resumable chunk")
    parser.add_argument("--table_format", choices=("jsonl", "parquet"), default="jsonl",
                        help="the id-keyed table: JSONL, or JSONL plus Parquet")
    reject_share_arg(parser)
    parser.add_argument("--strict", action="store_true", help="fail on the first bad row instead of skipping it")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


if __name__ == "__main__":
    help_first(build_parser)

from tqdm import tqdm

from reward_plugins.cli import UsageError, check_model_dir, check_tokenizer_dir, loading, run_cli
from reward_plugins.config import ConfigError, PluginSpec, load_pipeline_config
from reward_plugins.io import DataError, atomic_open, write_jsonl
from reward_plugins.logprobs import LogProbScorer, perplexity
from reward_plugins.vrcli import FINGERPRINT_KEY, VRCLIConfig, VRCLIPlugin, VRCLIPrompt
from setup_data.validation import RejectLog, RowError, iter_json_lines, reject_share_arg


@dataclass
class Item:
    """One datapoint to score: where it came from, its row, and its (context, gold) token ids."""

    split: str
    line: int
    raw: str
    row: dict[str, Any]
    context: list[int]
    gold: list[int]
    truncated: bool = False

    @property
    def id(self) -> str:
        return self.row["label"]["id"]

    @property
    def length(self) -> int:
        return len(self.context) + len(self.gold)


def find_vrcli_spec(spec: PluginSpec, name: str | None = None) -> PluginSpec:
    """The one `vrcli` node of a pipeline (searching nested plugins); `name` picks among several."""
    found, stack = [], [spec]
    while stack:
        node = stack.pop()
        if node.type == "vrcli" and (name is None or node.name == name):
            found.append(node)
        stack.extend(node.children.values())
    if len(found) != 1:
        names = "none" if not found else ", ".join(n.name for n in found)
        raise ConfigError([f"expected exactly one vrcli plugin{f' named {name!r}' if name else ''}, found {names}"])
    return found[0]


def load_vrcli_config(path: str | os.PathLike, reward_name: str | None = None) -> VRCLIConfig:
    """The `vrcli` configuration of a reward YAML (paths not checked: `--model_name` may replace the model)."""
    return find_vrcli_spec(load_pipeline_config(path, check_paths=False).reward, reward_name).config


def plan_chunks(lengths: Sequence[int], chunk_size: int) -> list[list[int]]:
    """Deterministic chunks of indices, longest first (ties by position), independent of what is already done."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start : start + chunk_size] for start in range(0, len(order), chunk_size)]


def score_chunk(scorer: LogProbScorer, items: Sequence[Item]) -> list[float]:
    """Baseline perplexities of one chunk: the reward's log-prob call and perplexity, one batched pass."""
    logprobs = scorer.continuation_logprobs([it.context for it in items], [it.gold for it in items])
    return [perplexity(row) for row in logprobs]


class ScoreCache:
    """Append-only JSONL of finished chunks: a settings header line, then one `{id, baseline_ppl, ...}` per row."""

    def __init__(self, path: Path, settings: dict[str, Any]):
        self.path = path
        self.settings = settings
        self.scores: dict[str, dict[str, Any]] = {}
        if path.exists():
            self._load()
        else:
            with atomic_open(path) as handle:
                handle.write(json.dumps({"settings": settings}) + "\n")

    def _load(self) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        header = json.loads(lines[0]) if lines else {}
        if header.get("settings") != self.settings:
            raise UsageError(
                f"{self.path} was computed with other settings:\n  {header.get('settings')}\nnow:\n  {self.settings}\n"
                "delete it to start over, or use another --nice_model_name"
            )
        for number, text in enumerate(lines[1:], 2):
            try:
                row = json.loads(text)
            except json.JSONDecodeError:
                if number == len(lines):  # a write cut short by the interruption: that chunk is redone
                    break
                raise DataError(f"{self.path}:{number}: malformed cache line; delete the file to start over") from None
            self.scores[row["id"]] = row
        self._truncate_to_valid(lines)

    def _truncate_to_valid(self, lines: list[str]) -> None:
        valid = [lines[0], *(json.dumps(row) for row in self.scores.values())]
        with atomic_open(self.path) as handle:
            handle.write("\n".join(valid) + "\n")

    def add(self, rows: Sequence[dict[str, Any]]) -> None:
        """Append one finished chunk and fsync, so a crash loses at most the chunk being written."""
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(row) + "\n" for row in rows))
            handle.flush()
            os.fsync(handle.fileno())
        for row in rows:
            self.scores[row["id"]] = row


def read_split(path: Path, split: str, prompt: VRCLIPrompt, tokenizer, max_length: int, rejects: RejectLog,
               seen: dict[str, str]) -> list[Item]:
    """Parse and tokenize one split file; bad rows go to `rejects` with file and line."""
    items = []
    for line, raw, value in iter_json_lines(path):
        try:
            if isinstance(value, RowError):
                raise value
            if not isinstance(value, Mapping) or not isinstance(value.get("label"), Mapping):
                raise RowError("missing_key", "row must be an object with a 'label' object")
            label = value["label"]
            if not isinstance(label.get("id"), str) or not label["id"]:
                raise RowError("missing_key", "label has no string 'id'")
            if label["id"] in seen:
                raise RowError("duplicate_id", f"id {label['id']} already at {seen[label['id']]}")
            gold = label.get(prompt.gold_key)
            if isinstance(gold, str) and not gold.strip():
                raise RowError("empty_gold", f"label {prompt.gold_key!r} is empty")
            gold_ids = tokenizer(gold, add_special_tokens=False)["input_ids"] if isinstance(gold, str) else []
            if len(gold_ids) >= max_length:
                raise RowError("too_long", f"gold has {len(gold_ids)} tokens, no room for context in max_length {max_length}")
            try:
                scored = prompt.scored_input(tokenizer, label, None, max_length)
            except ValueError as exc:
                raise RowError("bad_label", str(exc)) from None
        except RowError as error:
            rejects.reject(path, line, error, raw, split=split)
            continue
        seen[label["id"]] = f"{path}:{line}"
        items.append(Item(split, line, raw, dict(value), scored.context, scored.gold, scored.truncated))
    return items


def write_table(path: Path, rows: list[dict[str, Any]], table_format: str) -> list[Path]:
    """The id-keyed table as JSONL (always) and Parquet (on request), each written atomically."""
    write_jsonl(path.with_suffix(".jsonl"), rows)
    written = [path.with_suffix(".jsonl")]
    if table_format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        with atomic_open(path.with_suffix(".parquet"), "wb") as handle:
            pq.write_table(pa.Table.from_pylist(rows), handle)
        written.append(path.with_suffix(".parquet"))
    return written


def run(args: argparse.Namespace, scorer: LogProbScorer | None = None) -> dict[str, Any]:
    """Score every split (resuming from the cache), then write the labelled splits and the table."""
    config = load_vrcli_config(args.reward_config, args.reward_name)
    model = check_model_dir(args.model_name, "--model_name", causal_lm=True) if scorer is None else args.model_name
    overrides = {"model": model, "tokenizer": args.tokenizer_name or config.scorer.tokenizer, "backend": "hf"}
    for key in ("batch_size", "dtype", "device", "temperature", "max_length", "attn_implementation"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    scorer_config = config.scorer.model_copy(update=overrides)
    data_dir = Path(args.data_dir)
    out_dir = Path(args.out_dir) if args.out_dir else data_dir.with_name(data_dir.name + "_with_baseline")
    if out_dir.resolve() == data_dir.resolve():
        raise UsageError(f"--out_dir {out_dir} is the input folder: write the labelled splits elsewhere so no input row is lost")
    paths = {split: data_dir / f"{split}.jsonl" for split in args.splits}
    absent = [str(p) for p in paths.values() if not p.is_file()]
    if absent:
        raise UsageError(f"split file(s) not found: {', '.join(absent)} (choose --splits)")
    if scorer is None:
        if scorer_config.tokenizer:
            tokenizer = check_tokenizer_dir(str(scorer_config.tokenizer), "--tokenizer_name")
            scorer_config = scorer_config.model_copy(update={"tokenizer": tokenizer})
        with loading("--model_name", args.model_name):
            scorer = scorer_config.build()
    dtype = getattr(scorer, "dtype", None) or scorer_config.dtype
    # the reward's own fingerprint, computed by the plugin that will check it
    stamp = VRCLIPlugin(config.model_copy(update={"scorer": scorer_config}), "baseline", scorer).fingerprint()
    settings = {
        "model": args.nice_model_name,
        "fingerprint": stamp,
        "temperature": scorer.temperature,
        "max_length": scorer_config.max_length,
        "dtype": dtype,
        "attn_implementation": getattr(scorer, "attn_implementation", None),
        "batch_size": scorer_config.batch_size,
        "max_tokens_per_batch": scorer_config.max_tokens_per_batch,
        "chunk_size": args.chunk_size,
        "prompt": config.prompt.model_dump(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = ScoreCache(out_dir / f"baseline_ppl_{args.nice_model_name}.cache.jsonl", settings)
    rejects, seen = RejectLog(strict=args.strict), {}
    items, counts = {}, {}
    for split, path in paths.items():
        snapshot = rejects.counts.copy()
        items[split] = read_split(path, split, config.prompt, scorer.tokenizer, scorer_config.max_length, rejects, seen)
        counts[split] = rejects.counts - snapshot
    rejects_path = rejects.write(out_dir / f"baseline_rejects_{args.nice_model_name}.jsonl")
    for split, split_items in items.items():  # before any scoring: a split with nothing to score is refused now
        rejects.check_kept(str(paths[split]), len(split_items), counts[split], args.max_reject_share, rejects_path)
    summary = {}
    for split, split_items in items.items():
        chunks = plan_chunks([it.length for it in split_items], args.chunk_size)
        todo = [chunk for chunk in chunks if any(split_items[i].id not in cache.scores for i in chunk)]
        done_before = len(split_items) - sum(len(chunk) for chunk in todo)
        progress = tqdm(total=len(split_items), initial=done_before, desc=f"baseline {split}", unit="row", disable=args.quiet)
        for chunk in todo:
            chunk_items = [split_items[i] for i in chunk]
            ppls = score_chunk(scorer, chunk_items)
            cache.add([
                {"id": it.id, "split": split, "baseline_ppl": ppl, "gold_tokens": len(it.gold),
                 "context_tokens": len(it.context), "truncated": it.truncated,
                 "temperature": scorer.temperature, "model": args.nice_model_name}
                for it, ppl in zip(chunk_items, ppls)
            ])
            progress.update(len(chunk))
        progress.close()
        summary[split] = {"scored": sum(map(len, todo)), "cached": done_before}
    return finish(args, out_dir, items, cache, rejects, summary, stamp)


def finish(args: argparse.Namespace, out_dir: Path, items: dict[str, list[Item]], cache: ScoreCache,
           rejects: RejectLog, summary: dict[str, Any], stamp: dict[str, Any]) -> dict[str, Any]:
    """Write labelled splits, the id-keyed table and the rejects file; print counts per split."""
    table, labelled = [], {}
    for split, split_items in items.items():
        rows, bad = [], 0
        for it in split_items:
            entry = cache.scores[it.id]
            if not math.isfinite(entry["baseline_ppl"]) or entry["baseline_ppl"] <= 0:
                rejects.reject(Path(args.data_dir) / f"{split}.jsonl", it.line,
                               RowError("non_finite", f"baseline perplexity {entry['baseline_ppl']}"), it.raw, split=split)
                bad += 1
                continue
            label = {**it.row["label"], "baseline_ppl": entry["baseline_ppl"],
                     "baseline_temperature": entry["temperature"], "baseline_model": args.nice_model_name,
                     FINGERPRINT_KEY: stamp}
            rows.append({**it.row, "label": label})
            table.append(entry)
        labelled[split] = rows
        truncated = sum(cache.scores[it.id]["truncated"] for it in split_items)
        summary[split].update(written=len(rows), truncated_context=truncated)
        print(f"{split}: {len(rows)} rows with baseline_ppl ({summary[split]['cached']} from cache, "
              f"{truncated} with the story context cut to fit max_length); {bad} non-finite")
    rejects_path = rejects.write(out_dir / f"baseline_rejects_{args.nice_model_name}.jsonl")
    for split, rows in labelled.items():
        if not rows:
            rejects.check_kept(f"{split} split", 0, rejects_path=rejects_path)
    for split, rows in labelled.items():
        write_jsonl(out_dir / f"{split}.jsonl", rows)
    written = write_table(out_dir / f"baseline_ppl_{args.nice_model_name}", table, args.table_format)
    print(f"table: {', '.join(map(str, written))}")
    print(rejects.summary() + (f"; see {rejects_path}" if rejects_path else ""))
    summary["rejected"] = dict(rejects.counts)
    return summary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.chunk_size < 1:
        parser.error("--chunk_size must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: a bad config, data or model folder exits 2 with one message (`--debug` shows the traceback)."""
    return run_cli(lambda args: run(parse_args(args)), "compute_baseline_perplexity", argv)


if __name__ == "__main__":
    sys.exit(main())
