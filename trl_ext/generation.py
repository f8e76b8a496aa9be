"""Batched sampling from a causal LM that follows the policy: PPO rollouts, eval files, best-of-n.

Log-probs, KL and PPO ratios are computed as `log_softmax(logits / T)` of the chosen tokens, so sampling must
draw from exactly that distribution (with top-k / top-p only where a caller asks for them, e.g. held-out
eval). A checkpoint's own `generation_config` (`repetition_penalty`, `min_new_tokens`, `no_repeat_ngram_size`,
`bad_words_ids`, its own EOS list, ...) would otherwise still apply: transformers fills every field a passed
config leaves unset from the model's. `sampling_config` builds a fresh `GenerationConfig` holding only the
fields we mean, and `generate_following` runs `generate` with the model's own config set aside.
`FollowsPolicySampling` does the same for TRL's GRPO / RLOO training sampler: only the fields TRL sets from its
own config (temperature, top-p/k, min-p, repetition penalty, `generation_kwargs`, its EOS list) apply. The model's
`generation_config` is only set aside while sampling, so checkpoints and the final model keep theirs.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Generations:
    """Completions for a list of prompts: texts, the prompt and completion token ids (EOS kept).

    `logprobs` (with `return_logprobs`) holds the sampler's own log-probability of each completion token, from
    the scores the sampler drew from: equal to `log_softmax(logits / T)` when sampling follows the policy.
    """

    prompts: list[str]
    texts: list[str]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    logprobs: list[list[float]] | None = None


def sampling_config(tokenizer: PreTrainedTokenizerBase, max_new_tokens: int, temperature: float = 1.0,
                    top_p: float = 1.0, top_k: int = 0) -> GenerationConfig:
    """Plain sampling from `softmax(logits / T)` (top-k / top-p only when set), stopping at the tokenizer's EOS."""
    return GenerationConfig(
        do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens,
        min_new_tokens=0, repetition_penalty=1.0, no_repeat_ngram_size=0, num_beams=1,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )


@contextmanager
def _without_checkpoint_defaults(model: PreTrainedModel) -> Iterator[None]:
    """Set the model's (and a PEFT base model's) `generation_config` aside, so none of its fields fills ours."""
    holders = [model, *([model.get_base_model()] if hasattr(model, "get_base_model") else [])]
    saved = [holder.generation_config for holder in holders]
    try:
        for holder in holders:
            holder.generation_config = GenerationConfig()
        yield
    finally:
        for holder, config in zip(holders, saved):
            holder.generation_config = config


class FollowsPolicySampling:
    """Mixin for TRL's GRPO / RLOO trainers: their training sampler runs with the model's own `generation_config`
    set aside, so TRL's config is the only one that applies (transformers fills every field TRL leaves unset,
    e.g. `min_new_tokens`, `no_repeat_ngram_size`, `bad_words_ids`, from the checkpoint's). TRL computes the
    old and reference log-probs as `log_softmax(logits / T)`; now the samples come from that distribution."""

    def _generate_single_turn(self, *args, **kwargs):
        with _without_checkpoint_defaults(self.accelerator.unwrap_model(self.model)):
            return super()._generate_single_turn(*args, **kwargs)


def following_trainer(trainer_cls: type) -> type:
    """`trainer_cls` (TRL's GRPOTrainer or RLOOTrainer) with `FollowsPolicySampling`; refused if TRL no longer
    samples through `_generate_single_turn` (the override would silently do nothing)."""
    if not callable(getattr(trainer_cls, "_generate_single_turn", None)):
        raise RuntimeError(f"{trainer_cls.__name__} has no _generate_single_turn: this TRL version samples "
                           "elsewhere; pin the TRL in requirements.txt")
    if trainer_cls not in _FOLLOWING:
        _FOLLOWING[trainer_cls] = type(trainer_cls.__name__, (FollowsPolicySampling, trainer_cls),
                                       {"__doc__": trainer_cls.__doc__, "__module__": __name__})
    return _FOLLOWING[trainer_cls]


_FOLLOWING: dict[type, type] = {}


def generate_following(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       config: GenerationConfig, output_scores: bool = False):
    """`model.generate` with exactly `config` (nothing from the checkpoint's generation config); with
    `output_scores` the result also holds the processed scores each token was drawn from."""
    if output_scores:
        config = copy.deepcopy(config)
        config.output_scores = config.return_dict_in_generate = True
    with _without_checkpoint_defaults(model):
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)


def completion_ids(row: Sequence[int], eos_id: int | None) -> list[int]:
    """The sampled tokens of one row: up to and including the first EOS, else all of them (pads sampled as
    tokens are kept: without an EOS every position was sampled)."""
    ids = list(row)
    if eos_id is not None and eos_id in ids:
        return ids[: ids.index(eos_id) + 1]
    return ids


@torch.inference_mode()
def sample(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int,
           temperature: float = 1.0, batch_size: int = 64, seed: int | None = None, top_p: float = 1.0,
           top_k: int = 0, return_logprobs: bool = False) -> Generations:
    """Sample one completion per prompt (repeat prompts for several), left-padded batches, stopping at EOS."""
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    config = sampling_config(tokenizer, max_new_tokens, temperature, top_p, top_k)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    texts, prompt_ids, completions, logprobs = [], [], [], []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = generate_following(model, enc["input_ids"], enc["attention_mask"], config, return_logprobs)
            sequences = out.sequences if return_logprobs else out
            width = enc["input_ids"].shape[1]
            generated = sequences[:, width:]
            if return_logprobs:
                steps = torch.stack(out.scores, 1).float().log_softmax(-1)  # (batch, new tokens, vocab)
                chosen = steps.gather(2, generated.unsqueeze(-1)).squeeze(-1)
            for index, (row, mask) in enumerate(zip(enc["input_ids"], enc["attention_mask"])):
                ids = completion_ids(generated[index].tolist(), tokenizer.eos_token_id)
                prompt_ids.append(row[mask.bool()].tolist())
                completions.append(ids)
                texts.append(tokenizer.decode(ids, skip_special_tokens=True))
                if return_logprobs:
                    logprobs.append(chosen[index, : len(ids)].tolist())
    finally:
        tokenizer.padding_side = side
    return Generations(list(prompts), texts, prompt_ids, completions, logprobs if return_logprobs else None)
