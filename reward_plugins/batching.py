"""Length-sorted batching and padding: pure helpers shared by every model-backed scorer."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def length_sorted_batches(
    lengths: Sequence[int], batch_size: int, max_tokens: int | None = None
) -> list[list[int]]:
    """Group indices into batches of similar length, longest first, to cut padding.

    A batch holds at most `batch_size` items and, when `max_tokens` is set, at most `max_tokens` padded
    tokens (a single item longer than that still gets a batch of its own). Longest first means an
    out-of-memory error shows up on the first batch, not after minutes of work.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = lengths[current[0]] if current else lengths[index]
        too_many_tokens = max_tokens is not None and longest * (len(current) + 1) > max_tokens
        if current and (len(current) == batch_size or too_many_tokens):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into `(input_ids, attention_mask)` tensors."""
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a sequence scores the same alone or padded in a batch."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)


def truncate(ids: Sequence[int], max_length: int, side: str) -> tuple[list[int], bool]:
    """Cut `ids` to `max_length` from `side` ("left" keeps the end); say whether anything was cut."""
    ids = list(ids)
    if len(ids) <= max_length:
        return ids, False
    return (ids[-max_length:] if side == "left" else ids[:max_length]), True


def last_token_index(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Per row, the position of the rightmost token that is not padding: where transformers'
    `*ForSequenceClassification` models read their score, so heads trained through them read the same token."""
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (positions * (input_ids != pad_token_id)).argmax(-1)
