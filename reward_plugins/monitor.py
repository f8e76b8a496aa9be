"""The over-optimisation monitor: signals from what the reward pipeline already computes, an alarm, and its action.

Per training step the monitor reads a (k, B) matrix of ensemble member scores (the training reward's own
ensemble, or a shadow ensemble scored beside it), the proxy reward the policy is trained on (B,), and the
mean sequence KL to the initial policy. Without any gold it computes:

- `disagreement`: the mean over samples of the standard deviation across members of each member's score,
  standardised by that member's own mean and standard deviation over the reference steps (step 0 by default);
  so members on different scales weigh alike, and 0 means the members agree up to their step-0 offsets.
- `disagreement_rise`: its mean over the last `window` steps minus its mean over the reference steps.
- `trend`: the slope of disagreement against KL over the last `window` steps (per nat): its least-squares slope
  against the step over the KL's (one batch's KL is too noisy to regress on).
- `proxy`: the mean proxy reward, in standard deviations of the proxy over the reference steps, from its mean there.
- `divergence`: `divergence_weight * trend` minus the proxy's own slope against KL over the same window: positive
  once the uncertainty-penalised reward `proxy - divergence_weight * disagreement` falls as KL grows, i.e. once the
  proxy's gains are bought with disagreement. With k members whose errors are independent and a proxy that shares
  one member's error, that penalised reward tracks the true reward for a weight of k / sqrt(k - 1) (2.1 for 3
  members, 2.5 for 5): the default 2 is that estimate for small ensembles.
- `worst_member`: the lowest member's batch mean of its standardised scores (the worst-case objective of Coste et
  al. on the watched members).

At every eval the watched members also score the eval samples (many prompts, several samples each: far less noisy
than one training batch), each member standardised by its mean and standard deviation at the first eval:
- `eval_worst_member`: the lowest member's mean there;
- `worst_member_drop`: its best value at any eval so far minus its latest value. When the policy exploits an error
  of the reward it is trained on, that reward's member rises while the members that do not share the error fall,
  and the worst one falls first; while every member agrees that the policy improves, it keeps rising.
- `score` (what `stop` maximises when it keeps a checkpoint): the latest gold where there is gold, else the latest
  `eval_worst_member`, else `worst_member`'s mean over the last `window` steps.

Where gold exists (a gold RM or function), `gold` is its mean on the eval prompts at every eval. An alarm fires
once, when a signal stays beyond its threshold for `patience` consecutive steps (`gold_drop` and
`worst_member_drop`: at one eval). Everything here is pure maths and state (no I/O); trainers adapt it
(`reward_plugins.monitor_session`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .config import ExistingPath
from .types import RewardResult, Status

Action = Literal["warn", "checkpoint", "adapt_kl", "stop"]
SIGNALS = ("gold_drop", "worst_member_drop", "divergence", "trend", "disagreement_rise")  # reported in this order when several fire at once
STEP_SIGNALS = SIGNALS[2:]  # computed every step; gold_drop and worst_member_drop come at evals
PREFIX = "monitor/"
BASE_KEYS = ("kl", "disagreement", "disagreement_rise", "trend", "proxy", "proxy_trend", "divergence", "worst_member",
             "eval_worst_member", "worst_member_drop", "score", "alarm", "kl_scale")


class MonitorError(ValueError):
    """The monitor cannot compute its signals from what it was given; the message says what to change."""


class Thresholds(BaseModel):
    """When each signal raises the alarm (null: never). Units: standardised member scores, per nat of KL, gold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    disagreement_rise: float | None = Field(default=0.05, gt=0)  # disagreement's level above its reference value
    trend: float | None = Field(default=None, gt=0)  # disagreement's slope against KL above this
    divergence: float | None = 1.0  # weighted disagreement's slope minus the proxy's, per nat, above this
    worst_member_drop: float | None = Field(default=0.1, gt=0)  # eval worst member below its best eval so far
    gold_drop: float | None = Field(default=None, gt=0)  # gold below its best eval so far by this much (needs gold)


