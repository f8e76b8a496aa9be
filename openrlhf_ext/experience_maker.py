"""`PluginExperienceMaker`: OpenRLHF 0.11.2's `RemoteExperienceMaker` with our reward pipeline and eval files.

Installed in the trainer actor by `openrlhf_ext.hooks.install` (through the launcher). Per rollout batch:

1. With `REWARD_PLUGINS_TRAINER_CONFIG` set, the whole batch is scored in one pipeline call; every micro-batch gets
   `rewards`, `scores`, `info["reward"]` and the pipeline's fixed log keys, so the base class skips its
   reward-model dispatch. VR-CLI plugins with `scorer.backend: external` score on the reference-model
   actors (`ReferenceLogProbScorer`); the run is refused when there is none or temperatures disagree.
   Without the setting, the rollout-side rewards (our server or shim) are kept.
2. The base class runs the policy, reference and critic forwards.
3. Every `eval_every` steps the batch is written as an eval file (`evaluation.eval_files`): prompts,
   answers, proxy scores, per-member components, ensemble variance and the sequence KL to the reference.

Held-out evaluation (`--eval.dataset`, every `--eval.steps`): `plugin_evaluate` wraps the trainer's
`evaluate` so the eval samples are scored here by the same pipeline (the rollout side only has a
placeholder). Their rewards replace the placeholder's before OpenRLHF computes its pass@k metrics; the
VR-CLI metrics (`eval/vrcli_reward`, `eval/vrcli_improvement`, `eval/vrcli_improved_share`) go to the
trainer's loggers and, with the samples, to an eval file under `<eval dir>/heldout/`.

Labels whose VR-CLI baselines were computed with other settings (`baseline_fingerprint`) stop the run at
the first batch that carries them.

With a monitor (`--monitor-config`, `reward_plugins.monitor`), every batch feeds it after the base class has the
KL: member scores from the trainer-side pipeline, a shadow ensemble or the rollout side's `reward/<member>` info
keys; its `monitor/*` values go into every micro-batch's info (the same keys every step, so OpenRLHF's logs
carry them); eval files get gold and the monitor's values. `adapt_kl` multiplies the KL controller's value, which
both the reward's KL penalty and the KL loss read; `checkpoint` and `stop` are carried out by the trainer's
`save_logs_and_checkpoints` (`openrlhf_ext.hooks`).
"""

from __future__ import annotations

import functools
import logging
import math
import os

import numpy as np
import torch
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker

from evaluation.eval_files import EvalFile, list_eval_files, read_eval_file, rows_from_scores, write_eval_file
from reward_plugins.logprobs import dtype_name
from reward_plugins.monitor import Alarm, MonitorError
from reward_plugins.monitor_session import MonitorSession, load_monitor_config
from reward_plugins.pipeline import RewardError, RewardPipeline, ScoredBatch
from reward_plugins.registry import check_baselines
from reward_plugins.types import RewardResult, Sample
from reward_plugins.vrcli import eval_metrics, has_vrcli, model_id

from .placement import RayPlacer
from .ref_scorer import (
    ReferenceLogProbScorer,
    check_label_temperatures,
    check_reference_setup,
    external_scorer_plugins,
)
from .rollouts import experience_samples, info_components, sequence_kl
from .settings import HookSettings
from .version import REQUIRED_OPENRLHF

logger = logging.getLogger(__name__)


