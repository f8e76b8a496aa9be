"""How well the over-optimisation monitor warns: lead time, hit rate, false alarms and gold kept, from finished runs.

    python -m evaluation.monitor_eval RUN_DIR... [--set thresholds.divergence=0.5 --set window=20]
                                      [--pair ACTED_RUN=BASE_RUN] [--min-drop 0.05] [--markdown table.md]

Works offline from what a monitored run leaves (`RUN/monitor/steps.jsonl`, `evals.jsonl`, `config.json`, the eval
files `RUN/eval/eval_step*.json` with gold scores, from the monitor's gold or `evaluation.run_ppo_gold_eval`): the
monitor is replayed over the logged per-step signals with the run's own settings, or with `--set` overrides, so
thresholds are re-evaluated without retraining. A run whose action changed it (`adapt_kl`, `stop`) keeps the alarm
it really had (`alarm.json`).

Per run: gold's mean on the eval prompts at each eval gives its peak and its final value. A run whose final gold
is below its peak by at least `--min-drop` and by more than twice that drop's standard error over-optimises if its
mean proxy reward at the final eval is above the gold peak's (gold falls while the proxy rises), and degrades if
not (in neither rate); any other run is a control. Every KL is the monitor's (the mean
sequence KL of the training batch at that step), and the KL budget is the largest the run reached.
- lead: KL at the alarm minus KL at the gold peak (negative: before the peak);
- hit: an over-optimising run alarmed no later than its gold peak plus 10 % of its KL budget;
- false alarm: a control run alarmed at all;
- gold kept by `stop`: the gold of the checkpoint `stop` would keep (the best gold-free monitor score among the eval
  steps up to the alarm, checkpoints saved at every eval and the initial policy) over the peak gold; a run that
  really stopped is read from its `stop.json`;
- gold kept by `adapt_kl` (`--pair ACTED=BASE`, the same run with and without the action): the acted run's final
  gold over the base run's peak, beside the base run's gold at the same step over its peak.
Targets: hit rate >= 80 %, false alarms <= 10 %, gold kept >= 95 % of the peak.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from reward_plugins.config_loader import ConfigError, apply_overrides
from reward_plugins.io import DataError
from reward_plugins.monitor import Monitor, MonitorConfig, best_step, replay
from reward_plugins.monitor_session import read_evals, read_steps

from .eval_files import list_eval_files, read_eval_file

HIT_TARGET, FALSE_ALARM_TARGET, KEPT_TARGET, LATE_SHARE = 0.8, 0.1, 0.95, 0.1


@dataclass
class RunResult:
    """One run's gold curve, its replayed alarm and what `stop` would keep."""

    name: str
    action: str
    gold_steps: list[int]
    gold: list[float]
    gold_se: list[float]
    kl_at: dict[int, float]
    budget: float
    proxy: list[float]
    alarm_step: int | None = None
    alarm_kl: float | None = None
    signal: str | None = None
    kept_step: int | None = None
    stopped: bool = False

    @property
    def peak(self) -> int:
        return int(np.argmax(self.gold))

    @property
    def peak_gold(self) -> float:
        return self.gold[self.peak]

    @property
    def drop(self) -> float:
        return self.peak_gold - self.gold[-1]

    @property
    def drop_se(self) -> float:
        """Standard error of peak minus final gold (two independent evals)."""
        return math.hypot(self.gold_se[self.peak], self.gold_se[-1])

    def gold_falls(self, min_drop: float) -> bool:
        """Gold fell from its peak by at least `min_drop` and by more than twice the drop's standard error."""
        return self.drop >= min_drop and self.drop > 2 * self.drop_se

    def over_optimises(self, min_drop: float) -> bool:
        """Gold falls while the proxy keeps rising: the final eval's mean proxy above the gold peak's."""
        return self.gold_falls(min_drop) and self.proxy[-1] > self.proxy[self.peak]

    def kind(self, min_drop: float) -> str:
        """over-optimises; degrades (gold falls, and the proxy with it: no proxy error was exploited); control."""
        if self.over_optimises(min_drop):
            return "over-optimises"
        return "degrades" if self.gold_falls(min_drop) else "control"

    @property
    def peak_kl(self) -> float:
        return self.kl_at[self.gold_steps[self.peak]]

    @property
    def lead(self) -> float | None:
        return None if self.alarm_kl is None else self.alarm_kl - self.peak_kl

    def hit(self) -> bool:
        return self.alarm_kl is not None and self.alarm_kl <= self.peak_kl + LATE_SHARE * self.budget

    def gold_of(self, step: int) -> float:
        return self.gold[self.gold_steps.index(step)]


