"""The record types that flow between pipeline stages.

One small slotted dataclass per stage boundary (datatrove's `Document` is the model): every
stage reads and writes these, never dicts with string keys.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

# Modalities of a document, as written to `embeddings/` and `neighbours/`.
IMAGE_TEXT = "image+text"
IMAGE_ONLY = "image"
TEXT_ONLY = "text"
MODALITIES = (IMAGE_TEXT, IMAGE_ONLY, TEXT_ONLY)

# How records cross a fusion break. Beam's default coder pickles what it does not know, and a pickled
# numpy array costs about 150 bytes of header and a pickled slotted dataclass as much again: for a
# demo document (four 128-wide vectors) that doubled its size, held several times over by an in-process
# runner. Each record therefore reduces to a function and a tuple of plain values, an array to
# (dtype, stored dtype, raw bytes); token ids that fit travel as uint16 (ids stay below 65,536 in every
# vocabulary the build makes but the largest Chameleon ones). Unpacking gives back the same dtype and
# values, so nothing downstream can tell.


_ARRAY = "\x00ndarray"  # marks a packed array among a record's values


def pack_array(v: Any) -> Any:
    """A 1-D numeric array as (marker, dtype, stored dtype, bytes); anything else (None, a list) as it is."""
    if not (isinstance(v, np.ndarray) and v.ndim == 1 and v.dtype.kind in "fiu"):
        return v
    stored = v
    if v.dtype == np.int32 and v.size and v.min() >= 0 and v.max() <= 0xFFFF:
        stored = v.astype("<u2")
    return (_ARRAY, v.dtype.str, stored.dtype.str, stored.tobytes())


def unpack_array(v: Any) -> Any:
    if isinstance(v, tuple) and len(v) == 4 and v[0] == _ARRAY:
        _, dtype, stored, data = v
        return np.frombuffer(data, dtype=stored).astype(dtype)  # a copy that owns its memory
    return v


def packed(record) -> tuple:
    """`__reduce__` of a record dataclass: its class and every field's value, arrays packed."""
    return unpacked, (type(record), *(pack_array(getattr(record, f.name)) for f in fields(record)))


def unpacked(cls, *values):
    return cls(*(unpack_array(v) for v in values))


# The fixed vocabulary of reject reasons. `rejects/*.parquet` holds only these; the `detail`
# column carries the specifics (the exception text, the measured size, ...).
REJECT_REASONS = (
    "image_undecodable",  # not an image, not an allowed format (validate.ALLOWED_FORMATS), truncated, or the decoder failed
    "image_too_large",  # over the pixel or byte budget (decompression bombs land here, undecoded)
    "image_too_small",  # a side below --min_image_side
    "caption_not_utf8",  # caption bytes are not valid UTF-8
    "caption_too_long",  # caption over --max_caption_chars (its member or file over the caption budget)
    "member_too_large",  # a tar member or file that is neither image nor caption (a .json sidecar, a .bin) over its budget
    "sample_too_large",  # one key's tar members together over the sample budget, or too many members
    "duplicate_member",  # two members of one sample give the same part (`k.JPG` beside `k.jpg`): never overwritten
    "empty_example",  # neither a usable image nor a non-empty caption
    "duplicate_key",  # a key seen before; the first occurrence (by source order) is kept
    "unsafe_member",  # symlink, hard link, device, absolute or `..` member name, key with odd characters
    "shard_unreadable",  # a shard that is not a tar or is cut short; whole samples before the damage are kept
    "missing_file",  # a manifest row whose image path does not exist
    "unsupported_url",  # a path whose fsspec protocol is unknown or whose package is not installed (http://, sftp://)
    "not_regular_file",  # a folder or manifest path that is a symlink, FIFO, device or folder: never read
    "bad_manifest_row",  # a manifest row without the configured columns, unparsable, not UTF-8, or over the row budget
    "stage_error",  # an unexpected exception while processing this example in a later stage
)

# Why a valid example was left out of the corpus by a quality filter (`filtered/*.parquet`). Filtered
# examples are a third term of the accounting: read == written + rejected + filtered.
FILTER_REASONS = (
    "low_clip_score",  # image–caption cosine below --min_clip_score; `score` holds the cosine
    "exact_duplicate",  # the same decoded pixels as `duplicate_of`, which comes first in keep order
    "near_duplicate",  # doc embedding within --dedup_threshold of `duplicate_of`; `score` holds the cosine
)


