"""The README's code blocks run as written, and its set-up commands exist in the Makefile and CI script."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    exec(compile(BLOCKS[index], f"README.md[{index}]", "exec"), {})


def test_setup_commands_are_real():
    makefile = (ROOT / "Makefile").read_text()
    for target in re.findall(r"^make (\w+)", README, flags=re.M):
        assert re.search(rf"^{target}:", makefile, flags=re.M), f"README names `make {target}`, Makefile lacks it"
    assert re.search(r"^bench:.*\n\t\$\(PY\) -m finereg bench$", makefile, flags=re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
