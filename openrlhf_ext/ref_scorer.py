"""VR-CLI log-probs from OpenRLHF's reference-model actors (the frozen initial policy already on the GPUs).

`ReferenceLogProbScorer` implements `reward_plugins.logprobs.LogProbScorer`. Each micro-batch is laid out
as `[left-padded context][gold, right-padded]` with an `action_mask` that is 1 on the gold tokens, because
the reference actor returns log-probs for the last `action_mask.shape[1]` positions only, computed from
`log_softmax(logits / --rollout.temperature)`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import ray
import torch

from reward_plugins.batching import length_sorted_batches
from reward_plugins.config import PluginSpec
from reward_plugins.logprobs import fit_context
from reward_plugins.registry import RewardPlugin


class ReferenceModelError(RuntimeError):
    """The run cannot score VR-CLI with the reference model as configured; the message says what to change."""


def context_gold_batch(
    contexts: Sequence[Sequence[int]], golds: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sequences, attention_mask, action_mask): contexts left-padded, golds right-padded in the last columns."""
    context_width = max(len(c) for c in contexts)
    gold_width = max(len(g) for g in golds)
    rows = len(contexts)
    sequences = torch.full((rows, context_width + gold_width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(sequences)
    action_mask = torch.zeros((rows, gold_width), dtype=torch.bool)
    for row, (context, gold) in enumerate(zip(contexts, golds)):
        start = context_width - len(context)
        sequences[row, start:context_width] = torch.as_tensor(context, dtype=torch.long)
        sequences[row, context_width : context_width + len(gold)] = torch.as_tensor(gold, dtype=torch.long)
        attention_mask[row, start : context_width + len(gold)] = 1
        action_mask[row, : len(gold)] = True
    return sequences, attention_mask, action_mask


def spread_batches(batches: list[list[int]], minimum: int) -> list[list[int]]:
    """Split the largest batches until there are `minimum` of them; pad with repeats when items run out.

    OpenRLHF's `async_run_method_batch` refuses fewer micro-batches than effective actors.
    """
    batches = [list(b) for b in batches]
    while len(batches) < minimum:
        largest = max(range(len(batches)), key=lambda i: len(batches[i]))
        if len(batches[largest]) < 2:
            batches.extend([list(batches[0])] * (minimum - len(batches)))
            break
        half = len(batches[largest]) // 2
        batches[largest : largest + 1] = [batches[largest][:half], batches[largest][half:]]
    return batches


class ReferenceLogProbScorer:
    """`LogProbScorer` over a `RayActorGroup` of OpenRLHF `ReferenceModelActor`s."""

    def __init__(
        self,
        group: Any,
        tokenizer: Any,
        *,
        temperature: float,
        micro_batch_size: int,
        max_length: int,
        effective_actors: int = 1,
        duplicate_factor: int = 1,
        sync: bool = False,
    ):
        self.group = group
        self.tokenizer = tokenizer
        self.temperature = float(temperature)
        self.micro_batch_size = micro_batch_size
        self.max_length = max_length
        self.effective_actors = max(1, effective_actors)
        self.duplicate_factor = max(1, duplicate_factor)
        self.sync = sync
        self.truncated_contexts = 0

    @torch.no_grad()
    def continuation_logprobs(
        self, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
    ) -> list[np.ndarray]:
        if len(contexts) != len(continuations):
            raise ValueError("contexts and continuations differ in length")
        if not contexts:
            return []
        fitted = [fit_context(c, g, self.max_length) for c, g in zip(contexts, continuations)]
        self.truncated_contexts += sum(cut for _, cut in fitted)
        lengths = [len(c) + len(g) for (c, _), g in zip(fitted, continuations)]
        batches = spread_batches(length_sorted_batches(lengths, self.micro_batch_size), self.effective_actors)
        tensors = [
            context_gold_batch([fitted[i][0] for i in b], [continuations[i] for i in b], self.tokenizer.pad_token_id)
            for b in batches
        ]
        refs = self.group.async_run_method_batch(
            method_name="forward",
            sequences=[t[0] for t in tensors],
            action_mask=[t[2] for t in tensors],
            attention_mask=[t[1] for t in tensors],
        )
        if self.sync:
            ray.get(refs)
            ray.get(self.group.async_run_method(method_name="empty_cache"))
        outputs = list(itertools.chain.from_iterable(ray.get(refs)[:: self.duplicate_factor]))
        if len(outputs) != len(batches):
            raise RuntimeError(f"reference model returned {len(outputs)} micro-batches for {len(batches)}")
        result: list[np.ndarray | None] = [None] * len(contexts)
        for batch, logprobs in zip(batches, outputs):
            for row, index in enumerate(batch):
                if result[index] is None:
                    result[index] = logprobs[row, : len(continuations[index])].double().cpu().numpy()
        return result  # type: ignore[return-value]


def external_scorer_specs(spec: PluginSpec) -> Iterator[PluginSpec]:
    """Every plugin spec in the tree whose `scorer.backend` is `external` (VR-CLI on the reference model)."""
    scorer = getattr(spec.config, "scorer", None)
    if getattr(scorer, "backend", None) == "external":
        yield spec
    for child in spec.children.values():
        yield from external_scorer_specs(child)


def external_scorer_plugins(plugin: RewardPlugin) -> Iterator[RewardPlugin]:
    """Every built plugin in the tree that waits for an attached scorer."""
    scorer = getattr(plugin.config, "scorer", None)
    if getattr(scorer, "backend", None) == "external" and hasattr(plugin, "attach_scorer"):
        yield plugin
    for value in vars(plugin).values():
        children = value if isinstance(value, (list, tuple)) else [value]
        for child in children:
            if isinstance(child, RewardPlugin):
                yield from external_scorer_plugins(child)


def check_reference_setup(specs: Sequence[PluginSpec], *, kl_init_coef: float, rollout_temperature: float) -> None:
    """Refuse a run whose VR-CLI reward cannot use the reference model: none loaded, or a temperature mismatch."""
    if not specs:
        return
    names = ", ".join(s.name for s in specs)
    if not kl_init_coef > 0:
        raise ReferenceModelError(
            f"reward plugin(s) {names} score with the reference model (scorer.backend: external), but "
            "--algo.kl.init_coef 0 removes it; use a tiny positive coefficient (e.g. 1e-6 with --algo.kl.use_loss)"
        )
    for spec in specs:
        temperature = spec.config.scorer.temperature
        if not math.isclose(temperature, rollout_temperature):
            raise ReferenceModelError(
                f"reward plugin {spec.name}: scorer.temperature is {temperature} (the baselines' temperature) but "
                f"--rollout.temperature is {rollout_temperature}; the reference model scales its logits by the "
                "rollout temperature, so both must match"
            )


def check_label_temperatures(labels: Sequence[Any], rollout_temperature: float) -> None:
    """Refuse labels whose `baseline_temperature` differs from the temperature the reference model runs at."""
    seen = {label.get("baseline_temperature") for label in labels if isinstance(label, dict)}
    wrong = sorted(t for t in seen if t is not None and not math.isclose(float(t), rollout_temperature))
    if wrong:
        raise ReferenceModelError(
            f"labels carry baseline perplexities computed at temperature {wrong}, but the reference model runs at "
            f"--rollout.temperature {rollout_temperature}; recompute the baselines at that temperature or change it"
        )
