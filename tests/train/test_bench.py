"""finereg bench: the grid runs, the table / CSV / PNG are written, a rerun reuses finished runs; a signal stops
it cleanly and its workers never outlive it."""

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finereg.train.checkpoint import load_checkpoint
from finereg.train.cli import main
from finereg.train.report import accuracy_table, difference_table, report_markdown, summarize

TINY = ["--protocol", "smoke", "--epochs", "1", "-i", "2", "-b", "16", "--no-progress"]


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
    assert {(s["metric"], s["sample_rate"]) for s in summary} == {
        (m, r) for m in ("top1", "retention", "valid_top1", "mean_class_acc") for r in ("30.0", "100.0")
    }  # retention: the built-in source model keeps its pretrained classifier
    assert all(0 <= float(r["retention"]) <= 100 for r in rows)
    assert all(s["n"] == "2" and s["diff"] == "0.0" for s in summary)  # erm against itself
    png = (out / "accuracy_vs_rate.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    md = (out / "summary.md").read_text()
    assert "runs, seeds 0, 1" in md and "Top-1 accuracy (%) on the test split: mean ± std over the seeds" in md
    assert "Paired difference to erm" not in md  # only the baseline ran: nothing to pair
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


def test_paired_report_tables():
    rows = [{"method": "erm", "sample_rate": 15, "seed": k, "top1": v, "shift_top1": v - 30}
            for k, v in enumerate([80.0, 82.0, 84.0])]  # fmt: skip
    rows += [{"method": "a", "sample_rate": 15, "seed": k, "top1": v, "shift_top1": v - 30}
             for k, v in enumerate([81.0, 83.5, 85.0])]  # fmt: skip
    rows += [{"method": "b", "sample_rate": 15, "seed": 0, "top1": 90.0, "shift_top1": 1.0}]
    summary = summarize(rows)
    cell = {(s["metric"], s["method"]): s for s in summary}
    assert cell["top1", "erm"]["mean"] == pytest.approx(82.0) and cell["top1", "erm"]["std"] == pytest.approx(2.0)
    a = cell["top1", "a"]  # differences 1.0, 1.5, 1.0: mean 1.1667, s_d 0.2887, t(0.975, 2) = 4.3027
    assert a["diff"] == pytest.approx(7 / 6) and a["high"] - a["diff"] == pytest.approx(4.302653 * 0.288675 / 3**0.5)
    assert cell["top1", "b"]["n_pairs"] == 1 and math.isnan(cell["top1", "b"]["low"])  # one seed: no interval
    table = accuracy_table(summary, ["erm", "a", "b"], [15.0])
    assert "| erm | 82.0 ± 2.0 | 82.0 |" in table and "| b | **90.0 ± –** | 90.0 |" in table
    diffs = difference_table(summary, ["erm", "a", "b"], [15.0])
    assert "| a | **+1.2 [+0.4, +1.9]** |" in diffs and "| b | +10.0 [–, –] |" in diffs
    assert "| erm |" not in diffs
    md = report_markdown(summary, ["erm", "a", "b"], [15.0], "note")
    assert "shifted test set" in md and md.count("Paired difference to erm") == 2


def test_bench_bad_input(tmp_path, capsys):
    assert main(["bench", "--methods", "erm,nosuch", "--out", str(tmp_path), *TINY]) == 2
    assert "no method named 'nosuch'" in capsys.readouterr().err
    assert main(["bench", "--rates", "0,50", "--out", str(tmp_path), *TINY]) == 2
    assert (
        "each sampling rate (a percentage) must be a finite number > 0 and <= 100, got 0.0" in capsys.readouterr().err
    )


def test_bench_stops_cleanly_on_ctrl_c_and_finishes_on_rerun(tmp_path):
    """SIGINT to the bench process alone (as ``kill -INT``; a terminal's Ctrl-C also reaches the workers): the
    running fits checkpoint, the command writes what finished and exits 130; the same command finishes the grid."""
    out = tmp_path / "b"
    cmd = [
        sys.executable,
        "-m",
        "finereg",
        "bench",
        "--protocol",
        "smoke",
        "--methods",
        "erm,l2sp",
        "--rates",
        "30",
        "--seeds",
        "0,1",
        "--epochs",
        "40",
        "--jobs",
        "2",
        "--no-progress",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not list(out.glob("runs/*/last.pt")) and time.time() < deadline:  # the fits are under way
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "interrupted: run the same command" in output
    ckpts = [load_checkpoint(p) for p in out.glob("runs/*/last.pt")]
    assert ckpts and all(c["epoch"] < 40 for c in ckpts)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and all(",40," in r for r in rows[1:]), rows  # every run trained its 40 epochs


def _bench_cmd(out: Path, epochs: int) -> list[str]:
    return [sys.executable, "-m", "finereg", "bench", "--protocol", "smoke", "--methods", "erm,l2sp",
            "--rates", "30", "--seeds", "0,1",
            "--epochs", str(epochs), "--jobs", "2", "--no-progress", "--out", str(out)]  # fmt: skip


def _children(pid: int) -> set[int]:
    kids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.add(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _start_and_wait_for_training(out: Path, epochs: int) -> tuple[subprocess.Popen, set[int]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        _bench_cmd(out, epochs), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 120
    while len(list(out.glob("runs/*/last.pt"))) < 2 and time.time() < deadline:  # both workers are training
        time.sleep(0.1)
    workers = _children(proc.pid)
    assert len(list(out.glob("runs/*/last.pt"))) == 2 and len(workers) >= 2, workers
    return proc, workers


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_sigterm_stops_the_bench_like_ctrl_c_and_leaves_no_process(tmp_path):
    out = tmp_path / "b"
    proc, workers = _start_and_wait_for_training(out, 60)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted: run the same command" in output, output
    deadline = time.time() + 10
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not [w for w in workers if _alive(w)]
    ckpts = [load_checkpoint(p) for p in out.glob("runs/*/last.pt")]
    assert ckpts and all(c["epoch"] < 60 for c in ckpts)
    done = subprocess.run(_bench_cmd(out, 60), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert all(",60," in r for r in (out / "results.csv").read_text().splitlines()[1:])


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_workers_checkpoint_and_exit_when_the_bench_is_killed(tmp_path):
    out = tmp_path / "b"
    proc, workers = _start_and_wait_for_training(out, 1000)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    deadline = time.time() + 30
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not [w for w in workers if _alive(w)], "orphaned bench workers are still running"
    runs = sorted(out.glob("runs/*/last.pt"))
    assert len(runs) == 2  # the queued runs never started
    for p in runs:  # each running fit saved a checkpoint mid-epoch, which resumes
        assert 0 < load_checkpoint(p)["epoch"] < 1000 or load_checkpoint(p)["step"] > 0


def test_duplicates_in_the_grid_are_refused(tmp_path, capsys):
    for args, said in (
        (["--seeds", "0,0"], "--seeds lists 0 more than once"),
        (["--rates", "15,15"], "--rates lists 15.0 more than once"),
        (["--methods", "l2-sp,l2sp"], "--methods lists l2sp more than once"),
        (["--methods", "robust,ftp"], "--methods lists ftp more than once"),  # a group and one of its methods
    ):
        assert main(["bench", *args, "--out", str(tmp_path / "b"), *TINY]) == 2
        assert said in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    with pytest.raises(SystemExit):
        main(["bench", "--seeds", "abc", "--out", str(tmp_path / "b")])
    assert "argument --seeds: must be comma-separated integers, got 'abc'" in capsys.readouterr().err


def test_a_directory_that_is_not_a_bench_is_refused(tmp_path, capsys):
    (tmp_path / "results.csv").write_text("mine")
    assert main(["bench", "--methods", "erm", "--rates", "30", "--seeds", "0", "--out", str(tmp_path), *TINY]) == 2
    assert "holds no finereg bench (results.csv)" in capsys.readouterr().err
    assert (tmp_path / "results.csv").read_text() == "mine"


def test_a_diverged_run_is_reported_and_the_bench_goes_on(tmp_path, capsys):
    """A run whose loss stops being finite is a result of the grid: the other runs finish, the diverged ones are
    named in the report and left out of the means; ``--set`` of one method changes only that method's runs."""
    out = tmp_path / "b"
    args = ["bench", "--methods", "erm,l2sp", "--rates", "30", "--seeds", "0,1", "--out", str(out), "--jobs", "1"]
    assert main([*args, "--set", "head-l2.trade_off=1e38", *TINY]) == 0  # the head's L2 overflows at once
    with open(out / "results.csv") as f:
        rows = {(r["method"], r["seed"]): r for r in csv.DictReader(f)}
    assert rows[("erm", "0")]["diverged"] == "" and 0 <= float(rows[("erm", "0")]["top1"]) <= 100
    assert "loss is inf" in rows[("l2sp", "1")]["diverged"] and math.isnan(float(rows[("l2sp", "1")]["top1"]))
    md = (out / "summary.md").read_text()
    assert "**2 runs diverged**" in md and "l2sp 30% seed 0, l2sp 30% seed 1" in md
    assert "| l2sp | 2 diverged | – |" in md
    assert "| l2sp | 2 diverged | – |" in capsys.readouterr().out
    assert main([*args, "--set", "bss.k=2", *TINY]) == 2  # a --set for no method of the bench is refused
    assert "--set bss.k=2: no method of the run is 'bss' (methods: erm, l2sp)" in capsys.readouterr().err
