"""Eval files at every eval step: sample the eval prompts, score them with the pipeline, log KL to the initial policy.

Writes `EVAL_DIR/eval_step{step:06d}.json` through `evaluation.eval_files`, so the gold evaluation and the
plots read TRL runs exactly like OpenRLHF runs. With a `vrcli` reward the held-out VR-CLI metrics
(`vrcli_reward`, `vrcli_improvement`, `vrcli_improved_share`) go into the file's meta and to TensorBoard as `eval/*`. Runs on the main process only; the initial policy is a
frozen copy loaded from the policy path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from evaluation.eval_files import EvalFile, list_eval_files, read_eval_file, rows_from_scores, write_eval_file
from evaluation.eval_checkpoints import sequence_kls
from reward_plugins.logprobs import HFLogProbScorer
from reward_plugins.monitor_session import MonitorSession
from reward_plugins.pipeline import RewardPipeline
from reward_plugins.types import Sample
from reward_plugins.vrcli import eval_metrics, has_vrcli

from .generation import sample

logger = logging.getLogger(__name__)


def evaluate_policy(model, tokenizer, ref_model, pipeline: RewardPipeline, prompts: Sequence[str], labels: Sequence[Any],
                    step: int, kl_history: Sequence[float], max_new_tokens: int, temperature: float,
                    meta: dict[str, Any], seed: int = 0) -> EvalFile:
    """One eval file: a completion per prompt, its proxy reward and components, and its sequence KL."""
    was_training = model.training
    model.eval()
    try:
        gens = sample(model, tokenizer, prompts, max_new_tokens, temperature, seed=seed + step)
        kls = completion_kls(model, ref_model, tokenizer, gens.prompt_ids, gens.completion_ids)
    finally:
        model.train(was_training)
    samples = [Sample(prompt=p, response=t, query=p + t, label=lab, response_ids=ids)
               for p, t, lab, ids in zip(prompts, gens.texts, labels, gens.completion_ids)]
    scored = pipeline.score(samples)
    components = [dict(r.components) for r in scored.results]
    rows = rows_from_scores(prompts, gens.texts, scored.rewards, components, kls, scored.results)
    kl = float(np.mean(kls)) if kls else 0.0
    return EvalFile(step=step, rows=rows, kl=kl, kl_history=[*kl_history, kl], meta=dict(meta))


def completion_kls(policy, reference, tokenizer, prompt_ids: Sequence[list[int]],
                   completion_ids: Sequence[list[int]]) -> list[float]:
    """k1 sequence KL of each completion to the reference; an empty completion has KL 0."""
    scored = [i for i, ids in enumerate(completion_ids) if ids]
    width = max((len(prompt_ids[i]) + len(completion_ids[i]) for i in scored), default=1)
    scorers = [HFLogProbScorer.from_model(m, tokenizer, batch_size=64, max_length=width) for m in (policy, reference)]
    kls = sequence_kls(*scorers, [prompt_ids[i] for i in scored], [completion_ids[i] for i in scored])
    out = [0.0] * len(completion_ids)
    for i, kl in zip(scored, kls):
        out[i] = float(kl)
    return out


class EvalFileCallback(TrainerCallback):
    """Writes an eval file before training, every `every` steps and at the end."""

    def __init__(self, eval_dir: str | Path, pipeline: RewardPipeline, policy_path: str, prompts: Sequence[str],
                 labels: Sequence[Any], every: int, max_new_tokens: int, temperature: float, meta: dict[str, Any],
                 seed: int = 0, ref_model=None, monitor: MonitorSession | None = None):
        self.eval_dir = Path(eval_dir)
        self.pipeline = pipeline
        self.policy_path = policy_path
        self.prompts, self.labels = list(prompts), list(labels)
        self.every = every
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.meta = meta
        self.seed = seed
        self._ref = ref_model  # the frozen initial policy, when the caller already holds one
        self.monitor = monitor  # gold on every eval row and the monitor's values in the meta, when configured
        self._done: set[int] = set()
        self._writer = None
        self.has_vrcli = has_vrcli(pipeline.root)

    def _ref_model(self, device: torch.device):
        if self._ref is None:
            self._ref = AutoModelForCausalLM.from_pretrained(self.policy_path, dtype=torch.float32).to(device).eval()
        return self._ref

    def _history(self, step: int) -> list[float]:
        """KL of every earlier eval step (files from a resumed run's later steps are ignored)."""
        earlier = [p for p in list_eval_files(self.eval_dir) if int(p.stem.removeprefix("eval_step")) < step]
        return list(read_eval_file(earlier[-1]).kl_history) if earlier else []

    def write(self, step: int, model, tokenizer) -> Path | None:
        existing = {int(p.stem.removeprefix("eval_step")) for p in list_eval_files(self.eval_dir)}
        if step in self._done or step in existing:
            return None
        history = self._history(step)
        device = next(model.parameters()).device
        eval_file = evaluate_policy(model, tokenizer, self._ref_model(device), self.pipeline, self.prompts, self.labels,
                                    step, history, self.max_new_tokens, self.temperature, self.meta, self.seed)
        self._done.add(step)
        if self.monitor is not None:
            self.add_monitor(step, eval_file)
        if self.has_vrcli:
            metrics = eval_metrics([r.proxy_score for r in eval_file.rows], [r.components for r in eval_file.rows])
            eval_file.meta["metrics"] = metrics
            if self._writer is not None:
                for key, value in metrics.items():
                    self._writer.add_scalar(f"eval/{key}", value, step)
                self._writer.flush()
        path = write_eval_file(self.eval_dir, eval_file)
        logger.info("eval step %d: kl %.3f, mean proxy %.3f -> %s", step, eval_file.kl,
                    float(np.mean([r.proxy_score for r in eval_file.rows if r.proxy_score is not None] or [0.0])), path)
        return path

    def add_monitor(self, step: int, eval_file: EvalFile) -> None:
        """Gold for every row (when the monitor has gold) and the monitor's values, into the eval file."""
        samples = [Sample(prompt=row.prompt, response=row.answer, label=label)
                   for row, label in zip(eval_file.rows, self.labels, strict=True)]
        gold = self.monitor.score_eval(step, samples, [row.components for row in eval_file.rows])
        for row, value in zip(eval_file.rows, gold or []):
            row.gold_score = value
        eval_file.meta.update(self.monitor.eval_meta())

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.is_world_process_zero:
            if self.has_vrcli and "tensorboard" in (args.report_to or []):
                from torch.utils.tensorboard import SummaryWriter

                folder = os.getenv("TENSORBOARD_LOGGING_DIR") or os.path.join(args.output_dir, "runs", "heldout_eval")
                self._writer = SummaryWriter(folder)  # eval/vrcli_* beside the trainer's own runs/ scalars
            self.write(state.global_step, model, processing_class)

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.is_world_process_zero and self.every > 0 and state.global_step % self.every == 0:
            self.write(state.global_step, model, processing_class)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.is_world_process_zero:
            self.write(state.global_step, model, processing_class)
            if self._writer is not None:
                self._writer.close()
