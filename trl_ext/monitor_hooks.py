"""The over-optimisation monitor inside the single-machine trainers: our PPO loop (`watch_step`) and TRL's GRPO /
RLOO (`MonitorCallback`). Every process gathers the step's member scores and KL from all ranks, so every rank
computes the same signals and takes the same action; only the main process writes files.

GRPO / RLOO: the KL is TRL's own per-token `kl` metric (k3 for GRPO, k1 for RLOO, needs `beta > 0`) times the
mean completion length, i.e. the mean sequence KL; `adapt_kl` multiplies `trainer.beta`, which both trainers'
losses read at every step; `checkpoint` and `stop` ask the Trainer to save (and stop) at the end of the step.
A step of the monitor is the policy that sampled the batch: TRL's global step minus one at `on_step_end`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
import numpy as np
import torch
from transformers import TrainerCallback

from reward_plugins.monitor import Alarm, MemberBatch
from reward_plugins.monitor_session import MonitorSession

logger = logging.getLogger(__name__)


def pack_member_batch(batch: MemberBatch | None, names: tuple[str, ...], rows: int,
                      device: torch.device | str) -> torch.Tensor:
    """(rows, k + 1) tensor on `device`: each sample's member scores and proxy reward, NaN rows as padding, so that
    every rank gathers the same shape whatever its number of scored samples."""
    packed = torch.full((rows, len(names) + 1), float("nan"), dtype=torch.float32, device=device)
    if batch is not None and batch.scores.shape[1]:
        if batch.scores.shape[1] > rows:
            raise ValueError(f"{batch.scores.shape[1]} scored samples do not fit in {rows} rows")
        values = np.concatenate([batch.scores, batch.proxy[None, :]], axis=0).T
        packed[: values.shape[0]] = torch.as_tensor(values, dtype=torch.float32, device=device)
    return packed


def unpack_member_batch(gathered: np.ndarray, names: tuple[str, ...]) -> MemberBatch:
    """The rows of a gathered `pack_member_batch` that hold a sample."""
    rows = gathered[~np.isnan(gathered).any(axis=1)]
    return MemberBatch(rows[:, :-1].T, rows[:, -1], names)


def gathered_step(monitor: MonitorSession, gather, batch: MemberBatch | None, rows: int, kl_sum: torch.Tensor,
                  kl_count: torch.Tensor) -> tuple[MemberBatch, float]:
    """Every rank's member scores as one batch, and the mean sequence KL over every rank's samples."""
    packed = pack_member_batch(batch, monitor.member_keys, rows, kl_sum.device)
    merged = gather(packed).float().cpu().numpy()
    totals = gather(torch.stack([kl_sum.float(), kl_count.float()]).unsqueeze(0)).reshape(-1, 2).sum(0)
    return unpack_member_batch(merged, monitor.member_keys), float(totals[0] / totals[1].clamp(min=1))


def watch_step(monitor: MonitorSession, accelerator, step: int, seq_kl: torch.Tensor, valid: torch.Tensor,
               rows: int) -> Alarm | None:
    """PPO: feed the step's gathered member scores and mean sequence KL (valid samples) to the monitor."""
    valid = valid.to(seq_kl.device, seq_kl.dtype)
    batch, kl = gathered_step(monitor, accelerator.gather, monitor.take_batch(), rows, (seq_kl * valid).sum(), valid.sum())
    return monitor.step(step, kl, batch)


def copy_folder(source: Path, target: Path) -> None:
    """Replace `target` with a copy of `source` (the kept checkpoint's model as the run's final one)."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)


class MonitorCallback(TrainerCallback):
    """GRPO / RLOO: one monitor step per optimizer step; `monitor/*` go into TRL's own metrics (same keys every step).

    Put it before the eval-file callback, so the gold of an eval comes after the step that precedes it."""

    def __init__(self, session: MonitorSession):
        self.session = session
        self.trainer = None
        self.base_beta = 0.0
        self.stopped: Alarm | None = None
        self._seen: dict[str, int] = {}
        self._kl = self._length = 0.0

    def attach(self, trainer) -> None:
        """Give the callback its trainer (the KL metrics, `beta`, the accelerator)."""
        self.trainer = trainer
        self.base_beta = float(trainer.beta)

    def restore(self, checkpoint: str | Path) -> None:
        """Resume: the monitor as of the checkpoint, and `beta` with every earlier `adapt_kl` applied again."""
        step = int(Path(checkpoint).name.rsplit("-", 1)[1])
        self.session.restore(checkpoint, step)
        self.trainer.beta = self.base_beta * self.session.monitor.kl_scale

    def _new(self, key: str) -> list[float]:
        values = self.trainer._metrics["train"].get(key, [])
        new = values[self._seen.get(key, 0):]
        self._seen[key] = len(values)
        return [v for v in new if v is not None and np.isfinite(v)]

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._seen.clear()  # TRL clears its metric lists right after logging

    def on_step_end(self, args, state, control, **kwargs):
        trainer, session = self.trainer, self.session
        kl, length = self._new("kl"), self._new("completions/mean_length")
        self._kl = float(np.mean(kl)) if kl else self._kl
        self._length = float(np.mean(length)) if length else self._length
        local = session.take_batch()
        rows = max(trainer.args.per_device_train_batch_size * max(trainer.args.steps_per_generation or 1, 1),
                   local.scores.shape[1] if local is not None else 0)
        device = trainer.accelerator.device
        has = torch.tensor([float(local is not None)], device=device)
        if float(trainer.accelerator.gather(has).sum()) > 0:
            seq_kl = torch.tensor(self._kl * self._length, device=device)
            batch, _ = gathered_step(session, trainer.accelerator.gather, local, rows, seq_kl, torch.ones((), device=device))
            alarm = session.step(state.global_step - 1, self._kl * self._length, batch)
            if alarm is not None:
                self._act(alarm, control)
        metrics = trainer._metrics["train"]
        for key, value in session.logs().items():
            metrics[key].append(value)
            self._seen[key] = len(metrics[key])

    def _act(self, alarm: Alarm, control) -> None:
        if alarm.action == "adapt_kl":
            self.trainer.beta *= self.session.apply_kl(alarm.step)
        elif alarm.action in ("checkpoint", "stop"):
            control.should_save = True
            if alarm.action == "stop":
                control.should_training_stop = True
                self.stopped = alarm

    def on_save(self, args, state, control, **kwargs):
        self.session.save(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)