def gold_curve(run_dir: Path) -> tuple[list[int], list[float], list[float], list[float]]:
    """Each eval step, the mean gold over its scored rows, its standard error, and the mean proxy reward."""
    files = list_eval_files(run_dir / "eval")
    if not files:
        raise DataError(f"{run_dir}: no eval files in {run_dir / 'eval'}")
    steps, means, errors, proxy = [], [], [], []
    for path in files:
        eval_file = read_eval_file(path)
        values = [row.gold_score for row in eval_file.rows if row.gold_score is not None]
        if not values:
            raise DataError(f"{path}: no gold scores; set monitor.gold or run python -m evaluation.run_ppo_gold_eval")
        proxies = [row.proxy_score for row in eval_file.rows if row.proxy_score is not None]
        if not proxies:
            raise DataError(f"{path}: no proxy scores; over-optimisation (gold falls while the proxy rises) cannot be "
                            "told from a policy that degrades")
        steps.append(eval_file.step)
        means.append(float(np.mean(values)))
        errors.append(float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0)
        proxy.append(float(np.mean(proxies)))
    return steps, means, errors, proxy


def run_config(run_dir: Path, overrides: Sequence[str]) -> tuple[MonitorConfig, str]:
    """The run's own monitor settings (`monitor/config.json`) with `overrides` applied, and its action."""
    path = run_dir / "monitor" / "config.json"
    if not path.exists():
        raise DataError(f"{run_dir}: no monitor/config.json; was the run trained with a monitor: section?")
    raw = json.loads(path.read_text())["config"]
    data, _ = apply_overrides(raw, overrides, kind="monitor")
    try:
        return MonitorConfig.model_validate(data, context={"check_paths": False}), raw.get("action", "warn")
    except ValidationError as exc:
        raise ConfigError([f"{path} with --set: {err['loc']}: {err['msg']}" for err in exc.errors()], "monitor") from None


def evaluate_run(run_dir: str | Path, overrides: Sequence[str] = ()) -> RunResult:
    """Replay the monitor over one run and read its gold curve."""
    run_dir = Path(run_dir)
    config, action = run_config(run_dir, overrides)
    records = read_steps(run_dir)
    evals = read_evals(run_dir)
    steps, gold, errors, proxy = gold_curve(run_dir)
    kl_at = {int(r["step"]): float(r["kl"]) for r in records}
    last_kl = kl_at[max(kl_at)]
    for step in steps:  # an eval after the last logged step (the final one) sees the policy that step would sample
        kl_at.setdefault(step, last_kl)
    result = RunResult(str(run_dir), action, steps, gold, errors, kl_at, max(kl_at.values()), proxy)
    alarm_file = run_dir / "monitor" / "alarm.json"
    if action in ("adapt_kl", "stop"):  # the action changed the run after its alarm: only the real alarm is valid
        if alarm_file.exists():
            alarm = json.loads(alarm_file.read_text())
            result.alarm_step, result.alarm_kl, result.signal = int(alarm["step"]), float(alarm["kl"]), alarm["signal"]
    else:
        monitor = replay(config, records, list(zip(steps, gold)) if config.thresholds.gold_drop is not None else [], evals)
        if monitor.alarm is not None:
            result.alarm_step, result.alarm_kl, result.signal = monitor.alarm.step, monitor.alarm.kl, monitor.alarm.signal
    stop_file = run_dir / "monitor" / "stop.json"
    if stop_file.exists():
        result.kept_step, result.stopped = int(json.loads(stop_file.read_text())["kept_step"]), True
    elif result.alarm_step is not None and action in ("warn", "checkpoint"):
        result.kept_step = kept_by_stop(config, records, evals, steps, result.alarm_step)
    return result


