"""The demo's RL findings from its eval files: per-step gold with its standard error, each run's rise and fall,
gold at matched KL over seeds, and what the policy got wrong (pure functions on eval files; no torch).

Standard errors: a step's gold SE is over its eval samples (sd / sqrt(n)); a seed mean's SE is the seeds' sd
(ddof 1) / sqrt(seeds); a difference of two seed means has SE sqrt(se_a^2 + se_b^2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evaluation.eval_files import list_eval_files, read_eval_file
from reward_plugins.io import DataError

RISE = FALL = 0.05  # issue 19: peak - start and peak - end, in gold


@dataclass
class RunCurve:
    """One RL run's eval steps: KL, mean proxy, mean gold with its SE, mean mistakes per response."""

    name: str
    steps: np.ndarray
    kl: np.ndarray
    proxy: np.ndarray
    gold: np.ndarray
    gold_se: np.ndarray
    mistakes: list[dict[str, float]] = field(default_factory=list)
    answers: list[list[tuple[str, str, float, float]]] = field(default_factory=list)  # (prompt, answer, proxy, gold)


def run_curve(name: str, eval_dir: Path, mistakes_of: Callable[[str, str], dict[str, int]] | None = None) -> RunCurve:
    """The curve of one run from its gold-scored eval files (rows whose reward errored are left out)."""
    steps, kls, proxy, gold, gold_se, mistakes, answers = [], [], [], [], [], [], []
    for path in list_eval_files(eval_dir):
        eval_file = read_eval_file(path)
        rows = [r for r in eval_file.rows if r.scored and r.proxy_score is not None]
        if not rows:
            continue
        if any(r.gold_score is None for r in rows):
            raise DataError(f"{path}: rows without a gold score; run the gold stage first")
        golds = np.array([r.gold_score for r in rows])
        steps.append(eval_file.step)
        kls.append(eval_file.kl if eval_file.kl is not None else math.nan)
        proxy.append(float(np.mean([r.proxy_score for r in rows])))
        gold.append(float(golds.mean()))
        gold_se.append(float(golds.std(ddof=1) / math.sqrt(len(golds))) if len(golds) > 1 else math.nan)
        if mistakes_of is not None:
            counts = [mistakes_of(r.prompt, r.answer) for r in rows]
            mistakes.append({key: float(np.mean([c[key] for c in counts])) for key in counts[0]})
        answers.append([(r.prompt, r.answer, float(r.proxy_score), float(r.gold_score)) for r in rows])
    if not steps:
        raise DataError(f"{eval_dir}: no eval step with a scored row")
    return RunCurve(name, np.array(steps), np.array(kls), np.array(proxy), np.array(gold), np.array(gold_se),
                    mistakes, answers)


@dataclass
class RiseAndFall:
    start: float
    peak: float
    peak_step: int
    peak_kl: float
    end: float
    proxy_start: float
    proxy_at_peak: float
    proxy_end: float

    @property
    def rise(self) -> float:
        return self.peak - self.start

    @property
    def fall(self) -> float:
        return self.peak - self.end

    @property
    def over_optimises(self) -> bool:
        """Gold rose and then fell by at least RISE and FALL while the proxy went on rising after the gold peak."""
        return self.rise >= RISE and self.fall >= FALL and self.proxy_end > self.proxy_at_peak


def rise_and_fall(curve: RunCurve) -> RiseAndFall:
    peak = int(np.argmax(curve.gold))
    return RiseAndFall(float(curve.gold[0]), float(curve.gold[peak]), int(curve.steps[peak]), float(curve.kl[peak]),
                       float(curve.gold[-1]), float(curve.proxy[0]), float(curve.proxy[peak]), float(curve.proxy[-1]))


def kl_path(curve: RunCurve) -> np.ndarray:
    """The run's KL made non-decreasing along the steps (a running maximum), so gold can be read at a KL even
    where a noisy eval estimate dips."""
    return np.maximum.accumulate(np.nan_to_num(curve.kl, nan=0.0))


def gold_at_kl(curve: RunCurve, kl: float) -> float:
    """Gold interpolated linearly between the eval steps around `kl` on the run's KL path."""
    path = kl_path(curve)
    if kl > path[-1] + 1e-9:
        raise ValueError(f"{curve.name} never reaches KL {kl:.3f} (its largest is {path[-1]:.3f})")
    index = int(np.searchsorted(path, kl, side="left"))
    if index == 0:
        return float(curve.gold[0])
    lo, hi = path[index - 1], path[index]
    weight = 0.0 if hi == lo else (kl - lo) / (hi - lo)
    return float(curve.gold[index - 1] + weight * (curve.gold[index] - curve.gold[index - 1]))


