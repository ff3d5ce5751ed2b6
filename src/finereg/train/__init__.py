"""The engine behind ``finereg fit`` and ``finereg bench`` (needs the ``train`` extra for logs and plots)."""

from .bench import BenchConfig, BenchResult, bench
from .loop import FitConfig, FitResult, StepInfo, evaluate, fit, load_trained

__all__ = [
    "FitConfig",
    "FitResult",
    "StepInfo",
    "fit",
    "evaluate",
    "load_trained",
    "BenchConfig",
    "BenchResult",
    "bench",
]
