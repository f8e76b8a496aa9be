"""Gold and proxy reward against sqrt(KL) for best-of-n runs and RL eval folders, overlaid; PNG plus the CSV behind it.

    python -m evaluation.plots runs/bon_44m runs/ppo_uwo/eval [--recenter] [-o plots/overopt]

A RUN_DIR may hold `bon_sampled_results.json` (one best-of-n curve), `eval_step*.json` files (one RL
curve: mean proxy and gold score per eval step against the step's KL), or subfolders of those: `seed*`
best-of-n runs are averaged into one single-RM curve (with a band of one standard deviation across seeds),
every `ensemble_*` folder and every eval folder is its own curve; `seed*` RL runs (each holding eval files
or an `eval/` folder of them) are averaged into one RL curve per folder, step by step (mean KL, mean scores,
one standard deviation across seeds). RL points are drawn in KL order. Best-of-n KL is the analytical
`log n - (n-1)/n`, an upper bound on the true KL; RL KL is the eval files' estimate (negative estimates
plot at 0); rows whose reward errored or was skipped are left out (their proxy is a penalty, not a score).
`--recenter` subtracts each curve's first point so every curve starts at 0.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from reward_plugins.io import DataError, atomic_open

from .bon import kl_bon
from .eval_files import list_eval_files, read_eval_file

logger = logging.getLogger(__name__)

BON_FILE = "bon_sampled_results.json"
CSV_COLUMNS = ("run", "curve", "method", "members", "n_or_step", "kl", "sqrt_kl", "proxy", "gold", "proxy_std", "gold_std")


@dataclass
class Curve:
    run: str
    name: str
    method: str  # "best-of-n" or "rl"
    x: np.ndarray  # n for best-of-n, step for RL
    kl: np.ndarray
    proxy: np.ndarray
    gold: np.ndarray  # NaN where there is no gold score
    proxy_std: np.ndarray | None = None
    gold_std: np.ndarray | None = None
    members: list[str] = field(default_factory=list)

    @property
    def sqrt_kl(self) -> np.ndarray:
        return np.sqrt(np.clip(self.kl, 0.0, None))


def _read_bon(path: Path) -> list[dict]:
    import json

    try:
        points = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON: {exc.msg}") from exc
    if not isinstance(points, list) or not points:
        raise DataError(f"{path}: expected a non-empty list of {{n, proxy_score, gold_score}}")
    for index, point in enumerate(points):
        if not isinstance(point, dict) or not all(isinstance(point.get(k), (int, float)) for k in ("n", "proxy_score", "gold_score")):
            raise DataError(f"{path}: entry {index}: needs numbers n, proxy_score and gold_score")
    return points


def bon_curve_from_dirs(run: str, name: str, dirs: list[Path]) -> Curve:
    """One best-of-n curve, averaged over `dirs` (seeds) at the n values they share."""
    tables = [{int(p["n"]): p for p in _read_bon(d / BON_FILE)} for d in dirs]
    ns = sorted(set.intersection(*(set(t) for t in tables)))
    if not ns:
        raise DataError(f"{run}: the runs {[str(d) for d in dirs]} share no n value")
    proxy = np.array([[t[n]["proxy_score"] for n in ns] for t in tables])
    gold = np.array([[t[n]["gold_score"] for n in ns] for t in tables])
    averaged = len(dirs) > 1
    return Curve(run, name, "best-of-n", np.array(ns, dtype=float), np.asarray(kl_bon(ns), dtype=float), proxy.mean(0),
                 gold.mean(0), proxy.std(0) if averaged else None, gold.std(0) if averaged else None, [d.name for d in dirs])


def rl_curve(run: str, name: str, eval_dir: Path, max_kl: float | None = None) -> Curve:
    """Mean proxy and gold score per eval step against the step's KL."""
    steps, kls, proxy, gold = [], [], [], []
    for path in list_eval_files(eval_dir):
        eval_file = read_eval_file(path)
        if eval_file.kl is None:
            raise DataError(f"{path}: no kl; cannot place this step on the KL axis")
        if max_kl is not None and eval_file.kl > max_kl:
            continue
        kept = [r for r in eval_file.rows if r.scored and r.proxy_score is not None]
        if len(kept) < len(eval_file.rows):
            logger.warning("%s: %d of %d rows left out (reward errored or skipped)", path,
                           len(eval_file.rows) - len(kept), len(eval_file.rows))
        proxies = [r.proxy_score for r in kept]
        golds = [r.gold_score for r in kept]
        if not proxies:
            logger.warning("%s: no row has a proxy score (every reward errored); step left out", path)
            continue
        steps.append(eval_file.step)
        kls.append(eval_file.kl)
        proxy.append(np.mean(proxies))
        gold.append(np.mean(golds) if all(g is not None for g in golds) else math.nan)
    if not steps:
        raise DataError(f"{eval_dir}: no eval step has a row the reward scored")
    if np.isnan(gold).any():
        logger.warning("%s: some eval steps lack gold scores (run evaluation.run_ppo_gold_eval); their gold is left blank", eval_dir)
    return Curve(run, name, "rl", np.array(steps, dtype=float), np.array(kls), np.array(proxy), np.array(gold))


