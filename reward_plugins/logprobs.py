"""Log-probabilities of continuations given contexts, behind one small interface.

VR-CLI needs log p(gold tokens | context) from a frozen model. `LogProbScorer` is what the reward asks
for; `HFLogProbScorer` answers it with a local Hugging Face causal LM in length-sorted batches. Other
backends (for example OpenRLHF's reference-model actors) implement the same method.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from .batching import length_sorted_batches, position_ids_from_mask, right_pad
from .modeling import DTypeName, load_tokenizer, require_safetensors, resolve_device, resolve_dtype


@runtime_checkable
class LogProbScorer(Protocol):
    """Per-token log-probs of each continuation given its context, as float64 arrays."""

    temperature: float
    tokenizer: PreTrainedTokenizerBase

    def continuation_logprobs(
        self, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
    ) -> list[np.ndarray]: ...


def dtype_name(value) -> str | None:
    """One spelling for a dtype: `bf16`, `torch.bfloat16` and `bfloat16` are all `bfloat16` (None stays None)."""
    if value is None:
        return None
    text = str(value).removeprefix("torch.")
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16", "float": "float32"}.get(text, text)


def perplexity(token_logprobs: np.ndarray) -> float:
    """exp of the mean negative log-likelihood over the scored tokens."""
    if len(token_logprobs) == 0:
        raise ValueError("perplexity of zero tokens is undefined")
    return float(np.exp(-np.mean(token_logprobs)))


def fit_context(context: Sequence[int], continuation: Sequence[int], max_length: int) -> tuple[list[int], bool]:
    """Cut the context from the left so context + continuation fits `max_length`; the continuation is never cut."""
    if not context:
        raise ValueError("an empty context cannot predict the first continuation token")
    if not continuation:
        raise ValueError("empty continuation: nothing to score")
    room = max_length - len(continuation)
    if room < 1:
        raise ValueError(
            f"continuation of {len(continuation)} tokens leaves no room for context within max_length={max_length}"
        )
    context = list(context)
    if len(context) <= room:
        return context, False
    return context[-room:], True


class HFLogProbScorer:
    """Batched continuation log-probs from a local causal LM (frozen, `inference_mode`).

    Logits are divided by `temperature` before the softmax, as OpenRLHF's reference model does, so
    baselines computed here match rewards computed there at the same temperature.
    """

    def __init__(
        self,
        model_path: str,
        tokenizer_path: str | None = None,
        *,
        dtype: DTypeName = "auto",
        device: str = "auto",
        batch_size: int = 8,
        max_tokens_per_batch: int | None = None,
        max_length: int = 4096,
        temperature: float = 1.0,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
    ):
        require_safetensors(model_path)
        target = resolve_device(device)
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=resolve_dtype(dtype, target), trust_remote_code=trust_remote_code, **extra
        ).to(target).eval()
        tokenizer = load_tokenizer(tokenizer_path or model_path, trust_remote_code)
        self._attach(model, tokenizer, batch_size, max_tokens_per_batch, max_length, temperature)

    @classmethod
    def from_model(
        cls,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        batch_size: int = 8,
        max_tokens_per_batch: int | None = None,
        max_length: int = 4096,
        temperature: float = 1.0,
    ) -> HFLogProbScorer:
        """Score with a model already in memory (e.g. the policy being trained), used as is, not copied."""
        scorer = cls.__new__(cls)
        scorer._attach(model, tokenizer, batch_size, max_tokens_per_batch, max_length, temperature)
        return scorer

    def _attach(self, model, tokenizer, batch_size, max_tokens_per_batch, max_length, temperature) -> None:
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        self.model = model
        self.tokenizer: PreTrainedTokenizerBase = tokenizer
        self.device = next(model.parameters()).device
        self.batch_size = batch_size
        self.max_tokens_per_batch = max_tokens_per_batch
        self.max_length = max_length
        self.temperature = temperature
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.truncated_contexts = 0

    @property
    def dtype(self) -> str:
        """The weights' dtype name (`bfloat16`, ...), as baseline fingerprints record it."""
        return dtype_name(next(self.model.parameters()).dtype)

    @property
    def attn_implementation(self) -> str | None:
        """The attention kernel the model runs (`sdpa`, `flash_attention_2`, `eager`), as fingerprints record it."""
        return getattr(getattr(self.model, "config", None), "_attn_implementation", None)

    @torch.inference_mode()
    def continuation_logprobs(
        self, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
    ) -> list[np.ndarray]:
        if len(contexts) != len(continuations):
            raise ValueError("contexts and continuations differ in length")
        fitted = [fit_context(c, g, self.max_length) for c, g in zip(contexts, continuations)]
        self.truncated_contexts += sum(cut for _, cut in fitted)
        sequences = [ctx + list(gold) for (ctx, _), gold in zip(fitted, continuations)]
        starts = [len(ctx) for ctx, _ in fitted]
        out: list[np.ndarray | None] = [None] * len(sequences)
        lengths = [len(s) for s in sequences]
        for batch in length_sorted_batches(lengths, self.batch_size, self.max_tokens_per_batch):
            rows = self._score_batch([sequences[i] for i in batch], [starts[i] for i in batch])
            for i, row in zip(batch, rows):
                out[i] = row
        return out  # type: ignore[return-value]

    def _score_batch(self, sequences: list[list[int]], starts: list[int]) -> list[np.ndarray]:
        input_ids, attention_mask = right_pad(sequences, self.tokenizer.pad_token_id)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        width = input_ids.shape[1]
        # Logits at position p predict token p + 1; the first scored token sits at `start`.
        keep = width - (min(starts) - 1)
        kwargs = {"logits_to_keep": keep} if self._keeps_logits else {}
        logits = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            **kwargs,
        ).logits[:, -keep:]
        rows = continuation_token_logprobs(logits, input_ids, starts, [len(s) for s in sequences], self.temperature)
        return [row.double().cpu().numpy() for row in rows]


def continuation_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, starts: Sequence[int],
                                lengths: Sequence[int], temperature: float) -> list[torch.Tensor]:
    """Log-probs of tokens `starts[i]:lengths[i]` of each row under `log_softmax(logits / temperature)`.

    `logits` covers the last `logits.shape[1]` positions of `input_ids` (logits at position p predict token
    p + 1). Only the scored positions are upcast and normalised (not the whole batch's vocabulary rows), and
    everything stays on the logits' device.
    """
    offset = input_ids.shape[1] - logits.shape[1]
    rows = []
    for row, (start, length) in enumerate(zip(starts, lengths)):
        positions = torch.arange(start - 1, length - 1, device=logits.device) - offset
        targets = input_ids[row, start:length].to(logits.device)
        scaled = logits[row, positions].float() / temperature
        rows.append(scaled.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1))
    return rows