@dataclass(slots=True)
class Example:
    """One validated input document: an image, a caption, or both."""

    key: str  # unique, no dots or slashes (safe for WebDataset keys)
    source: str  # where it came from: "file" or "file::member"
    caption: str | None  # UTF-8 text, stripped; None when absent
    image: bytes | None  # encoded RGB image (original bytes when already plain RGB, else PNG)
    width: int = 0
    height: int = 0
    meta: str = ""  # the sample's JSON sidecar, verbatim (as text), when there is one
    image_hash: str = ""  # hash of the decoded RGB pixels and size (exact-duplicate filter); "" without image

    @property
    def modality(self) -> str:
        if self.image is not None and self.caption:
            return IMAGE_TEXT
        return IMAGE_ONLY if self.image is not None else TEXT_ONLY

    def __reduce__(self):
        return packed(self)


@dataclass(slots=True)
class Reject:
    """One input that did not become an Example, and why."""

    key: str
    source: str
    reason: str  # one of REJECT_REASONS
    detail: str = ""

    def __post_init__(self) -> None:
        if self.reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {self.reason!r}; add it to REJECT_REASONS")


@dataclass(slots=True)
class Filtered:
    """A valid example that a corpus filter left out (`transforms/filters.py`), and why."""

    key: str
    modality: str
    caption: str | None
    reason: str  # one of FILTER_REASONS
    score: float | None = None  # the cosine the decision compared (None for exact duplicates)
    duplicate_of: str | None = None  # the document this one duplicates (earlier in keep order)

    def __post_init__(self) -> None:
        if self.reason not in FILTER_REASONS:
            raise ValueError(f"unknown filter reason {self.reason!r}; add it to FILTER_REASONS")


@dataclass(slots=True)
class RawSample:
    """An undecoded sample as read from an input: the bytes of each part, keyed by extension."""

    key: str
    source: str
    order: tuple = ()  # (file, position) used to pick the first of duplicate keys deterministically
    parts: dict[str, bytes] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)  # parts still to fetch (manifests and folders): name -> URL


@dataclass(slots=True)
class EmbeddedExample:
    """An example's CLIP embeddings (float32, unit norm); a missing part is None."""

    key: str
    caption: str | None
    modality: str  # one of MODALITIES
    image_emb: Any = None  # np.ndarray (D,) or None
    text_emb: Any = None  # np.ndarray (D,) or None
    doc_emb: Any = None  # normalize(mean(image_emb, text_emb)), or the one part there is
    query_text_emb: Any = None  # the caption embedded after query dropout (retrieval's text query)
    image_hash: str = ""  # the Example's decoded-pixel hash, for the exact-duplicate filter

    def __reduce__(self):
        return packed(self)


@dataclass(slots=True)
class Neighbour:
    """One selected neighbour of a query, in the order it will stand in the training sequence."""

    query_key: str
    rank: int
    doc_key: str
    score: float
    via: str  # "image" or "text"
    doc_modality: str

    def __reduce__(self):
        return packed(self)


@dataclass(slots=True)
class RetrievalCounts:
    """One `retrieval_counts` row: what became of one query's candidates (columns of RETRIEVAL_COUNTS).

    candidates == selected + skipped_self + skipped_too_similar + skipped_already_selected
                  + skipped_diversity + skipped_modality + unexamined
    """

    query_key: str
    via: str
    candidates: int = 0
    skipped_self: int = 0
    skipped_too_similar: int = 0
    skipped_already_selected: int = 0
    skipped_diversity: int = 0
    skipped_modality: int = 0
    unexamined: int = 0
    selected: int = 0

    def row(self) -> dict:
        return asdict(self)

    def __reduce__(self):  # class and values: a pickled slotted dataclass is twice the size
        return packed(self)


@dataclass(slots=True)
class TokenizedDoc:
    """A document in the corpus's one id space (see schemas/vocab.py); a missing part is None."""

    key: str
    modality: str
    text_ids: Any = None  # np.ndarray int32 of global text ids, or None
    image_ids: Any = None  # np.ndarray int32 of global image ids, or None

    def __reduce__(self):
        return packed(self)


QUERY = -1  # a segment's doc_index (ShardSample.json `segments`) when it is the query's own


@dataclass(slots=True)
class ShardSample:
    """One training sequence as stored in a shard."""

    key: str  # WebDataset key: no dots, no slashes
    tokens: Any  # (T,) int32 token ids
    json: dict  # per-sample metadata (query key, neighbour keys, spans, ...), JSON-serialisable

    def __reduce__(self):
        return packed(self)


@dataclass(slots=True)
class ManifestRow:
    """One shard's line of the manifest (`schemas.artifacts.SHARD_MANIFEST`)."""

    shard: str  # file name under shards/
    samples: int
    tokens: int
    bytes: int
    sha256: str
