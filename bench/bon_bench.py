"""Best-of-n analysis at the published scale, and our estimator against a big-integer baseline.

Part 1: 1000 prompts x 12600 answers, 5 proxy RMs, mean/WCO/UWO ensembles, the 16 default n values, from
precomputed (synthetic) scores: wall time per repeat and peak memory. Part 2: on a smaller slice, the
straightforward per-n `scipy.special.comb(exact=True)` estimator against `evaluation.bon.bon_curve`,
timed side by side on the same data, with the speed ratio and the largest difference.

    .venv/bin/python bench/bon_bench.py [--prompts 1000] [--answers 12600] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import time
import tracemalloc

import numpy as np
from scipy.special import comb

from evaluation.bon import DEFAULT_NS, bon_curve
from evaluation.bon_analysis import analyse


def synthetic_scores(prompts: int, answers: int, members: int, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Gold scores and noisy proxy scores correlated with them, one (P, N) array per member."""
    rng = np.random.default_rng(seed)
    gold = rng.standard_normal((prompts, answers))
    proxies = {f"seed{m + 1}": gold + rng.standard_normal((prompts, answers)) for m in range(members)}
    return proxies, gold


def baseline_curve(proxy: np.ndarray, gold: np.ndarray, ns: list[int]) -> list[tuple[int, float]]:
    """The published approach: per n, exact big-integer binomials in Python, applied per prompt."""
    N = proxy.shape[1]
    sorted_gold = np.take_along_axis(gold, np.argsort(proxy, axis=1), axis=1)
    out = []
    for n in ns:
        denominator = comb(N, n, exact=True)
        coefficients = [comb(i - 1, n - 1, exact=True) / denominator for i in range(n, N + 1)]
        per_prompt = [sum(c * g for c, g in zip(coefficients, row[n - 1 :])) for row in sorted_gold.tolist()]
        out.append((n, float(np.mean(per_prompt))))
    return out


def full_scale(prompts: int, answers: int, repeats: int) -> None:
    members, gold = synthetic_scores(prompts, answers, 5)
    ns = [n for n in DEFAULT_NS if n <= answers]
    print(f"full analysis: {prompts} prompts x {answers} answers, 5 RMs + mean/WCO/UWO-0.5, {len(ns)} n values")
    times = []
    for repeat in range(repeats):
        tracemalloc.start()
        start, cpu_start = time.perf_counter(), time.process_time()
        curves = analyse(members, gold, ns, objectives=("mean", "wco", "uwo"), uwo_weights=(0.5,))
        times.append(time.perf_counter() - start)
        cpu = time.process_time() - cpu_start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(f"  repeat {repeat + 1}: {times[-1]:.2f} s wall ({cpu:.2f} s CPU, load average {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} cores), peak extra memory {peak / 2**20:.0f} MiB")
    inputs = (sum(m.nbytes for m in members.values()) + gold.nbytes) / 2**20
    print(f"  best {min(times):.2f} s, median {np.median(times):.2f} s (target < 5 s); inputs {inputs:.0f} MiB, "
          f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")
    for name, curve in curves.items():
        top = curve[-1]
        print(f"  {name:18s} n={top['n']:>5d}  proxy {top['proxy_score']:+.4f}  gold {top['gold_score']:+.4f}  "
              f"sqrt(KL_bon) {np.sqrt(top['kl_bon']):.3f}")


def versus_baseline(prompts: int, answers: int) -> None:
    members, gold = synthetic_scores(prompts, answers, 1, seed=1)
    proxy = members["seed1"]
    ns = [n for n in DEFAULT_NS if n <= answers]
    start = time.perf_counter()
    ours = bon_curve(proxy, gold, ns)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs = baseline_curve(proxy, gold, ns)
    theirs_s = time.perf_counter() - start
    diff = max(abs(o["gold_score"] - t) for o, (_, t) in zip(ours, theirs))
    print(f"one curve, {prompts} prompts x {answers} answers, {len(ns)} n values:")
    print(f"  {'baseline (comb exact=True)':28s} {theirs_s:8.3f} s")
    print(f"  {'ours (bon_curve)':28s} {ours_s:8.3f} s")
    print(f"  speed ratio baseline/ours: {theirs_s / ours_s:.0f}x; largest gold difference {diff:.2e}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--answers", type=int, default=12600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-prompts", type=int, default=20)
    parser.add_argument("--baseline-answers", type=int, default=3000)
    args = parser.parse_args(argv)
    full_scale(args.prompts, args.answers, args.repeats)
    versus_baseline(args.baseline_prompts, args.baseline_answers)


if __name__ == "__main__":
    main()
