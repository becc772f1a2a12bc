"""Deterministic parquet output: rows land in key-hash buckets, sorted, one file per bucket.

Beam's own `WriteToParquet` names and fills files by how the runner cut the data into bundles,
so two runs can differ byte for byte. Here the file a row lands in and its place in the file
follow from its sort key alone; each file is written under a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import apache_beam as beam
import pyarrow as pa

from transforms.rng import stable_hash


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb", **kwargs):
    """Open `path` (any fsspec URL) for writing under a unique temporary name beside it; on success
    rename it into place, on failure remove it. A reader never sees a partial file, and a retried or
    speculative task never shares a temporary name with another.
    """
    import uuid

    import fsspec

    fs, target = fsspec.core.url_to_fs(path)
    if "/" in target:
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
    tmp = f"{target}.tmp-{uuid.uuid4().hex}"
    try:
        with fs.open(tmp, mode, **kwargs) as f:
            yield f
        fs.mv(tmp, target)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` (any fsspec URL) through `atomic_open`."""
    with atomic_open(path) as f:
        f.write(data)


def write_table(path: str, table: pa.Table) -> None:
    """Write `table` to `path` (any fsspec URL) through `atomic_open`."""
    import pyarrow.parquet as pq

    # store_schema=False: pyarrow cannot read back a null fixed-size list from its own stored
    # schema (apache/arrow#35692); the types come back from the artifact schema on read instead,
    # and the artifact name and version travel as plain key-value metadata.
    with atomic_open(path) as f, pq.ParquetWriter(f, table.schema, compression="zstd", store_schema=False) as w:
        w.write_table(table)
        if table.schema.metadata:
            w.add_key_value_metadata(table.schema.metadata)


def read_table(path: str, schema: pa.Schema) -> pa.Table:
    """Read every parquet file under `path` and check it against `schema`."""
    import fsspec
    import pyarrow.parquet as pq

    fs, root = fsspec.core.url_to_fs(path)
    files = sorted(f for f in fs.find(root) if f.endswith(".parquet")) if fs.exists(root) else []
    tables = []
    for f in files:
        table = pq.read_table(fs.open(f, "rb"))
        if table.schema.names != schema.names:
            raise ValueError(f"{f} has columns {table.schema.names}, the artifact schema {schema.names}")
        tables.append(table.cast(schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()


ROWS_PER_FILE = 50_000  # when the file count follows the row count: bounds what one worker sorts and holds


def _num_files(count: int, fixed: int | None, rows_per_file: int) -> int:
    return fixed or max(1, -(-count // rows_per_file))


def _bucketed(record, sort_key: Callable, n: int):
    key = sort_key(record)
    return stable_hash(key) % n, (key, record)


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
        count = pcoll | "Count" >> beam.combiners.Count.Globally()
        n = count | "NumFiles" >> beam.Map(_num_files, self._n, self._rows_per_file)
        # Every bucket gets a file, empty or not, so readers always find the artifact and reruns
        # always write the same set of names.
        every_bucket = n | "EveryBucket" >> beam.FlatMap(lambda k: [(b, None) for b in range(k)])
        keyed = pcoll | "Bucket" >> beam.Map(_bucketed, self._sort_key, beam.pvalue.AsSingleton(n))
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
