"""transforms/lib/io.py: every small file is written whole or not at all."""

from __future__ import annotations

import pytest

from transforms.lib.io import atomic_open, write_bytes


def test_atomic_open_replaces_on_success_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "sub" / "stats.json"
    write_bytes(str(target), b"old")
    with pytest.raises(RuntimeError, match="killed halfway"):
        with atomic_open(str(target), "w") as f:
            f.write("half of the new")
            raise RuntimeError("killed halfway")
    assert target.read_bytes() == b"old"  # the previous file stands, whole
    assert sorted(p.name for p in target.parent.iterdir()) == ["stats.json"]  # no temporary left behind
    with atomic_open(f"file://{target}", "w", encoding="utf-8") as f:
        f.write("new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓"
    assert sorted(p.name for p in target.parent.iterdir()) == ["stats.json"]
