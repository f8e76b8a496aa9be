"""Best-of-n with the unbiased estimator (Nakano et al. 2021; Coste et al. 2024, App. B), exact and vectorised.

For one prompt with N answers sorted ascending by proxy score, the expected gold score of the proxy-best
of a uniformly random n-subset (drawn without replacement) is `sum_{i=n}^{N} p_i g_(i)` with
`p_i = C(i-1, n-1) / C(N, n)`. The coefficients come from the recurrence `p_N = n/N`,
`p_{i-1} = p_i (i-n)/(i-1)`, never from big integers. Prompt estimates are averaged, and since the
coefficients depend only on N, the average is `colmean(sorted gold) @ p`: one sort per prompt, one dot
product per n.

Ties in proxy score: the gold scores within a block of equal proxy scores are averaged before the
coefficients are applied. That is the exact expectation under uniform random tie-breaking, so the result
does not depend on sort order. The proxy estimate is unaffected by ties.

N may differ between prompts (ragged input); an n larger than the smallest N is skipped with a warning,
so every reported point averages over the same prompts.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numpy.typing import ArrayLike

DEFAULT_NS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 6144, 8192, 12500)
_CHUNK_ROWS = 32


class BonInputError(ValueError):
    """Unusable best-of-n scores; the message names the prompt row."""


def kl_bon(n: int | ArrayLike) -> float | np.ndarray:
    """Analytical KL of best-of-n from its base policy, `log n - (n-1)/n` nats (an upper bound, Beirami et al.)."""
    n_arr = np.asarray(n, dtype=np.float64)
    value = np.log(n_arr) - (n_arr - 1.0) / n_arr
    return float(value) if value.ndim == 0 else value


def bon_coefficients(N: int, ns: Sequence[int]) -> np.ndarray:
    """(len(ns), N) matrix: row j holds p_i for n = ns[j] over ascending ranks i = 1..N (zero below n)."""
    if N < 1:
        raise ValueError("N must be at least 1")
    out = np.zeros((len(ns), N), dtype=np.float64)
    for row, n in enumerate(ns):
        if not 1 <= n <= N:
            raise ValueError(f"n={n} is outside 1..N={N}")
        i = np.arange(N, n, -1, dtype=np.float64)  # i = N .. n+1 gives p_{i-1} = p_i (i-n)/(i-1)
        ratios = (i - n) / (i - 1.0)
        top_down = np.concatenate(([n / N], (n / N) * np.cumprod(ratios)))
        out[row, n - 1 :] = top_down[::-1]
    return out


def _order_preserving_keys(values: np.ndarray) -> np.ndarray:
    """uint64 keys that sort like the float64 values (+0.0 and -0.0 map to the same key)."""
    bits = np.ascontiguousarray(values + 0.0, dtype=np.float64).view(np.uint64)
    flip = bits >> np.uint64(63)
    flip *= np.uint64(0xFFFFFFFFFFFFFFFF)  # all ones for negatives: flip every bit
    flip |= np.uint64(1 << 63)  # for positives: set the sign bit
    flip ^= bits
    return flip


def _ascending_order(proxy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices that sort each row of a (c, N) block ascending, and which rows need the exact tie-aware path.

    Sorting one uint64 per answer (the value's order-preserving key with its low bits replaced by the
    answer index) is much faster than an argsort. Rows where two keys share their high bits (true ties,
    or values closer than the dropped bits) are redone with an exact stable argsort.
    """
    c, N = proxy.shape
    index_bits = np.uint64(max(1, (N - 1).bit_length()))
    keys = _order_preserving_keys(proxy)
    keys >>= index_bits
    keys <<= index_bits
    keys |= np.arange(N, dtype=np.uint64)
    keys.sort(axis=1)
    order = (keys & ((np.uint64(1) << index_bits) - np.uint64(1))).astype(np.intp)
    keys >>= index_bits
    suspect = (keys[:, 1:] == keys[:, :-1]).any(axis=1)
    if suspect.any():
        order[suspect] = np.argsort(proxy[suspect], axis=1, kind="stable")
    order += np.arange(0, c * N, N, dtype=np.intp)[:, None]
    return order, suspect


def _average_ties(sorted_proxy: np.ndarray, sorted_gold: np.ndarray) -> np.ndarray:
    """Replace each gold score by the mean over its block of equal (sorted) proxy scores, row by row."""
    c, N = sorted_proxy.shape
    starts = np.ones((c, N), dtype=bool)
    starts[:, 1:] = sorted_proxy[:, 1:] != sorted_proxy[:, :-1]
    flat_starts = np.flatnonzero(starts.ravel())
    sums = np.add.reduceat(sorted_gold.ravel(), flat_starts)
    counts = np.diff(np.append(flat_starts, c * N))
    return np.repeat(sums / counts, counts).reshape(c, N)