def matched_kl(curves: Sequence[RunCurve]) -> float:
    """The largest KL every run reaches."""
    return float(min(kl_path(c)[-1] for c in curves))


@dataclass
class SeedStats:
    values: list[float]

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def sd(self) -> float:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else math.nan

    @property
    def se(self) -> float:
        return self.sd / math.sqrt(len(self.values)) if len(self.values) > 1 else math.nan


def difference(a: SeedStats, b: SeedStats) -> tuple[float, float]:
    """Mean of `a` minus mean of `b`, and its standard error."""
    return a.mean - b.mean, math.sqrt(a.se**2 + b.se**2)


def seed_table(per_seed: Mapping[str, Sequence[float]], baseline: str) -> list[dict[str, float | str]]:
    """One row per objective: mean, sd, SE over seeds, and the difference from `baseline` with its SE and z."""
    base = SeedStats(list(per_seed[baseline]))
    rows = []
    for name, values in per_seed.items():
        stats = SeedStats(list(values))
        diff, se = difference(stats, base)
        rows.append({"objective": name, "mean": stats.mean, "sd": stats.sd, "se": stats.se,
                     "diff": diff if name != baseline else math.nan, "diff_se": se if name != baseline else math.nan,
                     "z": diff / se if name != baseline and se > 0 else math.nan})
    return rows


def _pm(value: float, se: float) -> str:
    return f"{value:.3f} ± {se:.3f}" if math.isfinite(se) else f"{value:.3f}"


def seeds_at(curves: Sequence[RunCurve], pick: Callable[[RunCurve], float]) -> SeedStats:
    return SeedStats([pick(c) for c in curves])


