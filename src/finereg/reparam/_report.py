"""The report of a model conversion (``standardize``, ``bake``, ``batchnorm_to_groupnorm``) and the rule for a
conversion that found nothing to convert: a :class:`~finereg._checks.FineregWarning`, or an error with
``strict=True``."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from .._checks import FineregError, FineregWarning, check_bool

__all__ = ["ConversionReport", "finish"]


@dataclass
class ConversionReport:
    """What a model conversion did: ``changed`` = [(module name, description)], ``skipped`` = [(name, reason)]."""

    action: str
    changed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        """Names of the changed modules (as in ``model.named_modules()``; the root is ``""``)."""
        return [n for n, _ in self.changed]

    def __len__(self) -> int:
        return len(self.changed)

    def __str__(self) -> str:
        lines = [f"{self.action}: {len(self.changed)} module(s) changed, {len(self.skipped)} skipped"]
        width = max((len(n or "(root)") for n, _ in self.changed + self.skipped), default=0)
        lines += [f"  {(n or '(root)'):<{width}}  {d}" for n, d in self.changed]
        if self.skipped:
            lines.append("skipped:")
            lines += [f"  {(n or '(root)'):<{width}}  {r}" for n, r in self.skipped]
        return "\n".join(lines)


def finish(report: ConversionReport, strict: bool, nothing: str) -> ConversionReport:
    """``report``, after a warning (or, with ``strict``, an error) when it changed nothing; ``nothing`` says what
    there was to convert and how to fix the call (e.g. ``"no convolution matched include=..."``)."""
    check_bool(strict, "strict")
    if report.changed:
        return report
    skipped = f" ({len(report.skipped)} skipped: {report.skipped[0][1]} ...)" if report.skipped else ""
    msg = f"{report.action} changed nothing: {nothing}{skipped}"
    if strict:
        raise FineregError(msg)
    warnings.warn(msg + " (strict=True makes this an error)", FineregWarning, stacklevel=3)
    return report
