"""The recipe in setup_data/sample_data/README.md runs verbatim and yields rows the baseline script accepts.

Each command is read from the README: `python -c CODE` is executed as written, `python SCRIPT ARGS` calls the
script's `main(ARGS)` in this process (same code, no interpreter start-up), in a scratch folder where
`setup_data/` and `configs/` are the repository's own.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "setup_data" / "sample_data" / "README.md"


def recipe_commands() -> list[list[str]]:
    """The README's indented command block, continuation lines joined, split as a shell would."""
    block = [line[4:] for line in RECIPE.read_text().splitlines() if line.startswith("    ")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(block))
    return [shlex.split(line) for line in joined.splitlines() if line.strip()]


def test_sample_recipe_runs_verbatim(tmp_path, monkeypatch, capsys):
    commands = recipe_commands()
    assert [c[:2] for c in commands] == [[".venv/bin/python", "-c"], [".venv/bin/python", "setup_data/setup_rl_data.py"],
                                         [".venv/bin/python", "setup_data/compute_baseline_perplexity.py"]]
    for name in ("setup_data", "configs"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MODELS_DIR", raising=False)
    exec(commands[0][2], {})  # noqa: S102 - the README's own line
    for command in commands[1:]:
        module = importlib.import_module(command[1].removesuffix(".py").replace("/", "."))
        assert module.main(command[2:]) == 0, capsys.readouterr().err
    sizes = {"train": 16, "test": 6, "val": 6}
    for split, size in sizes.items():
        rows = [json.loads(line) for line in (tmp_path / "rl_data" / f"{split}.jsonl").read_text().splitlines()]
        assert len(rows) == size
        assert all("In summary:" in row["prompt"][-1]["content"] for row in rows)
        scored = [json.loads(line) for line in (tmp_path / "rl_data_with_baseline" / f"{split}.jsonl").read_text().splitlines()]
        assert len(scored) == size
        assert all(row["label"]["baseline_ppl"] > 1 and row["label"]["baseline_fingerprint"]["dtype"] for row in scored)
    assert not (tmp_path / "rl_data_with_baseline" / "baseline_rejects_tiny.jsonl").exists()
