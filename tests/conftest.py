"""Shared fixtures: tiny models built on the spot (random weights, tokenizer trained on a few lines).

`tests/` is deliberately not a package (the openrlhf wheel installs a top-level `tests`); pytest runs
with `--import-mode=importlib`, so helpers live in uniquely named modules beside this file.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest


def _require(names: tuple[str, ...]) -> None:
    """The OpenRLHF and Ray contract tests must run, not skip: a missing dependency stops the suite up front."""
    import importlib

    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            missing.append(f"{name} ({exc})")
    if missing:
        pytest.exit(f"the test suite needs {', '.join(missing)}: install requirements.txt (make install)", returncode=4)


_require(("openrlhf", "ray"))

sys.path.insert(0, str(Path(__file__).parent))
import openrlhf_stand_ins  # noqa: E402

openrlhf_stand_ins.install()
openrlhf_stand_ins.hide_from_trl()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
logging.getLogger("transformers").setLevel(logging.ERROR)

import torch  # noqa: E402

from reward_plugins import tiny_models  # noqa: E402

# Tiny models on a shared 2-core machine: one thread avoids OpenMP spin-waiting (5-10x faster here).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tokenizer_dir(tiny_dir) -> Path:
    return tiny_models.build_tokenizer(tiny_dir / "tokenizer")


@pytest.fixture(scope="session")
def rm_dirs(tiny_dir, tokenizer_dir) -> dict[int, Path]:
    """Five tiny HF-format reward models, seeds 1-5, at tiny_dir/rm_seed{seed}."""
    return {seed: tiny_models.build_reward_model(tiny_dir / f"rm_seed{seed}", tokenizer_dir, seed=seed) for seed in range(1, 6)}


@pytest.fixture(scope="session")
def lm_dir(tiny_dir, tokenizer_dir) -> Path:
    """A tiny random causal LM at tiny_dir/ref_lm."""
    return tiny_models.build_causal_lm(tiny_dir / "ref_lm", tokenizer_dir, seed=0)


@pytest.fixture(scope="session")
def multihead_dir(tiny_dir, tokenizer_dir) -> Path:
    """A tiny random multi-head RM with 5 heads at tiny_dir/rm_multihead_seed1 (configs/rewards/multihead_uwo5.yaml)."""
    return tiny_models.build_multihead_rm(tiny_dir / "rm_multihead_seed1", tokenizer_dir, k=5, seed=1)


@pytest.fixture(scope="session")
def lora_dir(tiny_dir, tokenizer_dir) -> Path:
    """A tiny random LoRA ensemble with 5 adapters on the top layer at tiny_dir/rm_lora_seed1 (configs/rewards/lora_uwo5.yaml)."""
    return tiny_models.build_lora_ensemble(tiny_dir / "rm_lora_seed1", tokenizer_dir, k=5, seed=1)


@pytest.fixture()
def models_env(monkeypatch, tiny_dir, rm_dirs, lm_dir, multihead_dir, lora_dir) -> Path:
    """Point the shipped configs' ${MODELS_DIR} at the tiny models."""
    monkeypatch.setenv("MODELS_DIR", str(tiny_dir))
    return tiny_dir
