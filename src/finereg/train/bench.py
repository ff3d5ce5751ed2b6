"""``finereg bench``: methods × sampling rates × seeds on one protocol, reported with paired statistics.

Each run is a :func:`~finereg.train.loop.fit` in its own directory ``<out>/runs/<method>-sr<rate>-s<seed>``; the
bench writes ``results.csv`` (one row per run: test, shifted-test and validation accuracy), ``summary.csv`` and
``summary.md`` (per method and rate: mean ± std over the seeds, and the paired difference to ERM with its 95 %
confidence interval, for the test split and the shifted test set; :mod:`finereg.train.report`) and
``accuracy_vs_rate.png``. Runs go in parallel processes of one thread each (:mod:`finereg.train.runner`); what
every run shares (the built-in source model, the frozen prefix's outputs) is made once before they start. Running
the same command again with the same ``--out`` reuses finished runs and resumes interrupted ones.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._checks import FineregError, check_int, check_number, require_module
from .build import build_task
from .checkpoint import LAST
from .config import resolve
from .data import SAMPLE_RATES
from .loop import FitConfig, LossNotFinite, fit
from .methods import method_names, parse_methods, settings_for
from .metrics import write_text_atomic
from .report import accuracy_table, plot, report_markdown, summarize
from .run_dir import bench_dir
from .runner import check_stop, run_all

__all__ = ["BenchConfig", "BenchResult", "bench", "DEFAULT_SEEDS"]

DEFAULT_SEEDS = (0, 1, 2)


def _default_methods() -> list[str]:
    return method_names("tllib")


@dataclass
class BenchConfig:
    """The grid of a bench and the settings every run shares (``base``; its method, rate and seed are set per run)."""

    methods: list[str] = field(default_factory=_default_methods)
    rates: list[float] = field(default_factory=lambda: list(SAMPLE_RATES))
    seeds: list[int] = field(default_factory=lambda: list(DEFAULT_SEEDS))
    out: str | None = None
    jobs: int | None = None  # parallel runs; default: one per available CPU core
    base: FitConfig = field(default_factory=FitConfig)


@dataclass
class BenchResult:
    out: Path
    rows: list[dict]
    summary: list[dict]
    table: str
    seconds: float
    interrupted: bool = False


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def _run_name(method: str, rate: float, seed: int) -> str:
    return f"{method}-sr{rate:g}-s{seed}"


def _one(cfg: FitConfig) -> dict | None:
    """One run (fresh, or resumed from its directory); its final metrics as a row. ``None`` when the bench was
    stopped before the run began; a run in progress when it is stopped saves a checkpoint and ends."""
    run_dir = Path(cfg.out)
    if (run_dir / LAST).exists():
        cfg = dataclasses.replace(cfg, resume=str(run_dir))
    t0 = time.perf_counter()
    try:
        res = fit(cfg, log=lambda msg: None, on_step=check_stop)
    except LossNotFinite as e:  # a result of the grid, not an error of the bench: reported, left out of the means
        return {**_row(cfg, {}, 0, t0, False), "diverged": str(e)}
    return _row(cfg, res.final, res.epochs_done, t0, res.interrupted)


def _row(cfg: FitConfig, f: dict, epochs: int, t0: float, interrupted: bool) -> dict:
    run_dir = Path(cfg.out)
    return {
        "method": cfg.method,
        "sample_rate": cfg.sample_rate,
        "seed": cfg.seed,
        "top1": f.get("test_top1", math.nan),
        "shift_top1": f.get("shift_top1", math.nan),
        "retention": f.get("test_retention", math.nan),
        "valid_top1": f.get("valid_top1", math.nan),
        "mean_class_acc": f.get("test_mean_class_acc", math.nan),
        "epochs": epochs,
        "seconds": round(time.perf_counter() - t0, 2),
        "interrupted": interrupted,
        "diverged": "",
        "run_dir": str(run_dir),
    }


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> BenchResult:
    """Run the grid, write results.csv / summary.csv / summary.md / accuracy_vs_rate.png, print the table."""
    methods = parse_methods(cfg.methods)  # validate (and normalize, groups expanded) before any work
    require_module("matplotlib", "finereg bench's plot", "matplotlib (or 'finereg[train]')")
    if cfg.base.progress:
        require_module("tqdm.auto", "the progress bar", "tqdm (or 'finereg[train]')", "or run with --no-progress")
    # --set l2sp.trade_off=... changes the l2sp runs only; a --set that names no method of the bench is an error
    settings = {m: settings_for(m, cfg.base.set, methods) for m in methods}
    if not methods or not cfg.rates or not cfg.seeds:
        raise FineregError("bench needs at least one method, one sampling rate and one seed")
    rates = [check_number(r, "each sampling rate (a percentage)", low=0, high=100, low_open=True) for r in cfg.rates]
    seeds = [check_int(s, "each seed") for s in cfg.seeds]
    for what, values, given in (
        ("--methods", methods, cfg.methods),
        ("--rates", rates, cfg.rates),
        ("--seeds", seeds, cfg.seeds),
    ):
        twice = sorted({str(v) for v in values if values.count(v) > 1})
        if twice:
            raise FineregError(
                f"{what} lists {', '.join(twice)} more than once ({', '.join(map(str, given))}; aliases count as "
                "their method): each run would be counted twice in the mean and its std. List each once"
            )
    out = Path(cfg.out or f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}").expanduser()
    with bench_dir(out):
        return _bench(cfg, methods, settings, rates, seeds, out, log)


def _bench(
    cfg: BenchConfig,
    methods: list[str],
    settings: dict[str, Any],
    rates: list[float],
    seeds: list[int],
    out: Path,
    log: Callable[[str], None],
) -> BenchResult:
    t0 = time.perf_counter()
    jobs = max(1, cfg.jobs or _cores())
    base = dataclasses.replace(cfg.base, progress=False, tensorboard=False, resume=False, overwrite=False)
    build_task(resolve(base, 0.0), log)  # what every run shares, made once before the workers start (caches)
    grid = [
        dataclasses.replace(
            base,
            method=m,
            set=settings[m],
            sample_rate=float(r),
            seed=int(s),
            out=str(out / "runs" / _run_name(m, r, s)),
        )
        for m in methods
        for r in rates
        for s in seeds
    ]
    log(
        f"bench: {len(methods)} methods x {len(rates)} rates x {len(seeds)} seeds = {len(grid)} runs on "
        f"{base.data}, {jobs} in parallel -> {out}"
    )
    rows: list[dict] = []
    bar = _bar(len(grid), cfg.base.progress)

    def collect(row: dict) -> bool:
        rows.append(row)
        _tick(bar, row)
        return row["interrupted"]

    try:
        interrupted = run_all(_one, grid, jobs, collect, log)
    finally:
        if bar is not None:
            bar.close()
    order = {(c.method, c.sample_rate, c.seed): i for i, c in enumerate(grid)}
    rows.sort(key=lambda r: order.get((r["method"], float(r["sample_rate"]), r["seed"]), 0))
    summary = summarize(rows)
    seconds = time.perf_counter() - t0
    note = (
        f"finereg bench on {base.data} ({_describe(base)}): {len(rows)} runs, seeds {', '.join(map(str, seeds))}, "
        f"{seconds / 60:.1f} min."
    )
    diverged = [r for r in rows if r["diverged"]]
    report = report_markdown(summary, methods, rates, note, diverged)
    table = accuracy_table(summary, methods, rates, diverged=diverged)
    write_text_atomic(out / "results.csv", _csv(rows))
    write_text_atomic(out / "summary.csv", _csv(summary))
    write_text_atomic(out / "summary.md", report)
    if summary:
        plot(summary, methods, out / "accuracy_vs_rate.png", title=base.data)
    log("\n" + report)
    log(
        f"wrote {out / 'summary.md'}, {out / 'summary.csv'}, {out / 'results.csv'}"
        + (f", {out / 'accuracy_vs_rate.png'}" if summary else "")
    )
    if interrupted:
        log(f"interrupted: run the same command with --out {out} to finish the remaining runs")
    return BenchResult(out, rows, summary, table, seconds, interrupted)


def _describe(cfg: FitConfig) -> str:
    """The resolved settings every run of the bench shares, in one line."""
    c = resolve(cfg, 0.0)
    prefix = "" if c.frozen_prefix in (None, "none") else f", frozen prefix {c.frozen_prefix}"
    return (
        f"{c.arch}, {c.weights or 'default'} weights{prefix}, {c.epochs} epochs x "
        f"{c.iters_per_epoch or 'one pass'} steps x batch {c.batch_size}, lr {c.lr:g}"
    )


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="bench", unit="run", dynamic_ncols=True)


def _tick(bar, row: dict) -> None:
    if bar is not None:
        bar.update(1)
        got = "diverged" if row["diverged"] else f"{row['top1']:.1f}%"
        bar.set_postfix_str(f"{row['method']} {row['sample_rate']:g}% s{row['seed']}: {got}")
