"""`bench/gpu_check.py --dry-run`: the GPU check's code paths (RM scoring, VR-CLI scoring and baselines, a PPO
step, a GRPO step, the multi-head ensemble against one RM) run on CPU at tiny sizes and print one table, so the GPU run cannot break unseen."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_dry_run_prints_one_table_with_every_row(tmp_path, capsys):
    gpu_check = load_gpu_check()
    assert gpu_check.main(["--dry-run", "--work", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = out[out.index("gpu_check on CPU dry run"):].splitlines()
    rows = table[2:]
    starts = ["RM scoring", "VR-CLI scorer", "PPO step", "GRPO step", "multi-head ensemble k=5 vs one RM"]
    assert [next(r for r in rows if r.startswith(s)) for s in starts]
    assert "samples/s batched" in table[2] and "one at a time" in table[2] and "tokens/s" in table[3]
    assert "s/step" in table[4] and "s/step" in table[5] and "not run" not in out
    multihead = next(r for r in rows if r.startswith("multi-head ensemble k=5 vs one RM"))
    assert "x one RM's samples/s" in multihead and "parameter memory 1.00" in multihead  # 5 heads vs 1 on one backbone
    assert list(tmp_path.iterdir()) == []  # scratch models removed


def test_flops_count_and_peak_lookup():
    gpu_check = load_gpu_check()
    linear = torch.nn.Linear(4, 4, bias=False)
    model = torch.nn.Module()
    model.embed_tokens, model.proj = torch.nn.Embedding(10, 4), linear
    model.config = type("C", (), {"num_hidden_layers": 2, "hidden_size": 4})()
    # 16 non-embedding weights: 2 * 16 per token; causal attention 2 * layers * hidden * n^2 per sequence
    assert gpu_check.forward_flops(model, [3, 5]) == 2 * 16 * 8 + 2 * 2 * 4 * (9 + 25)
    assert gpu_check.peak_flops(torch.device("cpu")) is None
    assert dict(gpu_check.BF16_PEAK)["H100 PCIe"] < dict(gpu_check.BF16_PEAK)["H100"]


def test_without_a_gpu_the_full_run_says_so(capsys):
    if torch.cuda.is_available():
        return
    assert load_gpu_check().main([]) == 2
    assert "--dry-run" in capsys.readouterr().err
