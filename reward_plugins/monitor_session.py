"""One run's over-optimisation monitor, shared by every trainer (trl_ext PPO, TRL GRPO/RLOO, the OpenRLHF hook).

It takes each scored training batch (`observe_scored`), scores it with the shadow ensemble when one is configured,
feeds the step's member scores and KL to `reward_plugins.monitor.Monitor`, prints the alarm line once, writes
`RUN/monitor/steps.jsonl` (one record per step) and `evals.jsonl` (one per eval: the watched members' worst mean on
the eval samples, and gold), which `evaluation.monitor_eval` replays, `config.json`, `alarm.json` and `stop.json`,
and saves / restores the monitor with each checkpoint.
The trainer takes the action (`warn`, `checkpoint`, `adapt_kl`, `stop`), since only it holds the coefficient and
the checkpoints.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config_loader import load_model
from .io import DataError, atomic_open, iter_jsonl, write_json
from .monitor import (
    Alarm, GoldSpec, MemberBatch, Monitor, MonitorConfig, MonitorError, eval_member_scores, member_batch, member_keys,
)
from .pipeline import RewardPipeline, ScoredBatch
from .registry import RewardPlugin, plugin_tree
from .types import Sample, Status

logger = logging.getLogger(__name__)

STATE_FILE = "monitor_state.json"
STEPS_FILE = "steps.jsonl"
EVALS_FILE = "evals.jsonl"  # one record per observed eval: its worst member mean (null when left out) and gold
FEW_EVAL_SAMPLES = 32  # an eval smaller than this gives each member's scale from too few samples
RECORD_VALUES = ("kl", "disagreement", "proxy", "worst_member")  # what a replay reads from each step's record


def load_monitor_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> MonitorConfig:
    """A YAML file holding a monitor section's fields (the OpenRLHF launcher's --monitor-config), validated."""
    return load_model(MonitorConfig, path, overrides, kind="monitor")


def plugin_member_names(plugin: RewardPlugin) -> tuple[str, ...]:
    """The member names of a plugin with member scores (`member_names` on the plugin or its config), else ()."""
    names = getattr(plugin, "member_names", None) or getattr(plugin.config, "member_names", None)
    return tuple(names or ())


def pipeline_member_keys(pipeline: RewardPipeline, source: str) -> tuple[str, ...]:
    """Component keys of the first plugin with member scores in the pipeline (root first)."""
    groups = [names for node in plugin_tree(pipeline.root) if len(names := plugin_member_names(node)) >= 2]
    return member_keys(pipeline.root.component_keys, groups, source)


class GoldScorer:
    """Gold scores for samples: a reward pipeline's rewards, or a `module:callable` fn(responses, labels)."""

    def __init__(self, spec: GoldSpec, build: Callable[[str], RewardPipeline] = RewardPipeline.from_yaml):
        self.spec = spec
        self.pipeline = build(spec.reward_config) if spec.reward_config else None
        self.function = None if spec.function is None else load_function(spec.function)

    def __call__(self, samples: Sequence[Sample]) -> list[float]:
        if self.pipeline is not None:
            scored = self.pipeline.score(samples)
            bad = [(i, r.error) for i, (r, v) in enumerate(zip(scored.results, scored.rewards)) if v is None]
            if bad:
                raise DataError(f"gold {self.spec.name}: no score for {len(bad)} samples (first: {bad[0][1]})")
            values = scored.rewards
        else:
            values = self.function([s.response for s in samples], [s.label for s in samples])
        out = np.asarray(values, dtype=np.float64).reshape(-1)
        if len(out) != len(samples) or not np.all(np.isfinite(out)):
            raise DataError(f"gold {self.spec.name}: expected {len(samples)} finite scores, got {out[:5].tolist()}...")
        return out.tolist()


def load_function(target: str) -> Callable:
    """`package.module:callable` imported; a clear error when either is missing."""
    module_name, name = target.split(":", 1)
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise MonitorError(f"monitor.gold.function {target}: cannot import it ({exc})") from None
    if not callable(function):
        raise MonitorError(f"monitor.gold.function {target}: not callable")
    return function