def _rl_eval_dir(run_dir: Path) -> Path | None:
    for candidate in (run_dir, run_dir / "eval"):
        if candidate.is_dir() and list_eval_files(candidate):
            return candidate
    return None


def rl_curve_from_dirs(run: str, name: str, eval_dirs: list[Path], max_kl: float | None = None) -> Curve:
    """One RL curve averaged over seeds at the eval steps they share: mean KL, scores and their spread."""
    curves = [rl_curve(run, name, d, max_kl) for d in eval_dirs]
    steps = sorted(set.intersection(*(set(c.x.tolist()) for c in curves)))
    if not steps:
        raise DataError(f"{run}: the runs {[str(d) for d in eval_dirs]} share no eval step")
    pick = [[int(np.flatnonzero(c.x == step)[0]) for step in steps] for c in curves]
    kl = np.array([c.kl[i] for c, idx in zip(curves, pick) for i in idx]).reshape(len(curves), -1)
    proxy = np.array([c.proxy[i] for c, idx in zip(curves, pick) for i in idx]).reshape(len(curves), -1)
    gold = np.array([c.gold[i] for c, idx in zip(curves, pick) for i in idx]).reshape(len(curves), -1)
    averaged = len(curves) > 1
    return Curve(run, name, "rl", np.array(steps, dtype=float), kl.mean(0), proxy.mean(0), gold.mean(0),
                 proxy.std(0) if averaged else None, gold.std(0) if averaged else None,
                 [d.parent.name if d.name == "eval" else d.name for d in eval_dirs])


def collect_curves(run_dirs: list[str | Path], max_kl: float | None = None) -> list[Curve]:
    """Every curve found in the given folders (see the module docstring)."""
    curves = []
    for run_dir in map(Path, run_dirs):
        run = run_dir.name or str(run_dir)
        if not run_dir.is_dir():
            raise DataError(f"{run_dir}: not a folder")
        if (run_dir / BON_FILE).exists():
            curves.append(bon_curve_from_dirs(run, run, [run_dir]))
            continue
        if list_eval_files(run_dir):
            curves.append(rl_curve(run_dir.resolve().parent.name if run == "eval" else run, run, run_dir, max_kl))
            continue
        subdirs = sorted(p for p in run_dir.iterdir() if p.is_dir())
        seeds = [p for p in subdirs if p.name.startswith("seed") and (p / BON_FILE).exists()]
        rl_seeds = [(p, d) for p in subdirs if p.name.startswith("seed") and p not in seeds and (d := _rl_eval_dir(p))]
        found = []
        if seeds:
            found.append(bon_curve_from_dirs(run, f"single RM (mean of {len(seeds)})" if len(seeds) > 1 else seeds[0].name, seeds))
        if rl_seeds:
            label = f"mean of {len(rl_seeds)} seeds" if len(rl_seeds) > 1 else rl_seeds[0][0].name
            found.append(rl_curve_from_dirs(run, label, [d for _, d in rl_seeds], max_kl))
        seeds += [p for p, _ in rl_seeds]
        found += [bon_curve_from_dirs(run, p.name, [p]) for p in subdirs if p not in seeds and (p / BON_FILE).exists()]
        found += [rl_curve(run, p.name, p, max_kl) for p in subdirs if p not in seeds and list_eval_files(p)]
        if not found:
            raise DataError(f"{run_dir}: no {BON_FILE} or eval_step*.json here or in its subfolders")
        curves += found
    return curves


@dataclass(frozen=True)
class Mark:
    """A point of one run drawn on the gold panel in its curve's colour: its gold peak (a star) or the monitor's
    alarm (a dotted vertical line at the alarm's KL)."""

    run: str  # the `run` of the curve whose colour it takes
    kind: str  # "peak" or "alarm"
    kl: float
    gold: float = math.nan


def recentred(curve: Curve) -> Curve:
    """The curve shifted so its first point (n = 1, or the first eval step) is 0."""
    gold_start = curve.gold[0] if np.isfinite(curve.gold[0]) else 0.0
    return Curve(curve.run, curve.name, curve.method, curve.x, curve.kl, curve.proxy - curve.proxy[0], curve.gold - gold_start,
                 curve.proxy_std, curve.gold_std, curve.members)


