"""RA-CM3 retrieval: each example queries the memory bank with its image and its (dropped-out) caption.

Rules (docs/design.md, from RA-CM3 §3.2 and CM3Leon §2.2), applied per query to the candidates of each
via in score order; every candidate ends in exactly one count of `RETRIEVAL_COUNTS`:

1. self: the query's own document (same key) is skipped.
2. too similar: a score above `max_similarity` (0.9) is a near-duplicate of the query; skipped.
   The same threshold applies to the candidate's document embedding against the query's own
   document embedding: an image query scores an image+text near-duplicate well below 0.9 (the
   candidate's vector mixes in its caption), so the score alone lets near-duplicates through. On
   the demo corpus the score rule alone let 27 of 50 near-duplicate pairs be selected; with the
   document check none are.
3. already selected: a document already picked for this query (e.g. by the image query, now found
   by the text query) counts once.
4. modality: image+text documents come first. A single-modality candidate that passed rules 1-3 is
   set aside; the set-aside ones are looked at, in score order, only if the image+text candidates
   could not fill the quota. If they were not needed they count as `skipped_modality`.
5. diversity: a candidate whose doc embedding has inner product above `diversity_threshold` with an
   already selected document's is skipped.
Candidates never looked at because the quota was already full count as `unexamined`.

Quota: `num_retrieved` via the image query and `num_retrieved` via the text query (2 + 2). An example
without a caption or without an image has one query only; that query takes the whole
`2 * num_retrieved`, so every example asks for the same number of documents and the trainer's
"pick k of them" works alike for all. The image via runs first, then the text via.

Order (`rank`, the order in the training sequence, retrieved documents before the query): the two
vias interleaved, best first — image #1, text #1, image #2, text #2 — then what is left of the
longer via. Scores of an image query and of a text query are not on the same scale (CLIP's
image–text similarities run lower than text–text), so a plain sort by score would favour one via.

Determinism: the batch a query lands in (which varies with the runner) never changes a score's bits
or a tie's order. A Flat bank's search takes a BLAS path for big batches and a scalar one for small,
and the two differ in the last bit, so its candidates are rescored one (query, candidate) pair at a
time with faiss's scalar inner product (`fvec_inner_products_by_idx`). An IVF bank scans its lists
one query at a time, so its scores already are per pair and are kept. Candidates are then ordered by
(score desc, faiss id). The search fetches SEARCH_MARGIN candidates beyond top-k and cuts to top-k
after the rescore, so a near-tie at the boundary cannot change the candidate set either.
Two limits: an IVF bank's choice of lists at the nprobe boundary comes from a batched float32
search, and the scalar inner product follows the CPU's SIMD level, so workers of different CPU
generations may differ in a score's last bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from schemas.records import IMAGE_TEXT, EmbeddedExample, Neighbour, RetrievalCounts

VIAS = ("image", "text")
SEARCH_MARGIN = 4  # extra candidates fetched, so the float32 search's order at the top-k boundary cannot matter


@dataclass(frozen=True)
class RetrievalRules:
    """The selection rules' parameters (fields of `BuildConfig`)."""

    num_retrieved: int = 2  # documents per via (image, text)
    max_similarity: float = 0.9  # relevance: skip candidates scoring above this
    diversity_threshold: float = 0.95  # diversity: skip candidates this similar to a selected one
    topk: int = 32  # candidates fetched per query

    @classmethod
    def from_config(cls, cfg) -> RetrievalRules:
        # topk keeps its name: `cm3corpus query`/`generate` call the same parameter --topk.
        return cls(
            num_retrieved=cfg.num_retrieved,
            max_similarity=cfg.max_similarity,
            diversity_threshold=cfg.diversity_threshold,
            topk=cfg.retrieval_topk,
        )


@dataclass(slots=True)
class Candidates:
    """One query's candidates in score order (best first), and where to look up what the rules need.

    `keys`, `modalities` and `vectors` are indexed by faiss id (the bank's own tables, or dicts in
    tests), so nothing is gathered for candidates the rules never look at.

    Attributes:
        ids: faiss ids, best first.
        scores: inner product of each with the query.
        keys: faiss id → document key.
        modalities: faiss id → document modality.
        vectors: faiss id → doc embedding (D,) float32, for the diversity rule.
    """

    ids: Sequence[int]
    scores: Sequence[float]
    keys: Sequence[str] | Mapping[int, str]
    modalities: Sequence[str] | Mapping[int, str]
    vectors: Sequence[np.ndarray] | Mapping[int, np.ndarray]


class _Reconstructed:
    """faiss id → stored vector of a non-Flat bank, reconstructed when the rules first ask for it.

    The rules read a handful of each query's candidates; reconstructing all of them cost more than
    the rules (about 15% of an IVF search at 100k x 64).
    """

    __slots__ = ("_index", "_cache")

    def __init__(self, index):
        self._index, self._cache = index, {}

    def __getitem__(self, faiss_id: int) -> np.ndarray:
        vec = self._cache.get(faiss_id)
        if vec is None:
            vec = self._cache[faiss_id] = self._index.reconstruct(int(faiss_id))
        return vec


