"""Read every supported input into validated `Example`s, routing each failure to a `Reject`.

Inputs: WebDataset tars (img2dataset output; local paths, globs, `{000..009}` braces, any fsspec
URL), parquet / JSONL / CSV manifests (image path and caption columns configurable; the image
column may also hold the image bytes), and folders of images with `.txt` sidecars.

Archives are untrusted: members are read as bytes and never extracted, a member name never becomes
a filesystem path, links and device members are rejected, and the sizes in the headers are checked
against the budgets before any data is read.

Every input sample ends as exactly one Example or one Reject; a damaged shard adds one
`shard_unreadable` row (keyed by the sample that was being read, if any), so
`examples_read == examples_written + examples_rejected` holds.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import posixpath
import re
import stat
import tarfile
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics

from schemas.records import RawSample, Reject
from transforms import progress
from transforms.validate import IMAGE_PARTS, Budgets, describe_error, safe_key, validate

REJECTED = "rejected"  # tag of the reject output of ReadExamples
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
    import braceexpand
    import fsspec

    units: set[tuple[str, str]] = set()
    for pattern in patterns:
        for expanded in braceexpand.braceexpand(pattern):
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
        yield from read_tar(url, _budgets(cfg))
    elif fmt == "folder":
        yield _folder_sample(url, cfg.caption_ext)
    else:
        yield from read_manifest(url, fmt, cfg.image_column, cfg.caption_column, cfg.key_column, cfg.caption_ext)


def _budgets(cfg) -> Budgets:
    hash_pixels = cfg.dedup_threshold is not None  # only the exact-duplicate filter reads the hash
    return Budgets(cfg.max_image_pixels, cfg.max_image_bytes, cfg.min_image_side, cfg.max_caption_chars, hash_pixels)


def read_tar(url: str, budgets: Budgets) -> Iterator[RawSample | Reject]:
    """Group a tar's members into samples the way webdataset does, without trusting the archive.

    Whole samples before any damage are kept; the damage itself becomes one `shard_unreadable`
    reject, keyed by the sample that was being read when it happened (or empty between samples).
    """
    import fsspec

    current: RawSample | None = None
    problem: tuple[str, str] | None = None  # (reason, detail) that rejects the current sample
    position = 0
    try:
        with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tf:
            for member in _members(tf):
                if member.isdir():  # folder entries are not samples
                    continue
                match = _MEMBER.match(member.name)
                raw_key = match.group(1) if match else member.name
                key = safe_key(raw_key)
                if current is None or key != current.key:
                    if current is not None:
                        yield _finish(current, problem)
                    current = RawSample(key, f"{url}::{raw_key}", (url, position))
                    problem = None
                    position += 1
                unsafe = _unsafe_member(member, match)
                if unsafe:
                    problem = problem or ("unsafe_member", f"{member.name!r}: {unsafe}")
                    continue
                ext = match.group(2).lower()
                limit, reason = _part_budget(budgets, ext in IMAGE_PARTS)
                if member.size > limit:  # decided from the header: the data is never read
                    problem = problem or (reason, f"member {member.name!r} is {member.size} bytes")
                    continue
                current.parts[ext] = tf.extractfile(member).read()
            _check_tail(tf)
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        where = f"{current.key} incomplete: " if current is not None else ""
        yield Reject(current.key if current else "", url, "shard_unreadable", f"{where}{describe_error(e)}")
        return
    if current is not None:
        yield _finish(current, problem)


def _members(tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The archive's members, refusing any header that does not move the read position forward.

    A negative size (base-256 encoded) sends tarfile back to an earlier header, which it would re-read
    forever: phantom samples and growing memory. Such a shard ends as `shard_unreadable`.
    """
    last = -1
    while (member := tf.next()) is not None:
        if member.size < 0 or member.offset <= last:
            raise tarfile.ReadError(
                f"header at offset {member.offset} does not move the read position forward (size {member.size})"
            )
        last = member.offset
        yield member


def _check_tail(tf: tarfile.TarFile) -> None:
    """tarfile stops quietly at a bad header after the first; make that damage loud.

    A whole archive ends in at least two zero blocks; anything else after the last member means
    it was cut short or corrupted.
    """
    fileobj = tf.fileobj
    fileobj.seek(tf.offset)
    tail = fileobj.read(1024)
    if len(tail) < 1024 or tail.count(0) != len(tail):
        raise tarfile.ReadError(f"no end-of-archive marker at offset {tf.offset} (cut short or corrupted)")