def write_csv(path: Path, curves: list[Curve]) -> None:
    def cell(value) -> str:
        return "" if value is None or (isinstance(value, float) and math.isnan(value)) else repr(float(value))

    with atomic_open(path) as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for c in curves:
            for i in range(len(c.x)):
                writer.writerow([c.run, c.name, c.method, " ".join(c.members), int(c.x[i]), cell(c.kl[i]), cell(c.sqrt_kl[i]),
                                 cell(c.proxy[i]), cell(c.gold[i]), cell(None if c.proxy_std is None else c.proxy_std[i]),
                                 cell(None if c.gold_std is None else c.gold_std[i])])


def x_label(methods: set[str]) -> str:
    """The KL axis label for the methods drawn: best-of-n's analytical bound, RL's measured KL, or both."""
    bon = "best-of-n: KL = log n - (n-1)/n, an analytical upper bound"
    rl = "RL: mean sequence KL to the initial policy (k1, eval prompts)"
    if methods == {"best-of-n"}:
        return f"sqrt(KL)   [{bon}]"
    if methods == {"rl"}:
        return f"sqrt(KL)   [{rl}]"
    return f"sqrt(KL)\n{bon}\n{rl}"


def draw_marks(ax, marks: Sequence[Mark], colour_of: dict[str, str]) -> None:
    """Each gold peak as a star at (sqrt(KL), gold), each alarm as a dotted vertical line at sqrt(KL), in the colour
    of its run's curve; one legend entry per kind."""
    for kind, label in (("peak", "gold peak of a run"), ("alarm", "monitor alarm of a run")):
        for i, m in enumerate(m for m in marks if m.kind == kind):
            x = math.sqrt(max(m.kl, 0.0))
            if kind == "peak":
                ax.plot([x], [m.gold], marker="*", markersize=11, color=colour_of.get(m.run, "black"),
                        markeredgecolor="black", linestyle="none", label=label if i == 0 else None)
            else:
                ax.axvline(x, color=colour_of.get(m.run, "black"), linestyle=":", linewidth=1.5,
                           label=label if i == 0 else None)
    if marks:
        ax.legend(fontsize="small", loc="best")


def plot_curves(path: Path, curves: list[Curve], recenter: bool, marks: Sequence[Mark] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, c in enumerate(curves):
        style = dict(color=colours[index % len(colours)], marker="o" if c.method == "best-of-n" else "s", markersize=3,
                     linestyle="-" if c.method == "best-of-n" else "--", label=f"{c.run}: {c.name} ({c.method})")
        order = np.argsort(c.sqrt_kl, kind="stable")  # RL KL is not monotone in the step: draw along KL
        for ax, values, std in ((axes[0], c.gold, c.gold_std), (axes[1], c.proxy, c.proxy_std)):
            ax.plot(c.sqrt_kl[order], values[order], **style)
            if std is not None:
                ax.fill_between(c.sqrt_kl[order], (values - std)[order], (values + std)[order], color=style["color"], alpha=0.15)
    draw_marks(axes[0], marks, {c.run: colours[i % len(colours)] for i, c in reversed(list(enumerate(curves)))})
    shift = " (re-centred)" if recenter else ""
    for ax, title in ((axes[0], "Gold reward"), (axes[1], "Proxy reward")):
        ax.set_title(title + shift)
        ax.set_xlabel(x_label({c.method for c in curves}), fontsize="small")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("reward")
    axes[1].legend(fontsize="small", loc="best")
    fig.tight_layout()
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=120)
    plt.close(fig)


def plots(run_dirs: list[str | Path], output: str | Path = "overoptimisation", recenter: bool = False,
          max_kl: float | None = None, marks: Sequence[Mark] = ()) -> tuple[Path, Path]:
    """Plot every curve in `run_dirs` (with `marks` on the gold panel); writes OUTPUT.png and OUTPUT.csv and returns
    their paths."""
    curves = collect_curves(run_dirs, max_kl)
    if recenter:
        curves = [recentred(c) for c in curves]
    output = Path(output)
    png, csv_path = output.with_name(output.name + ".png"), output.with_name(output.name + ".csv")
    write_csv(csv_path, curves)
    plot_curves(png, curves, recenter, marks)
    return png, csv_path


def main(argv: list[str] | None = None) -> tuple[Path, Path]:
    parser = argparse.ArgumentParser(prog="python -m evaluation.plots", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", help="best-of-n run folders and/or RL eval folders")
    parser.add_argument("-o", "--output", default="overoptimisation", help="path prefix for the .png and .csv")
    parser.add_argument("--recenter", action="store_true", help="shift each curve so it starts at 0")
    parser.add_argument("--max-kl", type=float, default=None, help="drop RL eval steps above this KL (the paper used 150)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    png, csv_path = plots(args.run_dirs, args.output, args.recenter, args.max_kl)
    print(f"wrote {png} and {csv_path}")
    return png, csv_path


if __name__ == "__main__":
    import sys

    from reward_plugins.cli import run_cli

    sys.exit(run_cli(main, "evaluation.plots"))
