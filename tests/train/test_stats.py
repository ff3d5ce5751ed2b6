"""Paired statistics of the benchmark table, checked against numpy and scipy.stats."""

import math
import random

import numpy as np
import pytest
import scipy.stats

from finereg._checks import FineregError
from finereg.train.stats import mean_std, paired_summary, t_interval


def test_mean_std_is_the_sample_std():
    v = [71.2, 74.8, 73.1, 69.9, 75.0]
    m, sd = mean_std(v)
    assert m == pytest.approx(np.mean(v), abs=1e-12) and sd == pytest.approx(np.std(v, ddof=1), abs=1e-12)
    m1, sd1 = mean_std([3.0])
    assert m1 == 3.0 and math.isnan(sd1)
    with pytest.raises(FineregError):
        mean_std([])


@pytest.mark.parametrize("confidence", [0.95, 0.9, 0.99])
@pytest.mark.parametrize("n", [2, 3, 5, 12])
def test_t_interval_matches_scipy(n, confidence):
    rng = random.Random(n)
    a = [rng.gauss(80, 3) for _ in range(n)]
    b = [x - rng.gauss(1.0, 1.5) for x in a]
    mean, low, high = t_interval([x - y for x, y in zip(a, b)], confidence)
    ci = scipy.stats.ttest_rel(a, b).confidence_interval(confidence)
    assert mean == pytest.approx(np.mean(np.subtract(a, b)), abs=1e-12)
    assert (low, high) == (pytest.approx(ci.low, abs=1e-10), pytest.approx(ci.high, abs=1e-10))


def test_paired_summary():
    """Rows per (method, rate); differences paired on the seed; a run without a partner is left out of the
    difference; the interval is scipy's."""
    acc = {
        ("erm", 15): [60.0, 64.0, 62.0],
        ("l2sp", 15): [61.5, 65.0, 64.1],
        ("erm", 100): [90.0, 91.0, 89.5],
        ("l2sp", 100): [90.5, 90.0, 90.0, 88.0],  # a 4th seed that ERM lacks
    }
    results = [
        {"method": m, "rate": r, "seed": s, "accuracy": v} for (m, r), vals in acc.items() for s, v in enumerate(vals)
    ]
    rows = {(row.method, row.rate): row for row in paired_summary(results)}
    assert list(rows) == [("erm", 15), ("l2sp", 15), ("erm", 100), ("l2sp", 100)]
    r = rows[("l2sp", 15)]
    ci = scipy.stats.ttest_rel(acc[("l2sp", 15)], acc[("erm", 15)]).confidence_interval(0.95)
    assert r.n == r.n_pairs == 3 and r.mean == pytest.approx(np.mean(acc[("l2sp", 15)]))
    assert r.std == pytest.approx(np.std(acc[("l2sp", 15)], ddof=1))
    assert (r.low, r.high) == (pytest.approx(ci.low), pytest.approx(ci.high)) and r.low > 0  # certain gain
    r = rows[("l2sp", 100)]
    assert r.n == 4 and r.n_pairs == 3
    assert r.mean == pytest.approx(np.mean(acc[("l2sp", 100)]))  # all four runs
    ci = scipy.stats.ttest_rel(acc[("l2sp", 100)][:3], acc[("erm", 100)]).confidence_interval(0.95)
    assert (r.low, r.high) == (pytest.approx(ci.low), pytest.approx(ci.high)) and r.low < 0 < r.high
    base = rows[("erm", 15)]
    assert base.diff == base.low == base.high == 0.0


def test_paired_on_several_keys_and_other_metrics():
    results = [
        {"method": m, "rate": 50, "seed": s, "data_seed": d, "shift": 50 + s + d + (2 if m == "bss" else 0)}
        for m in ("erm", "bss")
        for s in (0, 1)
        for d in (0, 1)
    ]
    rows = paired_summary(results, "shift", pair_on=("seed", "data_seed"))
    bss = [r for r in rows if r.method == "bss"][0]
    assert bss.n_pairs == 4 and bss.diff == pytest.approx(2.0) and bss.low == pytest.approx(2.0)  # sd 0


def test_errors():
    ok = {"method": "erm", "rate": 15, "seed": 0, "accuracy": 1.0}
    with pytest.raises(FineregError, match="two results for method 'erm', rate 15"):
        paired_summary([ok, dict(ok)])
    with pytest.raises(FineregError, match="lacks seed"):
        paired_summary([{"method": "erm", "rate": 15, "accuracy": 1.0}])
    with pytest.raises(FineregError, match="baseline must be one of the methods in the results \\(l2\\)"):
        paired_summary([{**ok, "method": "l2"}])
    rows = paired_summary([ok, {**ok, "method": "l2", "seed": 5}])  # no shared seed: no difference
    assert math.isnan(rows[1].diff) and rows[1].n_pairs == 0
    with pytest.raises(FineregError, match="confidence must be"):
        t_interval([1.0, 2.0], 1.5)
