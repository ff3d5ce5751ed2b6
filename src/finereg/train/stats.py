"""Paired statistics for the benchmark table: mean ± sample standard deviation per method and rate, and the
paired difference against a baseline (ERM) on the same splits and seeds, with a Student-t confidence interval.

For a method M, a rate r and the seeds S both M and the baseline B were run with (same training subset, same
initialization of the head, same data order):

    d_s = acc(M, r, s) − acc(B, r, s),   d̄ = (1/n) Σ_s d_s,   s_d = sqrt(Σ_s (d_s − d̄)² / (n − 1)),
    CI_{1−α} = d̄ ± t_{1−α/2, n−1} · s_d / √n        (n = |S|, Student's t with n − 1 degrees of freedom).

Pairing removes what the seeds share (which images were sampled, the order of the batches), so a difference
too small to see in two overlapping mean ± std can still be certain. This is the interval of
``scipy.stats.ttest_rel(a, b).confidence_interval()``; the quantile comes from scipy (in the ``train`` extra).
With n = 1 the standard deviation and the interval are NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .._checks import FineregError, check_number

__all__ = ["SummaryRow", "mean_std", "t_interval", "paired_summary"]


@dataclass(frozen=True)
class SummaryRow:
    """One (method, rate) cell of the table."""

    method: str
    rate: Any
    n: int  # runs of this method at this rate
    mean: float
    std: float  # sample standard deviation (n − 1); NaN for n = 1
    n_pairs: int  # seeds shared with the baseline
    diff: float  # mean paired difference method − baseline (0 for the baseline itself)
    low: float  # confidence interval of the difference
    high: float


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1 in the denominator; NaN for one value)."""
    v = [float(x) for x in values]
    if not v:
        raise FineregError("mean_std needs at least one value, got none")
    m = math.fsum(v) / len(v)
    sd = math.sqrt(math.fsum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else math.nan
    return m, sd


def t_interval(diffs: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the Student-t ``confidence`` interval of the mean of paired differences."""
    confidence = check_number(confidence, "confidence", low=0, high=1, low_open=True, high_open=True)
    m, sd = mean_std(diffs)
    n = len(diffs)
    if n < 2:
        return m, math.nan, math.nan
    from scipy.stats import t

    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return m, m - half, m + half


def paired_summary(
    results: Iterable[Mapping[str, Any]],
    metric: str = "accuracy",
    *,
    baseline: str = "erm",
    pair_on: Sequence[str] = ("seed",),
    confidence: float = 0.95,
) -> list[SummaryRow]:
    """One :class:`SummaryRow` per (method, rate), in the order the methods and rates first appear.

    ``results``: one mapping per run with ``method``, ``rate``, the ``pair_on`` keys (``seed``; add
    ``data_seed`` when the split has its own seed) and ``metric``. A run of M is paired with the baseline's
    run at the same rate and ``pair_on`` values; runs without a partner are left out of the difference (but
    counted in the mean ± std). A (method, rate, pair) given twice is an error.
    """
    cells: dict[tuple[str, Any], dict[tuple, float]] = {}
    for r in results:
        missing = [k for k in ("method", "rate", metric, *pair_on) if k not in r]
        if missing:
            raise FineregError(
                f"each result must have the keys method, rate, {metric}, {', '.join(pair_on)}; "
                f"one lacks {', '.join(missing)}: {dict(r)!r}"
            )
        key, pair = (str(r["method"]), r["rate"]), tuple(r[k] for k in pair_on)
        cell = cells.setdefault(key, {})
        if pair in cell:
            raise FineregError(f"two results for method {key[0]!r}, rate {key[1]!r}, {dict(zip(pair_on, pair))}")
        cell[pair] = float(r[metric])
    if not any(m == baseline for m, _ in cells):
        methods = sorted({m for m, _ in cells})
        raise FineregError(
            f"baseline must be one of the methods in the results ({', '.join(methods)}), got {baseline!r}"
        )
    rows = []
    for (method, rate), cell in cells.items():
        mean, sd = mean_std(list(cell.values()))
        base = cells.get((baseline, rate), {})
        shared = [p for p in cell if p in base]
        if method == baseline:
            diff = low = high = 0.0
        elif shared:
            diff, low, high = t_interval([cell[p] - base[p] for p in shared], confidence)
        else:
            diff = low = high = math.nan
        rows.append(SummaryRow(method, rate, len(cell), mean, sd, len(shared), diff, low, high))
    return rows