def kept_by_stop(config: MonitorConfig, records: Sequence[dict], evals: Sequence[tuple[int, float]],
                 eval_steps: Sequence[int], alarm_step: int) -> int:
    """The eval step `stop` keeps: the best gold-free score among checkpoints at the eval steps up to the alarm
    (PPO's `stop` saves the initial policy as checkpoint-0). Checkpoint-s holds the policy that samples step s: its
    score is the monitor's after the steps before s and the evals of step s (the eval's worst member, where the run
    logged one)."""
    monitor = Monitor(config, has_gold=False)
    wanted = sorted(s for s in eval_steps if s <= alarm_step)
    pending = sorted(evals)
    scores: dict[int, float] = {}
    for record in [*records, None]:
        until = math.inf if record is None else int(record["step"])
        while pending and pending[0][0] <= until:
            monitor.observe_eval_worst(*pending.pop(0))
        for step in wanted:
            if step <= until and step not in scores:
                scores[step] = monitor.score if monitor.series.steps or monitor.series.eval_steps else -math.inf
        if record is not None:
            monitor.observe_signals(int(record["step"]), record["kl"], record["disagreement"], record["proxy"],
                                    record["worst_member"])
    return best_step(scores)


def summary(results: Sequence[RunResult], pairs: Sequence[tuple[RunResult, RunResult]], min_drop: float) -> str:
    """The markdown table (one row per run) and the four figures against their targets."""
    lines = ["| run | class | action | gold start -> peak (KL) -> end | proxy at gold peak -> end | "
             "alarm (signal) at KL | lead (KL) | hit | gold kept by stop |", "|---|---|---|---|---|---|---|---|---|"]
    kinds = {r.name: r.kind(min_drop) for r in results}
    overopt = [r for r in results if kinds[r.name] == "over-optimises"]
    controls = [r for r in results if kinds[r.name] == "control"]
    degrading = [r for r in results if kinds[r.name] == "degrades"]
    for r in results:
        alarm = "none" if r.alarm_kl is None else f"step {r.alarm_step} ({r.signal}) at {r.alarm_kl:.3f}"
        lead = "" if r.lead is None else f"{r.lead:+.3f}"
        hit = {"over-optimises": "yes" if r.hit() else "no",
               "control": "false alarm" if r.alarm_kl is not None else "silent",
               "degrades": "alarm" if r.alarm_kl is not None else "none"}[kinds[r.name]]
        kept = "" if r.kept_step is None else f"{r.gold_of(r.kept_step):.3f} (step {r.kept_step}) = {share(r)}"
        lines.append(f"| {r.name} | {kinds[r.name]} (drop {r.drop:.3f} +- {r.drop_se:.3f}) | {r.action} | "
                     f"{r.gold[0]:.3f} -> {r.peak_gold:.3f} ({r.peak_kl:.2f}) -> {r.gold[-1]:.3f} | "
                     f"{r.proxy[r.peak]:.3f} -> {r.proxy[-1]:.3f} | {alarm} | {lead} | {hit} | {kept} |")
    figures = []
    hits = [r.hit() for r in overopt]
    figures.append(rate_line("hit rate (alarm <= gold peak + 10 % of the KL budget)", hits, HIT_TARGET, at_least=True,
                             what="over-optimising runs"))
    leads = [r.lead for r in overopt if r.lead is not None]
    if leads:
        figures.append(f"- lead time: KL at the alarm minus KL at the gold peak, median {np.median(leads):+.3f} "
                       f"(range {min(leads):+.3f} .. {max(leads):+.3f}) over {len(leads)} alarmed over-optimising runs")
    figures.append(rate_line("false alarms", [r.alarm_kl is not None for r in controls], FALSE_ALARM_TARGET,
                             at_least=False, what="control runs"))
    if degrading:
        figures.append(f"- runs whose gold fell with their proxy (a policy that degrades, not over-optimisation; in "
                       f"neither rate): {len(degrading)}, alarmed {sum(r.alarm_kl is not None for r in degrading)}")
    kept = [r.gold_of(r.kept_step) / r.peak_gold for r in overopt if r.kept_step is not None and r.peak_gold > 0]
    if kept:
        figures.append(f"- gold kept by stop: {', '.join(f'{k:.0%}' for k in kept)} of the peak "
                       f"(target >= {KEPT_TARGET:.0%}: met in {sum(k >= KEPT_TARGET for k in kept)} of {len(kept)})")
    for acted, base in pairs:
        end = acted.gold_steps[-1]
        base_end = base.gold_of(end) if end in base.gold_steps else base.gold[-1]
        ratio, without = acted.gold[-1] / base.peak_gold, base_end / base.peak_gold
        alarm = "no alarm" if acted.alarm_step is None else f"alarm at step {acted.alarm_step}, KL {acted.alarm_kl:.2f}"
        figures.append(f"- gold kept by {acted.action} ({acted.name} vs {base.name}, {alarm}): gold at step {end} "
                       f"{acted.gold[-1]:.3f} = {ratio:.0%} of the base run's peak {base.peak_gold:.3f}, against "
                       f"{base_end:.3f} = {without:.0%} without (target >= {KEPT_TARGET:.0%}: "
                       f"{'met' if ratio >= KEPT_TARGET else 'missed'})")
    return "\n".join(lines) + "\n\n" + "\n".join(figures) + "\n"


