"""Read every supported input into raw samples, routing what cannot be read to a `Reject`.

Inputs: WebDataset tars (img2dataset output; local paths, globs, `{000..009}` braces, any fsspec
URL), parquet / JSONL / CSV manifests (image path and caption columns configurable; the image
column may also hold the image bytes), and folders of images with `.txt` sidecars.

Archives are untrusted: members are read as bytes and never extracted, a member name never becomes
a filesystem path, links, devices and sparse members are rejected, the sizes in the headers (extended
GNU and PAX headers included) are checked against the budgets before any data is read, and every
read of a file or manifest row is capped at its budget plus one byte.

Every input sample ends as exactly one RawSample or one Reject; a damaged shard adds one
`shard_unreadable` row (keyed by the sample that was being read, if any). The Beam side
(`transforms/read.py`) validates the samples and keeps each key once.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import posixpath
import re
import stat
import tarfile
from collections.abc import Iterator

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from schemas.records import RawSample, Reject
from transforms.lib.io import BoundedTarInfo, check_tar_tail, expand_patterns, tar_members, unsafe_member
from transforms.lib.validate import IMAGE_PARTS, Budgets, describe_error, printable, safe_key

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_MANIFEST_SUFFIXES = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "csv"}
_FOLDER_EXTS = set(IMAGE_PARTS) - {"image"}
# webdataset's grouping rule: the key is everything before the first dot of the base name.
_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")


# ---------------------------------------------------------------------------------------------
# Finding the inputs (on the driver, so a pattern that matches nothing fails at once and clearly).


def expand_inputs(patterns: tuple[str, ...], input_format: str = "auto") -> list[tuple[str, str]]:
    """Resolve input patterns into `(format, url)` units of work.

    Args:
        patterns: paths, globs, brace patterns or fsspec URLs; a folder stands for the tars in it,
            or, when it holds none, for its images and `.txt` sidecars.
        input_format: `auto` picks the format from each file's suffix.

    Returns:
        Sorted, de-duplicated units. A folder of images yields one unit per file stem.

    Raises:
        FileNotFoundError: a pattern matched nothing.
        ValueError: a file's format cannot be told from its suffix.
    """
    units: set[tuple[str, str]] = set()
    for expanded in expand_patterns(patterns):
        fs, path = fsspec.core.url_to_fs(expanded)
        protocol = expanded.split("://", 1)[0] + "://" if "://" in expanded else ""
        if fs.isdir(path):
            units.update(_expand_folder(fs, path, protocol, input_format))
            continue
        matches = sorted(fs.glob(path)) if any(c in path for c in "*?[") else ([path] if fs.exists(path) else [])
        if not matches:
            raise FileNotFoundError(f"input {expanded!r} matches no file")
        for match in matches:
            units.add((_format_of(match, input_format), protocol + match))
    return sorted(units)


def _format_of(path: str, input_format: str) -> str:
    if input_format not in ("auto", "folder"):
        return input_format
    lower = path.lower()
    if lower.endswith(_TAR_SUFFIXES):
        return "webdataset"
    for suffix, fmt in _MANIFEST_SUFFIXES.items():
        if lower.endswith(suffix):
            return fmt
    raise ValueError(f"cannot tell the format of {path!r}; pass --input_format (webdataset|parquet|jsonl|csv)")


def _expand_folder(fs, path: str, protocol: str, input_format: str) -> set[tuple[str, str]]:
    files = sorted(fs.find(path))
    tars = [f for f in files if f.lower().endswith(_TAR_SUFFIXES)]
    if tars and input_format in ("auto", "webdataset"):
        return {("webdataset", protocol + f) for f in tars}
    # A folder of images with sidecars: one unit per stem, named by the stem's path.
    stems = {f.rsplit(".", 1)[0] for f in files if "." in posixpath.basename(f)}
    if not stems:
        raise FileNotFoundError(f"folder {path!r} holds no tars, images or captions")
    return {("folder", protocol + s) for s in stems}


# ---------------------------------------------------------------------------------------------
# Reading one unit into raw samples (and rejects for what cannot even be grouped into a sample).


def read_unit(unit: tuple[str, str], cfg) -> Iterator[RawSample | Reject]:
    """Read one input unit; `cfg` carries the column names and budgets (a BuildConfig)."""
    fmt, url = unit
    if fmt == "webdataset":
        yield from read_tar(url, _budgets(cfg), cfg.caption_ext)
    elif fmt == "folder":
        yield _folder_sample(url, cfg.caption_ext)
    else:
        yield from read_manifest(
            url, fmt, cfg.image_column, cfg.caption_column, cfg.key_column, cfg.caption_ext, _budgets(cfg)
        )


def _budgets(cfg) -> Budgets:
    hash_pixels = cfg.dedup_threshold is not None  # only the exact-duplicate filter reads the hash
    return Budgets(cfg.max_image_pixels, cfg.max_image_bytes, cfg.min_image_side, cfg.max_caption_chars, hash_pixels)


MAX_MEMBERS_PER_SAMPLE = 64  # img2dataset writes 3


def used_parts(caption_ext: str) -> frozenset[str]:
    """The member extensions validation reads; any other member is counted, never kept."""
    return frozenset(IMAGE_PARTS) | {caption_ext, "json"}


def read_tar(url: str, budgets: Budgets, caption_ext: str = "txt") -> Iterator[RawSample | Reject]:
    """Group a tar's members into samples the way webdataset does, without trusting the archive.

    Members are grouped by their raw key (`a b` and `a_b` are two samples, even though both reduce
    to the key `a_b`: the later is then a `duplicate_key`); two members giving one part (`k.JPG`
    beside `k.jpg`) reject the sample as `duplicate_member`, never overwrite each other. Members
    nothing reads (`.bin`, `.cls`) are counted against the sample's budget and skipped unread.
    Whole samples before any damage are kept; the damage itself becomes one `shard_unreadable`
    reject, keyed by the sample that was being read when it happened (or empty between samples).
    """
    used = used_parts(caption_ext)
    sample_limit = _sample_budget(budgets)
    current: RawSample | None = None
    current_raw = None
    problem: tuple[str, str] | None = None  # (reason, detail) that rejects the current sample
    total = members = 0
    position = 0
    shown = printable(url)
    try:
        with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:*", tarinfo=BoundedTarInfo) as tf:
            for member in tar_members(tf):
                if member.isdir():  # folder entries are not samples
                    continue
                match = _MEMBER.match(member.name)
                raw_key = match.group(1) if match else member.name
                if current is None or raw_key != current_raw:
                    if current is not None:
                        yield _finish(current, problem)
                    current = RawSample(safe_key(raw_key), f"{shown}::{printable(raw_key)}", (url, position))
                    current_raw, problem, total, members = raw_key, None, 0, 0
                    position += 1
                if problem:  # the sample is rejected already: read nothing more of it
                    continue
                name = printable(member.name)
                unsafe = _unsafe_member(member, match)
                if unsafe:
                    problem = ("unsafe_member", f"{name!r}: {unsafe}")
                    continue
                ext = match.group(2).lower()
                members += 1
                limit, reason = _part_budget(budgets, ext, caption_ext)
                if members > MAX_MEMBERS_PER_SAMPLE:
                    problem = ("sample_too_large", f"more than {MAX_MEMBERS_PER_SAMPLE} members")
                elif ext in current.parts:
                    problem = ("duplicate_member", f"{name!r} gives part {ext!r} a second time")
                elif member.size > limit and ext != caption_ext:  # decided from the header: never read
                    problem = (reason, f"member {name!r} is {member.size} bytes (limit {limit})")
                elif total + member.size > sample_limit:  # a white-space caption too: its scan stays in budget
                    problem = ("sample_too_large", f"members total over {sample_limit} bytes at {name!r}")
                elif ext in used:
                    data = _read_capped(tf.extractfile(member).read, limit, ext == caption_ext, sample_limit)
                    if data is None:
                        problem = (reason, f"member {name!r} is {member.size} bytes (limit {limit})")
                    else:
                        current.parts[ext] = data
                        total += len(data)
                else:
                    total += member.size
            check_tar_tail(tf)
    except (tarfile.TarError, OSError, EOFError, ValueError, RecursionError) as e:
        where = f"{current.key} incomplete: " if current is not None else ""
        yield Reject(current.key if current else "", shown, "shard_unreadable", f"{where}{describe_error(e)}")
        return
    if current is not None:
        yield _finish(current, problem)


def _sample_budget(budgets: Budgets) -> int:
    """The most bytes one sample's parts may hold together (tar members, or a white-space caption's scan)."""
    return budgets.max_image_bytes + 2 * _text_budget(budgets)


def _read_capped(read, limit: int, caption: bool, scan_limit: int = 0) -> bytes | None:
    """At most `limit` bytes through `read(n)`, or None when there are more.

    A caption that is only white space is no caption, at any length up to `scan_limit` (the sample
    budget): past `limit` its rest is scanned a chunk at a time (never held) and, when it is all white
    space, it reads as empty. The scan stops at `scan_limit`, so a compressed stream of spaces costs
    a bounded read, never its whole decompressed size.
    """
    data = read(limit + 1)
    if len(data) <= limit:
        return data
    if not caption or data.strip():
        return None
    scanned = len(data)
    while scanned <= scan_limit and (chunk := read(min(1 << 20, scan_limit + 1 - scanned))):
        if chunk.strip():
            return None
        scanned += len(chunk)
    return b"" if scanned <= scan_limit else None


def _unsafe_member(member: tarfile.TarInfo, match) -> str:
    if unsafe := unsafe_member(member):
        return unsafe
    if match is None:
        return "no key.extension form"
    return ""


def _finish(sample: RawSample, problem: tuple[str, str] | None) -> RawSample | Reject:
    if problem:
        return Reject(sample.key, sample.source, *problem)
    return sample


def read_manifest(
    url: str,
    fmt: str,
    image_column: str,
    caption_column: str,
    key_column: str,
    caption_ext: str = "txt",
    budgets: Budgets | None = None,
) -> Iterator[RawSample | Reject]:
    """One RawSample or Reject per manifest row; image paths are resolved against the manifest's folder.

    A row that cannot be parsed (not UTF-8, a lone surrogate, nesting too deep for the parser, a line
    or CSV field over the row budget, a cell over its budget) is one `bad_manifest_row` (or the
    budget's reason), and the rows after it are read on: one bad row never hides another.
    """
    budgets = budgets or Budgets()
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    stem = safe_key(posixpath.basename(url).split(".", 1)[0])
    shown = printable(url)
    i = -1
    try:
        for i, row in enumerate(_manifest_rows(url, fmt, budgets, (image_column, caption_column))):
            key = f"{stem}_{i:09d}"
            source = f"{shown}::row {i}"
            if isinstance(row, Reject):  # the reader's own verdict on this row
                yield Reject(key, source, row.reason, row.detail)
                continue
            try:
                yield _row_sample(
                    row, key, source, (url, i), base, image_column, caption_column, key_column, caption_ext
                )
            except Exception as e:  # a cell of an unexpected type or content: this row only
                yield Reject(key, source, "bad_manifest_row", describe_error(e))
    except Exception as e:  # an unparsable manifest: keep the rows before the damage, say where it broke
        yield Reject(stem, shown, "bad_manifest_row", f"manifest unreadable after row {i}: {describe_error(e)}")


def _row_sample(
    row, key, source, order, base, image_column, caption_column, key_column, caption_ext
) -> RawSample | Reject:
    if not isinstance(row, dict) or (image_column not in row and caption_column not in row):
        return Reject(key, source, "bad_manifest_row", f"no {image_column!r} or {caption_column!r}")
    raw_key = row.get(key_column)
    if raw_key not in (None, ""):
        key = safe_key(str(raw_key))
    sample = RawSample(key, source, order)
    caption = row.get(caption_column)
    if caption is not None:
        sample.parts[caption_ext] = caption if isinstance(caption, bytes) else str(caption).encode("utf-8")
    image = row.get(image_column)
    if isinstance(image, dict):  # HF datasets store images as {"bytes": ..., "path": ...}
        image = image.get("bytes") or image.get("path")
    if isinstance(image, bytes):
        sample.parts["image"] = image
    elif image:
        path = str(image)
        path.encode("utf-8")  # a lone surrogate is no path
        sample.paths["image"] = path if "://" in path or path.startswith("/") else f"{base}/{path}"
    return sample


def _text_budget(budgets: Budgets) -> int:
    return 4 * budgets.max_caption_chars + 2**20


def _row_budget(budgets: Budgets) -> int:
    """Bytes one JSONL line or CSV row may take: a caption escaped six bytes a character, and paths."""
    return 6 * budgets.max_caption_chars + 2**20


_PARQUET_BATCH_BYTES = 16 * 2**20  # uncompressed bytes a parquet batch holds, about


def _manifest_rows(url: str, fmt: str, budgets: Budgets, columns: tuple[str, str]) -> Iterator[dict | Reject]:
    if fmt == "parquet":
        with fsspec.open(url, "rb") as f:
            yield from _parquet_rows(f, budgets, columns)
        return
    limit = _row_budget(budgets)
    with fsspec.open(url, "rb") as f:
        if fmt == "jsonl":
            for line in _bounded_lines(f, limit):
                if line is None:
                    yield Reject("", "", "bad_manifest_row", f"line over {limit} bytes")
                elif line.strip():
                    yield _json_row(line)
        else:
            yield from _csv_rows(f, limit, url.lower().endswith(".tsv"))


def _bounded_lines(f, limit: int) -> Iterator[bytes | None]:
    """The lines of a binary file, each read to `limit` bytes at most; an over-long one is None."""
    while line := f.readline(limit + 1):
        if len(line) > limit and not line.endswith(b"\n"):
            while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
            yield None
        else:
            yield line


def _json_row(line: bytes) -> dict | Reject:
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        return Reject("", "", "bad_manifest_row", f"not UTF-8: {e}")
    except RecursionError:
        return Reject("", "", "bad_manifest_row", "nested too deep to parse")
    except ValueError as e:
        return Reject("", "", "bad_manifest_row", f"not JSON: {e}")
    if not isinstance(row, dict):
        return Reject("", "", "bad_manifest_row", f"a JSON {type(row).__name__}, not an object")
    return row


def _csv_rows(f, limit: int, tsv: bool) -> Iterator[dict | Reject]:
    """CSV rows; a row with a field over the parser's limit, a line over `limit` or bytes that are not
    UTF-8 is rejected and the reader goes on with the next row."""
    overlong: set[int] = set()

    def lines():
        for n, line in enumerate(_bounded_lines(f, limit), 1):
            if line is None:
                overlong.add(n)
                yield "\x00\n"  # stands for the line, so the row it belongs to is still a row
            else:
                yield line.decode("utf-8", "surrogateescape")

    text = lines()
    first = next(text, "")
    dialect = csv.excel_tab if tsv or "\t" in first else csv.excel
    reader = csv.DictReader(itertools.chain([first], text), dialect=dialect)
    last_line = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            last_line = reader.reader.line_num
            yield Reject("", "", "bad_manifest_row", f"CSV: {e}")
            continue
        span = range(last_line + 1, reader.reader.line_num + 1)
        last_line = reader.reader.line_num
        if any(n in overlong for n in span):
            yield Reject("", "", "bad_manifest_row", f"line over {limit} bytes")
            continue
        try:
            for value in row.values():
                if isinstance(value, str):
                    value.encode("utf-8")
        except UnicodeEncodeError as e:
            yield Reject("", "", "bad_manifest_row", f"not UTF-8: {e}")
            continue
        yield row


def _parquet_rows(f, budgets: Budgets, columns: tuple[str, str]) -> Iterator[dict | Reject]:
    """Parquet rows in batches of about `_PARQUET_BATCH_BYTES` (at least one row), through a buffered
    stream so a column chunk is never read whole; a binary or string cell over its budget rejects its
    row only, and is never copied out of Arrow."""
    pf = pq.ParquetFile(f, buffer_size=2**20, pre_buffer=False)
    meta = pf.metadata
    rows = max(1, meta.num_rows)
    row_bytes = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)) / rows
    batch_size = int(max(1, min(1024, _PARQUET_BATCH_BYTES // max(1.0, row_bytes))))
    image_column, caption_column = columns
    for batch in pf.iter_batches(batch_size=batch_size, use_threads=False):
        over: dict[int, tuple[str, str]] = {}  # row -> (reason, detail)
        arrays = []
        for name, col in zip(batch.schema.names, batch.columns, strict=True):
            sizes = col
            if pa.types.is_struct(col.type) and col.type.get_field_index("bytes") >= 0:
                sizes = pc.struct_field(col, "bytes")
            if (
                pa.types.is_binary(sizes.type)
                or pa.types.is_string(sizes.type)
                or pa.types.is_large_binary(sizes.type)
                or pa.types.is_large_string(sizes.type)
            ):
                limit = budgets.max_image_bytes if name == image_column else _text_budget(budgets)
                lengths = pc.binary_length(sizes).to_pylist()
                bad = [j for j, n in enumerate(lengths) if n is not None and n > limit]
                for j in bad:
                    reason = {image_column: "image_too_large", caption_column: "caption_too_long"}.get(
                        name, "member_too_large"
                    )
                    over.setdefault(j, (reason, f"column {name!r} holds {lengths[j]} bytes (limit {limit})"))
                if bad:
                    mask = pa.array([j in over for j in range(len(col))])
                    col = pc.if_else(mask, pa.nulls(len(col), col.type), col)
            arrays.append(col)
        for j, row in enumerate(pa.Table.from_arrays(arrays, names=batch.schema.names).to_pylist()):
            if j in over:
                yield Reject("", "", *over[j])
            else:
                yield row


def _folder_sample(stem_url: str, caption_ext: str) -> RawSample:
    """A folder unit: an image and/or a caption file that share a stem."""
    fs, stem = fsspec.core.url_to_fs(stem_url)
    protocol = stem_url[: len(stem_url) - len(stem)] if stem_url.endswith(stem) else ""
    key = safe_key(posixpath.basename(stem))
    sample = RawSample(key, printable(stem_url), (stem_url, 0))
    for path in sorted(fs.glob(stem + ".*")):
        ext = path.rsplit(".", 1)[1].lower()
        if ext in _FOLDER_EXTS:
            sample.paths.setdefault("image", protocol + path)
        elif ext in (caption_ext, "json"):
            sample.paths[ext] = protocol + path
    return sample


def _part_budget(budgets: Budgets, part: str, caption_ext: str = "txt") -> tuple[int, str]:
    """Bytes one part (a tar member's extension, a file's role) may hold, and the reason when over.

    An image part has the image budget; a caption, the caption budget; anything else (a `.json`
    sidecar, a `.bin` nothing reads) is `member_too_large` over the caption budget, or over the
    image budget when nothing reads it (it is counted, never held).
    """
    if part in IMAGE_PARTS:
        return budgets.max_image_bytes, "image_too_large"
    if part == caption_ext:
        return _text_budget(budgets), "caption_too_long"
    if part == "json":
        return _text_budget(budgets), "member_too_large"
    return budgets.max_image_bytes, "member_too_large"


def fetch_parts(sample: RawSample, budgets: Budgets, caption_ext: str = "txt") -> RawSample | Reject:
    """Read the files a manifest row or folder sample names, each read capped at its budget plus one byte.

    Local paths must be regular files: a symlink (to a secret, to `/proc/self/environ`), a FIFO or a
    device is refused as `not_regular_file`, checked on the opened descriptor so nothing can be
    swapped in between. Whatever size a file reports (`/dev/zero` and `/proc` files say 0), no more
    than the budget plus one byte is ever read (a white-space caption is scanned on, never held). A
    URL whose fsspec protocol is unknown or not installed (`http://` without aiohttp) is
    `unsupported_url`.
    """
    for name, url in sorted(sample.paths.items()):
        limit, reason = _part_budget(budgets, name, caption_ext)
        caption = name == caption_ext
        shown = printable(url)
        try:
            try:
                fs, path = fsspec.core.url_to_fs(url)
            except (ImportError, ValueError) as e:
                protocol = url.split("://", 1)[0] if "://" in url else "file"
                return Reject(
                    sample.key, sample.source, "unsupported_url", f"{shown}: {protocol}:// {describe_error(e)}"
                )
            if isinstance(fs, LocalFileSystem):
                data = _read_local_regular(path, limit, caption, _sample_budget(budgets))
                if isinstance(data, str):
                    return Reject(sample.key, sample.source, "not_regular_file", f"{shown}: {data}")
            else:
                size = fs.size(path)
                if size is not None and size > limit and not caption:
                    return Reject(sample.key, sample.source, reason, f"{shown} is {size} bytes")
                with fs.open(path, "rb") as f:
                    data = _read_capped(f.read, limit, caption, _sample_budget(budgets))
            if data is None:
                return Reject(sample.key, sample.source, reason, f"{shown} is over {limit} bytes")
            sample.parts[name] = data
        except FileNotFoundError:
            return Reject(sample.key, sample.source, "missing_file", shown)
        except OSError as e:
            return Reject(sample.key, sample.source, "missing_file", f"{shown}: {describe_error(e)}")
    sample.paths = {}
    return sample


def _read_local_regular(path: str, limit: int, caption: bool = False, scan_limit: int = 0) -> bytes | str | None:
    """At most limit bytes of a local regular file (None when it holds more), or why it is not one
    (links are not followed)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        if os.path.islink(path):
            return "a symbolic link"
        raise
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISFIFO(mode):
            return "a FIFO"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            return "a device"
        if not stat.S_ISREG(mode):
            return "not a file"

        def read(n: int) -> bytes:
            chunks, left = [], n
            while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
                chunks.append(chunk)
                left -= len(chunk)
            return b"".join(chunks)

        return _read_capped(read, limit, caption, scan_limit)
    finally:
        os.close(fd)