def summary(rm_reports: Sequence[Mapping], bon: Mapping[str, Sequence[Mapping]],
            curves: Mapping[str, Sequence[RunCurve]], baseline: str = "single_rm") -> str:
    """The demo's markdown tables: proxy RMs, best-of-n, PPO per objective, each single-RM run's rise and fall, the
    ensembles against the single RM at matched KL, the policies' mistakes, and example completions."""
    lines = ["## Proxy reward models (each learnt from its own annotator's labels; held-out accuracy on clean pairs "
             "of SFT samples ranked by gold, and agreement with its annotator on the same pairs; score mean and sd on "
             "the reference SFT samples, what the rewards are standardised with)", "",
             "| RM | annotator | accuracy ± SE (gold) | pairs | agreement ± SE (own annotator) | pairs | mean | sd |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rm_reports:
        acc, n = r["accuracy"], r["test_pairs"]
        agree, m = r["annotator_agreement"], r["annotator_pairs"]
        lines.append(f"| rm_seed{r['seed']} | {r['annotator']} | {_pm(acc, math.sqrt(acc * (1 - acc) / n))} | {n} | "
                     f"{_pm(agree, math.sqrt(agree * (1 - agree) / m))} | {m} | {r['mean']:.3f} | {r['std']:.3f} |")
    lines += ["", "## Best-of-n from the SFT policy on the eval prompts (unbiased estimator; members z-scored; "
              "KL_bon is an upper bound; ± one SE over prompts)", "",
              "| proxy | n | KL_bon | proxy n=1 -> n | gold n=1 -> n | peak gold (n) |", "|---|---|---|---|---|---|"]
    for name, curve in bon.items():
        first, last = curve[0], curve[-1]
        peak = max(curve, key=lambda p: p["gold_score"])
        lines.append(f"| {name} | {last['n']} | {last['kl_bon']:.2f} | {first['proxy_score']:.3f} -> "
                     f"{last['proxy_score']:.3f} | {_pm(first['gold_score'], first.get('gold_se', math.nan))} -> "
                     f"{_pm(last['gold_score'], last.get('gold_se', math.nan))} | "
                     f"{_pm(peak['gold_score'], peak.get('gold_se', math.nan))} ({peak['n']}) |")
    lines += rl_tables(curves, baseline)
    return "\n".join(lines) + "\n"


def rl_tables(curves: Mapping[str, Sequence[RunCurve]], baseline: str = "single_rm") -> list[str]:
    """The PPO tables (see `summary`)."""
    seeds = len(next(iter(curves.values())))
    kl = matched_kl([c for runs in curves.values() for c in runs])
    lines = ["", f"## PPO, {seeds} seeds per objective (eval prompts; KL = mean sequence KL to the SFT policy, k1; "
             "± one SE over seeds)", "",
             "| objective | steps | final KL | proxy start -> end | gold start | gold peak (step) | gold end | "
             f"gold at KL {kl:.2f} (sd) |", "|---|---|---|---|---|---|---|---|"]
    at_kl = {name: seeds_at(runs, lambda c: gold_at_kl(c, kl)) for name, runs in curves.items()}
    for name, runs in curves.items():
        start, end = seeds_at(runs, lambda c: c.gold[0]), seeds_at(runs, lambda c: c.gold[-1])
        peaks = [rise_and_fall(c) for c in runs]
        peak = SeedStats([p.peak for p in peaks])
        steps = "/".join(str(p.peak_step) for p in peaks)
        matched = at_kl[name]
        lines.append(f"| {name} | {int(runs[0].steps[-1])} | {seeds_at(runs, lambda c: c.kl[-1]).mean:.2f} | "
                     f"{seeds_at(runs, lambda c: c.proxy[0]).mean:.2f} -> {seeds_at(runs, lambda c: c.proxy[-1]).mean:.2f} | "
                     f"{_pm(start.mean, start.se)} | {_pm(peak.mean, peak.se)} ({steps}) | {_pm(end.mean, end.se)} | "
                     f"{_pm(matched.mean, matched.se)} ({matched.sd:.3f}) |")
    if baseline in curves:
        lines += ["", f"## Does every {baseline} run over-optimise? (gold ± one SE over the eval samples; needs rise and "
                  f"fall >= {RISE} with the proxy still rising after the gold peak)", "",
                  "| run | gold start | gold peak (step, KL) | gold end | rise | fall | proxy at peak -> end | "
                  "over-optimises |", "|---|---|---|---|---|---|---|---|"]
        for c in curves[baseline]:
            r = rise_and_fall(c)
            peak = int(np.argmax(c.gold))
            lines.append(f"| {c.name} | {_pm(r.start, c.gold_se[0])} | {_pm(r.peak, c.gold_se[peak])} ({r.peak_step}, "
                         f"{r.peak_kl:.2f}) | {_pm(r.end, c.gold_se[-1])} | {r.rise:+.3f} | {r.fall:+.3f} | "
                         f"{r.proxy_at_peak:.2f} -> {r.proxy_end:.2f} | {'yes' if r.over_optimises else 'NO'} |")
        lines += ["", f"## Gold at matched KL {kl:.2f} (the largest KL every run reaches), against {baseline}", "",
                  f"| objective | gold (mean of seeds) | sd | SE | minus {baseline} ± SE | z | beyond 2 SE |",
                  "|---|---|---|---|---|---|---|"]
        for row in seed_table({name: stats.values for name, stats in at_kl.items()}, baseline):
            beyond = "" if row["objective"] == baseline else ("yes" if row["z"] > 2 else "NO")
            diff = "" if row["objective"] == baseline else f"{row['diff']:+.3f} ± {row['diff_se']:.3f}"
            z = "" if row["objective"] == baseline else f"{row['z']:.1f}"
            lines.append(f"| {row['objective']} | {row['mean']:.3f} | {row['sd']:.3f} | {row['se']:.3f} | {diff} | {z} | "
                         f"{beyond} |")
    lines += mistake_table(curves, baseline)
    lines += examples(curves, baseline)
    return lines


def mistake_table(curves: Mapping[str, Sequence[RunCurve]], baseline: str) -> list[str]:
    """Mean mistakes per answer at the first and last eval step, averaged over seeds."""
    first = next(iter(curves.values()))[0]
    if not first.mistakes:
        return []
    keys = list(first.mistakes[0])
    lines = ["", "## What the policies say wrong (mean per answer over the eval samples and seeds; step 0 -> last step)",
             "", "| objective | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, runs in curves.items():
        cells = [f"{np.mean([c.mistakes[0][k] for c in runs]):.2f} -> {np.mean([c.mistakes[-1][k] for c in runs]):.2f}"
                 for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for c in curves.get(baseline, []):  # each single-RM run exploits its own RM's error
        lines.append(f"| {c.name} | " + " | ".join(f"{c.mistakes[0][k]:.2f} -> {c.mistakes[-1][k]:.2f}" for k in keys) + " |")
    return lines


def examples(curves: Mapping[str, Sequence[RunCurve]], baseline: str = "single_rm", per_run: int = 2) -> list[str]:
    """Completions from the last eval step of each `baseline` run that its proxy scores above its median while gold
    scores them below 1 (what the policy learnt to exploit), beside another objective's answer to the same prompt."""
    if baseline not in curves:
        return []
    others = [name for name in curves if name != baseline]
    lines = ["", "## Example completions at the last step (proxy: the run's own reward, z-scored; gold: the rule)", "",
             f"| run | prompt | {baseline} answer (proxy, gold) | " + " | ".join(f"{o} answer (gold)" for o in others) + " |",
             "|---|---|---|" + "---|" * len(others)]
    for index, curve in enumerate(curves[baseline]):
        rows = curve.answers[-1]
        median = float(np.median([r[2] for r in rows]))
        seen: set[str] = set()
        picked = []
        for prompt, answer, proxy, gold in sorted(rows, key=lambda r: (r[3], -r[2])):
            if proxy > median and gold < 1.0 and prompt not in seen:
                picked.append((prompt, answer, proxy, gold))
                seen.add(prompt)
            if len(picked) == per_run:
                break
        for prompt, answer, proxy, gold in picked:
            cells = []
            for other in others:
                match = next((r for r in curves[other][index].answers[-1] if r[0] == prompt), None)
                cells.append(f"`{match[1].strip()}` ({match[3]:.2f})" if match else "")
            task = prompt.split("Instruction:")[-1].split("\n")[0].strip()
            lines.append(f"| {curve.name} | {task} | `{answer.strip()}` ({proxy:.2f}, {gold:.2f}) | " + " | ".join(cells) + " |")
    return lines


def monitor_section(table: str, settings: Mapping[str, Any]) -> str:
    """The monitor's table from `evaluation.monitor_eval.summary` under a heading that says its settings (a run's
    `monitor:` section)."""
    steps = ", ".join(f"{key} {settings[key]}" for key in ("reference_steps", "window", "patience"))
    thresholds = ", ".join(f"{key} {value}" for key, value in settings["thresholds"].items() if value is not None)
    return (f"\n## The over-optimisation monitor on every PPO run (evaluation.monitor_eval; action {settings['action']}; "
            "a single-RM run watched by a shadow ensemble of all proxy RMs, an ensemble run by its own members; KL is "
            f"the training batch's; {steps}; thresholds {thresholds}; a run whose gold falls by >= {FALL} and 2 SE "
            "while its proxy rises over-optimises, one whose proxy does not rise degrades, any other is a control)"
            "\n\n" + table)


def cheap_section(curves: Mapping[str, Sequence[RunCurve]], cheap: Sequence[str], full: str = "uwo",
                  baseline: str = "single_rm", train_seconds: Mapping[str, float] | None = None) -> list[str]:
    """How much of the k-RM ensemble's gold gain over one RM (at matched KL) each one-model ensemble recovers, and
    what the reward models cost to train."""
    present = [name for name in cheap if name in curves]
    if not present or full not in curves or baseline not in curves:
        return []
    kl = matched_kl([c for runs in curves.values() for c in runs])
    at = {name: SeedStats([gold_at_kl(c, kl) for c in curves[name]]) for name in (baseline, full, *present)}
    gain, gain_se = difference(at[full], at[baseline])
    lines = ["", f"## One-model ensembles against the {len(curves[full])}-seed k-RM ensemble ({full}), gold at matched "
             f"KL {kl:.2f}", "", f"| objective | gold ± SE | gain over {baseline} ± SE | share of {full}'s gain |",
             "|---|---|---|---|", f"| {full} | {_pm(at[full].mean, at[full].se)} | {_pm(gain, gain_se)} | 1.00 |"]
    for name in present:
        own, own_se = difference(at[name], at[baseline])
        share = own / gain if gain > 0 else math.nan
        lines.append(f"| {name} | {_pm(at[name].mean, at[name].se)} | {_pm(own, own_se)} | {share:.2f} |")
    if train_seconds:
        lines += ["", "Reward-model training, seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in train_seconds.items())]
    return lines
