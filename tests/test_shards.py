"""WebDataset shards: byte-identical whatever the input order, readable by tarfile and webdataset."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from schemas.artifacts import SHARD_MANIFEST
from schemas.records import ShardSample
from transforms.lib.shards import (
    num_shards_for,
    sample_nbytes,
    shard_assignment,
    shard_name,
    shard_of,
    split_bucket,
    write_bucket,
    write_manifest,
    write_shard,
)


def make_samples(n: int, seed: int = 0) -> list[ShardSample]:
    rng = np.random.default_rng(seed)
    return [
        ShardSample(
            key=f"q{i:04d}",
            tokens=rng.integers(0, 5000, size=int(rng.integers(5, 60))).astype(np.int32),
            json={"query_key": f"q{i:04d}", "neighbours": [f"q{(i + 1) % n:04d}"], "caption": "é ünïcode"},
        )
        for i in range(n)
    ]


def test_same_samples_in_any_order_give_identical_bytes(tmp_path):
    samples = make_samples(20)
    shuffled = [samples[i] for i in np.random.default_rng(1).permutation(len(samples))]
    a = write_shard(str(tmp_path / "a" / "cm3-000000.tar"), samples)
    b = write_shard(str(tmp_path / "b" / "cm3-000000.tar"), shuffled)
    data = (tmp_path / "a" / "cm3-000000.tar").read_bytes()
    assert data == (tmp_path / "b" / "cm3-000000.tar").read_bytes()
    assert a == b
    assert (a.shard, a.samples, a.bytes) == ("cm3-000000.tar", 20, len(data))
    assert a.tokens == sum(len(s.tokens) for s in samples)
    assert a.sha256 == hashlib.sha256(data).hexdigest()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["cm3-000000.tar"]  # no temporary left


def test_tar_members_are_sorted_and_normalised(tmp_path):
    samples = make_samples(5)
    path = tmp_path / "s.tar"
    write_shard(str(path), samples[::-1])
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [f"{s.key}.{ext}" for s in samples for ext in ("json", "tokens.npy")]
        for m in members:
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o444)
            assert m.isfile()
        first = tar.extractfile(members[1]).read()
    tokens = np.load(io.BytesIO(first), allow_pickle=False)
    assert tokens.dtype == np.int32 and np.array_equal(tokens, samples[0].tokens)


def test_plain_webdataset_reads_it_back(tmp_path):
    import webdataset as wds

    samples = make_samples(6)
    path = tmp_path / "cm3-000000.tar"
    write_shard(str(path), samples)
    got = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [g["__key__"] for g in got] == [s.key for s in samples]
    for g, s in zip(got, samples, strict=True):
        assert np.array_equal(np.load(io.BytesIO(g["tokens.npy"]), allow_pickle=False), s.tokens)
        assert json.loads(g["json"].decode("utf-8")) == s.json
        assert g["json"] == json.dumps(s.json, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


@pytest.mark.parametrize("key", ["a.b", "a/b", ""])
def test_keys_with_dots_or_slashes_are_refused(tmp_path, key):
    with pytest.raises(ValueError):
        write_shard(str(tmp_path / "x.tar"), [ShardSample(key, np.zeros(3, np.int32), {})])
    assert list(tmp_path.iterdir()) == []


def test_duplicate_keys_are_refused(tmp_path):
    s = make_samples(1)[0]
    with pytest.raises(ValueError, match="duplicate"):
        write_shard(str(tmp_path / "x.tar"), [s, s])


def test_sample_nbytes_is_exact(tmp_path):
    samples = make_samples(7) + [ShardSample("k" * 150, np.arange(3, dtype=np.int32), {"é": 1})]  # PAX header
    row = write_shard(str(tmp_path / "x.tar"), samples)
    members = sum(sample_nbytes(s) for s in samples)
    assert row.bytes == -(-(members + 1024) // 10240) * 10240


def test_assignment_follows_keys_only():
    keys = [f"key{i}" for i in range(500)]
    a = shard_assignment(keys, 7)
    b = shard_assignment(reversed(keys), 7)
    assert a == b and set(a.values()) == set(range(7))
    assert all(shard_of(k, 7) == v for k, v in a.items())


def test_num_shards_for():
    assert num_shards_for(0, 0, 100, 10**6) == 1
    assert num_shards_for(900, 0, 100, 10**9) == 10  # 900 / (100 * 0.9)
    assert num_shards_for(10, 10**7, 10**4, 10**6) == 12  # bytes dominate: 1e7 / 9e5
    assert num_shards_for(1000, 0, 100, 10**9, fill=1.0) == 10


def test_split_bucket_honours_both_limits():
    samples = make_samples(30)
    parts = split_bucket(samples[::-1], max_samples=8, max_bytes=10**9)
    assert [len(p) for p in parts] == [8, 8, 8, 6]
    assert [s.key for p in parts for s in p] == sorted(s.key for s in samples)
    one = sample_nbytes(samples[0])
    parts = split_bucket(samples, max_samples=100, max_bytes=10240)
    assert len(parts) > 1 and all(sum(sample_nbytes(s) for s in p) + 1024 <= 10240 for p in parts if len(p) > 1)
    assert one < 10240


def test_write_bucket_names_overflow_parts_and_manifest(tmp_path):
    samples = make_samples(10)
    rows = write_bucket(str(tmp_path), 3, samples, max_samples=4, max_bytes=10**9)
    assert [r.shard for r in rows] == [shard_name(3), shard_name(3, 1), shard_name(3, 2)]
    assert [r.shard for r in rows] == ["cm3-000003.tar", "cm3-000003-001.tar", "cm3-000003-002.tar"]
    rows += write_bucket(str(tmp_path), 0, make_samples(2, seed=5), max_samples=4, max_bytes=10**9)
    write_manifest(str(tmp_path), rows[::-1])
    table = pq.read_table(tmp_path / "manifest.parquet")
    assert table.schema.equals(SHARD_MANIFEST, check_metadata=False)
    assert table.column("shard").to_pylist() == sorted(r.shard for r in rows)
    for r in rows:
        assert hashlib.sha256((tmp_path / r.shard).read_bytes()).hexdigest() == r.sha256
    summary = json.loads((tmp_path / "manifest.json").read_text())
    assert summary["total"]["samples"] == 12 and len(summary["shards"]) == 4