def _unsafe_member(member: tarfile.TarInfo, match) -> str:
    if not member.isfile():
        return "not a regular file (link or device)"
    name = member.name
    if name.startswith("/") or name.startswith("\\") or ".." in name.split("/"):
        return "absolute or parent-relative name"
    if any(ord(c) < 32 for c in name) or "\\" in name:
        return "control character or backslash in name"
    if match is None:
        return "no key.extension form"
    return ""


def _finish(sample: RawSample, problem: tuple[str, str] | None) -> RawSample | Reject:
    if problem:
        return Reject(sample.key, sample.source, *problem)
    return sample


def read_manifest(
    url: str, fmt: str, image_column: str, caption_column: str, key_column: str, caption_ext: str = "txt"
) -> Iterator[RawSample | Reject]:
    """One RawSample per manifest row; image paths are resolved against the manifest's folder."""
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    stem = safe_key(posixpath.basename(url).split(".", 1)[0])
    try:
        rows = _manifest_rows(url, fmt)
        for i, row in enumerate(rows):
            source = f"{url}::row {i}"
            if not isinstance(row, dict) or (image_column not in row and caption_column not in row):
                yield Reject(
                    f"{stem}_{i:09d}", source, "bad_manifest_row", f"no {image_column!r} or {caption_column!r}"
                )
                continue
            raw_key = row.get(key_column)
            key = safe_key(str(raw_key)) if raw_key not in (None, "") else f"{stem}_{i:09d}"
            sample = RawSample(key, source, (url, i))
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
                sample.paths["image"] = path if "://" in path or path.startswith("/") else f"{base}/{path}"
            yield sample
    except Exception as e:  # an unparsable manifest: keep the rows before the damage, say where it broke
        yield Reject(stem, url, "bad_manifest_row", f"manifest unreadable: {describe_error(e)}")


