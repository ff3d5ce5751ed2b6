"""The Makefile's first set-up step: install torch (and torchvision) into the running environment.

    python tools/install_torch.py cpu|default CONSTRAINTS

``cpu`` (the Makefile's choice where ``nvidia-smi`` is absent): PyTorch's CPU-only build, 0.75 GB of torch instead
of the 1.2 GB of torch and 4.1 GB of CUDA libraries (``nvidia-*`` packages, triton) that ``pip install torch``
brings on Linux. It comes from https://download.pytorch.org/whl/cpu where that answers within 10 s, else from
``+cpu`` builds of torch and torchvision pip already sees (a wheel directory or index in the pip configuration; the
CUDA torchvision on PyPI does not load on a CPU torch); where neither has both, pip's default build is installed
and the script says so. ``default``: pip's default build. An environment that has torch keeps it. Either way the
versions installed are written to ``CONSTRAINTS`` (a pip constraints file), so the extras installed next keep them.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
import urllib.request

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _pip(*args: str, quiet: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", *args]
    return subprocess.run(cmd, capture_output=quiet, text=True)


def _reachable(url: str, timeout: float = 10.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def cpu_versions(index_listing: str) -> list[str]:
    """The ``+cpu`` versions in ``pip index versions`` output, newest first (pip's order)."""
    found = re.search(r"^Available versions: (.*)$", index_listing, re.M)
    return [v for v in (found.group(1).split(", ") if found else []) if v.endswith("+cpu")]


def _works() -> bool:
    """torchvision's compiled operators load against this torch (a CUDA torchvision fails on a CPU torch)."""
    probe = "import torch, torchvision; torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def _install_cpu() -> bool:
    if _reachable(f"{CPU_INDEX}/torch/"):
        print(f"set-up: torch's CPU build from {CPU_INDEX}", flush=True)
        tried = _pip("install", "-q", "torch", "torchvision", "--extra-index-url", CPU_INDEX, quiet=False)
        if tried.returncode == 0 and _works():
            return True
    else:
        print(f"set-up: {CPU_INDEX} is not reachable; looking for CPU builds pip already sees", flush=True)
        torch, vision = (cpu_versions(_pip("index", "versions", name).stdout) for name in ("torch", "torchvision"))
        if torch and not vision:
            print(f"set-up: pip sees torch {torch[0]} but no CPU build of torchvision to go with it", flush=True)
        for version in torch if vision else []:  # newest first; a cap in the pip configuration may refuse some
            if _pip("install", "-q", f"torch=={version}", *(f"torchvision=={v}" for v in vision[:1])).returncode:
                continue
            if _works():
                print(f"set-up: torch {version} (CPU build)", flush=True)
                return True
            break
    if _installed("torch"):
        _pip("uninstall", "-q", "-y", "torch", "torchvision")
    print(
        "set-up: no CPU build of torch and torchvision is reachable: pip's default build (with CUDA, ~4 GB)", flush=True
    )
    return False


def _installed(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def main(argv: list[str]) -> int:
    build, constraints = argv
    if build not in ("cpu", "default"):
        raise SystemExit(f"the torch build must be cpu or default, got {build!r}")
    if _installed("torch"):  # an environment that has torch keeps it (make clean, then make, to change the build)
        print(f"set-up: keeping the installed torch {_installed('torch')}", flush=True)
    elif (build == "default" or not _install_cpu()) and _pip("install", "-q", "torch", "torchvision").returncode:
        return 1
    pins = [f"{name}=={_installed(name)}" for name in ("torch", "torchvision") if _installed(name)]
    with open(constraints, "w") as f:
        f.write("".join(p + "\n" for p in pins))
    print(f"set-up: {', '.join(pins)} (kept by the next steps: {constraints})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
