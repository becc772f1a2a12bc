"""The Beam side of sharding (the pure pieces live in `transforms/lib/shards.py`).

`WriteShards`: count and size → number of shards (side input) → key-hash buckets → sorted tars + manifest.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.common import KeyHashBuckets
from transforms.lib.sequences import size, sum_pairs
from transforms.lib.shards import num_shards_for, write_bucket, write_manifest


def _write_bucket(keyed, directory: str, max_samples: int, max_bytes: int) -> list:
    bucket, samples = keyed
    rows = write_bucket(directory, bucket, list(samples), max_samples, max_bytes)
    Metrics.counter("write", "examples_written").inc(sum(r.samples for r in rows))
    Metrics.counter("write", "shards").inc(len(rows))
    return rows


def _write_manifest(rows, directory: str) -> str:
    write_manifest(directory, sorted(rows, key=lambda r: r.shard))
    return directory


class WriteShards(beam.PTransform):
    """ShardSamples → `shards/cm3-BBBBBB.tar` + manifest; the shard of a sample follows from its key."""

    def __init__(self, directory: str, max_samples: int, max_bytes: int):
        super().__init__()
        self._directory, self._max_samples, self._max_bytes = directory, max_samples, max_bytes

    def expand(self, samples):
        max_samples, max_bytes = self._max_samples, self._max_bytes
        by_shard, _ = samples | "ByShard" >> KeyHashBuckets(
            lambda t: num_shards_for(t[0], t[1], max_samples, max_bytes), measure=size, add=sum_pairs
        )
        rows = (
            by_shard
            | "Group" >> beam.GroupByKey()
            | "Write" >> beam.FlatMap(_write_bucket, self._directory, self._max_samples, self._max_bytes)
        )
        return rows | "Rows" >> beam.combiners.ToList() | "Manifest" >> beam.Map(_write_manifest, self._directory)
