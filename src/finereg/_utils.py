"""Small helpers shared across finereg: unwrapping wrapped models, resolving names, clear errors."""

from __future__ import annotations

import difflib
import os
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

import torch
from torch import Tensor, nn

from ._checks import FineregError, FineregTypeError, UnknownNameError

__all__ = [
    "unwrap",
    "strip_prefixes",
    "close_matches",
    "unknown_name_error",
    "get_submodule",
    "atomic_write",
    "name_list",
    "class_ranks",
]

# Prefixes that wrappers add to parameter and module names: DistributedDataParallel / DataParallel
# ("module."), torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DistributedDataParallel, DataParallel and ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def strip_prefixes(name: str) -> str:
    """``name`` without the leading wrapper prefixes (``module.``, ``_orig_mod.``), e.g. of a DDP state_dict."""
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p) :], True
    return name


def close_matches(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Up to ``n`` candidates that look like ``name`` (for 'did you mean' messages)."""
    candidates = list(candidates)
    found = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if not found:  # fall back to substring matches, e.g. 'conv2' -> 'layer1.0.conv2'
        found = [c for c in candidates if name in c][:n]
    return found


def unknown_name_error(
    kind: str, name: str, candidates: Iterable[str], hint: str = "", *, what: str | None = None
) -> UnknownNameError:
    """An :class:`UnknownNameError` (a ``KeyError``) for an unknown ``name``, listing close matches among
    ``candidates``. The message starts with ``what`` (default ``"no <kind> named <name>"``)."""
    candidates = list(candidates)
    near = close_matches(name, candidates)
    msg = what or f"no {kind} named {name!r}"
    if near:
        msg += f"; did you mean one of: {', '.join(map(repr, near))}?"
    else:
        shown = ", ".join(map(repr, candidates[:10])) + (" ..." if len(candidates) > 10 else "")
        msg += f"; available: {shown}" if candidates else f"; there are no {kind}s to choose from"
    if hint:
        msg += f" {hint}"
    return UnknownNameError(msg)


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)`` accepting wrapper prefixes, with a clear error listing close matches."""
    model = unwrap(model)
    name = strip_prefixes(name)
    if name == "":
        return model
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise unknown_name_error(
            "submodule",
            name,
            (n for n, _ in model.named_modules() if n),
            hint="(names are those of model.named_modules())",
        ) from None


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object], *, replace: bool = True) -> Path:
    """Write a file so that a crash never leaves it half written: ``write(f)`` fills a temporary file in the
    same folder, which is flushed to disk and then renamed over ``path`` (``os.replace``, atomic on POSIX and
    Windows). On any error the temporary file is removed and ``path`` keeps its previous content.

    With ``replace=False`` the finished temporary file is returned instead of renamed (for callers that rotate
    files, e.g. ``last.pt`` → ``prev.pt``, before the rename).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):  # mkstemp creates the file 0600: give it the mode open() would (umask)
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
            fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path if replace else Path(tmp)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries to disk, so that a rename in it survives a power loss (POSIX; a no-op where
    folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()


def name_list(names: str | Iterable[str], what: str, example: str) -> list[str]:
    """``names`` (one name or an iterable of names) as a list, checked: not empty, all ``str``, no name twice
    (after removing wrapper prefixes). ``what`` names the argument in the errors, ``example`` shows a valid one."""
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise FineregError(f"{what} is empty: give {example} (see model.named_modules())")
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise FineregTypeError(f"{what} must be str, got {bad!r}")
    stripped = [strip_prefixes(n) for n in names]
    dupes = sorted({n for n in stripped if stripped.count(n) > 1})
    if dupes:
        raise FineregError(f"{what} given more than once: {dupes}")
    return names


def class_ranks(labels: Tensor, num_classes: int | None = None, *, generator: torch.Generator | None = None) -> Tensor:
    """Each sample's rank among the samples of its class (0 = first), as an int64 tensor like ``labels``.

    Without ``generator`` the order is the samples' order in ``labels``; with one, a random order drawn from it
    (``randperm`` on the generator's device): samples of rank < k_c then form a random subset of k_c samples of
    class c, nested for growing k_c. One stable sort, no loop over classes.
    """
    labels = torch.as_tensor(labels).long()
    n = labels.numel()
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if n else 0
    if generator is None:
        order = torch.sort(labels, stable=True).indices
    else:
        perm = torch.randperm(n, generator=generator, device=generator.device).to(labels.device)
        order = perm[torch.sort(labels[perm], stable=True).indices]  # grouped by class, random within a class
    counts = torch.bincount(labels, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    ranks = torch.empty_like(labels)
    ranks[order] = torch.arange(n, device=labels.device) - starts[labels[order]]
    return ranks