def _too_close(vec: np.ndarray, chosen: list[np.ndarray], threshold: float) -> bool:
    # At most 2·num_retrieved chosen vectors: one small dot each beats stacking them into a matrix,
    # and a plain loop beats any() over a generator.
    for c in chosen:
        if c.dot(vec) > threshold:
            return True
    return False


def _select_via(
    query_key: str,
    via: str,
    c: Candidates,
    quota: int,
    rules: RetrievalRules,
    chosen_ids: set,
    chosen_vecs: list,
    query_doc: np.ndarray | None = None,
) -> tuple[list[int], RetrievalCounts]:
    """Pick up to `quota` candidate positions of one via; updates chosen_ids / chosen_vecs.

    The hot path of retrieval (once per query): counts are kept in locals and the row built once.
    """
    ids, scores, keys, modalities, vectors = c.ids, c.scores, c.keys, c.modalities, c.vectors
    max_similarity, diversity = rules.max_similarity, rules.diversity_threshold
    self_skips = too_similar = already = diverse = 0
    picked: list[int] = []
    deferred: list[int] = []  # single-modality candidates that passed rules 1-3 (rule 4)
    i, n = 0, len(ids)
    while i < n and len(picked) < quota:
        doc = ids[i]
        if keys[doc] == query_key:
            self_skips += 1
        elif scores[i] > max_similarity or (query_doc is not None and vectors[doc].dot(query_doc) > max_similarity):
            too_similar += 1
        elif doc in chosen_ids:
            already += 1
        elif modalities[doc] != IMAGE_TEXT:
            deferred.append(i)
        else:
            vec = vectors[doc]
            if chosen_vecs and _too_close(vec, chosen_vecs, diversity):
                diverse += 1
            else:
                picked.append(i)
                chosen_ids.add(doc)
                chosen_vecs.append(vec)
        i += 1
    unexamined = n - i
    skipped_modality = 0
    if len(picked) < quota:  # not enough image+text documents: fall back to single-modality ones
        for j, d in enumerate(deferred):
            if len(picked) == quota:
                unexamined += len(deferred) - j
                break
            vec = vectors[ids[d]]
            if chosen_vecs and _too_close(vec, chosen_vecs, diversity):
                diverse += 1
            else:
                picked.append(d)
                chosen_ids.add(ids[d])
                chosen_vecs.append(vec)
    else:
        skipped_modality = len(deferred)
    counts = RetrievalCounts(
        query_key, via, n, self_skips, too_similar, already, diverse, skipped_modality, unexamined, len(picked)
    )
    return (sorted(picked) if len(picked) > 1 else picked), counts


