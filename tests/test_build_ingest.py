"""`cm3corpus build` at the ingest stage: exact outcomes, accounting, and runner independence."""

from __future__ import annotations

import json

import pytest

from pipelines import build_corpus
from pipelines.demo.command import demo_build_flags
from schemas import artifacts
from tests.badinputs import cases, encode, rgb, write_tar
from transforms.lib.io import read_table

BUDGET_FLAGS = ["--max_image_pixels=1000000", "--max_image_bytes=1048576", *demo_build_flags()]


def make_inputs(root):
    """Every bad case in one tar, duplicates across two more, and a truncated shard."""
    write_tar(root / "00000.tar", [(k, p) for k, p, _ in cases()])
    write_tar(root / "00001.tar", [("dup", {"txt": b"first copy"}), ("good", {"txt": b"dup of a key in 00000"})])
    write_tar(root / "00002.tar", [("dup", {"txt": b"second copy"}), ("last", {"jpg": encode(rgb(), "JPEG")})])
    data = (root / "00002.tar").read_bytes()
    (root / "00003.tar").write_bytes(data[:2000])  # cut inside the second sample's image
    expected = {k: e for k, _, e in cases()}
    expected_rejects = sorted(
        [(k, e) for k, e in expected.items() if "_" in e]
        + [("dup", "duplicate_key"), ("dup", "duplicate_key"), ("good", "duplicate_key"), ("last", "shard_unreadable")]
    )
    return expected, expected_rejects


def build(inp, out, *extra):
    return build_corpus.run(["--input", f"{inp}/*.tar", "--output", str(out), *BUDGET_FLAGS, *extra])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("in")
    return root, make_inputs(root)


def test_every_case_lands_where_the_policy_says(inputs, tmp_path):
    root, (expected, expected_rejects) = inputs
    stats = build(root, tmp_path / "out")
    rejects = read_table(str(tmp_path / "out" / "rejects"), artifacts.REJECTS).to_pylist()
    assert sorted((r["key"], r["reason"]) for r in rejects) == expected_rejects
    kept = sum(1 for e in expected.values() if "_" not in e) + 2  # + "dup" from 00001.tar, "last" from 00002.tar
    assert stats["examples_written"] == kept
    assert stats["examples_read"] == len(expected) + 2 + 2 + 1 + 1  # 00003: "dup" whole, then damage
    assert stats["examples_read"] == stats["examples_written"] + stats["examples_rejected"]
    assert stats["rejects_by_reason"]["duplicate_key"] == 3
    on_disk = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert on_disk["accounted"] and on_disk["rejects_by_reason"] == stats["rejects_by_reason"]
    assert not (tmp_path / "out" / build_corpus.STAGING).exists()
    # the first occurrence by source order is the one kept, and the reject says which it was
    dup_rejects = [r for r in rejects if r["key"] == "dup"]
    assert all("00001.tar" in r["detail"] for r in dup_rejects)


@pytest.mark.slow
def test_multiprocessing_gives_the_same_stats_and_rejects(inputs, tmp_path):
    root, _ = inputs
    a = build(root, tmp_path / "a")
    b = build(root, tmp_path / "b", "--direct_running_mode=multi_processing", "--direct_num_workers=2")
    for key in ("examples_read", "examples_written", "examples_rejected", "rejects_by_reason"):
        assert a[key] == b[key]
    files = sorted(p.name for p in (tmp_path / "a" / "rejects").iterdir())
    assert files and files == sorted(p.name for p in (tmp_path / "b" / "rejects").iterdir())
    for name in files:
        assert (tmp_path / "a" / "rejects" / name).read_bytes() == (tmp_path / "b" / "rejects" / name).read_bytes()


def test_rerun_replaces_previous_outputs(inputs, tmp_path):
    root, _ = inputs
    out = tmp_path / "out"
    (out / "rejects").mkdir(parents=True)
    (out / "rejects" / "stale-from-an-old-run.parquet").write_bytes(b"old")
    (out / build_corpus.STAGING / "rejects").mkdir(parents=True)  # left by a killed run
    build(root, out)
    assert "stale-from-an-old-run.parquet" not in {p.name for p in (out / "rejects").iterdir()}


def test_missing_input_fails_clearly(tmp_path):
    with pytest.raises(SystemExit, match="--input: .* matches no file") as e:  # one line, no traceback
        build(tmp_path / "nowhere", tmp_path / "out")
    assert "\n" not in str(e.value)
