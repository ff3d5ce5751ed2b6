"""Make the CIFAR-10 files the repository carries (``src/finereg/_data/cifar10/``) from the full JPEG release.

Run once, by hand: ``python benchmarks/make_cifar10_subset.py ../shared/data/cifar10``. It copies the official test
archive unchanged (10,000 images, 1,000 per class) and writes ``cifar10-train500-jpeg.tar.gz``: 500 images of each
class of the official training split, drawn without replacement by ``numpy.random.default_rng(SEED)`` from the 5,000
of the class (the order inside a class folder is not random), their JPEG bytes unchanged, in sorted member order
with fixed metadata and a zero gzip time stamp, so the archive and its SHA-256 are reproducible.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np

SEED = 20261207
PER_CLASS = 500
OUT = Path(__file__).resolve().parents[1] / "src" / "finereg" / "_data" / "cifar10"


def main(src: Path) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tarfile.open(src / "cifar10-train-jpeg.tar.gz") as tf:
        members = {m.name: m for m in tf.getmembers() if m.isfile()}
        classes = sorted({n.split("/")[1] for n in members})
        rng = np.random.default_rng(SEED)
        chosen = []
        for c in classes:
            names = sorted(n for n in members if n.split("/")[1] == c)
            chosen += sorted(names[i] for i in rng.choice(len(names), PER_CLASS, replace=False))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as out:
            for name in chosen:
                data = tf.extractfile(members[name]).read()
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 1554014139, 0o644
                out.addfile(info, io.BytesIO(data))
    target = OUT / "cifar10-train500-jpeg.tar.gz"
    with open(target, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as gz:
        gz.write(buf.getvalue())
    shutil.copyfile(src / "cifar10-test-jpeg.tar.gz", OUT / "cifar10-test-jpeg.tar.gz")
    sums = []
    for name in ("cifar10-test-jpeg.tar.gz", "cifar10-train500-jpeg.tar.gz"):
        sums.append(f"{hashlib.sha256((OUT / name).read_bytes()).hexdigest()}  {name}\n")
    (OUT / "SHA256SUMS").write_text("".join(sums))
    print("".join(sums), end="")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/cifar10"))
