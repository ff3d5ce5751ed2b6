"""A small real text classification task available offline: Python standard library docstrings, labelled by module.

Each example is the first paragraph of the docstring of a public function, class, method or property defined by
one of a few standard library modules (``math``, ``datetime``, ``pathlib``, ``logging``, ``unittest``,
``asyncio`` by default), labelled by that module. The sentences are real English written by the CPython
developers ("Return the arc tangent (measured in radians) of x.", "Make this path absolute, without
normalizing or resolving symlinks.") and ship with every Python, so the task needs no download.

Construction (deterministic for a given Python version, whose docstrings it reads):

1. for each module, walk its public names in sorted order; keep a function, class, method, property,
   classmethod or staticmethod whose ``__module__`` is the module or one of its submodules (re-exports of other
   modules are left out); its text is the first paragraph of ``inspect.getdoc``, whitespace collapsed;
2. drop texts under ``min_words`` words, and texts that occur under two labels (ambiguous);
3. per label, order the texts by the SHA-256 of the text, keep the first ``per_class``, and split them
   60 / 20 / 20 % into train / validation / test (the order of a hash: a fixed, content-defined shuffle);
   each split is then ordered by the same hash, so that consecutive examples mix the labels.

The result is cached as JSON in finereg's cache folder (:func:`finereg.train.builtin.cache_dir`), named by a hash
of the recipe and the Python version, written atomically; a missing or unreadable file is rebuilt.
:func:`tokenize` turns a split into a ``torch.utils.data.Dataset`` of fixed-length token tensors (the
``input_ids`` / ``attention_mask`` / ``labels`` dicts that Hugging Face's ``Trainer`` and a plain ``DataLoader``
both take).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._checks import FineregError, check_int
from .._utils import atomic_write
from ..train.builtin import cache_dir

__all__ = ["TextTask", "TokenizedSplit", "stdlib_docstrings", "tokenize", "accuracy", "DEFAULT_MODULES"]

DEFAULT_MODULES: tuple[str, ...] = ("math", "datetime", "pathlib", "logging", "unittest", "asyncio")
_VERSION = 1  # bump when the construction changes (the cache key includes it)


@dataclass(frozen=True)
class TextTask:
    """A labelled text task: ``labels`` (class names) and three splits of ``(text, label index)`` pairs."""

    labels: tuple[str, ...]
    train: tuple[tuple[str, int], ...]
    val: tuple[tuple[str, int], ...]
    test: tuple[tuple[str, int], ...]

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def split(self, name: str) -> tuple[tuple[str, int], ...]:
        """The split called ``name``: ``"train"``, ``"val"`` or ``"test"``."""
        if name not in ("train", "val", "test"):
            raise FineregError(f"split must be one of 'train', 'val', 'test', got {name!r}")
        return getattr(self, name)


def _first_paragraph(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split())


def _defined_in(obj: Any, module: str) -> bool:
    owner = getattr(obj, "__module__", None)
    if isinstance(obj, (property, staticmethod, classmethod)):
        owner = getattr(getattr(obj, "fget", None) or getattr(obj, "__func__", None), "__module__", owner)
    if not isinstance(owner, str):
        return False
    owner = owner.lstrip("_")  # C accelerators: _datetime for datetime, _asyncio for asyncio
    return owner == module or owner.startswith(module + ".")


def _member_docs(module: str) -> list[str]:
    """First paragraphs of the docstrings of the public objects that ``module`` defines, in sorted-name order."""
    mod = importlib.import_module(module)
    texts: list[str] = []
    seen: set[int] = set()
    for name, obj in sorted(vars(mod).items()):
        if name.startswith("_") or inspect.ismodule(obj) or id(obj) in seen or not callable(obj):
            continue
        if not _defined_in(obj, module):
            continue
        seen.add(id(obj))
        doc = inspect.getdoc(obj)
        if doc:
            texts.append(_first_paragraph(doc))
        if inspect.isclass(obj):
            for member_name, member in sorted(vars(obj).items()):
                if member_name.startswith("_") or id(member) in seen:
                    continue
                if not (callable(member) or isinstance(member, (property, staticmethod, classmethod))):
                    continue
                seen.add(id(member))
                doc = inspect.getdoc(member)
                if doc:
                    texts.append(_first_paragraph(doc))
    return texts


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _build(modules: Sequence[str], per_class: int, min_words: int) -> dict[str, Any]:
    by_label: list[set[str]] = []
    for m in modules:
        texts = {t for t in _member_docs(m) if len(t.split()) >= min_words}
        by_label.append(texts)
    counts: dict[str, int] = {}
    for texts in by_label:
        for t in texts:
            counts[t] = counts.get(t, 0) + 1
    splits: dict[str, list[list[Any]]] = {"train": [], "val": [], "test": []}
    for label, texts in enumerate(by_label):
        kept = sorted((t for t in texts if counts[t] == 1), key=_digest)
        kept = kept[:per_class]
        if len(kept) < 5:
            raise FineregError(
                f"module {modules[label]!r} documents only {len(kept)} public objects with a docstring of at least "
                f"{min_words} words; choose modules with more (e.g. {', '.join(DEFAULT_MODULES)})"
            )
        n_train, n_val = round(0.6 * len(kept)), round(0.2 * len(kept))
        for name, part in (
            ("train", kept[:n_train]),
            ("val", kept[n_train : n_train + n_val]),
            ("test", kept[n_train + n_val :]),
        ):
            splits[name] += [[t, label] for t in part]
    for name, rows in splits.items():  # labels interleaved, in a fixed content-defined order
        splits[name] = sorted(rows, key=lambda row: _digest(row[0]))
    return {"labels": list(modules), **splits}


def _cache_path(cache: str | os.PathLike | None, recipe: dict[str, Any]) -> Path:
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir(cache) / f"text-stdlib-docstrings-v{_VERSION}-{key}.json"


def _read(path: Path, recipe: dict[str, Any]) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        if obj.get("recipe") != recipe or not all(isinstance(obj["data"][k], list) for k in ("train", "val", "test")):
            return None
        return obj["data"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def stdlib_docstrings(
    modules: Sequence[str] = DEFAULT_MODULES,
    *,
    per_class: int = 40,
    min_words: int = 5,
    cache: str | os.PathLike | None = None,
) -> TextTask:
    """The docstring classification task (see the module docstring), from the cache or built now and cached.

    Args:
        modules: the standard library modules, one label each (at least two, no repeats).
        per_class: at most this many texts per label (before the 60/20/20 split).
        min_words: shortest text kept, in words.
        cache: the cache folder (default: ``$FINEREG_CACHE``, else ``$XDG_CACHE_HOME/finereg``, else
            ``~/.cache/finereg``).
    """
    if isinstance(modules, str) or not all(isinstance(m, str) for m in modules):
        raise FineregError(f"modules must be a list of module names like {list(DEFAULT_MODULES[:2])}, got {modules!r}")
    modules = tuple(modules)
    if len(modules) < 2 or len(set(modules)) != len(modules):
        raise FineregError(f"modules must name at least two different modules, got {list(modules)}")
    per_class = check_int(per_class, "per_class", low=5)
    min_words = check_int(min_words, "min_words", low=1)
    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError:
            raise FineregError(f"modules: {m!r} is not an importable module of this Python") from None
    recipe = {
        "version": _VERSION,
        "python": list(sys.version_info[:3]),
        "modules": list(modules),
        "per_class": per_class,
        "min_words": min_words,
    }
    path = _cache_path(cache, recipe)
    data = _read(path, recipe) if path.is_file() else None
    if data is None:
        data = _build(modules, per_class, min_words)
        payload = json.dumps({"recipe": recipe, "data": data}, ensure_ascii=False, indent=0).encode("utf-8")
        atomic_write(path, lambda f: f.write(payload))
    return TextTask(
        labels=tuple(data["labels"]),
        train=tuple((t, int(y)) for t, y in data["train"]),
        val=tuple((t, int(y)) for t, y in data["val"]),
        test=tuple((t, int(y)) for t, y in data["test"]),
    )


class TokenizedSplit(torch.utils.data.Dataset):
    """Fixed-length token tensors of a split: item ``i`` is ``{"input_ids", "attention_mask", "labels"}`` (plus
    ``"token_type_ids"`` when the tokenizer makes them), ready for ``default_data_collator`` or a ``DataLoader``."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        n = {len(t) for t in tensors.values()}
        if len(n) != 1:
            raise FineregError(f"all tensors must have one row per example, got lengths {sorted(n)}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors["labels"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


def tokenize(examples: Sequence[tuple[str, int]], tokenizer: Any, max_length: int = 32) -> TokenizedSplit:
    """``examples`` (``(text, label)`` pairs) tokenized by a Hugging Face ``tokenizer``, padded and truncated to
    ``max_length`` tokens."""
    max_length = check_int(max_length, "max_length", low=2)
    if not examples:
        raise FineregError("examples is empty: give (text, label) pairs, e.g. stdlib_docstrings().train")
    texts = [t for t, _ in examples]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    tensors = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
    tensors["labels"] = torch.tensor([y for _, y in examples], dtype=torch.long)
    return TokenizedSplit(tensors)


@torch.no_grad()
def accuracy(model: torch.nn.Module, split: TokenizedSplit, batch_size: int = 64) -> float:
    """Top-1 accuracy (%) of ``model`` (called with the split's tensors, returning ``logits``) on ``split``, in eval
    mode (the model's mode is restored)."""
    was = model.training
    model.eval()
    try:
        correct = 0
        for i in range(0, len(split), batch_size):
            batch = {k: v[i : i + batch_size] for k, v in split.tensors.items() if k != "labels"}
            logits = model(**batch)["logits"]
            correct += int((logits.argmax(-1) == split.tensors["labels"][i : i + batch_size]).sum())
    finally:
        model.train(was)
    return 100.0 * correct / len(split)
