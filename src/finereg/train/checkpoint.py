"""Checkpoints written atomically, with the previous one kept, verified and read back with clear errors.

Each file is a zip archive (``torch.save``'s format) whose records carry CRC-32 checksums; loading verifies them
first, so a damaged file is refused rather than resumed with different weights. Each save writes a temporary file
in the run directory, flushes it to disk, moves the current ``last.pt`` to ``prev.pt`` and then the temporary file
to ``last.pt`` (both ``os.replace``, atomic on POSIX and Windows). A crash at any moment leaves at least one
complete checkpoint; a corrupt ``last.pt`` leaves ``prev.pt`` to resume from.
"""

from __future__ import annotations

import errno
import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from .._checks import FineregError
from .._utils import atomic_write, fsync_dir

__all__ = [
    "CheckpointError",
    "LAST",
    "PREV",
    "atomic_save",
    "save_checkpoint",
    "load_checkpoint",
    "find_checkpoint",
    "FORMAT",
]

LAST = "last.pt"
PREV = "prev.pt"
FORMAT = "finereg-checkpoint-v1"


class CheckpointError(FineregError, RuntimeError):
    """A checkpoint that is missing, corrupt or from another run."""


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` through a temporary file in the same directory and ``os.replace``."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(state: dict, run_dir: str | os.PathLike) -> Path:
    """Write ``state`` as ``run_dir/last.pt``; the checkpoint it replaces becomes ``run_dir/prev.pt``.

    A full disk (or quota, or file-size limit) raises :class:`CheckpointError` saying so; the previous checkpoint
    is untouched."""
    run_dir = Path(run_dir)
    try:
        tmp = atomic_write(run_dir / LAST, lambda f: torch.save({"format": FORMAT, **state}, f), replace=False)
    except Exception as e:
        full = _space_error(e)
        if full is None:
            raise
        kept = (
            f"the last checkpoint {str(run_dir / LAST)!r} is intact (checkpoints are written atomically): make "
            f"room and continue with --resume {run_dir}"
            if (run_dir / LAST).exists()
            else "no checkpoint had been written yet"
        )
        raise CheckpointError(f"could not write a checkpoint in {str(run_dir)!r}: {full}; {kept}") from None
    last = run_dir / LAST
    if last.exists():
        os.replace(last, run_dir / PREV)
    os.replace(tmp, last)
    fsync_dir(run_dir)  # the renames reach the disk, not only the page cache
    return last


_SPACE = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file size limit is exceeded",
}


def _space_error(e: BaseException) -> str | None:
    """What ran out, when ``e`` (or an exception it was raised from, as torch's writer does) is an out-of-space
    ``OSError``."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _SPACE:
            return f"{_SPACE[e.errno]} ({e.strerror})"
        e = e.__cause__ or e.__context__
    return None


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Check every record of a checkpoint file against its CRC-32 checksum (``torch.save`` writes a zip archive
    with one per record); raises :class:`CheckpointError` for a damaged or truncated file."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or unreadable ({type(e).__name__}: {e}).") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: its record {bad!r} fails its checksum.")


def find_checkpoint(path: str | os.PathLike, command: str = "fit") -> Path:
    """The checkpoint file for ``path``: the file itself, or ``last.pt`` (else ``prev.pt``) of a run directory; the
    error's advice is for ``command`` (``"fit"``: resume, ``"wise-ft"``: sweep a finished run)."""
    path = Path(path)
    if path.is_dir():
        for name in (LAST, PREV):
            if (path / name).is_file():
                return path / name
        if command == "wise-ft":
            raise CheckpointError(
                f"{str(path)!r} holds no run (no {LAST} or {PREV}): wise-ft sweeps a run that finereg fit finished; "
                f"give its run directory (or a checkpoint in it), or train one first with finereg fit --out {path}"
            )
        raise CheckpointError(
            f"no checkpoint to resume from in {str(path)!r} (looked for {LAST} and {PREV}); "
            "start a new run without --resume"
        )
    if path.is_file():
        return path
    if command == "wise-ft":
        raise CheckpointError(
            f"{str(path)!r} does not exist: give the directory of a run that finereg fit finished (or a checkpoint "
            "in it)"
        )
    raise CheckpointError(f"checkpoint {str(path)!r} does not exist; pass a run directory or a .pt file")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", *, command: str = "fit") -> dict:
    """Read a finereg checkpoint (``weights_only``); a corrupt file raises :class:`CheckpointError` naming the
    intact previous checkpoint where there is one, with the advice of ``command`` (``"fit"`` or ``"wise-ft"``)."""
    path = find_checkpoint(path)
    try:
        verify_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(str(e) + _fallback_hint(path, command)) from None
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated / garbage files
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or unreadable ({type(e).__name__}: {e})."
            + _fallback_hint(path, command)
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{str(path)!r} is not a finereg training checkpoint (no {FORMAT!r} marker)."
            + _fallback_hint(path, command)
        )
    return state


def _fallback_hint(path: Path, command: str = "fit") -> str:
    prev = path.parent / PREV
    wise = command == "wise-ft"
    if path.name != PREV and prev.is_file():
        try:
            earlier = load_checkpoint(prev)
        except CheckpointError:
            if wise:
                return (
                    f" The previous checkpoint {str(prev)!r} is damaged too: no intact checkpoint of the run is left; "
                    "train it again (finereg fit with --overwrite), then run finereg wise-ft"
                )
            return (
                f" The previous checkpoint {str(prev)!r} is damaged too: there is no intact checkpoint to resume "
                "from, so start the run again (same command with --overwrite, or another --out)"
            )
        if not wise:
            return f" The previous checkpoint {str(prev)!r} is intact: resume from it with --resume {prev}"
        cfg = earlier.get("config", {})
        if earlier.get("epoch", 0) >= cfg.get("epochs", 0) and not earlier.get("step"):
            return (
                f" The previous checkpoint {str(prev)!r} is intact and finished: sweep it with finereg wise-ft {prev}"
            )
        return (
            f" The previous checkpoint {str(prev)!r} is intact: finish the run from it with finereg fit --resume "
            f"{prev}, then run finereg wise-ft {path.parent}"
        )
    if wise:
        return (
            " Nothing was changed; there is no earlier checkpoint to fall back on: train the run again (finereg fit "
            "with --overwrite), then run finereg wise-ft"
        )
    return (
        " Nothing was overwritten; there is no earlier checkpoint to fall back on, so start the run again "
        "(same command with --overwrite, or another --out)"
    )