class PluginExperienceMaker(RemoteExperienceMaker):
    """Scores whole rollout batches with a reward pipeline and records eval files; see the module docstring."""

    def __init__(self, *args, settings: HookSettings | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        a = self.args
        self.settings = settings or HookSettings.from_env(eval_steps=a.eval.steps, output_dir=a.ckpt.output_dir)
        self.global_step: int | None = None
        self._calls = 0
        self._kl_history: list[float] | None = None
        self.pipeline = RewardPipeline.from_yaml(self.settings.reward_config, RayPlacer()) if self.settings.reward_config else None
        self.external = list(external_scorer_plugins(self.pipeline.root)) if self.pipeline else []
        if self.pipeline is not None and self.pipeline.on_error == "skip":
            raise RewardError("on_error: skip cannot be used in the experience maker: every sample needs a reward")
        if self.external:
            self._attach_reference_scorers()
        self.monitor = self._build_monitor() if self.settings.monitor_config else None
        self.monitor_request: Alarm | None = None  # checkpoint / stop, for the trainer to carry out

    def _build_monitor(self) -> MonitorSession:
        if self.initial_model_group is None:
            raise MonitorError("the monitor needs the KL to the reference model; pass --algo.kl.init_coef > 0")
        return MonitorSession(load_monitor_config(self.settings.monitor_config), self.pipeline, self.args.ckpt.output_dir,
                              build=lambda path: RewardPipeline.from_yaml(path, RayPlacer()),
                              source_name="the rollout-side reward" if self.pipeline is None else self.settings.reward_config)

    def _attach_reference_scorers(self) -> None:
        a = self.args
        coef = a.algo.kl.init_coef if self.initial_model_group is not None else 0.0
        reference_name = model_id(a.actor.model_name_or_path)  # the reference actors load the initial policy
        check_reference_setup(self.external, kl_init_coef=coef, rollout_temperature=a.rollout.temperature)
        duplicate = a.ds.ring_attn_size * a.ds.tensor_parallel_size
        for plugin in self.external:
            plugin.attach_scorer(
                ReferenceLogProbScorer(
                    self.initial_model_group,
                    self.tokenizer,
                    temperature=a.rollout.temperature,
                    micro_batch_size=plugin.config.scorer.batch_size,
                    max_length=plugin.config.scorer.max_length,
                    effective_actors=a.ref.num_nodes * a.ref.num_gpus_per_node // duplicate,
                    duplicate_factor=duplicate,
                    sync=a.train.colocate_all or a.train.colocate_actor_ref,
                )
            )
            plugin.scorer.model_id = reference_name
            plugin.scorer.dtype = dtype_name(a.ds.param_dtype)  # what the baselines must have been computed with
            plugin.scorer.attn_implementation = a.ds.attn_implementation

    @torch.no_grad()
    def make_experience(self, samples_list):
        step = self.global_step if self.global_step is not None else self._calls
        self._calls += 1
        n = self.args.rollout.n_samples_per_prompt
        samples = [s for e in samples_list for s in experience_samples(e, self.tokenizer, n)]
        scored = None
        if self.pipeline is not None:
            scored = self.score_samples(samples)
            assign_rewards(samples_list, scored)
        experiences = super().make_experience(samples_list)
        if self.monitor is not None:
            self.watch(step, experiences, samples, scored)
        every = self.settings.eval_every
        if every is not None and step % every == 0:
            self.record(step, experiences, samples, scored)
        return experiences

    def watch(self, step: int, experiences, samples: list[Sample], scored: ScoredBatch | None) -> None:
        """Feed the monitor one step; its values go into every micro-batch's info; `adapt_kl` acts on the controller."""
        rewards = [float(v) for e in experiences for v in torch.as_tensor(e.info["reward"]).flatten().tolist()]
        if scored is None:  # rollout-side rewards: members from the `reward/<member>` info keys
            components = [c for e in experiences for c in info_components(e.info, len(e.sequences))]
            scored = ScoredBatch([RewardResult.ok(r, c) for r, c in zip(rewards, components)], rewards, {}, ())
        self.monitor.observe_scored(samples, ScoredBatch(scored.results, rewards, scored.logs, scored.log_keys))
        kls = [k for e in experiences for k in (sequence_kl(e, True) or [])]
        if len(kls) != len(rewards):
            raise MonitorError("the monitor needs every sample's KL to the reference model, which this batch lacks")
        alarm = self.monitor.step(step, float(np.mean(kls)), self.monitor.take_batch())
        for experience in experiences:
            size = len(experience.sequences)
            for key, value in self.monitor.logs().items():
                experience.info[key] = torch.full((size,), value, dtype=torch.float32)
        if alarm is None:
            return
        if alarm.action == "adapt_kl":
            self.kl_ctl.value *= self.monitor.apply_kl(step)
        elif alarm.action in ("checkpoint", "stop"):
            self.monitor_request = alarm

    def score_samples(self, samples: list[Sample]) -> ScoredBatch:
        """One pipeline call for the whole batch; a sample left without a reward stops the run, loudly."""
        labels = [s.label for s in samples]
        if self.external:
            check_label_temperatures(labels, self.args.rollout.temperature)
        check_baselines(self.pipeline.root, labels)
        scored = self.pipeline.score(samples)
        missing = [i for i, reward in enumerate(scored.rewards) if reward is None]
        if missing:
            first = scored.results[missing[0]]
            raise RewardError(
                f"{len(missing)} of {len(samples)} samples got no reward (first: {first.status.value}: {first.error}); "
                "the experience maker needs one per sample"
            )
        return scored

    def score_eval_samples(self, samples_list, step: int, n_samples_per_prompt: int) -> dict[str, float]:
        """Score held-out samples with the pipeline, put the rewards on them, write an eval file; the metrics."""
        samples = [s for e in samples_list for s in experience_samples(e, self.tokenizer, n_samples_per_prompt)]
        scored = self.score_samples(samples)
        start = 0
        for experience in samples_list:
            size = len(experience.sequences)
            chunk = torch.tensor(scored.rewards[start : start + size], dtype=torch.float32)
            experience.rewards = chunk
            experience.scores = chunk.clone()
            start += size
        components = [dict(result.components) for result in scored.results]
        metrics = {"reward": float(np.mean(scored.rewards)), **scored.logs}
        if has_vrcli(self.pipeline.root):
            metrics.update(eval_metrics(scored.rewards, components))
        metrics = {key: value for key, value in metrics.items() if math.isfinite(value)}
        if self.settings.eval_dir:
            answers = [self.tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
            rows = rows_from_scores([s.prompt for s in samples], answers, scored.rewards, components)
            self._add_monitor(step, rows, samples, answers, observe=True)
            meta = {**self._meta(), "split": "heldout", "metrics": metrics}
            path = write_eval_file(os.path.join(self.settings.eval_dir, "heldout"), EvalFile(step=step, rows=rows, meta=meta))
            logger.info("wrote held-out eval file %s (%d rows)", path, len(rows))
        return metrics

    def record(self, step: int, experiences, samples: list[Sample], scored: ScoredBatch | None) -> None:
        """Write this batch as the eval file for `step`: answers without special tokens, for any gold RM.

        Written atomically; a re-run step (after a resume) overwrites its file.
        """
        rewards = [float(v) for e in experiences for v in torch.as_tensor(e.rewards).flatten().tolist()]
        if scored is not None:
            components = [dict(result.components) for result in scored.results]
        else:
            components = [c for e in experiences for c in info_components(e.info, len(e.sequences))]
        has_reference = self.initial_model_group is not None
        per_batch = [sequence_kl(e, has_reference) for e in experiences]
        kls = None if any(k is None for k in per_batch) else [k for batch in per_batch for k in batch]
        answers = [self.tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
        rows = rows_from_scores([s.prompt for s in samples], answers, rewards, components, kls,
                                scored.results if scored is not None else None)
        self._add_monitor(step, rows, samples, answers, observe=not self.args.eval.dataset)
        kl = float(np.mean(kls)) if kls else None
        history = self._history_before(step)
        if kl is not None:
            history.append(kl)
        self._kl_history = history
        path = write_eval_file(
            self.settings.eval_dir, EvalFile(step=step, rows=rows, kl=kl, kl_history=list(history), meta=self._meta())
        )
        logger.info("wrote eval file %s (%d rows)", path, len(rows))

    def _add_monitor(self, step: int, rows, samples: list[Sample], answers: list[str], observe: bool) -> None:
        """Gold on every row (observed by the monitor for one kind of eval file only: held-out when there is one)."""
        if self.monitor is None:
            return
        plain = [Sample(prompt=s.prompt, response=a, label=s.label) for s, a in zip(samples, answers)]
        for row, value in zip(rows, self.monitor.score_eval(step, plain, [row.components for row in rows], observe) or []):
            row.gold_score = value

    def _history_before(self, step: int) -> list[float]:
        if self._kl_history is not None:
            return list(self._kl_history)
        earlier = [p for p in list_eval_files(self.settings.eval_dir) if read_eval_file(p).step < step]
        return list(read_eval_file(earlier[-1]).kl_history) if earlier else []

    def _meta(self) -> dict:
        a = self.args
        return {
            "source": "openrlhf_ext.experience_maker",
            "openrlhf": REQUIRED_OPENRLHF,
            "reward_config": self.settings.reward_config,
            "reward_scored_in": "trainer" if self.pipeline is not None else "rollout",
            "remote_url": list(a.reward.remote_url) if a.reward.remote_url else None,
            "kl": "sum over response tokens of log pi - log pi_ref (k1)",
            "rollout_temperature": a.rollout.temperature,
            "n_samples_per_prompt": a.rollout.n_samples_per_prompt,
            "policy": a.actor.model_name_or_path,
            **(self.monitor.eval_meta() if self.monitor is not None else {}),
        }


def assign_rewards(samples_list, scored: ScoredBatch) -> None:
    """Set rewards, scores and the same info keys on every micro-batch, in batch order."""
    rewards = torch.tensor(scored.rewards, dtype=torch.float32)  # CPU, as OpenRLHF's samples_generator makes them
    logs = [scored.sample_logs(i) for i in range(len(scored.results))]
    start = 0
    for experience in samples_list:
        size = len(experience.sequences)
        chunk = rewards[start : start + size]
        experience.rewards = chunk
        experience.scores = chunk.clone()
        experience.info["reward"] = chunk.clone()
        if "score" in experience.info:
            experience.info["score"] = chunk.clone()
        for key in scored.log_keys:
            experience.info[key] = torch.tensor([logs[i][key] for i in range(start, start + size)], dtype=torch.float32)
        start += size


def plugin_evaluate(evaluate):
    """Wrap `PPOTrainer.evaluate(global_step, **generate_kwargs)`: held-out samples scored by our pipeline.

    Without a trainer-side pipeline the original runs unchanged.
    """

    @functools.wraps(evaluate)
    def wrapped(self, global_step, **generate_kwargs):
        maker = getattr(self, "experience_maker", None)
        settings = getattr(maker, "settings", None)
        if settings is not None:
            generate_kwargs.update(settings.eval_sampling())  # the launcher's --eval-top-p / --eval-top-k
        if getattr(maker, "pipeline", None) is None:
            return evaluate(self, global_step, **generate_kwargs)
        generator = self.samples_generator
        generate = generator.generate_eval_samples
        metrics: dict[str, float] = {}

        def generate_and_score(**kwargs):
            samples_list = generate(**kwargs)
            n = kwargs.get("n_samples_per_prompt", generate_kwargs.get("n_samples_per_prompt", 1))
            metrics.update(maker.score_eval_samples(samples_list, global_step, n))
            return samples_list

        generator.generate_eval_samples = generate_and_score
        try:
            logs = evaluate(self, global_step, **generate_kwargs)
        finally:
            generator.generate_eval_samples = generate
        for tracker in (getattr(self, "tensorboard_logger", None), getattr(self, "wandb_logger", None)):
            if tracker is not None and metrics:
                tracker.log_eval(global_step, metrics)
        logger.info("held-out reward metrics at step %s: %s", global_step, metrics)
        return {**(logs or {}), **metrics}

    return wrapped


def evaluate_before_training(fit):
    """Wrap `PPOTrainer.fit(global_step)`: with `eval_at_start`, evaluate the initial policy once (step 0) on a
    fresh run, with the eval settings OpenRLHF uses at later steps."""

    @functools.wraps(fit)
    def wrapped(self, global_step: int = 0):
        settings = getattr(getattr(self, "experience_maker", None), "settings", None)
        if settings is not None and settings.eval_at_start and self.eval_dataloader and global_step == 0 \
                and self.init_checkpoint_states()["global_step"] == 0:
            kwargs = {**self.generate_kwargs, "temperature": self.args.eval.temperature,
                      "n_samples_per_prompt": self.args.eval.n_samples_per_prompt}
            self.evaluate(0, **kwargs)
        return fit(self, global_step)

    return wrapped