def _sorted_column_sums(proxy: np.ndarray, gold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column sums over a (c, N) block of proxy and (tie-averaged) gold scores, each row sorted by proxy."""
    order, exact_rows = _ascending_order(proxy)
    sorted_proxy = np.ascontiguousarray(proxy).ravel().take(order)
    sorted_gold = np.ascontiguousarray(gold).ravel().take(order)
    if exact_rows.any():
        sorted_gold[exact_rows] = _average_ties(sorted_proxy[exact_rows], sorted_gold[exact_rows])
    return sorted_proxy.sum(axis=0), sorted_gold.sum(axis=0)


def _group_sums(proxy: np.ndarray, gold: np.ndarray, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """`_sorted_column_sums` over row chunks, in threads (numpy's sort releases the GIL)."""
    chunks = [slice(s, s + _CHUNK_ROWS) for s in range(0, proxy.shape[0], _CHUNK_ROWS)]
    if workers <= 1 or len(chunks) == 1:
        parts = [_sorted_column_sums(proxy[c], gold[c]) for c in chunks]
    else:
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(lambda c: _sorted_column_sums(proxy[c], gold[c]), chunks))
    return sum(p for p, _ in parts), sum(g for _, g in parts)


def _as_groups(
    proxy_scores: ArrayLike | Sequence[ArrayLike], gold_scores: ArrayLike | Sequence[ArrayLike]
) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], int]:
    """Validated (proxy, gold) 2-D float64 blocks keyed by N, and the number of prompts."""
    if isinstance(proxy_scores, np.ndarray) and proxy_scores.ndim == 2:
        proxy_rows: Sequence = proxy_scores
    else:
        proxy_rows = list(proxy_scores)
    gold_rows = gold_scores if isinstance(gold_scores, np.ndarray) and gold_scores.ndim == 2 else list(gold_scores)
    if len(proxy_rows) == 0:
        raise BonInputError("no prompts: proxy_scores is empty")
    if len(proxy_rows) != len(gold_rows):
        raise BonInputError(f"{len(proxy_rows)} prompts of proxy scores but {len(gold_rows)} of gold scores")
    if isinstance(proxy_rows, np.ndarray) and isinstance(gold_rows, np.ndarray):
        proxy = np.asarray(proxy_rows, dtype=np.float64)
        gold = np.asarray(gold_rows, dtype=np.float64)
        if proxy.shape != gold.shape:
            raise BonInputError(f"proxy scores have shape {proxy.shape} but gold scores {gold.shape}")
        _check_finite(proxy, gold)
        if proxy.shape[1] == 0:
            raise BonInputError("row 0: no answers")
        return {proxy.shape[1]: (proxy, gold)}, proxy.shape[0]
    by_length: dict[int, list[int]] = {}
    arrays = []
    for row, (p, g) in enumerate(zip(proxy_rows, gold_rows)):
        try:
            p_arr = np.asarray(p, dtype=np.float64)
            g_arr = np.asarray(g, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise BonInputError(f"row {row}: scores are not numbers ({exc})") from exc
        if p_arr.ndim != 1 or g_arr.ndim != 1:
            raise BonInputError(f"row {row}: expected a flat list of scores per prompt")
        if p_arr.size == 0:
            raise BonInputError(f"row {row}: no answers")
        if p_arr.shape != g_arr.shape:
            raise BonInputError(f"row {row}: {p_arr.size} proxy scores but {g_arr.size} gold scores")
        arrays.append((p_arr, g_arr))
        by_length.setdefault(p_arr.size, []).append(row)
    groups = {}
    for N, rows in by_length.items():
        proxy = np.stack([arrays[r][0] for r in rows])
        gold = np.stack([arrays[r][1] for r in rows])
        _check_finite(proxy, gold, rows)
        groups[N] = (proxy, gold)
    return groups, len(arrays)


def _check_finite(proxy: np.ndarray, gold: np.ndarray, rows: Sequence[int] | None = None) -> None:
    for name, block in (("proxy", proxy), ("gold", gold)):
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(block.sum()):  # one cheap pass; locate the culprit only when there is one
                continue
        bad = ~np.isfinite(block)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            row = rows[r] if rows is not None else r
            raise BonInputError(f"row {row}: {name} score of answer {c} is missing or not finite ({block[r, c]})")


def bon_curve(
    proxy_scores: ArrayLike | Sequence[ArrayLike],
    gold_scores: ArrayLike | Sequence[ArrayLike],
    ns: Sequence[int] = DEFAULT_NS,
    *,
    workers: int | None = None,
) -> list[dict[str, float]]:
    """Unbiased best-of-n proxy and gold estimates, averaged over prompts, for each n in `ns`.

    Scores are (P, N) arrays or P per-prompt arrays of any lengths, in any order (answer j of a prompt
    has proxy score proxy[j] and gold score gold[j]). Returns `[{"n", "proxy_score", "gold_score",
    "kl_bon"}, ...]` in the order of `ns`, skipping (with a warning) any n above the smallest N.
    """
    ns = [int(n) for n in ns]
    if not ns or any(n < 1 for n in ns):
        raise ValueError(f"ns must be a non-empty list of positive integers, got {ns}")
    groups, prompts = _as_groups(proxy_scores, gold_scores)
    smallest = min(groups)
    too_big = [n for n in ns if n > smallest]
    if too_big:
        warnings.warn(f"best-of-n: skipping n={too_big}, above the {smallest} answers of the shortest prompt", stacklevel=2)
    kept = [n for n in ns if n <= smallest]
    if not kept:
        return []
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    proxy_total = np.zeros(len(kept))
    gold_total = np.zeros(len(kept))
    for N, (proxy, gold) in groups.items():
        proxy_sums, gold_sums = _group_sums(proxy, gold, workers)
        coefficients = bon_coefficients(N, kept)
        proxy_total += coefficients @ proxy_sums
        gold_total += coefficients @ gold_sums
    return [
        {"n": n, "proxy_score": float(p / prompts), "gold_score": float(g / prompts), "kl_bon": float(kl_bon(n))}
        for n, p, g in zip(kept, proxy_total, gold_total)
    ]

