"""Writing and reading files whole: a reader never sees a partial file (any fsspec URL); and input patterns.

Every artifact the build, the trainer and the demo write goes through `atomic_open` (a temporary
name beside the target, renamed into place on success), so a killed or retried task leaves either
the old file or the new one.

`expand_patterns` is the one brace expansion (`{000..009}`, `{a,b}`) and `::` list splitting of
input patterns, shared by the build's inputs (`transforms.lib.read.expand_inputs`) and the trainer's
shards (`model.data.expand_shards`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import braceexpand
import pyarrow as pa


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


def expand_patterns(patterns: Iterable[str], separator: str | None = None) -> Iterator[str]:
    """Each pattern's brace expansions (`cm3-{000..009}.tar`, `{train,val}.jsonl`), in order.

    Args:
        patterns: paths, globs or URLs; globs are left to the caller, which knows its filesystem.
        separator: when given (`::`), each pattern is first split into a list of patterns at it.
    """
    for pattern in patterns:
        for part in pattern.split(separator) if separator else (pattern,):
            yield from braceexpand.braceexpand(part)
