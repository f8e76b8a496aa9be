"""`--help` answers at once on every command-line tool: it is parsed before torch, transformers, TRL or Ray load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CLIS = ["trl_ext.train", "trl_ext.sft", "trl_ext.train_rm", "trl_ext.demo", "trl_ext.demo_vrcli",
        "evaluation.eval_checkpoints", "evaluation.plots", "evaluation.run_bon_pipeline", "evaluation.run_ppo_gold_eval",
        "evaluation.sample_gold_gens", "openrlhf_ext.export", "openrlhf_ext.launch", "openrlhf_ext.serve",
        "reward_plugins.demo", "reward_plugins.score", "setup_data.compute_baseline_perplexity", "setup_data.convert",
        "setup_data.setup_rl_data", "setup_data.story_format", "setup_data.synthetic_task"]
HEAVY = ("torch", "transformers", "trl", "ray", "deepspeed", "vllm")
PROBE = """
import json, resource, runpy, sys, time
began = time.process_time()
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
else:
    code = None
heavy = [m for m in {heavy} if m in sys.modules]
print(json.dumps({{"code": code, "heavy": heavy, "cpu_s": time.process_time() - began}}), file=sys.__stderr__)
""".format(heavy=HEAVY)


@pytest.mark.parametrize("module", CLIS)
def test_help_answers_before_the_heavy_imports(module):
    result = subprocess.run([sys.executable, "-c", PROBE, module], cwd=REPO, capture_output=True, text=True, timeout=120)
    report = json.loads(result.stderr.strip().splitlines()[-1])
    assert report["code"] in (0, None) and "usage:" in result.stdout, result.stdout + result.stderr
    assert report["heavy"] == [], f"{module} --help imports {report['heavy']}"
    assert report["cpu_s"] < 2.0
