"""Batched sampling from a causal LM (eval files, best-of-n)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Generations:
    """Completions for a list of prompts: texts, the prompt and completion token ids (EOS kept)."""

    prompts: list[str]
    texts: list[str]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]


def _completion_ids(row: torch.Tensor, eos_id: int | None, pad_id: int | None) -> list[int]:
    ids = row.tolist()
    if eos_id is not None and eos_id in ids:
        return ids[: ids.index(eos_id) + 1]
    return [t for t in ids if t != pad_id]


@torch.inference_mode()
def sample(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int,
           temperature: float = 1.0, batch_size: int = 64, seed: int | None = None) -> Generations:
    """Sample one completion per prompt (repeat prompts for several), left-padded batches, stopping at EOS."""
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    texts, prompt_ids, completion_ids = [], [], []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )
            width = enc["input_ids"].shape[1]
            for row, mask, generated in zip(enc["input_ids"], enc["attention_mask"], out[:, width:]):
                ids = _completion_ids(generated, tokenizer.eos_token_id, tokenizer.pad_token_id)
                prompt_ids.append(row[mask.bool()].tolist())
                completion_ids.append(ids)
                texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return Generations(list(prompts), texts, prompt_ids, completion_ids)
