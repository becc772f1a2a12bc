"""Writing and reading files whole: a reader never sees a partial file (any fsspec URL); and input patterns.

Every artifact the build, the trainer and the demo write goes through `atomic_open` (a temporary
name beside the target, renamed into place on success), so a killed or retried task leaves either
the old file or the new one.

`expand_patterns` is the one brace expansion (`{000..009}`, `{a,b}`) and `::` list splitting of
input patterns, shared by the build's inputs (`transforms.lib.read.expand_inputs`) and the trainer's
shards (`model.data.expand_shards`).

Tar archives are written by one deterministic writer (`write_tar`: PAX format, fixed mtime, owner
and mode, members in the order given) and read by one bounded reader (`read_tar`), whose rules
(`BoundedTarInfo`, `tar_members`, `check_tar_tail`, `unsafe_member`) are also those of the build's
reading of untrusted input tars (transforms/lib/read.py).
"""

from __future__ import annotations

import contextlib
import io
import tarfile
import uuid
from collections.abc import Callable, Iterable, Iterator

import braceexpand
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem


@contextlib.contextmanager
def _temporary(path: str):
    """(filesystem, temporary name beside `path`); on success the temporary is renamed onto `path`,
    on failure removed. The name is unique, so a retried or speculative task never shares it."""
    fs, target = fsspec.core.url_to_fs(path)
    if "/" in target:
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
    tmp = f"{target}.tmp-{uuid.uuid4().hex}"
    try:
        yield fs, tmp
        fs.mv(tmp, target)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb", **kwargs):
    """Open `path` (any fsspec URL) for writing under a unique temporary name beside it; on success
    rename it into place, on failure remove it. A reader never sees a partial file, and a retried or
    speculative task never shares a temporary name with another.
    """
    with _temporary(path) as (fs, tmp), fs.open(tmp, mode, **kwargs) as f:
        yield f


@contextlib.contextmanager
def atomic_path(path: str):
    """`atomic_open` for a writer that takes a local path rather than a stream: yields the temporary
    path (`{path}.tmp-{hex}`), renamed onto `path` on success.

    torch.save names the folder inside its zip after the file it is given less its last suffix (a
    stream gives `archive/`): saved here at `ckpt.pt`, a checkpoint holds `ckpt.pt/data.pkl` whatever
    the temporary's random tail, the bytes of the trainer's earlier save to `ckpt.pt.tmp`.
    """
    with _temporary(path) as (fs, tmp):
        if not isinstance(fs, LocalFileSystem):
            raise ValueError(f"{path}: atomic_path writes local files only")
        yield tmp