class GoldSpec(BaseModel):
    """A gold reward scored on the eval prompts at every eval: a reward YAML (a gold RM) or a Python function."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reward_config: ExistingPath | None = None  # any reward pipeline YAML; its reward is the gold score
    function: str | None = None  # "module:callable", called as fn(responses, labels) -> one float per response

    @model_validator(mode="after")
    def _one_source(self) -> GoldSpec:
        if (self.reward_config is None) == (self.function is None):
            raise ValueError("give exactly one of reward_config (a gold reward YAML) and function (module:callable)")
        if self.function is not None and (":" not in self.function or not all(self.function.split(":", 1))):
            raise ValueError(f"function must look like package.module:callable, got {self.function!r}")
        return self

    @property
    def name(self) -> str:
        return self.function or str(self.reward_config)


class MonitorConfig(BaseModel):
    """The `monitor:` section: what to watch, when to raise the alarm and what to do then."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shadow: ExistingPath | None = None  # reward YAML with member scores, scored beside the training reward, never trained on
    members: list[str] | None = None  # component keys holding member scores; default: found in the reward's plugins
    reference_steps: int = Field(default=1, ge=1)  # steps whose scores fix each member's location and scale
    window: int = Field(default=20, ge=1)  # steps in each slope against KL and in the disagreement's level
    min_kl_rise: float = Field(default=0.05, ge=0)  # no slope against KL while KL rose less than this over the window
    patience: int = Field(default=5, ge=1)  # consecutive steps a signal must stay beyond its threshold
    thresholds: Thresholds = Thresholds()
    action: Action = "warn"
    divergence_weight: float = Field(default=2.0, gt=0)  # disagreement's weight against the proxy (see above)
    kl_factor: float = Field(default=2.0, gt=1)  # adapt_kl multiplies the KL coefficient by this
    gold: GoldSpec | None = None

    @field_validator("members")
    @classmethod
    def _distinct(cls, members: list[str] | None) -> list[str] | None:
        if members is not None and (len(members) < 2 or len(set(members)) != len(members)):
            raise ValueError("members must name at least 2 distinct component keys")
        return members

    @model_validator(mode="after")
    def _consistent(self) -> MonitorConfig:
        if all(getattr(self.thresholds, name) is None for name in SIGNALS):
            raise ValueError("thresholds: every signal is off (null); the alarm could never fire")
        if self.thresholds.gold_drop is not None and self.gold is None:
            raise ValueError("thresholds.gold_drop needs gold: (a gold reward_config or function)")
        return self


def monitor_keys(has_gold: bool) -> tuple[str, ...]:
    """Every key the monitor logs, on every step of a run (OpenRLHF all-reduces logs key by key)."""
    return tuple(PREFIX + key for key in (*BASE_KEYS, *(("gold",) if has_gold else ())))


# ---------------------------------------------------------------- maths (pure functions)

def member_reference(batches: Sequence[ArrayLike]) -> tuple[np.ndarray, np.ndarray]:
    """Each member's mean and population std over the (k, B) batches of the reference steps, pooled."""
    pooled = np.concatenate([np.asarray(b, dtype=np.float64) for b in batches], axis=1)
    return pooled.mean(axis=1), pooled.std(axis=1)


def disagreement(member_scores: ArrayLike, means: ArrayLike, stds: ArrayLike) -> float:
    """Mean over samples of the std across members of the member scores standardised by (means, stds)."""
    scores = np.asarray(member_scores, dtype=np.float64)  # float64 whatever the rest: numpy promotes them to it
    z = (scores - np.asarray(means)[:, None]) / np.asarray(stds)[:, None]
    return float(z.std(axis=0).mean())


def worst_member(member_scores: ArrayLike, means: ArrayLike, stds: ArrayLike) -> float:
    """The lowest over members of the batch mean of each member's scores standardised by (means, stds)."""
    scores = np.asarray(member_scores, dtype=np.float64)
    z = (scores - np.asarray(means)[:, None]) / np.asarray(stds)[:, None]
    return float(z.mean(axis=1).min())


