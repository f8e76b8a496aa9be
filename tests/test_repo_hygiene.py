"""What a user's clone looks like after the README's commands, and how the suite itself behaves: every output
folder the README creates is git-ignored, and a missing openrlhf or ray fails the suite instead of skipping files."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def readme_outputs() -> set[str]:
    """Top-level names that README commands write (relative paths whose first part the repository does not hold)."""
    tracked = {p.split("/")[0] for p in subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                                                       check=True).stdout.split()}
    names = set()
    for block in re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S):
        for line in block.splitlines():
            for token in re.split(r"[\s=]+", line.split("#")[0]):
                token = token.strip("'\"")
                match = re.match(r"^(?:\$\{[A-Z_]+:-)?([A-Za-z_][\w.-]*)(/|\.jsonl$|\.png$|\.csv$)", token)
                if match and not token.startswith("-"):
                    first = match.group(1) if match.group(2) == "/" else token
                    if first not in tracked:
                        names.add(first)
    return names


def test_every_output_folder_the_readme_creates_is_ignored():
    outputs = readme_outputs()
    assert {"data", "models", "runs", "plots", "rl_data", "rl_data_with_baseline", "scored.jsonl"} <= outputs
    for name in sorted(outputs):
        probe = f"{name}/x" if "." not in name else name
        ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", probe], cwd=REPO).returncode == 0
        assert ignored, f".gitignore does not cover {name}, which the README's commands write"


def test_a_missing_openrlhf_fails_the_suite(tmp_path):
    """A stand-in `openrlhf` that cannot be imported: the run stops with one line instead of skipping test files."""
    fake = tmp_path / "fake" / "openrlhf"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('openrlhf is not installed here')\n")
    env = {**os.environ, "PYTHONPATH": str(fake.parent), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "tests/test_bon_edges.py", "-p", "no:cacheprovider",
                             "-q", "-k", "kl_bon"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "the test suite needs openrlhf (openrlhf is not installed here): install requirements.txt" in \
        result.stdout + result.stderr