class MonitorSession:
    """The monitor of one run: inputs, files and the alarm line. `main` is False on every rank but the first (they
    compute the same signals from the same gathered data, and write nothing)."""

    def __init__(self, config: MonitorConfig, pipeline: RewardPipeline | None, run_dir: str | os.PathLike | None,
                 main: bool = True, build: Callable[[str], RewardPipeline] = RewardPipeline.from_yaml,
                 source_name: str = "the training reward"):
        self.config = config
        self.shadow = build(config.shadow) if config.shadow else None
        watched = self.shadow or pipeline
        source = f"monitor.shadow {config.shadow}" if self.shadow else source_name
        if watched is None and not config.members:
            raise MonitorError(f"{source} is not known here; list its member components in monitor.members")
        if config.members:
            missing = [] if watched is None else [k for k in config.members if k not in watched.root.component_keys]
            if missing:
                raise MonitorError(f"monitor.members: {source} has no component {missing}; it has "
                                   f"{list(watched.root.component_keys)}")
            self.member_keys = tuple(config.members)
        else:
            self.member_keys = pipeline_member_keys(watched, source)
        self.gold = GoldScorer(config.gold, build) if config.gold else None
        self.monitor = Monitor(config)
        self.dir = Path(run_dir) / "monitor" if run_dir is not None else None
        self.main = main
        self._pending: list[MemberBatch] = []
        self._eval_alarm: Alarm | None = None
        self._written = 0
        self._snapshots: list[dict[str, float]] = []
        if self.dir is not None and main:
            write_json(self.dir / "config.json", {"config": config.model_dump(mode="json"),
                                                  "member_keys": list(self.member_keys),
                                                  "watched": source, "keys": list(self.monitor.keys)})

    @property
    def keys(self) -> tuple[str, ...]:
        return self.monitor.keys

    # ------------------------------------------------ per step

    def observe_scored(self, samples: Sequence[Sample], scored: ScoredBatch) -> MemberBatch:
        """A scored training batch: member scores from the shadow (scored now) or the training reward's components."""
        results = self.shadow.score(samples).results if self.shadow is not None else scored.results
        batch = member_batch(results, scored.rewards, self.member_keys)
        self._pending.append(batch)
        return batch

    def take_batch(self) -> MemberBatch | None:
        """Every batch observed since the last call, as one (None when there was none)."""
        batches, self._pending = self._pending, []
        return MemberBatch.concat(batches) if batches else None

    def step(self, step: int, kl: float, batch: MemberBatch) -> Alarm | None:
        """Feed one step; prints the alarm line and writes alarm.json when it fires. Returns the alarm for the
        trainer to act on: this step's, or one that fired at the eval before it (`gold_drop`, `worst_member_drop`).
        A step without a sample that every member scored (all errored) is left out with a warning; the logs keep
        their last values."""
        if batch.scores.shape[1] == 0:
            logger.warning("monitor: step %d has no sample with every member score and a reward; left out", step)
            return None
        alarm = self.monitor.observe(step, kl, batch)
        self._snapshots.append(self.monitor.logs())
        self._write_steps()
        if alarm is not None:
            self.announce(alarm)
        elif self._eval_alarm is not None:  # fired at the eval before this step: the trainer acts on it now
            alarm, self._eval_alarm = self._eval_alarm, None
        return alarm

    def announce(self, alarm: Alarm) -> None:
        if self.main:
            print(alarm.line(), file=sys.stderr, flush=True)
            if self.dir is not None:
                write_json(self.dir / "alarm.json", vars(alarm))

    def logs(self) -> dict[str, float]:
        return self.monitor.logs()

    def _write_steps(self) -> None:
        """Append the records that are final (after the reference steps, every step at once)."""
        s = self.monitor.series
        if not self.main or self.dir is None or len(s.steps) < self.config.reference_steps:
            return
        lines = []
        for i in range(self._written, len(s.steps)):
            record = {key.removeprefix("monitor/"): value for key, value in self._snapshots[i].items()}
            record.update(step=s.steps[i], kl=s.kl[i], disagreement=s.disagreement[i], proxy=s.proxy[i],
                          worst_member=s.worst[i])
            lines.append(json.dumps(record) + "\n")
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / STEPS_FILE, "a", encoding="utf-8") as handle:
            handle.writelines(lines)
        self._written = len(s.steps)

    # ------------------------------------------------ gold at evals

    def score_eval(self, step: int, samples: Sequence[Sample], components: Sequence[Mapping[str, float] | None],
                   observe: bool = True) -> list[float] | None:
        """An eval's samples: gold for each (None without gold) and the watched members' scores (the shadow scores
        them; else they are the eval's own reward `components`). With `observe`, the gold mean and the members go to
        the monitor (may fire `gold_drop` or `worst_member_drop`) and to `evals.jsonl`."""
        gold = self.gold(samples) if self.gold is not None else None
        if not observe:
            return gold
        if gold is not None:
            self._announce(self.monitor.observe_gold(step, float(np.mean(gold))))
        if self.shadow is not None:
            components = [r.components if r.status is Status.OK else None for r in self.shadow.score(samples).results]
        scores = eval_member_scores(components, self.member_keys)
        if 2 <= scores.shape[1] < FEW_EVAL_SAMPLES and not self.monitor.series.eval_steps:
            logger.warning("monitor: the first eval has %d samples with every member score; each member's scale and "
                           "worst_member_drop (threshold %s) are noisy below %d: use more eval prompts or samples",
                           scores.shape[1], self.config.thresholds.worst_member_drop, FEW_EVAL_SAMPLES)
        if scores.shape[1] < 2:
            logger.warning("monitor: the eval of step %d has %d sample(s) with every member score; its members are "
                           "left out", step, scores.shape[1])
        else:
            self._announce(self.monitor.observe_eval_members(step, scores, self.member_keys))
        self._write_eval(step, None if gold is None else float(np.mean(gold)))
        return gold

    def _announce(self, alarm: Alarm | None) -> None:
        """An alarm fired at an eval: printed now, handed to the trainer with the next `step`."""
        if alarm is not None:
            self.announce(alarm)
            self._eval_alarm = alarm

    def _write_eval(self, step: int, gold: float | None) -> None:
        s = self.monitor.series
        if not self.main or self.dir is None:
            return
        record = {"step": step, "worst_member": s.eval_worst[-1] if s.eval_steps and s.eval_steps[-1] == step else None,
                  "gold": gold}
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / EVALS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def eval_meta(self) -> dict[str, Any]:
        """What an eval file records about the monitor: every key's value now, and the gold's name."""
        meta: dict[str, Any] = {"monitor": self.logs()}
        if self.gold is not None:
            meta.update(gold_rm=self.config.gold.name, gold_format="monitor.gold")
        return meta

    # ------------------------------------------------ checkpoints and resume

    def checkpoint_state(self, step: int) -> dict[str, Any]:
        """The monitor state a checkpoint of training step `step` holds (as `STATE_FILE`); remembers its score."""
        self.monitor.note_checkpoint(step)
        return self.monitor.state_dict(before_step=step)

    def save(self, folder: str | os.PathLike, step: int) -> None:
        """Write the monitor state into the finished checkpoint `folder` of step `step` (main process)."""
        state = self.checkpoint_state(step)
        if self.main:
            write_json(Path(folder) / STATE_FILE, state)

    def restore(self, folder: str | os.PathLike, step: int) -> None:
        """Resume from checkpoint `folder` of step `step`; steps.jsonl loses the records the run will redo."""
        path = Path(folder) / STATE_FILE
        if not path.exists():
            raise MonitorError(f"{folder}: no {STATE_FILE}; this checkpoint was saved without the monitor "
                               "(start a fresh run to monitor it)")
        self.restore_state(json.loads(path.read_text()), step)

    def restore_state(self, state: dict[str, Any], step: int) -> None:
        """Resume from a checkpoint's monitor state (of training step `step`)."""
        self.monitor.load_state_dict(state)
        self._snapshots = [dict(self.monitor.logs()) for _ in self.monitor.series.steps]
        self._written = len(self.monitor.series.steps)
        if self.main and self.dir is not None:
            keep_records_before(self.dir / STEPS_FILE, step)
            keep_records_before(self.dir / EVALS_FILE, step + 1)  # the evals of `step` are in the state
            if self.monitor.alarm is None:
                for name in ("alarm.json", "stop.json"):
                    (self.dir / name).unlink(missing_ok=True)

    def apply_kl(self, step: int) -> float:
        """adapt_kl: the factor to multiply the coefficient by (recorded, so a resumed run applies it again)."""
        factor = self.monitor.scale_kl(step)
        if self.main:
            logger.warning("monitor: KL coefficient multiplied by %g at step %d (now %g x the configured one)",
                           factor, step, self.monitor.kl_scale)
        return factor

    def keep_best(self, checkpoint_dir: Callable[[int], Path], alarm: Alarm,
                  more_dirs: Callable[[int], Sequence[Path]] = lambda step: ()) -> Path | None:
        """stop: the saved checkpoint with the best monitor score (its folder `checkpoint_dir(step)`); later ones (and
        their `more_dirs`) move to `monitor/after_stop/` so that resuming the run picks the kept one. Writes stop.json
        and prints one line naming it."""
        best = self.monitor.best_checkpoint()
        if best is None:
            return None
        kept = checkpoint_dir(best)
        moved = []
        if self.main:
            for step in sorted(s for s in self.monitor.checkpoints if s > best):
                for folder in (checkpoint_dir(step), *more_dirs(step)):
                    if not folder.exists():
                        continue
                    target = self.dir / "after_stop" / folder.parent.name / folder.name
                    if target.exists():
                        shutil.rmtree(target)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    folder.rename(target)
                    moved.append(str(target))
            record = {"alarm": vars(alarm), "kept_checkpoint": str(kept), "kept_step": best,
                      "kept_score": self.monitor.checkpoints[best], "moved": moved,
                      "scores": {str(k): v for k, v in sorted(self.monitor.checkpoints.items())}}
            write_json(self.dir / "stop.json", record)
            print(f"[monitor] stopped at step {alarm.step}; kept {kept} (step {best}, monitor score "
                  f"{self.monitor.checkpoints[best]:.4g}, the best saved){'; moved later ones to ' + str(self.dir / 'after_stop') if moved else ''}",
                  file=sys.stderr, flush=True)
        return kept


