"""Our reward pipeline as a TRL reward function: one batched `pipeline.score` call per step.

TRL calls `fn(prompts=, completions=, completion_ids=, **columns, trainer_state=, log_extra=, log_metric=)`
with every dataset column (the label included) and takes a list of floats, `None` meaning "skip".
The adapter logs every key of `pipeline.log_keys` each call (so every rank logs the same keys), adds
the per-sample components to TRL's completions table, and every `table_every` steps writes a JSONL table
of sample completions with their rewards under `table_dir`. When every sample of `stop_after` consecutive
steps errored it raises `RewardFailure` with the first error, instead of training on penalties alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from reward_plugins.io import write_jsonl
from reward_plugins.pipeline import RewardPipeline, ScoredBatch
from reward_plugins.types import RewardResult, Sample, Status

CONTROL_KWARGS = ("trainer_state", "log_extra", "log_metric", "environments")
DEFAULT_STOP_AFTER = 3


class RewardFailure(RuntimeError):
    """The reward failed on every sample of several consecutive steps; training on it would learn nothing."""


class ErrorStreak:
    """Counts consecutive steps whose samples all errored; `observe` raises `RewardFailure` at `stop_after`.

    Framework-free so any trainer (TRL, a PPO loop) can call it once per scored batch; 0 disables it."""

    def __init__(self, stop_after: int = DEFAULT_STOP_AFTER):
        if stop_after < 0:
            raise ValueError("stop_after must be >= 0")
        self.stop_after = stop_after
        self.steps = 0
        self.first_error: str | None = None

    def observe(self, results: Sequence[RewardResult]) -> None:
        if not results or any(r.status != Status.ERROR for r in results):
            self.steps, self.first_error = 0, None
            return
        self.steps += 1
        if self.first_error is None:
            self.first_error = next((r.error for r in results if r.error), "no error message")
        if self.stop_after and self.steps >= self.stop_after:
            raise RewardFailure(
                f"the reward failed on every sample of {self.steps} consecutive steps ({len(results)} samples in the "
                f"last); stopping instead of training on error penalties. First error: {self.first_error}"
            )


def _text(value: Any, tokenizer=None) -> str:
    """A completion or prompt as text; message-list prompts go through the chat template when a tokenizer is given
    (as the policy saw them), else their contents are joined (completions)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(value, add_generation_prompt=True, tokenize=False)
        return "".join(str(m["content"]) for m in value)
    raise TypeError(f"expected a string or a list of messages, got {type(value).__name__}")


class PipelineRewardFunc:
    """Callable that TRL's GRPO/RLOO trainers accept in `reward_funcs`."""

    def __init__(self, pipeline: RewardPipeline, name: str = "pipeline", label_key: str = "label",
                 table_dir: str | Path | None = None, table_every: int = 0, table_rows: int = 8,
                 stop_after: int = DEFAULT_STOP_AFTER, tokenizer=None,
                 observer: Callable[[list[Sample], ScoredBatch], Any] | None = None):
        self.pipeline = pipeline
        self.__name__ = name
        self.label_key = label_key
        self.table_dir = Path(table_dir) if table_dir is not None else None
        self.table_every = table_every
        self.table_rows = table_rows
        self.last = None
        self.streak = ErrorStreak(stop_after)
        self.tokenizer = tokenizer
        self.observer = observer  # sees every scored batch (the over-optimisation monitor)

    def samples(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Sequence[int]] | None,
                columns: dict[str, Sequence[Any]]) -> list[Sample]:
        """Samples with the label column as the label (the whole row when there is no label column)."""
        labels = columns.get(self.label_key)
        if labels is None:
            labels = [{key: values[i] for key, values in columns.items()} for i in range(len(prompts))]
        group_ids = columns.get("id") or [None] * len(prompts)
        samples = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            prompt_text, response = _text(prompt, self.tokenizer), _text(completion)
            samples.append(Sample(
                prompt=prompt_text,
                response=response,
                query=prompt_text + response,
                label=labels[i],
                response_ids=list(completion_ids[i]) if completion_ids is not None else None,
                group_id=group_ids[i],
            ))
        return samples

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Sequence[int]] | None = None,
                 **kwargs: Any) -> list[float | None]:
        control = {key: kwargs.pop(key, None) for key in CONTROL_KWARGS}
        samples = self.samples(prompts, completions, completion_ids, kwargs)
        scored = self.pipeline.score(samples)
        self.last = scored
        if self.observer is not None:
            self.observer(samples, scored)
        log_metric: Callable[[str, float], None] | None = control["log_metric"]
        if log_metric is not None:
            for key in self.pipeline.log_keys:
                log_metric(key, scored.logs[key])
        log_extra: Callable[[str, list], None] | None = control["log_extra"]
        if log_extra is not None:
            per_sample = [scored.sample_logs(i) for i in range(len(prompts))]
            for key in self.pipeline.log_keys[1:]:
                log_extra(key, [row[key] for row in per_sample])
        state = control["trainer_state"]
        step = int(getattr(state, "global_step", 0) or 0)
        if self.table_dir is not None and self.table_every > 0 and step % self.table_every == 0:
            self._write_table(step, prompts, completions, scored)
        self.streak.observe(scored.results)
        return list(scored.rewards)

    def _write_table(self, step: int, prompts, completions, scored) -> None:
        rows = []
        for i in range(min(self.table_rows, len(prompts))):
            result = scored.results[i]
            rows.append({
                "step": step, "prompt": _text(prompts[i], self.tokenizer), "completion": _text(completions[i]),
                "reward": scored.rewards[i], "status": result.status.value, "error": result.error,
                "components": dict(result.components),
            })
        write_jsonl(self.table_dir / f"completions_step{step:06d}.jsonl", rows)
