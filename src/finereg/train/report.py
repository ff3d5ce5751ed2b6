"""What a bench says: per method and sampling rate, the mean ± std of each metric over the seeds and the paired
difference to ERM with its 95 % confidence interval (:func:`finereg.train.stats.paired_summary`), as markdown
tables, a CSV and a plot.

Metrics (a run's final row): ``top1`` (the test split), ``shift_top1`` (the shifted test set, where the data has
one), ``retention`` (forgetting, :mod:`finereg.train.retention`, where the network has a pretrained classifier),
``valid_top1`` (the validation split: in ``summary.csv`` only, for choosing settings) and ``mean_class_acc``.
A difference whose interval excludes 0 is marked (a difference at the 5 % level);
with fewer than two seeds there is no interval. Each value prints with the decimals its spread needs (a std of 0.05
as ``85.70 ± 0.05``, never ``85.7 ± 0.0``), and ``summary.md`` ends with a sentence per rate naming the methods
that beat the baseline with certainty on each metric (:func:`verdict`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from .stats import SummaryRow, paired_summary

__all__ = ["METRICS", "summarize", "accuracy_table", "difference_table", "report_markdown", "verdict", "plot"]

# metric key of a result row -> its title in the report
METRICS = {
    "top1": "top-1 accuracy (%) on the test split",
    "shift_top1": "top-1 accuracy (%) on the shifted test set",
    "retention": "retention (%) of the pretrained model's predictions on the test split",
}


def summarize(rows: list[dict], baseline: str = "erm") -> list[dict]:
    """One dict per (metric, method, rate): ``n``, ``mean``, ``std``, and against ``baseline`` on the same seeds
    ``n_pairs``, ``diff``, ``low``, ``high`` (NaN without a baseline run or with one seed). Interrupted runs are
    left out."""
    done = [r for r in rows if not r.get("interrupted")]
    out = []
    for metric in ("top1", "shift_top1", "retention", "valid_top1", "mean_class_acc"):
        have = [
            {"method": r["method"], "rate": float(r["sample_rate"]), "seed": int(r["seed"]), metric: float(r[metric])}
            for r in done
            if r.get(metric) not in (None, "") and not math.isnan(float(r[metric]))
        ]
        if not have:
            continue
        base = baseline if any(h["method"] == baseline for h in have) else have[0]["method"]
        for s in paired_summary(have, metric, baseline=base):
            out.append({"metric": metric, **_row(s), "baseline": base})
    return out


def _row(s: SummaryRow) -> dict:
    return {"method": s.method, "sample_rate": s.rate, "n": s.n, "mean": s.mean, "std": s.std, "n_pairs": s.n_pairs,
            "diff": s.diff, "low": s.low, "high": s.high}  # fmt: skip


def _cells(summary: list[dict], metric: str) -> dict[tuple[str, float], dict]:
    return {(s["method"], float(s["sample_rate"])): s for s in summary if s["metric"] == metric}


def _fmt(v: float, sign: bool = False, digits: int = 1) -> str:
    return "–" if v is None or math.isnan(v) else (f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}")


def _digits(spread: float) -> int:
    """Decimals that show the first significant digit of ``spread`` (a std, an interval's half-width), at least
    1 and at most 6: a std of 0.05 prints as 0.05, never as 0.0; 0 or NaN prints with 1."""
    if spread is None or not math.isfinite(spread) or spread <= 0:
        return 1
    return min(6, max(1, -math.floor(math.log10(spread))))


def _interval(s: dict) -> str:
    """``+1.2 [+0.4, +1.9]``: the mean paired difference and its interval, with the decimals its half-width
    needs (and, where it excludes 0, those that keep the bound nearest 0 from printing as 0)."""
    d = _digits((s["high"] - s["low"]) / 2)
    if _certain(s):
        d = max(d, _digits(min(abs(s["low"]), abs(s["high"]))))
    return f"{_fmt(s['diff'], True, d)} [{_fmt(s['low'], True, d)}, {_fmt(s['high'], True, d)}]"


def _certain(s: dict) -> bool:
    return not math.isnan(s["low"]) and (s["low"] > 0 or s["high"] < 0)


def accuracy_table(
    summary: list[dict],
    methods: Sequence[str],
    rates: Sequence[float],
    metric: str = "top1",
    diverged: Sequence[dict] = (),
) -> str:
    """Rows = methods, columns = rates and their average; cells = mean ± std over the seeds; best mean in bold.
    A cell with ``diverged`` runs (result rows whose loss was not finite) says how many seeds diverged."""
    cell = _cells(summary, metric)
    lost = _count(diverged)
    best = {r: max((cell[(m, r)]["mean"] for m in methods if (m, r) in cell), default=None) for r in rates}
    lines = ["| method | " + " | ".join(f"{r:g}%" for r in rates) + " | avg |", "|---|" + "---|" * (len(rates) + 1)]
    for m in methods:
        texts, means = [], []
        for r in rates:
            s, k = cell.get((m, float(r))), lost.get((m, float(r)), 0)
            note = f"{k} diverged" if k else ""
            if s is None:
                texts.append(note or "–")
                continue
            means.append(s["mean"])
            d = _digits(s["std"])
            text = f"{_fmt(s['mean'], digits=d)} ± {_fmt(s['std'], digits=d)}"
            text = f"**{text}**" if best[r] is not None and s["mean"] == best[r] else text
            texts.append(f"{text} ({note})" if note else text)
        avg = _fmt(sum(means) / len(means)) if len(means) == len(rates) else "–"
        lines.append(f"| {m} | " + " | ".join(texts) + f" | {avg} |")
    return "\n".join(lines)


def difference_table(summary: list[dict], methods: Sequence[str], rates: Sequence[float], metric: str = "top1") -> str:
    """Rows = methods but the baseline, columns = rates; cells = the mean paired difference to the baseline and
    its 95 % interval, ``+1.2 [+0.4, +2.0]``, in bold where the interval excludes 0."""
    cell = _cells(summary, metric)
    lines = ["| method | " + " | ".join(f"{r:g}%" for r in rates) + " |", "|---|" + "---|" * len(rates)]
    base = next((s["baseline"] for s in cell.values()), "erm")
    for m in methods:
        if m == base:
            continue
        texts = []
        for r in rates:
            s = cell.get((m, float(r)))
            if s is None or math.isnan(s["diff"]):
                texts.append("–")
                continue
            text = _interval(s)
            texts.append(f"**{text}**" if _certain(s) else text)
        lines.append(f"| {m} | " + " | ".join(texts) + " |")
    return "\n".join(lines)


def _count(diverged: Sequence[dict]) -> dict[tuple[str, float], int]:
    out: dict[tuple[str, float], int] = {}
    for r in diverged:
        key = (r["method"], float(r["sample_rate"]))
        out[key] = out.get(key, 0) + 1
    return out


def report_markdown(
    summary: list[dict], methods: Sequence[str], rates: Sequence[float], note: str, diverged: Sequence[dict] = ()
) -> str:
    """The bench's ``summary.md``: for each metric present, the accuracy table and the paired-difference table;
    first the runs that diverged (left out of the means and the pairs), with the error of the first."""
    parts = [note]
    if diverged:
        where = ", ".join(f"{r['method']} {float(r['sample_rate']):g}% seed {r['seed']}" for r in diverged)
        parts.append(
            f"**{len(diverged)} runs diverged** (the loss became infinite or NaN; they are left out of the means "
            f"and the paired differences): {where}. First error: {diverged[0]['diverged']}"
        )
    present = {s["metric"] for s in summary}
    for metric, title in METRICS.items():
        if metric not in present:
            continue
        base = next(s["baseline"] for s in summary if s["metric"] == metric)
        parts += [
            f"### {title[0].upper()}{title[1:]}: mean ± std over the seeds",
            accuracy_table(summary, methods, rates, metric, diverged),
        ]
        if any(m != base for m in methods):
            parts += [
                f"Paired difference to {base} (same seeds, so the same training images and order), mean and 95 % "
                "confidence interval (Student t); **bold**: the interval excludes 0.",
                difference_table(summary, methods, rates, metric),
            ]
    parts += verdict(summary, methods, rates)
    return "\n\n".join(parts) + "\n"


def verdict(summary: list[dict], methods: Sequence[str], rates: Sequence[float]) -> list[str]:
    """The end of ``summary.md``: per rate, a sentence saying on each metric of the report which methods beat the
    baseline with certainty (the 95 % interval of the paired difference lies above 0), or that none does."""
    present = [m for m in METRICS if any(s["metric"] == m for s in summary)]
    if not present:
        return []
    base = {m: next(s["baseline"] for s in summary if s["metric"] == m) for m in present}
    if not any(m != base[present[0]] for m in methods):
        return []
    out = [f"### Which methods beat {base[present[0]]}"]
    for r in rates:
        clauses = []
        for metric in present:
            cell, where = _cells(summary, metric), METRICS[metric].replace(" (%)", "")
            have = [cell[m, float(r)] for m in methods if m != base[metric] and (m, float(r)) in cell]
            wins = [s for s in have if _certain(s) and s["low"] > 0]
            if not any(not math.isnan(s["low"]) for s in have):
                clauses.append(f"in {where}, there is no interval (fewer than two seeds paired with {base[metric]})")
            elif wins:
                names = ", ".join(f"{s['method']} ({_interval(s)})" for s in wins)
                verb = "beats" if len(wins) == 1 else "beat"
                clauses.append(f"in {where}, {names} {verb} {base[metric]} with certainty")
            else:
                clauses.append(f"in {where}, no method beats {base[metric]} with certainty")
        out.append(f"At {r:g} %, {'; '.join(clauses)}.")
    out.append("With certainty: the 95 % interval of the paired difference lies above 0 (the bold cells above).")
    return out


def plot(summary: list[dict], methods: Sequence[str], path: str | os.PathLike, title: str = "") -> Path:
    """``accuracy_vs_rate.png``: per metric (test, shifted test) the mean accuracy vs sampling rate (± std), and
    below it the paired difference to the baseline with its 95 % interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = _figure(summary, methods, title, plt)
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _figure(summary: list[dict], methods: Sequence[str], title: str, plt):
    """The figure of :func:`plot`; a method has one colour in every panel, the one of its legend entry."""
    colour = {m: f"C{k % 10}" for k, m in enumerate(methods)}  # the same line in the upper and the lower panels
    metrics = [m for m in METRICS if any(s["metric"] == m for s in summary)]
    fig, axes = plt.subplots(2, len(metrics), figsize=(6.5 * len(metrics), 8), dpi=110, squeeze=False)
    for col, metric in enumerate(metrics):
        cell = _cells(summary, metric)
        rates = sorted({r for _, r in cell})
        top, bottom = axes[0][col], axes[1][col]
        for k, m in enumerate(methods):
            pts = sorted((r, s) for (mm, r), s in cell.items() if mm == m)
            if not pts:
                continue
            x = [r for r, _ in pts]
            std = [0.0 if math.isnan(s["std"]) else s["std"] for _, s in pts]
            top.errorbar(x, [s["mean"] for _, s in pts], yerr=std, marker="o", capsize=3, label=m, color=colour[m])
            if m != pts[0][1]["baseline"]:
                shift = (k - len(methods) / 2) * 0.6  # spread the intervals of one rate apart
                d = [s["diff"] for _, s in pts]
                lo = [0.0 if math.isnan(s["low"]) else s["diff"] - s["low"] for _, s in pts]
                hi = [0.0 if math.isnan(s["high"]) else s["high"] - s["diff"] for _, s in pts]
                bottom.errorbar(
                    [v + shift for v in x], d, yerr=[lo, hi], marker="o", capsize=3, label=m, color=colour[m]
                )
        base = next(iter(cell.values()))["baseline"]
        for ax in (top, bottom):
            ax.set_xticks(rates, [f"{r:g}%" for r in rates])
            ax.set_xlabel("sampling rate of the training set (per class)")
            ax.grid(alpha=0.3)
        top.set_ylabel(METRICS[metric])
        top.set_title(f"{title}: {metric}" if title else metric)
        bottom.axhline(0, color="black", lw=1)
        bottom.set_ylabel(f"difference to {base} (points, 95 % CI)")
        top.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig
