"""The scripts in examples/ run as a user runs them (the README points to them) and print their checks."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

CASES = {
    "seed_orthogonal_freeze.py": ([], ["max|Δ frozen| 0.0e+00", "frozen still exact: True", "3 separate layers"]),
    "standardize_resnet.py": (["--size", "32"], ["baked == standardized: max |diff| 0.00e+00", "torch.export"]),
    # the Keras front (seed 002 in Keras 3), on the backend of the test process (KERAS_BACKEND, torch by default)
    "keras_orthogonal_freeze.py": (
        ["--epochs", "3", "--steps", "3"],
        [
            "max|Δ frozen| 0.0e+00",
            "frozen filters unchanged (bit-identical): True",
            "penalty decreasing: True",
            "filters 0, 1,4,7 unchanged: True",
            "frozen mask kept True, penalty kept True",
        ],
    ),
}

# --- trainer integrations (issue 12): real MiniLM, one epoch, one thread; the fine-tuned head must have learned ------
CASES["hf_trainer_l2sp.py"] = (
    ["--epochs", "1", "--threads", "1"],
    ["loss = task_loss + bss at every step: True", "optimizer: DecoupledL2SP(AdamW)", "after fine-tuning: val"],
)
CASES["lightning_delta.py"] = (
    ["--epochs", "1", "--threads", "1"],
    ["with a frozen copy: frozen True, separate True", "after fine-tuning: val"],
)
MIN_VAL_ACCURACY = {"hf_trainer_l2sp.py": 40.0, "lightning_delta.py": 40.0}  # 6 classes: chance is 16.7 %
# ---------------------------------------------------------------------------------------------------------------------


def test_every_example_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(CASES)


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs(script):
    args, expected = CASES[script]
    out = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for line in expected:
        assert line in out.stdout, f"{script}: {line!r} not in its output:\n{out.stdout}"
    steps = [ln for ln in out.stdout.splitlines() if ln.startswith("step ")]
    assert all("max|Δ frozen| 0.0e+00" in ln for ln in steps), steps  # frozen filters never move
    if script in MIN_VAL_ACCURACY:  # trainer integrations (issue 12)
        val = float(re.search(r"after fine-tuning: val ([0-9.]+)%", out.stdout).group(1))
        assert val >= MIN_VAL_ACCURACY[script], out.stdout