def _manifest_rows(url: str, fmt: str) -> Iterator[dict]:
    import fsspec

    if fmt == "parquet":
        import pyarrow.parquet as pq

        with fsspec.open(url, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
                yield from batch.to_pylist()
    elif fmt == "jsonl":
        with fsspec.open(url, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        yield {"__error__": str(e)}
    else:
        with fsspec.open(url, "rt", encoding="utf-8", newline="") as f:
            sample = f.read(4096)
            f.seek(0)
            dialect = csv.excel_tab if url.lower().endswith(".tsv") or "\t" in sample.split("\n", 1)[0] else csv.excel
            yield from csv.DictReader(f, dialect=dialect)


def _folder_sample(stem_url: str, caption_ext: str) -> RawSample:
    """A folder unit: an image and/or a caption file that share a stem."""
    import fsspec

    fs, stem = fsspec.core.url_to_fs(stem_url)
    protocol = stem_url[: len(stem_url) - len(stem)] if stem_url.endswith(stem) else ""
    key = safe_key(posixpath.basename(stem))
    sample = RawSample(key, stem_url, (stem_url, 0))
    for path in sorted(fs.glob(stem + ".*")):
        ext = path.rsplit(".", 1)[1].lower()
        if ext in _FOLDER_EXTS:
            sample.paths.setdefault("image", protocol + path)
        elif ext in (caption_ext, "json"):
            sample.paths[ext] = protocol + path
    return sample


def _part_budget(budgets: Budgets, is_image: bool) -> tuple[int, str]:
    """Bytes one part may hold, and the reason it is rejected with when over."""
    if is_image:
        return budgets.max_image_bytes, "image_too_large"
    return 4 * budgets.max_caption_chars + 2**20, "caption_too_long"


def fetch_parts(sample: RawSample, budgets: Budgets) -> RawSample | Reject:
    """Read the files a manifest row or folder sample names, each read capped at its budget plus one byte.

    Local paths must be regular files: a symlink (to a secret, to `/proc/self/environ`), a FIFO or a
    device is refused as `not_regular_file`, checked on the opened descriptor so nothing can be
    swapped in between. Whatever size a file reports (`/dev/zero` and `/proc` files say 0), no more
    than the budget plus one byte is ever read.
    """
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    for name, url in sorted(sample.paths.items()):
        limit, reason = _part_budget(budgets, name == "image")
        try:
            fs, path = fsspec.core.url_to_fs(url)
            if isinstance(fs, LocalFileSystem):
                data = _read_local_regular(path, limit)
                if isinstance(data, str):
                    return Reject(sample.key, sample.source, "not_regular_file", f"{url}: {data}")
            else:
                size = fs.size(path)
                if size is not None and size > limit:
                    return Reject(sample.key, sample.source, reason, f"{url} is {size} bytes")
                with fs.open(path, "rb") as f:
                    data = f.read(limit + 1)
            if len(data) > limit:
                return Reject(sample.key, sample.source, reason, f"{url} is over {limit} bytes")
            sample.parts[name] = data
        except FileNotFoundError:
            return Reject(sample.key, sample.source, "missing_file", url)
        except OSError as e:
            return Reject(sample.key, sample.source, "missing_file", f"{url}: {describe_error(e)}")
    sample.paths = {}
    return sample


def _read_local_regular(path: str, limit: int) -> bytes | str:
    """At most limit + 1 bytes of a local regular file, or why it is not one (links are not followed)."""
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
        chunks, left = [], limit + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# The Beam side.


class _ReadAndValidate(beam.DoFn):
    """Reads one unit and validates each of its samples; rejects go to the REJECTED output."""

    def __init__(self, cfg, read_ns: str, reject_ns: str, key_prefix: str = ""):
        self._cfg, self._reject_ns, self._prefix = cfg, reject_ns, key_prefix
        self._read = Metrics.counter(read_ns, "examples_read")

    def process(self, unit):
        budgets = _budgets(self._cfg)
        for item in read_unit(unit, self._cfg):
            self._read.inc()
            order = item.order if isinstance(item, RawSample) else ()
            if isinstance(item, RawSample) and item.paths:
                item = fetch_parts(item, budgets)
            if isinstance(item, RawSample):
                item = validate(item, budgets, self._cfg.caption_ext)
            if self._prefix and item.key:
                item = dataclasses.replace(item, key=self._prefix + item.key)
            if isinstance(item, Reject):
                Metrics.counter(self._reject_ns, item.reason).inc()
                progress.note("rejected")
                yield beam.pvalue.TaggedOutput(REJECTED, item)
            else:
                progress.note("read ok")
                yield item.key, (order, item)


def _first_of_duplicates(keyed, reject_ns: str):
    """Keep the first occurrence of a key by source order; the others become duplicate_key rejects."""
    key, examples = keyed
    ordered = sorted(examples, key=lambda e: e[0])
    yield ordered[0][1]
    for _, dup in ordered[1:]:
        Metrics.counter(reject_ns, "duplicate_key").inc()
        yield beam.pvalue.TaggedOutput(
            REJECTED, Reject(key, dup.source, "duplicate_key", f"first: {ordered[0][1].source}")
        )


class ReadExamples(beam.PTransform):
    """Inputs → (PCollection[Example], PCollection[Reject]), each key once.

    Args:
        units: from `expand_inputs`, resolved on the driver.
        cfg: a BuildConfig (columns and budgets).
        counters: namespace prefix of its counters; the run's accounting (`stats.json`) reads the
            default one, so inputs that are not this run's examples (neighbour documents) use another.
        key_prefix: put in front of every key (`--key_prefix`); None takes `cfg.key_prefix`.
    """

    def __init__(self, units: list[tuple[str, str]], cfg, counters: str = "", key_prefix: str | None = None):
        super().__init__()
        self._units = units
        self._cfg = cfg
        self._prefix = cfg.key_prefix if key_prefix is None else key_prefix
        self._read_ns, self._reject_ns = (f"{counters}read", f"{counters}rejected")

    def expand(self, pbegin):
        read = (
            pbegin
            | "Units" >> beam.Create(self._units)
            | "Spread" >> beam.Reshuffle()
            | "ReadValidate"
            >> beam.ParDo(_ReadAndValidate(self._cfg, self._read_ns, self._reject_ns, self._prefix)).with_outputs(
                REJECTED, main="examples"
            )
        )
        unique = (
            read.examples
            | "ByKey" >> beam.GroupByKey()
            | "Dedup" >> beam.FlatMap(_first_of_duplicates, self._reject_ns).with_outputs(REJECTED, main="examples")
        )
        rejects = (read[REJECTED], unique[REJECTED]) | "AllRejects" >> beam.Flatten()
        return unique.examples, rejects
