"""transforms/lib/io.py: every small file is written whole or not at all; tars are written
deterministically and read within bounds."""

from __future__ import annotations

import io
import tarfile
import zipfile

import pytest
import torch
from webdataset import TarWriter

from transforms.lib.io import atomic_open, atomic_path, read_tar, write_bytes, write_tar


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


def test_atomic_path_checkpoints_are_the_same_bytes_whatever_the_temporary_name(tmp_path):
    state = {"w": torch.arange(6, dtype=torch.float32)}
    saved = []
    for run in ("a", "b"):
        with atomic_path(str(tmp_path / run / "ckpt.pt")) as tmp:
            assert tmp != str(tmp_path / run / "ckpt.pt")
            torch.save(state, tmp)
        saved.append((tmp_path / run / "ckpt.pt").read_bytes())
        assert sorted(p.name for p in (tmp_path / run).iterdir()) == ["ckpt.pt"]  # no temporary left
    # torch names the zip's folder after the file less its last suffix: the temporary's random tail goes
    assert saved[0] == saved[1]
    assert zipfile.ZipFile(tmp_path / "a" / "ckpt.pt").namelist()[0] == "ckpt.pt/data.pkl"


def test_write_tar_matches_webdataset_and_reads_back_in_order(tmp_path):
    samples = [("b", {"json": b"{}", "tokens.npy": b"\x01" * 700}), ("a" * 120, {"txt": "é".encode()})]
    ours = io.BytesIO()
    write_tar(ours, ((f"{k}.{ext}", v) for k, parts in samples for ext, v in sorted(parts.items())))
    theirs = io.BytesIO()
    with TarWriter(theirs, user="", group="", mode=0o444, encoder=False, mtime=0, format="PAX_FORMAT") as tw:
        for k, parts in samples:
            tw.write({"__key__": k, **parts})
    assert ours.getvalue() == theirs.getvalue() and len(ours.getvalue()) % tarfile.RECORDSIZE == 0
    (tmp_path / "x.tar").write_bytes(ours.getvalue())
    got = list(read_tar(str(tmp_path / "x.tar")))
    assert got == [("b.json", b"{}"), ("b.tokens.npy", b"\x01" * 700), ("a" * 120 + ".txt", "é".encode())]
    assert list(read_tar(str(tmp_path / "x.tar"), keep=lambda n: n.endswith(".txt"))) == got[2:]


def test_read_tar_refuses_links_unsafe_names_oversized_members_and_truncation(tmp_path):
    def tar_with(info: tarfile.TarInfo, data: bytes = b"") -> str:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            tf.addfile(info, io.BytesIO(data) if data else None)
        path = tmp_path / f"t{len(list(tmp_path.iterdir()))}.tar"
        path.write_bytes(buf.getvalue())
        return str(path)

    link = tarfile.TarInfo("k.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with pytest.raises(tarfile.ReadError, match="not a regular file"):
        list(read_tar(tar_with(link)))
    up = tarfile.TarInfo("../k.txt")
    up.size = 2
    with pytest.raises(tarfile.ReadError, match="parent-relative"):
        list(read_tar(tar_with(up, b"hi")))
    big = tarfile.TarInfo("k.txt")
    big.size = 100
    path = tar_with(big, b"x" * 100)
    with pytest.raises(tarfile.ReadError, match="limit 99"):
        list(read_tar(path, max_member_bytes=99))
    assert list(read_tar(path, max_member_bytes=100)) == [("k.txt", b"x" * 100)]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(open(path, "rb").read()[:1024])  # header and data, no end-of-archive marker
    with pytest.raises(tarfile.ReadError, match="end-of-archive"):
        list(read_tar(str(cut)))