def keep_records_before(path: Path, step: int) -> None:
    """Drop the per-step records of steps >= `step` (a resumed run logs them again)."""
    if not path.exists():
        return
    kept = [json.dumps(row) + "\n" for _, row in iter_jsonl(path) if int(row["step"]) < step]
    with atomic_open(path) as handle:
        handle.writelines(kept)


def read_steps(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    """The per-step monitor records of a run (`RUN/monitor/steps.jsonl`)."""
    path = Path(run_dir) / "monitor" / STEPS_FILE
    if not path.exists():
        raise DataError(f"{run_dir}: no {path.relative_to(run_dir)}; was the run trained with a monitor: section?")
    rows = [row for _, row in iter_jsonl(path)]
    for number, row in enumerate(rows, 1):
        missing = [key for key in ("step", *RECORD_VALUES) if key not in row]
        if missing or not all(math.isfinite(float(row[k])) for k in RECORD_VALUES if k in row):
            raise DataError(f"{path}:{number}: a record needs finite step, {', '.join(RECORD_VALUES)}"
                            + (f" (missing: {', '.join(missing)})" if missing else ""))
    return rows


def read_evals(run_dir: str | os.PathLike) -> list[tuple[int, float]]:
    """Each observed eval's step and worst member mean (`RUN/monitor/evals.jsonl`; none for a run without evals)."""
    path = Path(run_dir) / "monitor" / EVALS_FILE
    if not path.exists():
        return []
    evals = []
    for number, row in iter_jsonl(path):
        if "step" not in row or "worst_member" not in row:
            raise DataError(f"{path}:{number}: a record needs step and worst_member (null when left out)")
        if row["worst_member"] is not None:
            if not math.isfinite(float(row["worst_member"])):
                raise DataError(f"{path}:{number}: worst_member is {row['worst_member']}")
            evals.append((int(row["step"]), float(row["worst_member"])))
    return evals