def share(result: RunResult) -> str:
    """The kept checkpoint's gold as a share of the peak (no share of a peak at or below 0: gold kept "165 %" of
    -0.187 would read as a gain)."""
    if result.peak_gold <= 0:
        return f"n/a (peak {result.peak_gold:.3f} <= 0)"
    return f"{result.gold_of(result.kept_step) / result.peak_gold:.0%}"


def rate_line(label: str, flags: Sequence[bool], target: float, at_least: bool, what: str) -> str:
    if not flags:
        return f"- {label}: no {what} among the runs given"
    rate = sum(flags) / len(flags)
    met = rate >= target if at_least else rate <= target
    return (f"- {label}: {sum(flags)} of {len(flags)} {what} = {rate:.0%} "
            f"(target {'>=' if at_least else '<='} {target:.0%}: {'met' if met else 'missed'})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluation.monitor_eval", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR", help="monitored run folders (with monitor/ and eval/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="replay with this monitor setting instead of the run's (e.g. thresholds.divergence=0.5)")
    parser.add_argument("--pair", action="append", default=[], metavar="ACTED=BASE",
                        help="a run with adapt_kl or stop, and the same run without it")
    parser.add_argument("--min-drop", type=float, default=0.05,
                        help="gold peak minus final gold that counts as falling (and more than 2 standard errors)")
    parser.add_argument("--markdown", help="also write the table to this file")
    return parser


def main(argv: Sequence[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    if not args.runs and not args.pair:
        raise DataError("give at least one RUN_DIR (or --pair ACTED=BASE)")
    results = [evaluate_run(run, args.set) for run in args.runs]
    pairs = []
    for text in args.pair:
        acted, sep, base = text.partition("=")
        if not sep:
            raise DataError(f"--pair {text!r}: expected ACTED_RUN=BASE_RUN")
        pairs.append((evaluate_run(acted, args.set), evaluate_run(base, args.set)))
    table = summary(results, pairs, args.min_drop)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    return table


if __name__ == "__main__":
    from reward_plugins.cli import run_cli

    sys.exit(run_cli(main, "evaluation.monitor_eval"))