def slope(x: ArrayLike, y: ArrayLike) -> float:
    """Least-squares slope of y against x; 0 when x does not vary."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    dx = x - x.mean()
    spread = float(dx @ dx)
    if spread <= 1e-12 * max(1.0, float(x @ x)):
        return 0.0
    return float(dx @ (y - y.mean()) / spread)


def per_kl(steps: ArrayLike, kl: ArrayLike, values: ArrayLike, min_kl_rise: float) -> float:
    """Slope of `values` against KL over a window: the ratio of both least-squares slopes against the step (one
    batch's KL is too noisy to regress on); 0 while the fitted KL rose less than `min_kl_rise` over the window, or
    did not rise at all (no slope per nat, even with `min_kl_rise` 0)."""
    kl_slope = slope(steps, kl)
    if kl_slope <= 0 or kl_slope * (float(steps[-1]) - float(steps[0])) < min_kl_rise:
        return 0.0
    return slope(steps, values) / kl_slope


def standardised(value: float, mean: float, std: float) -> float:
    return (value - mean) / std


# ---------------------------------------------------------------- what a trainer hands the monitor

@dataclass
class MemberBatch:
    """One step's member scores (k, B), the proxy rewards (B,) of the same samples, and the member names."""

    scores: np.ndarray
    proxy: np.ndarray
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64)
        self.proxy = np.asarray(self.proxy, dtype=np.float64)
        if self.scores.ndim != 2 or self.scores.shape[0] < 2 or self.scores.shape[1] != self.proxy.shape[0]:
            raise MonitorError(f"member scores must be (k >= 2, B) with B proxy rewards; got {self.scores.shape} and "
                               f"{self.proxy.shape}")

    @staticmethod
    def concat(batches: Sequence[MemberBatch]) -> MemberBatch:
        """Several batches of one step (gradient accumulation, ranks) as one."""
        return MemberBatch(np.concatenate([b.scores for b in batches], axis=1),
                           np.concatenate([b.proxy for b in batches]), batches[0].names)


def member_batch(results: Sequence[RewardResult], proxy: Sequence[float | None], keys: Sequence[str]) -> MemberBatch:
    """Member scores from the results' components (keys as the pipeline names them), for the samples that have every
    member and a proxy reward; errored and skipped samples are left out (the pipeline counts them)."""
    columns = [i for i, (r, p) in enumerate(zip(results, proxy, strict=True))
               if p is not None and r.status is Status.OK and all(k in r.components for k in keys)]
    scores = [[results[i].components[k] for i in columns] for k in keys]  # (k, 0) when no sample is left
    return MemberBatch(scores, [proxy[i] for i in columns], tuple(keys))


def eval_member_scores(components: Sequence[Mapping[str, float] | None], keys: Sequence[str]) -> np.ndarray:
    """(k, n) member scores of the eval samples whose components hold every member (errored ones are left out)."""
    rows = [c for c in components if c is not None and all(k in c for k in keys)]
    return np.array([[row[k] for row in rows] for k in keys], dtype=np.float64).reshape(len(keys), len(rows))


def member_keys(component_keys: Sequence[str], groups: Sequence[Sequence[str]], source: str) -> tuple[str, ...]:
    """The pipeline's component keys of the first member group found, whether the plugin is the root (`seed1`) or
    nested in a composite (`uwo/seed1`). `groups` are the member names of every plugin with members, root first."""
    for names in groups:
        for prefix in sorted({key[: len(key) - len(name)] for key in component_keys for name in names
                              if key.endswith(name) and (key == name or key[: len(key) - len(name)].endswith("/"))}):
            keys = tuple(prefix + name for name in names)
            if all(key in component_keys for key in keys):
                return keys
    raise MonitorError(f"{source}: no plugin with member scores (an ensemble); name a shadow ensemble in "
                       "monitor.shadow, or list the component keys in monitor.members")


# ---------------------------------------------------------------- the stateful monitor

@dataclass
class Alarm:
    """The first signal that stayed beyond its threshold: where, at what KL, how far."""

    step: int
    kl: float
    signal: str
    value: float
    threshold: float
    action: str

    def line(self) -> str:
        """The one line printed when the alarm fires."""
        return (f"[monitor] ALARM at step {self.step}, KL {self.kl:.3f}: {self.signal} {self.value:.4g} > "
                f"{self.threshold:.4g}; action: {self.action}")


@dataclass
class Series:
    """Per-step signal inputs (what a replay needs) and the gold evals, in step order."""

    steps: list[int] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    disagreement: list[float] = field(default_factory=list)
    proxy: list[float] = field(default_factory=list)
    worst: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_worst: list[float] = field(default_factory=list)
    gold_steps: list[int] = field(default_factory=list)
    gold: list[float] = field(default_factory=list)