def write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` (any fsspec URL) through `atomic_open`."""
    with atomic_open(path) as f:
        f.write(data)


# ---------------------------------------------------------------------------------------------
# Tar archives.

TAR_FORMAT = tarfile.PAX_FORMAT  # like USTAR for short ASCII names; long or non-ASCII names still fit
TAR_MTIME = 0  # fixed, so the same members give the same bytes on any machine at any time
MAX_MEMBER_BYTES = 2**30  # `read_tar`'s default bound on one member


def tar_member(name: str, size: int, mode: int = 0o444) -> tarfile.TarInfo:
    """The header of a regular-file member: mtime 0, uid/gid 0, empty user and group names."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, TAR_MTIME, mode
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_tar(f, members: Iterable[tuple[str, bytes]], mode: int = 0o444) -> None:
    """Write a tar of `members` (name, bytes), in the order given, to the binary stream `f`.

    Deterministic: PAX format, `tar_member` headers, the archive padded to whole records; the same
    members in the same order give the same bytes. The stream needs only `write` (a hashing wrapper
    will do). Callers sort the members as their format needs (WebDataset: a sample's members together).
    """
    with tarfile.open(fileobj=f, mode="w|", format=TAR_FORMAT) as tar:
        for name, data in members:
            tar.addfile(tar_member(name, len(data), mode), io.BytesIO(data))


# Extended tar headers (GNU long names, PAX records) are read whole by tarfile before any member is
# seen: a gzipped shard can declare gigabytes there. Real ones are a path or a few records.
MAX_LONG_NAME = 64 * 2**10  # bytes of a GNU long name or long link (PATH_MAX is 4 KiB)
MAX_PAX_HEADER = 2**20  # bytes of one PAX header, and of all global PAX records of a shard together
MAX_HEADER_CHAIN = 8  # extended headers in front of one member (GNU and PAX together are 2 or 3)


class BoundedTarInfo(tarfile.TarInfo):
    """tarfile's header parsing with the extended headers' sizes checked before they are read."""

    def _proc_gnulong(self, tf):
        _check_extended(self, MAX_LONG_NAME, "GNU long-name")
        return _chained(tf, lambda: super(BoundedTarInfo, self)._proc_gnulong(tf))

    def _proc_pax(self, tf):
        _check_extended(self, MAX_PAX_HEADER, "PAX")
        member = _chained(tf, lambda: super(BoundedTarInfo, self)._proc_pax(tf))
        if sum(len(k) + len(v) for k, v in tf.pax_headers.items()) > MAX_PAX_HEADER:
            raise tarfile.ReadError(f"global PAX records over {MAX_PAX_HEADER} bytes")
        return member


def _check_extended(info: tarfile.TarInfo, limit: int, kind: str) -> None:
    if info.size < 0 or info.size > limit:
        raise tarfile.ReadError(f"{kind} header at offset {info.offset} declares {info.size} bytes (limit {limit})")


def _chained(tf, parse):
    """Run `parse` (which reads the next header) one extended header deeper; too deep ends the shard."""
    depth = getattr(tf, "_cm3_header_depth", 0)
    if depth >= MAX_HEADER_CHAIN:
        raise tarfile.ReadError(f"more than {MAX_HEADER_CHAIN} extended headers in a row")
    tf._cm3_header_depth = depth + 1
    try:
        return parse()
    finally:
        tf._cm3_header_depth = depth


def tar_members(tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The archive's members, refusing any header that does not move the read position forward.

    A negative size (base-256 encoded) sends tarfile back to an earlier header, which it would re-read
    forever: phantom samples and growing memory. Such an archive is an error (the build's reader makes
    it a `shard_unreadable` reject).
    """
    last = -1
    while (member := tf.next()) is not None:
        if member.size < 0 or member.offset <= last:
            raise tarfile.ReadError(
                f"header at offset {member.offset} does not move the read position forward (size {member.size})"
            )
        last = member.offset
        yield member


def check_tar_tail(tf: tarfile.TarFile) -> None:
    """tarfile stops quietly at a bad header after the first; make that damage loud.

    A whole archive ends in at least two zero blocks; anything else after the last member means
    it was cut short or corrupted.
    """
    fileobj = tf.fileobj
    fileobj.seek(tf.offset)
    tail = fileobj.read(1024)
    if len(tail) < 1024 or tail.count(0) != len(tail):
        raise tarfile.ReadError(f"no end-of-archive marker at offset {tf.offset} (cut short or corrupted)")


def unsafe_member(member: tarfile.TarInfo) -> str:
    """Why a member must not be read ("" when it may): a link, device or sparse file, or a name that
    could become a path outside wherever it was taken to be (absolute, `..`, control characters).
    """
    if not member.isfile():
        return "not a regular file (link or device)"
    if member.issparse():
        return "a sparse file"
    name = member.name
    if name.startswith("/") or name.startswith("\\") or ".." in name.split("/"):
        return "absolute or parent-relative name"
    if any(ord(c) < 32 for c in name) or "\\" in name:
        return "control character or backslash in name"
    return ""


def read_tar(
    path: str, max_member_bytes: int = MAX_MEMBER_BYTES, keep: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular-file member of the tar at `path` (any fsspec URL), in archive order.

    Read by the rules for untrusted tars: extended headers bounded (`BoundedTarInfo`), every header
    moving forward (`tar_members`), an end-of-archive marker (`check_tar_tail`). A link, device,
    sparse file or unsafe name (`unsafe_member`), or a member over `max_member_bytes`, raises
    `tarfile.ReadError`: member names are only ever returned, never used as paths. Folder entries
    are skipped, and so are, unread, the members whose name `keep` (when given) refuses.
    """
    with fsspec.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:*", tarinfo=BoundedTarInfo) as tf:
        for member in tar_members(tf):
            if member.isdir():
                continue
            if unsafe := unsafe_member(member):
                raise tarfile.ReadError(f"{path}: member {member.name!r}: {unsafe}")
            if member.size > max_member_bytes:
                raise tarfile.ReadError(
                    f"{path}: member {member.name!r} is {member.size} bytes (limit {max_member_bytes})"
                )
            if keep is None or keep(member.name):
                yield member.name, tf.extractfile(member).read(member.size)
        check_tar_tail(tf)


def write_table(path: str, table: pa.Table) -> None:
    """Write `table` to `path` (any fsspec URL) through `atomic_open`."""
    # store_schema=False: pyarrow cannot read back a null fixed-size list from its own stored
    # schema (apache/arrow#35692); the types come back from the artifact schema on read instead,
    # and the artifact name and version travel as plain key-value metadata.
    with atomic_open(path) as f, pq.ParquetWriter(f, table.schema, compression="zstd", store_schema=False) as w:
        w.write_table(table)
        if table.schema.metadata:
            w.add_key_value_metadata(table.schema.metadata)


def read_table(path: str, schema: pa.Schema) -> pa.Table:
    """Read every parquet file under `path` and check it against `schema`."""
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
