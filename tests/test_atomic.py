"""atomic_write: the target is replaced whole or not at all."""

from __future__ import annotations

import pytest

from moe_interp.atomic import atomic_write


def test_replaces_whole_file(tmp_path):
    target = tmp_path / "sub" / "out.json"
    atomic_write(target, lambda p: p.write_text("new"))
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, exc):
    target = tmp_path / "out.json"
    target.write_text("old")

    def half(p):
        p.write_text("half")
        raise exc("killed")

    with pytest.raises(exc):
        atomic_write(target, half)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
