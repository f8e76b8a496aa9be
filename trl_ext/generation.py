"""Batched sampling from a causal LM and per-token log-probs of its completions (eval files, best-of-n)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from reward_plugins.batching import right_pad


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


@torch.inference_mode()
def completion_logprobs(model: PreTrainedModel, prompt_ids: Sequence[Sequence[int]],
                        completion_ids: Sequence[Sequence[int]], pad_id: int, batch_size: int = 64) -> list[torch.Tensor]:
    """Log-probability of each completion token given its prompt and the completion tokens before it."""
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    for start in range(0, len(prompt_ids), batch_size):
        pids, cids = prompt_ids[start : start + batch_size], completion_ids[start : start + batch_size]
        input_ids, mask = right_pad([list(p) + list(c) for p, c in zip(pids, cids)], pad_id)
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = input_ids[:, 1:].to(device)
        token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
        for row, (p, c) in enumerate(zip(pids, cids)):
            out.append(token_logp[row, len(p) - 1 : len(p) - 1 + len(c)])
    return out


def sequence_kl(policy_logps: Sequence[torch.Tensor], ref_logps: Sequence[torch.Tensor]) -> list[float]:
    """Sampled sequence KL (k1): sum over completion tokens of log pi - log pi_ref."""
    return [float((p - r).sum()) for p, r in zip(policy_logps, ref_logps, strict=True)]
