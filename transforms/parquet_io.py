"""Deterministic parquet output: rows land in key-hash buckets, sorted, one file per bucket.

Beam's own `WriteToParquet` names and fills files by how the runner cut the data into bundles,
so two runs can differ byte for byte. Here the file a row lands in and its place in the file
follow from its sort key alone; each file is written under a temporary name and renamed.
"""

from __future__ import annotations

from collections.abc import Callable

import apache_beam as beam
import pyarrow as pa

from transforms.common import KeyHashBuckets
from transforms.lib.io import write_table

ROWS_PER_FILE = 50_000  # when the file count follows the row count: bounds what one worker sorts and holds


def _num_files(count: int, fixed: int | None, rows_per_file: int) -> int:
    return fixed or max(1, -(-count // rows_per_file))


class WriteSortedParquet(beam.PTransform):
    """PCollection[record] → `{directory}/{prefix}-BBBBB-of-NNNNN.parquet`, deterministic bytes.

    Args:
        directory: output folder (fsspec URL).
        schema: the artifact's explicit pyarrow schema.
        to_rows: record → list of row dicts matching `schema`.
        sort_key: record → string; decides the bucket and the order within it.
        num_buckets: files to spread the rows over; None: one file per `rows_per_file` records,
            from the record count (the same input always gives the same files).
        prefix: file name prefix.
        rows_per_file: records a file holds at most on average when `num_buckets` is None.
    """

    def __init__(
        self,
        directory: str,
        schema: pa.Schema,
        to_rows: Callable,
        sort_key: Callable,
        num_buckets: int | None = None,
        prefix: str = "part",
        rows_per_file: int = ROWS_PER_FILE,
    ):
        super().__init__()
        self._directory, self._schema, self._to_rows = directory, schema, to_rows
        self._sort_key, self._n, self._prefix, self._rows_per_file = sort_key, num_buckets, prefix, rows_per_file

    def expand(self, pcoll):
        sort_key, fixed, rows_per_file = self._sort_key, self._n, self._rows_per_file
        keyed, n = pcoll | "Buckets" >> KeyHashBuckets(
            lambda count: _num_files(count, fixed, rows_per_file), key=sort_key, value=lambda r: (sort_key(r), r)
        )
        # Every bucket gets a file, empty or not, so readers always find the artifact and reruns
        # always write the same set of names.
        every_bucket = n | "EveryBucket" >> beam.FlatMap(lambda k: [(b, None) for b in range(k)])
        return (
            (keyed, every_bucket)
            | "All" >> beam.Flatten()
            | "Group" >> beam.GroupByKey()
            | "Write" >> beam.Map(self._write, beam.pvalue.AsSingleton(n))
        )

    def _write(self, grouped: tuple, n: int) -> str:
        bucket, keyed = grouped
        present = [kr for kr in keyed if kr is not None]
        rows = [row for _, record in sorted(present, key=lambda kr: kr[0]) for row in self._to_rows(record)]
        path = f"{self._directory}/{self._prefix}-{bucket:05d}-of-{n:05d}.parquet"
        write_table(path, pa.Table.from_pylist(rows, schema=self._schema))
        return path
