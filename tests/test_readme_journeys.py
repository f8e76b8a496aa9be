"""Run the README's journeys as written: every ```bash block after a `<!-- journey: NAME -->` line, in README order,
in one scratch folder that looks like a fresh clone (the repository's tracked inputs linked in), at toy sizes set
through the shell variables the README shows. A journey that fails shows its command output."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
MARKER = re.compile(r"^<!-- journey: (?P<name>[a-z_]+) -->\n```bash\n(?P<body>.*?)^```$", re.M | re.S)
LINKED = ("configs", "setup_data", "scripts", "openrlhf_ext")
TOY_SIZES = {"N_SFT": "64", "N_PREF": "64", "N_RL": "32", "N_EVAL": "4", "SFT_EPOCHS": "1", "RM_EPOCHS": "1",
             "BON_N": "8", "RL_STEPS": "4", "EVAL_EVERY": "2"}
EXPECTED = {
    "setup": ["data/prompts.jsonl", "data/prefs_gold.jsonl", "data/llm_on_ray_sft.jsonl", "models/base/config.json"],
    "coste": ["models/sft/final/config.json", "models/rm_seed3/rm_eval.json", "models/gold_seed0/config.json",
              "runs/bon/ensemble_UWO-0.5/bon_sampled_results.json", "runs/bon/seed2/bon_sampled_results.json",
              "runs/ppo_uwo3/final/config.json", "plots/coste.png", "plots/coste.csv"],
    "vrcli": ["rl_data/train.jsonl", "rl_data_with_baseline/train.jsonl", "runs/grpo_vrcli/final/config.json", "runs/grpo_vrcli/test_eval", "plots/vrcli.png"],
    "llm_on_ray": ["data/ray/sft.jsonl", "models/ray/sft/final/config.json", "models/ray/rm_seed1/config.json",
                   "runs/grpo_ray/final/config.json"],
    "openrlhf": [],
    "cheap": ["models/rm_multihead_seed1/heads.safetensors", "models/rm_lora_seed1/lora_ensemble.json",
              "runs/bon_multihead/head4/bon_sampled_results.json", "runs/bon_multihead/ensemble_UWO-0.5/bon_sampled_results.json",
              "runs/scored_multihead.jsonl", "runs/scored_lora.jsonl"],
    "monitor": ["runs/ppo_rm_monitor/monitor/steps.jsonl", "runs/ppo_rm_monitor/final/config.json"],
}


def journeys() -> list[tuple[str, str]]:
    return [(m["name"], m["body"]) for m in MARKER.finditer(README.read_text())]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A scratch folder laid out like the repository root after `make install` (inputs linked, outputs empty)."""
    root = tmp_path_factory.mktemp("clone")
    (root / ".venv").symlink_to(Path(sys.prefix))
    for name in LINKED:
        (root / name).symlink_to(REPO / name)
    return root


def run_block(root: Path, name: str, body: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **TOY_SIZES, "PORT": str(free_port()), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("MODELS_DIR", "DATA_DIR", "RUN_DIR", "POLICY"):
        env.pop(key, None)
    process = subprocess.Popen(["bash", "-euo", "pipefail", "-c", body], cwd=root, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = process.communicate(timeout=600)
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)  # a background server the block left behind
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(process.args, process.returncode, out)


def test_readme_marks_every_journey():
    names = [name for name, _ in journeys()]
    assert names == list(EXPECTED), names
    for name, body in journeys():
        commands = [line for line in body.splitlines() if line.strip() and not line.startswith(("#", " "))]
        pythons = [c for c in commands if "python" in c.split("#")[0]]
        assert all(".venv/bin/python" in c for c in pythons), f"{name}: a command outside .venv: {pythons}"


@pytest.mark.parametrize("name", list(EXPECTED))
def test_journey_runs_as_written(clone: Path, name: str):
    body = dict(journeys())[name]
    result = run_block(clone, name, body)
    assert result.returncode == 0, f"journey {name} failed (exit {result.returncode}):\n{result.stdout[-6000:]}"
    missing = [p for p in EXPECTED[name] if not (clone / p).exists()]
    assert not missing, f"journey {name} did not write {missing}:\n{result.stdout[-3000:]}"
    if name == "coste":
        curves = {p.parent.name: json.loads(p.read_text()) for p in (clone / "runs/bon").glob("*/bon_sampled_results.json")}
        assert set(curves) == {"seed1", "seed2", "seed3", "ensemble_mean", "ensemble_WCO", "ensemble_UWO-0.5"}
        eval_rows = [row for f in sorted((clone / "runs/ppo_uwo3/eval").glob("eval_step*.json"))
                     for row in json.loads(f.read_text())["rows"]]
        assert eval_rows and all(row["gold_score"] is not None and row["status"] in ("ok", "error") for row in eval_rows)
    if name == "vrcli":
        rows = [json.loads(line) for line in (clone / "rl_data_with_baseline/train.jsonl").read_text().splitlines()]
        assert all(isinstance(r["prompt"], list) and r["label"]["baseline_ppl"] > 0 for r in rows)
    if name == "openrlhf":
        assert "answers /health" in result.stdout and "ok: runtime_env" in result.stdout
        assert "openrlhf_ext.export runs/ppo_rm/checkpoints models/ppo_rm" in result.stdout
