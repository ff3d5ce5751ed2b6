"""The code examples of the library's docs pages run as written (docs/engine.md's are the engine's, tested with
it)."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = [
    "feature_penalties.md",
    "head_methods.md",
    "weight_groups.md",
    "weight_penalties.md",
    "weight_standardization.md",
]
BLOCKS = [
    (page, i, code)
    for page in PAGES
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S))
]


@pytest.mark.parametrize("page", PAGES)
def test_page_has_examples(page):
    assert any(p == page for p, _, _ in BLOCKS)


@pytest.mark.parametrize("page, index, code", BLOCKS, ids=[f"{p}[{i}]" for p, i, _ in BLOCKS])
def test_example_runs(page, index, code, capsys, one_thread):
    exec(compile(code, f"{page}[{index}]", "exec"), {"__name__": f"doc_{index}"})
    if page == "weight_groups.md" and "register_hook" in code:
        assert "hook: row 0 moved by" in capsys.readouterr().out
