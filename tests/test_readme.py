"""Every Python example in the README runs as written (blocks opening with "# not run" are skipped)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    code = BLOCKS[index]
    if code.lstrip().startswith("# not run"):
        pytest.skip("documented as not runnable here")
    from moe_interp.architectures import _REGISTRY

    before = dict(_REGISTRY)
    try:
        exec(compile(code, f"README.md example {index}", "exec"), {"__name__": "__readme__"})
    finally:  # an example may register an architecture
        _REGISTRY.clear()
        _REGISTRY.update(before)
