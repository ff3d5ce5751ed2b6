"""finereg bench: the grid runs, the table / CSV / PNG are written, a rerun reuses finished runs."""

import csv

import pytest

from finereg.train.bench import markdown_table, summarize
from finereg.train.cli import main

TINY = ["--epochs", "1", "-i", "2", "-b", "16", "--no-progress"]


def test_bench_writes_table_csv_and_plot(tmp_path, capsys):
    out = tmp_path / "bench"
    assert (
        main(
            [
                "bench",
                "--methods",
                "erm",
                "--rates",
                "30,100",
                "--seeds",
                "0,1",
                "--out",
                str(out),
                "--jobs",
                "2",
                *TINY,
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| method | 30% | 100% | avg |" in printed and "| erm |" in printed
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["sample_rate"], r["seed"]) for r in rows] == [
        ("30.0", "0"),
        ("30.0", "1"),
        ("100.0", "0"),
        ("100.0", "1"),
    ]
    assert all(0 <= float(r["top1"]) <= 100 for r in rows)
    with open(out / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == 2 and all(s["n"] == "2" for s in summary)
    png = (out / "accuracy_vs_rate.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    md = (out / "summary.md").read_text()
    assert "mean ± std over seeds 0, 1" in md and "Mean per-class accuracy" in md
    # a second run over the same directory reuses the finished runs and reports the same numbers
    assert (
        main(
            [
                "bench",
                "--methods",
                "erm",
                "--rates",
                "30,100",
                "--seeds",
                "0,1",
                "--out",
                str(out),
                "--jobs",
                "1",
                *TINY,
            ]
        )
        == 0
    )
    with open(out / "results.csv") as f:
        again = list(csv.DictReader(f))
    assert [r["top1"] for r in again] == [r["top1"] for r in rows]


def test_summary_statistics_and_table():
    rows = [
        {"method": "a", "sample_rate": 15, "seed": s, "top1": v, "mean_class_acc": v}
        for s, v in enumerate([80.0, 82.0, 84.0])
    ]
    rows += [{"method": "b", "sample_rate": 15, "seed": 0, "top1": 90.0, "mean_class_acc": 89.0}]
    s = {x["method"]: x for x in summarize(rows)}
    assert s["a"]["top1_mean"] == pytest.approx(82.0) and s["a"]["top1_std"] == pytest.approx(2.0)  # n - 1
    assert s["b"]["top1_std"] == 0.0 and s["b"]["n"] == 1
    table = markdown_table(list(s.values()), ["a", "b"], [15.0])
    assert "| a | 82.0 ± 2.0 | 82.0 |" in table and "| b | **90.0 ± 0.0** | 90.0 |" in table


def test_bench_bad_input(tmp_path, capsys):
    assert main(["bench", "--methods", "erm,nosuch", "--out", str(tmp_path), *TINY]) == 2
    assert "no method named 'nosuch'" in capsys.readouterr().err
    assert main(["bench", "--rates", "0,50", "--out", str(tmp_path), *TINY]) == 2
    assert "percentages" in capsys.readouterr().err
