"""Turn OpenRLHF micro-batch `Experience`s into our `Sample`s and per-sample info values (no openrlhf import)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from reward_plugins.pipeline import FIXED_LOG_KEYS, LOG_PREFIX
from reward_plugins.types import Sample


def response_ids(sequences: torch.Tensor, action_mask: torch.Tensor) -> list[list[int]]:
    """Generated token ids per row: the action mask covers the last `action_mask.shape[1]` positions."""
    tail = sequences[:, sequences.shape[1] - action_mask.shape[1] :]
    return [tail[row][action_mask[row].bool()].tolist() for row in range(sequences.shape[0])]


def experience_samples(experience: Any, tokenizer: Any, n_samples_per_prompt: int) -> list[Sample]:
    """One `Sample` per row: prompt text, response and query decoded with special tokens kept (as OpenRLHF's reward_func sees them)."""
    ids = response_ids(experience.sequences, experience.action_mask)
    samples = []
    for row, generated in enumerate(ids):
        full = experience.sequences[row][experience.attention_mask[row].bool()].tolist()
        index = experience.index[row] if experience.index is not None else None
        samples.append(
            Sample(
                prompt=experience.prompts[row],
                response=tokenizer.decode(generated, skip_special_tokens=False),
                query=tokenizer.decode(full, skip_special_tokens=False),
                label=experience.labels[row] if experience.labels else None,
                response_ids=generated,
                group_id=None if index is None else index // n_samples_per_prompt,
            )
        )
    return samples


def info_components(info: dict[str, torch.Tensor], batch_size: int) -> list[dict[str, float]]:
    """Per-row reward components that a rollout-side reward (our server or shim) left as `reward/<name>` info keys."""
    keys = [k for k in info if k.startswith(LOG_PREFIX) and k not in FIXED_LOG_KEYS]
    rows: list[dict[str, float]] = [{} for _ in range(batch_size)]
    for key in keys:
        values = torch.as_tensor(info[key]).flatten().tolist()
        for row, value in zip(range(batch_size), values):
            rows[row][key[len(LOG_PREFIX) :]] = float(value)
    return rows


def sequence_kl(experience: Any, has_reference: bool) -> list[float] | None:
    """Per-row sum over response tokens of log pi - log pi_ref (k1), or None without a reference model.

    With `--algo.kl.use_loss` the reference log-probs stay on the experience; otherwise only the masked
    mean `info["logprobs_diff"]` does, so the sum is that mean times the response length.
    """
    if not has_reference:
        return None
    mask = experience.action_mask.float()
    if experience.base_action_log_probs is not None and experience.action_log_probs is not None:
        diff = (experience.action_log_probs.float() - experience.base_action_log_probs.float()) * mask
        return diff.sum(-1).tolist()
    mean = experience.info.get("logprobs_diff")
    return None if mean is None else (mean.float() * mask.sum(-1)).tolist()


def split_by(values: Sequence[Any], sizes: Sequence[int]) -> list[list[Any]]:
    out, start = [], 0
    for size in sizes:
        out.append(list(values[start : start + size]))
        start += size
    return out
