"""Corpus-level quality filters: CLIP-score filtering and near-duplicate removal.

Web image–caption data is full of captions that do not describe their image and of re-uploads of the
same picture. The embeddings the build already has are what both filters need, so they run between
the embedding stage and the memory bank, in this order:

1. CLIP score (`--min_clip_score S`): an image+text example whose image–caption cosine is below S is
   left out (DataComp and LAION used 0.28 / 0.3 for ViT-B-32 / ViT-L-14 scores). Single-modality
   examples have no pair to score and pass. The scores of every image+text example go into a
   fixed-bin histogram (a Beam combine) that `report.html` plots with S marked, filters on or off.
2. Exact duplicates (with `--dedup_threshold`): examples with the same decoded pixels (the hash
   `transforms.lib.validate.pixel_hash` takes while validating) are grouped by that hash; the first in keep
   order stays.
3. Near duplicates (`--dedup_threshold T`): the survivors are indexed in a scratch bank (the memory
   bank's own `BuildMemoryBank`, under `_staging/`), and each one searches it, 256 queries per faiss
   call, for every document within cosine T (`range_search`). A document is left out when one of them
   comes before it in keep order.

Keep order is (image+text before single-modality, then key hash, then key): it depends on the documents
alone, so every decision is a per-pair rule that no runner, batch or worker count can change. A chain
a–b–c (a~b, b~c, a not ~ c) leaves out both b and c: a decision never waits for another's outcome.
`duplicate_of` names the first document within T; following it through `filtered/` always ends at a
kept document, since every step goes strictly earlier in keep order.

Determinism of the search: a Flat bank's range search takes a BLAS path for big batches and a scalar
one for small, which differ in the last bit, so it searches RANGE_MARGIN below T and rescores each
found pair with faiss's scalar inner product before comparing with T (as retrieval does). An IVF bank
scans one query at a time, so its scores are per pair already; the same limits as retrieval apply
(list choice at the nprobe boundary, CPU SIMD level), and a PQ bank (over 4 GiB of vectors) compares
PQ-approximated cosines.

The Beam stage that applies these rules (and counts, writes and samples what they leave out) is
`transforms/filters.py`.
"""

from __future__ import annotations

import math

import numpy as np

from schemas.records import IMAGE_TEXT, EmbeddedExample, Filtered
from transforms.lib.retrieve import rescore
from transforms.lib.rng import stable_hash

RANGE_MARGIN = 1e-3  # the range search reaches this far below T; the scalar rescore decides
HIST_LO, HIST_BINS = -1.0, 100  # CLIP-score histogram: 100 bins of 0.02 over [-1, 1]
HIST_WIDTH = 2.0 / HIST_BINS


def clip_score(e: EmbeddedExample) -> float | None:
    """The image–caption cosine of an image+text example (its two unit embeddings' inner product)."""
    if e.image_emb is None or e.text_emb is None:
        return None
    return float(np.dot(np.asarray(e.image_emb, np.float64), np.asarray(e.text_emb, np.float64)))


def keep_order(key: str, modality: str) -> tuple[int, int, str]:
    """Sort key of the keep rule: image+text first, then key hash (the key breaks a hash tie)."""
    return (0 if modality == IMAGE_TEXT else 1, stable_hash(key), key)


def split_exact(docs: list[EmbeddedExample]) -> tuple[EmbeddedExample, list[Filtered]]:
    """Of examples with the same decoded pixels, keep the first in keep order; the rest are left out."""
    ordered = sorted(docs, key=lambda e: keep_order(e.key, e.modality))
    first = ordered[0]
    return first, [Filtered(e.key, e.modality, e.caption, "exact_duplicate", None, first.key) for e in ordered[1:]]


def first_earlier(
    key: str, modality: str, found: list[tuple[str, str, float]], threshold: float
) -> tuple[str, float] | None:
    """The document that makes `key` a near duplicate, or None when it is kept.

    Args:
        key: the query document.
        modality: its modality.
        found: (key, modality, cosine) of the documents its search found (itself included or not).
        threshold: T; a document counts when its cosine is at least T.

    Returns:
        (key, cosine) of the first document in keep order within T that comes before `key`.
    """
    own = keep_order(key, modality)
    best = None
    for other, other_modality, score in found:
        if other == key or score < threshold:
            continue
        order = keep_order(other, other_modality)
        if order < own and (best is None or order < best[0]):
            best = (order, other, score)
    return None if best is None else (best[1], best[2])


def histogram_bin(score: float) -> int:
    """The bin of a score: [-1, -0.98) is 0, ..., [0.98, 1] is 99 (1.0 joins the last bin)."""
    return min(HIST_BINS - 1, max(0, math.floor((score - HIST_LO) * HIST_BINS / 2.0)))


def range_search(bank, queries: np.ndarray, threshold: float) -> list[list[tuple[int, float]]]:
    """Every (faiss id, cosine) within `threshold` of each query, with batch-independent cosines.

    A Flat bank is searched RANGE_MARGIN lower and each found pair rescored as retrieval rescores
    (`transforms.lib.retrieve.rescore`: faiss's scalar inner product); an IVF bank's per-query scan scores are kept.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if bank.count == 0 or len(queries) == 0:
        return [[] for _ in queries]
    lims, scores, ids = bank.index.range_search(queries, float(threshold - RANGE_MARGIN))
    lims = lims.astype(np.int64)  # faiss hands back size_t offsets
    counts = np.diff(lims)
    width = int(counts.max()) if len(counts) else 0
    found = np.full((len(queries), max(width, 1)), -1, dtype=np.int64)
    columns = np.arange(len(ids)) - np.repeat(lims[:-1], counts)
    found[np.repeat(np.arange(len(queries)), counts), columns] = ids
    padded = np.full(found.shape, -np.inf, dtype=np.float32)
    padded[found >= 0] = scores
    found, exact, _ = rescore(queries, found, bank, padded)  # retrieval's batch-independent cosines
    return [
        [(int(i), float(s)) for i, s in zip(found[r], exact[r], strict=True) if i >= 0 and s >= threshold]
        for r in range(len(queries))
    ]