class Monitor:
    """Feeds on one batch per step (`observe`) and gold at evals (`observe_gold`); `logs()` has the same keys always.

    `alarm` is set once, by the first signal over its threshold for `patience` steps; the trainer takes the action.
    `observe_signals` takes precomputed (KL, disagreement, proxy) values, which is how logged runs are replayed."""

    def __init__(self, config: MonitorConfig, has_gold: bool | None = None):
        self.config = config
        self.has_gold = config.gold is not None if has_gold is None else has_gold
        self.keys = monitor_keys(self.has_gold)
        self.series = Series()
        self.means: np.ndarray | None = None
        self.stds: np.ndarray | None = None
        self.proxy_mean = self.proxy_std = 0.0
        self.reference_disagreement = 0.0
        self.eval_means: np.ndarray | None = None
        self.eval_stds: np.ndarray | None = None
        self.streaks = dict.fromkeys(SIGNALS, 0)
        self.alarm: Alarm | None = None
        self.kl_scale = 1.0
        self.kl_scalings: list[int] = []
        self.checkpoints: dict[int, float] = {}  # saved checkpoint step -> its monitor score
        self._reference: list[MemberBatch] = []
        self._last: dict[str, float] = dict.fromkeys(self.keys, 0.0)
        self._last[PREFIX + "kl_scale"] = 1.0

    # ------------------------------------------------ feeding

    def observe(self, step: int, kl: float, batch: MemberBatch) -> Alarm | None:
        """One training step: its mean sequence KL and its member scores; returns the alarm if it fires now."""
        if not math.isfinite(kl):
            raise MonitorError(f"step {step}: the KL to the initial policy is {kl}; the monitor needs it every step")
        if batch.scores.shape[1] == 0:
            raise MonitorError(f"step {step}: no sample had every member score and a proxy reward")
        if len(self._reference) < self.config.reference_steps:  # provisional values until the reference is complete
            self._reference.append(batch)
            self._fix_reference(step)
            if len(self._reference) == self.config.reference_steps:
                return self._rewrite_reference(step, kl, batch)
        return self.observe_signals(step, kl, *self._signals_of(batch))

    def _fix_reference(self, step: int) -> None:
        """Each member's and the proxy's location and scale over the reference steps so far. A flat one is refused
        once the reference is complete; before, its scale is provisionally 1 (its standardised scores are 0 anyway)."""
        self.means, self.stds = member_reference([b.scores for b in self._reference])
        proxy = np.concatenate([b.proxy for b in self._reference])
        self.proxy_mean, self.proxy_std = float(proxy.mean()), float(proxy.std())
        flat = [name for name, std in zip(self._reference[0].names, self.stds) if not std > 0]
        if len(self._reference) < self.config.reference_steps:
            self.stds = np.where(self.stds > 0, self.stds, 1.0)
            self.proxy_std = self.proxy_std if self.proxy_std > 0 else 1.0
        elif flat or not self.proxy_std > 0:
            what = f"member(s) {', '.join(flat)}" if flat else "the proxy reward"
            raise MonitorError(f"step {step}: {what} gave every reference sample the same score, so there is no scale "
                               "to standardise by; raise monitor.reference_steps or the batch size")

    def _signals_of(self, batch: MemberBatch) -> tuple[float, float, float]:
        return (disagreement(batch.scores, self.means, self.stds),
                standardised(float(batch.proxy.mean()), self.proxy_mean, self.proxy_std),
                worst_member(batch.scores, self.means, self.stds))

    def _rewrite_reference(self, step: int, kl: float, batch: MemberBatch) -> Alarm | None:
        """The reference is complete: recompute the reference steps' values with it, then take this step."""
        n = len(self._reference) - 1
        for index, earlier in zip(range(len(self.series.steps) - n, len(self.series.steps)), self._reference[:-1]):
            (self.series.disagreement[index], self.series.proxy[index],
             self.series.worst[index]) = self._signals_of(earlier)
        d, p, w = self._signals_of(batch)
        self.reference_disagreement = float(np.mean([*self.series.disagreement[len(self.series.steps) - n:], d]))
        return self.observe_signals(step, kl, d, p, w)

    def observe_signals(self, step: int, kl: float, disagreement_value: float, proxy_value: float,
                        worst_value: float) -> Alarm | None:
        """One step from precomputed values (online after `observe`, or replaying a logged run); no streak counts
        before the reference steps are complete."""
        s = self.series
        if s.steps and step <= s.steps[-1]:
            raise MonitorError(f"step {step} comes after step {s.steps[-1]}; steps must increase")
        s.steps.append(step)
        s.kl.append(float(kl))
        s.disagreement.append(float(disagreement_value))
        s.proxy.append(float(proxy_value))
        s.worst.append(float(worst_value))
        if len(s.steps) == self.config.reference_steps and not self._reference:  # replay: the reference from the series
            self.reference_disagreement = float(np.mean(s.disagreement))
        values = self.signal_values()
        if len(s.steps) < self.config.reference_steps:
            return None
        fired = self._update_streaks(values)
        return self._fire(step, fired, values) if fired else None

    def observe_gold(self, step: int, gold: float) -> Alarm | None:
        """Gold's mean on the eval prompts at an eval step; can fire the `gold_drop` alarm at once."""
        if not math.isfinite(gold):
            raise MonitorError(f"step {step}: gold is {gold}")
        self.series.gold_steps.append(step)
        self.series.gold.append(float(gold))
        self._last[PREFIX + "gold"] = float(gold)
        self._last[PREFIX + "score"] = self._score()
        return self._eval_alarm(step, "gold_drop", max(self.series.gold) - gold)

    def observe_eval_members(self, step: int, member_scores: ArrayLike, names: Sequence[str]) -> Alarm | None:
        """The watched members' (k, n) scores of the eval samples at an eval: the first eval fixes each member's
        location and scale; every eval gives the worst member's mean (may fire `worst_member_drop` at once)."""
        scores = np.asarray(member_scores, dtype=np.float64)
        if scores.ndim != 2 or scores.shape[0] < 2 or scores.shape[1] < 2:
            raise MonitorError(f"step {step}: eval member scores must be (k >= 2 members, n >= 2 samples); got "
                               f"{scores.shape}")
        if self.eval_means is None:
            means, stds = member_reference([scores])
            flat = [name for name, std in zip(names, stds) if not std > 0]
            if flat:
                raise MonitorError(f"step {step}: member(s) {', '.join(flat)} gave every eval sample the same score, "
                                   "so there is no scale to standardise by; use more eval prompts or samples")
            self.eval_means, self.eval_stds = means, stds
        return self.observe_eval_worst(step, worst_member(scores, self.eval_means, self.eval_stds))

    def observe_eval_worst(self, step: int, value: float) -> Alarm | None:
        """The eval's worst member mean (online after `observe_eval_members`, or replaying a logged run)."""
        if not math.isfinite(value):
            raise MonitorError(f"step {step}: the eval's worst member score is {value}")
        self.series.eval_steps.append(step)
        self.series.eval_worst.append(float(value))
        drop = max(self.series.eval_worst) - float(value)
        self._last.update({PREFIX + "eval_worst_member": float(value), PREFIX + "worst_member_drop": drop,
                           PREFIX + "score": self._score()})
        return self._eval_alarm(step, "worst_member_drop", drop)

    def _eval_alarm(self, step: int, signal: str, drop: float) -> Alarm | None:
        threshold = getattr(self.config.thresholds, signal)
        if threshold is not None and self.alarm is None and drop > threshold:
            kl = self.series.kl[-1] if self.series.kl else 0.0
            return self._set_alarm(Alarm(step, kl, signal, drop, threshold, self.config.action))
        return None

    def _score(self) -> float:
        s = self.series
        if self.has_gold and s.gold:
            return s.gold[-1]
        if s.eval_worst:
            return s.eval_worst[-1]
        return float(np.mean(s.worst[-self.config.window:])) if s.worst else 0.0

    # ------------------------------------------------ signals

    def signal_values(self) -> dict[str, float]:
        """The signals at the latest step (slopes over the last `window` steps, 0 until the window is full)."""
        s, w = self.series, self.config.window
        d = s.disagreement[-1] if s.steps else 0.0
        full = len(s.steps) >= max(w, self.config.reference_steps)
        rise = self.config.min_kl_rise
        trend = per_kl(s.steps[-w:], s.kl[-w:], s.disagreement[-w:], rise) if full else 0.0
        proxy_trend = per_kl(s.steps[-w:], s.kl[-w:], s.proxy[-w:], rise) if full else 0.0
        weight = self.config.divergence_weight
        values = {
            "kl": s.kl[-1] if s.kl else 0.0, "disagreement": d,
            "disagreement_rise": float(np.mean(s.disagreement[-w:])) - self.reference_disagreement if s.steps else 0.0,
            "trend": trend, "proxy": s.proxy[-1] if s.proxy else 0.0, "proxy_trend": proxy_trend,
            "divergence": weight * trend - proxy_trend, "worst_member": s.worst[-1] if s.worst else 0.0,
            "eval_worst_member": s.eval_worst[-1] if s.eval_worst else 0.0,
            "worst_member_drop": max(s.eval_worst) - s.eval_worst[-1] if s.eval_worst else 0.0, "score": self._score(),
            "alarm": float(self.alarm is not None), "kl_scale": self.kl_scale,
        }
        self._last.update({PREFIX + key: float(value) for key, value in values.items()})
        return values

    def _update_streaks(self, values: Mapping[str, float]) -> list[str]:
        thresholds = self.config.thresholds
        full = len(self.series.steps) >= max(self.config.window, self.config.reference_steps)
        fired = []
        for name in STEP_SIGNALS:
            threshold = getattr(thresholds, name)
            needs_window = name != "disagreement_rise"  # the slopes need a full window; the level does not
            over = threshold is not None and (full or not needs_window) and values[name] > threshold
            self.streaks[name] = self.streaks[name] + 1 if over else 0
            if self.streaks[name] >= self.config.patience:
                fired.append(name)
        return fired

    def _fire(self, step: int, fired: list[str], values: Mapping[str, float]) -> Alarm | None:
        if self.alarm is not None:
            return None
        name = fired[0]
        return self._set_alarm(Alarm(step, values["kl"], name, values[name], getattr(self.config.thresholds, name),
                                     self.config.action))

    def _set_alarm(self, alarm: Alarm) -> Alarm:
        self.alarm = alarm
        self._last[PREFIX + "alarm"] = 1.0
        return alarm

    def feed(self, records: Iterable[Mapping[str, float]], gold: Iterable[tuple[int, float]] = (),
             evals: Iterable[tuple[int, float]] = ()) -> None:
        """Logged steps and evals in training order: the evals of step s (of the policy that samples step s; gold
        first) come before step s's record."""
        pending = sorted([(int(step), 0, float(value)) for step, value in gold]
                         + [(int(step), 1, float(value)) for step, value in evals])

        def take(until: float) -> None:
            while pending and pending[0][0] <= until:
                step, kind, value = pending.pop(0)
                (self.observe_gold if kind == 0 else self.observe_eval_worst)(step, value)

        for record in records:
            take(int(record["step"]))
            self.observe_signals(int(record["step"]), record["kl"], record["disagreement"], record["proxy"],
                                 record["worst_member"])
        take(math.inf)

    # ------------------------------------------------ what trainers read

    def logs(self) -> dict[str, float]:
        """Every monitor key with its latest value (0 before there is one), the same keys on every call."""
        return {key: self._last[key] for key in self.keys}

    def scale_kl(self, step: int) -> float:
        """Record that the KL coefficient was multiplied by `kl_factor` at `step`; returns the factor to apply."""
        self.kl_scalings.append(step)
        self.kl_scale *= self.config.kl_factor
        self._last[PREFIX + "kl_scale"] = self.kl_scale
        return self.config.kl_factor

    @property
    def score(self) -> float:
        return self._last[PREFIX + "score"]

    def note_checkpoint(self, step: int) -> None:
        """A checkpoint of `step` was saved; remember its monitor score for `best_checkpoint`."""
        self.checkpoints[step] = self.score

    def best_checkpoint(self) -> int | None:
        """The saved step with the best monitor score (the earliest among equals), or None before any save."""
        return best_step(self.checkpoints)

    # ------------------------------------------------ resume

    def state_dict(self, before_step: int | None = None) -> dict[str, Any]:
        """JSON-able state as of just before training step `before_step` observes (all of it when None): what a
        checkpoint of that step holds, so that resuming there observes that step again. Gold evals of that step
        (made before its batch) are kept."""
        cut = math.inf if before_step is None else before_step
        s = self.series
        keep = [i for i, step in enumerate(s.steps) if step < cut]
        gold = [i for i, step in enumerate(s.gold_steps) if step <= cut]
        evals = [i for i, step in enumerate(s.eval_steps) if step <= cut]
        return {
            "series": {"steps": [s.steps[i] for i in keep], "kl": [s.kl[i] for i in keep],
                       "disagreement": [s.disagreement[i] for i in keep], "proxy": [s.proxy[i] for i in keep],
                       "worst": [s.worst[i] for i in keep],
                       "gold_steps": [s.gold_steps[i] for i in gold], "gold": [s.gold[i] for i in gold],
                       "eval_steps": [s.eval_steps[i] for i in evals], "eval_worst": [s.eval_worst[i] for i in evals]},
            "eval_reference": None if self.eval_means is None or not evals else
            {"means": self.eval_means.tolist(), "stds": self.eval_stds.tolist()},
            "reference": [{"step": step, "scores": b.scores.tolist(), "proxy": b.proxy.tolist(), "names": list(b.names)}
                          for step, b in zip(s.steps, self._reference) if step < cut],
            "kl_scalings": [step for step in self.kl_scalings if step < cut],
            "checkpoints": {str(k): v for k, v in self.checkpoints.items() if k <= cut},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state_dict`'s output: the reference and every logged step are replayed, so streaks and the
        alarm come back exactly as they were."""
        missing = [key for key in ("worst", "eval_steps", "eval_worst") if key not in state["series"]]
        missing += [key for key in ("eval_reference",) if key not in state]
        if missing:
            raise MonitorError(f"this monitor state has no {', '.join(missing)}: it was saved by an older version of "
                               "the monitor; resume with that version or start a fresh run")
        fresh = Monitor(self.config, self.has_gold)
        self.__dict__.update(fresh.__dict__)
        reference = [MemberBatch(np.array(b["scores"]), np.array(b["proxy"]), tuple(b["names"])) for b in state["reference"]]
        if reference:
            self._reference = reference
            self._fix_reference(int(state["reference"][-1]["step"]))
        series = state["series"]
        n = self.config.reference_steps
        if len(reference) >= n:
            self.reference_disagreement = float(np.mean(series["disagreement"][:n]))
        records = [{"step": step, "kl": series["kl"][i], "disagreement": series["disagreement"][i],
                    "proxy": series["proxy"][i], "worst_member": series["worst"][i]} for i, step in enumerate(series["steps"])]
        self.feed(records, zip(series["gold_steps"], series["gold"]), zip(series["eval_steps"], series["eval_worst"]))
        if state["eval_reference"] is not None:
            self.eval_means = np.array(state["eval_reference"]["means"])
            self.eval_stds = np.array(state["eval_reference"]["stds"])
        self.kl_scalings = [int(step) for step in state["kl_scalings"]]
        self.kl_scale = self.config.kl_factor ** len(self.kl_scalings)
        self._last[PREFIX + "kl_scale"] = self.kl_scale
        self.checkpoints = {int(k): float(v) for k, v in state["checkpoints"].items()}


def best_step(scores: Mapping[int, float]) -> int | None:
    """The step with the highest score (the earliest among equals)."""
    if not scores:
        return None
    return min(scores, key=lambda step: (-scores[step], step))


def replay(config: MonitorConfig, records: Sequence[Mapping[str, float]], gold: Sequence[tuple[int, float]] = (),
           evals: Sequence[tuple[int, float]] = ()) -> Monitor:
    """A monitor run over logged per-step records ({step, kl, disagreement, proxy, worst_member}), gold evals and the
    evals' worst member means, with `config`'s thresholds: re-evaluates a finished run without retraining."""
    monitor = Monitor(config, has_gold=bool(gold))
    monitor.feed(records, gold, evals)
    return monitor
