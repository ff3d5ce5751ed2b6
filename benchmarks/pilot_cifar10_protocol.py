"""Pilot of the CIFAR-10 protocol's settings: ERM through the engine (``finereg.train.loop.fit``) at the lowest and
the highest sampling rate over a small grid of learning rate, steps, resolution and frozen prefix, scored on the
**validation** split (test and corrupted accuracy printed beside it, never used to choose), timed per run.

    python benchmarks/pilot_cifar10_protocol.py --out /tmp/pilot [--sizes 64] [--prefixes blocks.4]
        [--lrs 0.01 0.03 0.1] [--epochs 4 8] [--rates 10 100]

One thread per run, as the engine's bench runs one job per core. Appends one JSON line per run to
``<out>/pilot.jsonl`` and skips the runs already there (resumable).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from finereg.train.loop import FitConfig, fit


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/pilot-cifar10")
    p.add_argument("--sizes", type=int, nargs="+", default=[64])
    p.add_argument("--prefixes", nargs="+", default=["blocks.4"])
    p.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1])
    p.add_argument("--epochs", type=int, nargs="+", default=[4, 8])
    p.add_argument("--rates", type=float, nargs="+", default=[10, 100])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "pilot.jsonl"
    done = {json.loads(line)["name"] for line in log.read_text().splitlines()} if log.exists() else set()
    for size, prefix, lr, epochs, rate in itertools.product(a.sizes, a.prefixes, a.lrs, a.epochs, a.rates):
        name = f"px{size}-{prefix}-lr{lr:g}-e{epochs}-sr{rate:g}-s{a.seed}"
        if name in done:
            continue
        cfg = FitConfig(data="cifar10", image_size=size, frozen_prefix=prefix, lr=lr, epochs=epochs,
                        sample_rate=rate, seed=a.seed, threads=1, out=str(out / "runs" / name), overwrite=True,
                        progress=False, tensorboard=False)  # fmt: skip
        t0 = time.perf_counter()
        f = fit(cfg, log=lambda m: None).final
        row = {"name": name, "size": size, "prefix": prefix, "lr": lr, "epochs": epochs, "rate": rate,
               "valid": f["valid_top1"], "test": f["test_top1"], "shift": f["shift_top1"],
               "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
        print(json.dumps(row), flush=True)
        with open(log, "a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
