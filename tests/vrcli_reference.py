"""An independent VR-CLI perplexity for tests: the original's whole-string computation, written with transformers only.

As ReasoningNCP's `rl_training/compute_baseline_ppls.py` and `ray_utils.py` do (read for facts, not copied):
the conversation with the gold chapter as the assistant turn goes through `apply_chat_template(tokenize=True)`
once, every label before the gold is masked with -100, and the perplexity is exp of the model's own loss.
"""

from __future__ import annotations

import math

import torch


def whole_string_ppl(model, tokenizer, messages: list[dict[str, str]], gold: str, temperature: float = 1.0) -> float:
    """exp(mean NLL) of every token from the gold's first to the end of the rendered conversation."""
    ids = list(tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": gold}], tokenize=True)["input_ids"])
    prefix = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
    assert ids[: len(prefix)] == prefix, "the template renders the prompt differently once the gold follows"
    input_ids = torch.tensor([ids])
    labels = input_ids.clone()
    labels[:, : len(prefix)] = -100
    with torch.no_grad():
        if temperature == 1.0:
            return math.exp(model(input_ids=input_ids, labels=labels).loss.item())
        logits = model(input_ids=input_ids).logits[0, len(prefix) - 1 : -1] / temperature
        return math.exp(torch.nn.functional.cross_entropy(logits, input_ids[0, len(prefix) :]).item())


def messages_for(system: str | None, user: str) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": user}]