def select_neighbours(
    query_key: str,
    candidates: Mapping[str, Candidates],
    rules: RetrievalRules,
    query_doc: np.ndarray | None = None,
    total: int | None = None,
) -> tuple[list[Neighbour], list[RetrievalCounts]]:
    """Apply the selection rules (module docstring) to one example's candidates.

    Args:
        query_key: the example's key (its own document is skipped).
        candidates: via ("image", "text") → that query's candidates, best first; a via the example
            has no query for is absent, and the other via takes its quota.
        rules: thresholds and counts.
        query_doc: the example's own document embedding, for the near-duplicate half of rule 2.
        total: documents wanted in all, split over the vias (the first via takes the odd one);
            `2 * num_retrieved`, the build's count, when None. `cm3corpus query` and `generate` set it.

    Returns:
        The selected neighbours with `rank` set (interleaved by via, best first), and one counts row
        per via that ran.
    """
    vias = [v for v in VIAS if v in candidates]
    if not vias:
        return [], []
    total = rules.num_retrieved * len(VIAS) if total is None else total
    quotas = [total // len(vias) + (i < total % len(vias)) for i in range(len(vias))]
    chosen_ids: set = set()
    chosen_vecs: list = []
    picks: list[list[Neighbour]] = []
    rows = []
    for via, quota in zip(vias, quotas, strict=True):
        c = candidates[via]
        positions, counts = _select_via(query_key, via, c, quota, rules, chosen_ids, chosen_vecs, query_doc)
        picks.append(
            [Neighbour(query_key, 0, c.keys[c.ids[i]], c.scores[i], via, c.modalities[c.ids[i]]) for i in positions]
        )
        rows.append(counts)
    ordered = [n for turn in range(max(quotas)) for per_via in picks if turn < len(per_via) for n in [per_via[turn]]]
    for rank, n in enumerate(ordered):
        n.rank = rank
    return ordered, rows


def rescore(queries: np.ndarray, ids: np.ndarray, bank, found_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, Any]:
    """Batch-independent scores of each query's candidates, resorted (score desc, id asc).

    A Flat bank's search takes a BLAS path for big batches and a scalar one for small, so its
    candidates are rescored one (query, candidate) pair at a time with faiss's scalar inner product
    against the stored vectors, with no (R, K, D) copy. An IVF bank scans its lists one query at a
    time, so the scores it found are already the same whatever the batch and are kept; its vectors
    are reconstructed only when the rules ask.

    Args:
        queries: (R, D) float32.
        ids: (R, K) faiss ids from the search; -1 where the bank had fewer.
        bank: the loaded `transforms.lib.memory_bank.Bank`.
        found_scores: (R, K) the search's scores.

    Returns:
        ids (R, K) and scores (R, K) float32 (-inf at padding) reordered, and faiss id → vector.
    """
    import faiss  # lazy: faiss loads only where an index is touched

    if bank.is_flat:
        table, pos = bank.vector_table(ids)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        rows = np.ascontiguousarray(np.where(ids >= 0, pos, -1), dtype=np.int64)  # -1 scores -inf
        scores = np.empty(ids.shape, dtype=np.float32)
        faiss.fvec_inner_products_by_idx(
            faiss.swig_ptr(scores),
            faiss.swig_ptr(queries),
            faiss.swig_ptr(table),
            faiss.swig_ptr(rows),
            queries.shape[1],
            len(queries),
            ids.shape[1],
        )
        vectors: Any = table
    else:
        scores = np.array(found_scores, dtype=np.float32)
        vectors = _Reconstructed(bank.index)
    scores[ids < 0] = -np.inf
    order = np.lexsort((ids, -scores), axis=1)  # last key first: score desc, then id asc
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(scores, order, axis=1), vectors


def retrieve_batch(
    bank, examples: Sequence[EmbeddedExample], rules: RetrievalRules, total: int | None = None
) -> tuple[list[Neighbour], list[RetrievalCounts]]:
    """Search the bank once for a batch of examples (image and text queries together) and select.

    Args:
        bank: a loaded `transforms.lib.memory_bank.Bank`.
        examples: the batch; an example's image query is its `image_emb`, its text query its
            `query_text_emb` (the caption after query dropout).
        rules: selection parameters.
        total: documents per example (`select_neighbours`); the build's `2 * num_retrieved` when None.

    Returns:
        All selected neighbours and counts rows of the batch.
    """
    vias = [_vias_of(e) for e in examples]
    owners = [(i, via) for i, vs in enumerate(vias) for via in vs]
    none = Candidates([], [], {}, {}, {})
    per_example: list[dict[str, Candidates]] = [dict.fromkeys(vs, none) for vs in vias]
    k = min(rules.topk, bank.count)
    if owners and k > 0:
        vecs = [examples[i].image_emb if via == "image" else examples[i].query_text_emb for i, via in owners]
        queries = np.ascontiguousarray(np.stack(vecs), dtype=np.float32)  # (R, D)
        # Fetch a margin beyond k and cut after the exact rescore: near-ties at rank k can swap between
        # FAISS's batch paths, and which of them made the top k would then depend on the batch.
        found_scores, found = bank.index.search(queries, min(k + SEARCH_MARGIN, bank.count))
        ids, scores, vectors = rescore(queries, found, bank, found_scores)
        ids, scores = ids[:, :k], scores[:, :k]
        valid = (ids >= 0).sum(axis=1).tolist()
        ids_l, scores_l = ids.tolist(), scores.tolist()  # one conversion per batch
        keys, mods = bank.keys, bank.modalities
        for r, (i, via) in enumerate(owners):
            n = valid[r]
            row_ids, row_scores = (ids_l[r], scores_l[r]) if n == k else (ids_l[r][:n], scores_l[r][:n])
            per_example[i][via] = Candidates(row_ids, row_scores, keys, mods, vectors)
    neighbours, counts = [], []
    for e, cands in zip(examples, per_example, strict=True):
        query_doc = None if e.doc_emb is None else np.asarray(e.doc_emb, dtype=np.float32)
        ns, cs = select_neighbours(e.key, cands, rules, query_doc, total)
        neighbours.extend(ns)
        counts.extend(cs)
    return neighbours, counts


def query_view(e: EmbeddedExample) -> EmbeddedExample:
    """What retrieval reads of an example (its queries and its document vector): no caption, no text_emb.

    The batches wait for the bank, which an in-process runner builds after embedding everything, so
    they are held whole in the meantime.
    """
    return EmbeddedExample(e.key, None, e.modality, e.image_emb, None, e.doc_emb, e.query_text_emb)


def _vias_of(e: EmbeddedExample) -> list[str]:
    return [via for via, v in (("image", e.image_emb), ("text", e.query_text_emb)) if v is not None]
