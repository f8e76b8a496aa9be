"""VR-CLI baselines: perplexity without a plan, and the fingerprint that ties a baseline to the reward's settings.

The baseline script records the reward's fingerprint (scorer model name, temperature, max_length,
prompt-settings hash, dtype, attention implementation) in every label, and the reward refuses labels whose
fingerprint differs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

import numpy as np

from ..logprobs import LogProbScorer, dtype_name, perplexity
from .prompts import ScoredInput, VRCLIPrompt

FINGERPRINT_KEY = "baseline_fingerprint"
OPTIONAL_KEYS = ("model", "dtype", "attn_implementation")  # compared when the reward side knows them


def model_id(name_or_path: str | os.PathLike) -> str:
    """A model's name for fingerprints: the last path component (`Qwen/Qwen2.5-7B-Instruct` -> `Qwen2.5-7B-Instruct`)."""
    return PurePath(str(name_or_path).rstrip("/\\")).name or str(name_or_path)


def fingerprint(model: str | None, temperature: float, max_length: int, prompt: VRCLIPrompt, dtype: str | None = None,
                attn_implementation: str | None = None, revision: str | None = None) -> dict[str, Any]:
    """What must agree between a baseline and the reward that uses it: scorer model (and its hub commit when it came
    from a hub id), temperature, max_length, prompt settings, and the numerics (weights' dtype, attention kernel:
    bf16 flash-attention and fp32 sdpa give perplexities that differ by more than the reward's first step)."""
    out = {"model": model, "temperature": float(temperature), "max_length": int(max_length),
           "prompt_hash": prompt.settings_hash(), "dtype": dtype_name(dtype), "attn_implementation": attn_implementation}
    if revision is not None:
        out["revision"] = revision
    return out


def fingerprint_differences(expected: Mapping[str, Any], found: Any) -> list[str]:
    """Human-readable differences between the reward's fingerprint and a label's (empty when they agree).

    A `None` model, dtype or attention implementation on the reward side (an external scorer that did not
    say) is not compared.
    """
    if not isinstance(found, Mapping):
        return [f"{FINGERPRINT_KEY} is {found!r}, not an object"]
    out = []
    for key, value in expected.items():
        other = found.get(key)
        if value is None and key in OPTIONAL_KEYS:
            continue
        same = (isinstance(other, (int, float)) and not isinstance(other, bool) and math.isclose(other, value)
                if key == "temperature" else other == value)
        if not same:
            out.append(f"{key}: baseline {other!r}, reward {value!r}")
    return out


class BaselineMismatchError(RuntimeError):
    """Labels carry baselines computed with other settings than this reward's: the run must stop."""


def baseline_inputs(scorer: LogProbScorer, prompt: VRCLIPrompt, labels: Sequence[Any]) -> list[ScoredInput]:
    """The baseline (no plan) inputs of each label, fitted to the scorer's max_length."""
    max_length = getattr(scorer, "max_length", None)
    return [prompt.scored_input(scorer.tokenizer, label, None, max_length) for label in labels]


def baseline_perplexities(scorer: LogProbScorer, prompt: VRCLIPrompt, labels: Sequence[Any]) -> np.ndarray:
    """Perplexity of each label's gold continuation without a plan: the VR-CLI baseline."""
    inputs = baseline_inputs(scorer, prompt, labels)
    logprobs = scorer.continuation_logprobs([i.context for i in inputs], [i.gold for i in inputs])
    return np.array([perplexity(row) for row in logprobs])


def valid_baseline(value: Any) -> bool:
    """A usable baseline perplexity: a real number (not a bool) that is finite and positive as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value)) and value > 0
    except OverflowError:
        return False
