"""Score a JSONL file of rollouts with a reward pipeline: `python -m reward_plugins.score --config X.yaml --input F`.

Input rows: `{"prompt": str, "response": str, "label": any (optional), "query": str (optional),
"response_ids": [int] (optional), "group_id": (optional)}`. Output rows add `reward`, `status`, `error`
and `components`; the batch logs are printed as a table.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from .io import DataError, iter_jsonl, write_jsonl
from .pipeline import RewardPipeline
from .types import Sample

SAMPLE_FIELDS = ("prompt", "response", "query", "label", "response_ids", "group_id")


def read_samples(path: str) -> list[Sample]:
    """Samples from JSONL; a row without string prompt/response is an error naming its line."""
    samples = []
    for number, row in iter_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("response"), str):
            raise DataError(f"{path}:{number}: expected an object with string 'prompt' and 'response'")
        samples.append(Sample(**{key: row[key] for key in SAMPLE_FIELDS if key in row}))
    if not samples:
        raise DataError(f"{path}: no rows")
    return samples


def score_file(pipeline: RewardPipeline, samples: Sequence[Sample], batch_size: int) -> tuple[list[dict], dict[str, float]]:
    """Score in batches; returns one output row per sample and the logs over all of them."""
    rows, results, rewards = [], [], []
    for start in tqdm(range(0, len(samples), batch_size), desc="scoring", unit="batch"):
        out = pipeline.score(samples[start : start + batch_size])
        results.extend(out.results)
        rewards.extend(out.rewards)
    for sample, result, reward in zip(samples, results, rewards):
        rows.append({
            "prompt": sample.prompt,
            "response": sample.response,
            "reward": reward,
            "status": result.status.value,
            "error": result.error,
            "components": dict(result.components),
        })
    return rows, pipeline.batch_logs(results, rewards)


def print_logs(logs: dict[str, float], title: str) -> None:
    table = Table(title=title)
    table.add_column("log key")
    table.add_column("value", justify="right")
    for key, value in logs.items():
        table.add_row(key, f"{value:.4f}")
    Console().print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="reward pipeline YAML")
    parser.add_argument("--input", required=True, help="JSONL of rollouts")
    parser.add_argument("--output", help="JSONL to write scored rows to (atomically)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    pipeline = RewardPipeline.from_yaml(args.config)
    rows, logs = score_file(pipeline, read_samples(args.input), args.batch_size)
    if args.output:
        write_jsonl(args.output, rows)
    print_logs(logs, f"{args.config} on {args.input} ({len(rows)} samples)")


if __name__ == "__main__":
    import sys

    from reward_plugins.cli import run_cli

    sys.exit(run_cli(main, "reward_plugins.score"))
