"""Explicit pyarrow schemas, one per artifact of the output directory.

Every writer passes these and every reader checks against them; nothing infers a schema from the
first record. Bump SCHEMA_VERSION when a column changes meaning or type.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1"


def _versioned(name: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={"cm3corpus.artifact": name, "cm3corpus.schema_version": SCHEMA_VERSION})


REJECTS = _versioned(
    "rejects",
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
    ],
)


def embeddings_schema(dim: int) -> pa.Schema:
    """`embeddings/*.parquet`: one row per kept example; missing parts are null. float16 keeps it compact."""
    vec = pa.list_(pa.float16(), dim)
    return _versioned(
        "embeddings",
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("caption", pa.string()),
            pa.field("modality", pa.string(), nullable=False),
            pa.field("image_emb", vec),
            pa.field("text_emb", vec),
            pa.field("doc_emb", vec, nullable=False),
        ],
    )


MEMORY_BANK_IDS = _versioned(
    "memory_bank_ids",
    [
        pa.field("faiss_id", pa.int64(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("modality", pa.string(), nullable=False),
    ],
)

NEIGHBOURS = _versioned(
    "neighbours",
    [
        pa.field("query_key", pa.string(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),  # 0-based order in the training sequence
        pa.field("doc_key", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),  # inner product with the query that found it
        pa.field("via", pa.string(), nullable=False),  # "image" or "text"
        pa.field("doc_modality", pa.string(), nullable=False),
    ],
)

# Per query and via: how many candidates each rule skipped, and how many were selected; the columns
# add up: candidates == selected + skipped_* + unexamined.
RETRIEVAL_COUNTS = _versioned(
    "retrieval_counts",
    [
        pa.field("query_key", pa.string(), nullable=False),
        pa.field("via", pa.string(), nullable=False),
        pa.field("candidates", pa.int32(), nullable=False),
        pa.field("skipped_self", pa.int32(), nullable=False),
        pa.field("skipped_too_similar", pa.int32(), nullable=False),
        pa.field("skipped_already_selected", pa.int32(), nullable=False),
        pa.field("skipped_diversity", pa.int32(), nullable=False),
        pa.field("skipped_modality", pa.int32(), nullable=False),
        pa.field("unexamined", pa.int32(), nullable=False),  # not looked at: the quota was already full
        pa.field("selected", pa.int32(), nullable=False),
    ],
)

SHARD_MANIFEST = _versioned(
    "shard_manifest",
    [
        pa.field("shard", pa.string(), nullable=False),  # file name under shards/
        pa.field("samples", pa.int64(), nullable=False),
        pa.field("tokens", pa.int64(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
    ],
)

# One row per example a corpus filter left out (transforms/filters.py); reason is one of
# records.FILTER_REASONS. `score`: the image–caption cosine (low_clip_score) or the doc-embedding
# cosine with `duplicate_of` (near_duplicate); null for exact duplicates. `duplicate_of` comes first
# in keep order; following it through this table always ends at a kept document.
FILTERED = _versioned(
    "filtered",
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("modality", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("score", pa.float32()),
        pa.field("duplicate_of", pa.string()),
    ],
)

ALL = {
    "rejects": REJECTS,
    "memory_bank_ids": MEMORY_BANK_IDS,
    "neighbours": NEIGHBOURS,
    "retrieval_counts": RETRIEVAL_COUNTS,
    "shard_manifest": SHARD_MANIFEST,
    "filtered": FILTERED,
}
