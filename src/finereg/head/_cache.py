"""Disk cache for quantities computed once before training (LwF's recorded source targets, Co-Tuning's
category relationship).

A cache entry is a file named by a key: a SHA-256 hash of the model's state (parameter and buffer names,
dtypes, shapes and bytes), of the data (every tensor the loader yields, in order) and of the options. A rerun
with the same model and data finds the file and skips the forward passes; a changed model, changed data or a
changed option gives a new key and recomputes. Files are written atomically (a temporary file in the same
folder, then ``os.replace``), so an interrupted run never leaves a half-written entry behind.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import FineregError, FineregTypeError
from .._utils import atomic_write, unwrap

__all__ = ["module_fingerprint", "loader_fingerprint", "make_key", "cached"]


def _update_tensor(h: hashlib._Hash, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _update_obj(h: hashlib._Hash, obj: Any) -> None:
    """Hash tensors and (nested) tuples/lists/dicts of tensors and plain values."""
    if isinstance(obj, Tensor):
        _update_tensor(h, obj)
    elif isinstance(obj, (list, tuple)):
        h.update(f"seq{len(obj)}".encode())
        for o in obj:
            _update_obj(h, o)
    elif isinstance(obj, dict):
        h.update(f"map{len(obj)}".encode())
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _update_obj(h, obj[k])
    else:
        h.update(repr(obj).encode())


def module_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a module's class and its full state dict (names, dtypes, shapes, values)."""
    if not isinstance(model, nn.Module):
        raise FineregTypeError(f"expected an nn.Module to fingerprint, got {type(model).__name__}")
    model = unwrap(model)
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        _update_tensor(h, t)
    return h.hexdigest()


def loader_fingerprint(loader: Iterable) -> str:
    """SHA-256 of everything a data loader yields, batch by batch, in order.

    This reads the data once (no model is run). Random augmentations make every pass different, so the
    cache would never hit: record with deterministic transforms, as the LwF and Co-Tuning papers do.
    """
    h = hashlib.sha256(b"loader")
    n = 0
    for batch in loader:
        _update_obj(h, batch)
        n += 1
    if n == 0:
        raise FineregError("the data loader yielded no batches; give it a non-empty dataset")
    return h.hexdigest()


def make_key(*parts: Any) -> str:
    """A short hex key from strings / plain values (e.g. fingerprints and options)."""
    h = hashlib.sha256()
    for p in parts:
        _update_obj(h, p)
    return h.hexdigest()[:32]


def cached(cache_dir: str | os.PathLike | None, stem: str, key: str, compute: Callable[[], dict]) -> dict:
    """``compute()`` (a dict of tensors / plain values), or its stored copy ``<cache_dir>/<stem>-<key>.pt``."""
    if cache_dir is None:
        return compute()
    path = Path(cache_dir) / f"{stem}-{key}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    out = compute()
    atomic_write(path, lambda f: torch.save(out, f))
    return out
