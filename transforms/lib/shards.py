"""Deterministic WebDataset shards of CM3 sequences, and their manifest.

Which shard a sample lands in follows from its key alone, so any runner and any parallelism give
the same files byte for byte:

1. `num_shards_for(count, total_bytes, ...)` from two global sums (samples, and `sample_nbytes`),
   aiming each shard at `fill` of `shard_max_samples` and `shard_max_bytes`;
2. `shard_of(key, num_shards) = bucket_of(key, num_shards)`, `stable_hash(key) % num_shards` (num_shards as a side input);
3. GroupByKey on that bucket, then `write_bucket`: the bucket's samples sorted by key, written to
   `cm3-{bucket:06d}.tar`. Hash buckets are uneven, so a bucket that still exceeds either limit is
   split, in key order, into `cm3-{bucket:06d}.tar`, `cm3-{bucket:06d}-001.tar`, ... A bucket
   that receives no sample writes no file; the manifest lists exactly the shards there are.

A shard holds, per sample, `KEY.json` (sorted-key UTF-8 JSON) and `KEY.tokens.npy` (int32, no
pickle), members sorted, mtime 0, uid/gid 0, empty user and group names; it is written under a
temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict

import numpy as np
import pyarrow as pa

from schemas.artifacts import SCHEMA_VERSION, SHARD_MANIFEST
from schemas.records import ManifestRow, ShardSample
from transforms.lib.io import TAR_FORMAT, atomic_open, tar_member, write_bytes, write_table, write_tar
from transforms.lib.rng import bucket_of

SHARD_PREFIX = "cm3"
MANIFEST_PARQUET = "manifest.parquet"
MANIFEST_JSON = "manifest.json"
_TAR_END = 2 * tarfile.BLOCKSIZE  # two zero blocks close an archive ...
_TAR_RECORD = tarfile.RECORDSIZE  # ... which is then padded to a whole record


def _check_key(key: str) -> None:
    # WebDataset splits a member name at the first dot into key and extension, and a slash would
    # make a directory: either would silently corrupt the sample, so refuse rather than rename.
    if not key or "." in key or "/" in key:
        raise ValueError(f"shard sample key {key!r} must be non-empty with no dots or slashes")


def encode_sample(sample: ShardSample) -> dict[str, bytes]:
    """The sample's members, extension → bytes: `json` and `tokens.npy`."""
    _check_key(sample.key)
    npy = io.BytesIO()
    np.save(npy, np.ascontiguousarray(sample.tokens, dtype="<i4"), allow_pickle=False)
    meta = json.dumps(sample.json, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return {"json": meta.encode("utf-8"), "tokens.npy": npy.getvalue()}


def sample_nbytes(sample: ShardSample) -> int:
    """Exact bytes the sample takes inside a shard (headers and padding included)."""
    total = 0
    for ext, data in encode_sample(sample).items():
        header = tar_member(f"{sample.key}.{ext}", len(data)).tobuf(TAR_FORMAT, "utf-8", "surrogateescape")
        total += len(header) + math.ceil(len(data) / tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return total


def _archive_bytes(members: int) -> int:
    """Bytes of a tar whose members take `members` bytes: end blocks, then padding to a record."""
    return math.ceil((members + _TAR_END) / _TAR_RECORD) * _TAR_RECORD


def num_shards_for(num_samples: int, total_bytes: int, max_samples: int, max_bytes: int, fill: float = 0.9) -> int:
    """Hash buckets for a corpus: enough that an average bucket is at `fill` of both limits.

    Args:
        num_samples: samples in the corpus.
        total_bytes: the sum of `sample_nbytes` over them.
        max_samples: `shard_max_samples`.
        max_bytes: `shard_max_bytes`.
        fill: target share of each limit; the slack absorbs the unevenness of hash buckets.
    """
    by_count = num_samples / (max_samples * fill)
    by_bytes = total_bytes / (max_bytes * fill)
    return max(1, math.ceil(max(by_count, by_bytes)))


def shard_of(key: str, num_shards: int) -> int:
    """The bucket of a key: a process-independent hash modulo `num_shards`."""
    return bucket_of(key, num_shards)


def shard_assignment(keys: Iterable[str], num_shards: int) -> dict[str, int]:
    """Key → bucket for many keys (the Beam pipeline buckets with `transforms.common.KeyHashBuckets`: the same hash)."""
    return {k: shard_of(k, num_shards) for k in keys}


def shard_name(bucket: int, part: int = 0) -> str:
    """`cm3-000042.tar` for a bucket's first part, `cm3-000042-001.tar` for its overflow parts."""
    return f"{SHARD_PREFIX}-{bucket:06d}.tar" if part == 0 else f"{SHARD_PREFIX}-{bucket:06d}-{part:03d}.tar"


def split_bucket(samples: Iterable[ShardSample], max_samples: int, max_bytes: int) -> list[list[ShardSample]]:
    """Sort a bucket by key and cut it, greedily in key order, into parts within both limits.

    A single sample bigger than `max_bytes` gets a part of its own.

    Args:
        samples: one bucket's samples, in any order.
        max_samples: most samples per part.
        max_bytes: most bytes per shard file.
    """
    ordered = sorted(samples, key=lambda s: s.key)
    parts: list[list[ShardSample]] = []
    current: list[ShardSample] = []
    size = 0
    for s in ordered:
        n = sample_nbytes(s)
        if current and (len(current) >= max_samples or _archive_bytes(size + n) > max_bytes):
            parts.append(current)
            current, size = [], 0
        current.append(s)
        size += n
    if current:
        parts.append(current)
    return parts


class _HashingWriter:
    """A write-only stream that hashes and counts what passes through to `sink`."""

    def __init__(self, sink):
        self.sink, self.sha, self.nbytes = sink, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.nbytes += len(data)
        return self.sink.write(data)


def write_shard(path: str, samples: Sequence[ShardSample]) -> ManifestRow:
    """Write one WebDataset shard, byte-identical for the same samples in any order.

    Args:
        path: the shard's final path (local or any fsspec URL); written under a temporary name in
            the same folder and renamed, so a reader never sees a partial shard.
        samples: the shard's samples; sorted by key here, keys must be unique.
    """
    ordered = sorted(samples, key=lambda s: s.key)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a.key == b.key:
            raise ValueError(f"duplicate key {a.key!r} in shard {path}")
    tokens = sum(int(np.asarray(s.tokens).size) for s in ordered)
    members = ((f"{s.key}.{ext}", data) for s in ordered for ext, data in sorted(encode_sample(s).items()))
    with atomic_open(path) as f:
        out = _HashingWriter(f)
        write_tar(out, members)
    name = path.rsplit("/", 1)[-1]
    return ManifestRow(name, len(ordered), tokens, out.nbytes, out.sha.hexdigest())


def write_bucket(
    directory: str, bucket: int, samples: Iterable[ShardSample], max_samples: int, max_bytes: int
) -> list[ManifestRow]:
    """Write one hash bucket as `cm3-{bucket:06d}.tar` (plus overflow parts when over a limit).

    Args:
        directory: the shards folder.
        bucket: `shard_of(key, num_shards)` of every sample given.
        samples: the bucket's samples (e.g. the values of a GroupByKey), any order.
        max_samples: `shard_max_samples`.
        max_bytes: `shard_max_bytes`.
    """
    parts = split_bucket(samples, max_samples, max_bytes)
    return [write_shard(f"{directory}/{shard_name(bucket, i)}", part) for i, part in enumerate(parts)]


def write_manifest(directory: str, rows: Iterable[ManifestRow]) -> None:
    """Write `manifest.parquet` (`SHARD_MANIFEST` schema) and `manifest.json` under `directory`.

    Rows are sorted by shard name, so the files do not depend on the order the shards finished.
    """
    ordered = sorted(rows, key=lambda r: r.shard)
    dicts = [asdict(r) for r in ordered]
    write_table(f"{directory}/{MANIFEST_PARQUET}", pa.Table.from_pylist(dicts, schema=SHARD_MANIFEST))
    summary = {
        "schema_version": SCHEMA_VERSION,
        "shards": dicts,
        "total": {f: sum(d[f] for d in dicts) for f in ("samples", "tokens", "bytes")},
    }
    write_bytes(f"{directory}/{MANIFEST_JSON}", (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())


__all__ = [
    "MANIFEST_JSON",
    "MANIFEST_PARQUET",
    "encode_sample",
    "num_shards_for",
    "sample_nbytes",
    "shard_assignment",
    "shard_name",
    "shard_of",
    "split_bucket",
    "write_bucket",
    "write_manifest",
    "write_shard",
]
