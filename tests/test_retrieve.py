"""Retrieval: each selection rule on hand-made embeddings, counts that add up, the batched DoFn and its writers."""

from __future__ import annotations

import dataclasses

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from schemas.artifacts import NEIGHBOURS, RETRIEVAL_COUNTS
from schemas.records import IMAGE_ONLY, IMAGE_TEXT, TEXT_ONLY, EmbeddedExample, RetrievalCounts
from transforms.lib.memory_bank import add_part, bank_info, ids_table, load_bank, merge_parts, train_index, write_bank
from transforms.lib.retrieve import Candidates, RetrievalRules, retrieve_batch, select_neighbours
from transforms.retrieve import Retrieve, WriteNeighbours, WriteRetrievalCounts

RULES = RetrievalRules(num_retrieved=2, max_similarity=0.9, diversity_threshold=0.95, topk=8)
DIM = 8


def unit(i: int) -> np.ndarray:
    """A distinct unit vector per document (orthogonal, so the diversity rule stays quiet)."""
    v = np.zeros(DIM, np.float32)
    v[i % DIM] = 1.0
    return v


def cands(*rows) -> Candidates:
    """rows: (faiss id, score, key, modality[, vector]) best first."""
    keys = {r[0]: r[2] for r in rows}
    modalities = {r[0]: r[3] for r in rows}
    vectors = {r[0]: r[4] if len(r) > 4 else unit(r[0]) for r in rows}
    return Candidates([r[0] for r in rows], [r[1] for r in rows], keys, modalities, vectors)


def picked(neighbours):
    return [(n.doc_key, n.via) for n in neighbours]


def assert_adds_up(c: RetrievalCounts):
    skipped = sum(getattr(c, f.name) for f in dataclasses.fields(c) if f.name.startswith("skipped_"))
    assert c.candidates == c.selected + skipped + c.unexamined


def test_self_is_skipped_even_below_the_similarity_threshold():
    ns, (c,) = select_neighbours("q", {"image": cands((0, 0.8, "q", IMAGE_TEXT), (1, 0.7, "a", IMAGE_TEXT))}, RULES)
    assert picked(ns) == [("a", "image")]
    assert (c.skipped_self, c.selected) == (1, 1)


def test_too_similar_is_skipped_and_threshold_is_strict():
    rows = ((0, 0.95, "dup", IMAGE_TEXT), (1, 0.9, "edge", IMAGE_TEXT), (2, 0.5, "b", IMAGE_TEXT))
    ns, (c, _) = select_neighbours("q", {"image": cands(*rows), "text": cands()}, RULES)
    assert picked(ns) == [("edge", "image"), ("b", "image")]  # 0.9 itself is allowed: "above 0.9" is skipped
    assert c.skipped_too_similar == 1 and c.unexamined == 0


def test_document_found_by_both_queries_counts_once():
    image = cands((0, 0.8, "a", IMAGE_TEXT), (1, 0.7, "b", IMAGE_TEXT), (2, 0.6, "c", IMAGE_TEXT))
    text = cands((0, 0.85, "a", IMAGE_TEXT), (3, 0.75, "d", IMAGE_TEXT), (4, 0.65, "e", IMAGE_TEXT))
    ns, (ci, ct) = select_neighbours("q", {"image": image, "text": text}, RULES)
    assert [n.doc_key for n in ns] == ["a", "d", "b", "e"]  # interleaved: image#1 text#1 image#2 text#2
    assert [n.rank for n in ns] == [0, 1, 2, 3]
    assert [n.via for n in ns] == ["image", "text", "image", "text"]
    assert ct.skipped_already_selected == 1 and ci.unexamined == 1
    assert len({n.doc_key for n in ns}) == len(ns)


def test_image_text_documents_are_preferred_over_higher_scoring_single_modality_ones():
    rows = (
        (0, 0.8, "t", TEXT_ONLY),
        (1, 0.7, "i", IMAGE_ONLY),
        (2, 0.6, "it1", IMAGE_TEXT),
        (3, 0.5, "it2", IMAGE_TEXT),
    )
    ns, (c, _) = select_neighbours("q", {"image": cands(*rows), "text": cands()}, RULES)
    assert picked(ns) == [("it1", "image"), ("it2", "image")]
    assert (c.skipped_modality, c.selected) == (2, 2)
    assert ns[0].doc_modality == IMAGE_TEXT


def test_single_modality_fills_in_when_image_text_runs_short():
    rows = ((0, 0.8, "t", TEXT_ONLY), (1, 0.7, "i", IMAGE_ONLY), (2, 0.6, "it", IMAGE_TEXT), (3, 0.5, "t2", TEXT_ONLY))
    ns, (c, _) = select_neighbours("q", {"image": cands(*rows), "text": cands()}, RULES)
    assert picked(ns) == [("t", "image"), ("it", "image")]  # back in score order within the via
    assert (c.selected, c.skipped_modality, c.unexamined) == (2, 0, 2)  # "i" and "t2" were not needed
    assert_adds_up(c)


def test_diversity_skips_a_near_copy_of_a_selected_document_across_vias():
    near = unit(0) + 0.05 * unit(1)
    near /= np.linalg.norm(near)  # inner product with unit(0) ≈ 0.9988 > 0.95
    image = cands((0, 0.8, "a", IMAGE_TEXT), (1, 0.7, "a_copy", IMAGE_TEXT, near), (2, 0.6, "b", IMAGE_TEXT))
    text = cands((1, 0.85, "a_copy", IMAGE_TEXT, near), (3, 0.6, "c", IMAGE_TEXT), (4, 0.5, "d", IMAGE_TEXT))
    ns, (ci, ct) = select_neighbours("q", {"image": image, "text": text}, RULES)
    assert sorted(n.doc_key for n in ns) == ["a", "b", "c", "d"]
    assert ci.skipped_diversity == 1 and ct.skipped_diversity == 1


def test_one_query_takes_the_whole_quota():
    rows = [(i, 0.8 - i / 100, f"d{i}", IMAGE_TEXT) for i in range(6)]
    ns, counts = select_neighbours("q", {"text": cands(*rows)}, RULES)
    assert [n.doc_key for n in ns] == ["d0", "d1", "d2", "d3"] and {n.via for n in ns} == {"text"}
    assert [c.via for c in counts] == ["text"]
    assert select_neighbours("q", {}, RULES) == ([], [])


def test_counts_add_up_on_random_candidates():
    rng = np.random.default_rng(0)
    mods = [IMAGE_TEXT, IMAGE_ONLY, TEXT_ONLY]
    for trial in range(200):
        by_via = {}
        for via in ("image", "text")[: 1 + trial % 2]:
            k = int(rng.integers(0, 12))
            ids = rng.choice(20, size=k, replace=False)
            vecs = rng.normal(size=(k, 4)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            scores = np.sort(rng.uniform(0.3, 1.0, size=k))[::-1]
            keys = ["q" if i == 7 else f"k{i}" for i in ids]
            m = [mods[i % 3] for i in ids]
            ids = ids.tolist()
            by_via[via] = Candidates(
                ids,
                scores.tolist(),
                dict(zip(ids, keys, strict=True)),
                dict(zip(ids, m, strict=True)),
                dict(zip(ids, vecs, strict=True)),
            )
        ns, counts = select_neighbours("q", by_via, RetrievalRules(2, 0.9, 0.8, 12))
        for c in counts:
            assert_adds_up(c)
        assert sum(c.selected for c in counts) == len(ns) <= 4
        assert len({n.doc_key for n in ns}) == len(ns) and "q" not in {n.doc_key for n in ns}
        assert all(n.score <= 0.9 for n in ns)


# --- the batched search against a real bank ---------------------------------------------------------


def corpus(n: int = 60, dim: int = 16, seed: int = 0) -> list[EmbeddedExample]:
    rng = np.random.default_rng(seed)

    def u(x):
        return (x / np.linalg.norm(x)).astype(np.float32)

    out = []
    for i in range(n):
        img, txt = u(rng.normal(size=dim)), u(rng.normal(size=dim))
        modality = (IMAGE_TEXT, IMAGE_ONLY, TEXT_ONLY)[i % 3]
        image_emb = img if modality != TEXT_ONLY else None
        text_emb = txt if modality != IMAGE_ONLY else None
        doc = u(sum(v for v in (image_emb, text_emb) if v is not None))
        query_text = u(txt + 0.3 * rng.normal(size=dim)) if text_emb is not None else None
        out.append(EmbeddedExample(f"k{i:03d}", None, modality, image_emb, text_emb, doc, query_text))
    return out


@pytest.fixture(scope="module")
def bank_dir(tmp_path_factory):
    examples = sorted(corpus(), key=lambda e: e.key)
    vecs = np.stack([e.doc_emb for e in examples])
    index = merge_parts(
        train_index(vecs, "Flat", vecs.shape[1]), [add_part(train_index(vecs, "Flat", 16), vecs, np.arange(len(vecs)))]
    )
    d = str(tmp_path_factory.mktemp("bank") / "memory_bank")
    ids = ids_table(np.arange(len(vecs)), [e.key for e in examples], [e.modality for e in examples])
    write_bank(d, index, ids, bank_info(index, "test", "Flat", None))
    return d


def test_retrieve_batch_skips_self_and_does_not_depend_on_batching(bank_dir):
    bank, examples = load_bank(bank_dir), corpus()
    rules = RetrievalRules(2, 0.9, 0.95, 10)
    whole, whole_counts = retrieve_batch(bank, examples, rules)
    parts = [retrieve_batch(bank, examples[i : i + 7], rules) for i in range(0, len(examples), 7)]
    assert whole == [n for ns, _ in parts for n in ns]  # scores bit for bit, whatever the batch
    assert whole_counts == [c for _, cs in parts for c in cs]
    assert all(n.query_key != n.doc_key for n in whole)
    assert len(whole_counts) == sum(1 if e.modality != IMAGE_TEXT else 2 for e in examples)
    for c in whole_counts:
        assert_adds_up(c)
    by_query = {}
    for n in whole:
        by_query.setdefault(n.query_key, []).append(n.rank)
    assert all(ranks == list(range(len(ranks))) and len(ranks) == 4 for ranks in by_query.values())


def test_retrieve_transform_and_writers_round_trip(bank_dir, tmp_path):
    examples = corpus()
    rules = RetrievalRules(2, 0.9, 0.95, 10)
    expected, expected_counts = retrieve_batch(load_bank(bank_dir), examples, rules)
    out = tmp_path / "out"
    with TestPipeline() as p:
        bank = p | "Bank" >> beam.Create([bank_dir])  # as BuildMemoryBank hands it over
        result = p | beam.Create(examples) | Retrieve(bank, rules, batch_size=16)
        assert_that(result.neighbours, equal_to(expected), label="Neighbours")
        assert_that(result.counts, equal_to(expected_counts), label="Counts")
        result.neighbours | WriteNeighbours(str(out / "neighbours"), num_shards=2)
        result.counts | WriteRetrievalCounts(str(out / "retrieval_counts"))
    files = sorted((out / "neighbours").glob("*.parquet"))
    assert [f.name for f in files] == ["neighbours-00000-of-00002.parquet", "neighbours-00001-of-00002.parquet"]
    tables = [pq.read_table(f) for f in files]
    assert all(t.schema.equals(NEIGHBOURS, check_metadata=False) for t in tables)
    assert sum(t.num_rows for t in tables) == len(expected)
    counts = pq.read_table(out / "retrieval_counts" / "counts-00000-of-00001.parquet")
    assert counts.schema.equals(RETRIEVAL_COUNTS, check_metadata=False)
    assert counts.column("query_key").to_pylist() == sorted(counts.column("query_key").to_pylist())


def test_near_duplicate_of_the_query_document_is_skipped_even_when_the_query_scores_it_low():
    # An image query scores an image+text near-duplicate low (its vector mixes in the caption), but
    # the candidate's document vector is almost the query's own document vector.
    query_doc = unit(3)
    near = 0.98 * unit(3) + 0.2 * unit(4)
    near = near / np.linalg.norm(near)
    c = cands((3, 0.6, "near", IMAGE_TEXT, near), (5, 0.5, "other", IMAGE_TEXT))
    ns, (counts,) = select_neighbours("q", {"image": c}, RULES, query_doc)
    assert picked(ns) == [("other", "image")]
    assert counts.skipped_too_similar == 1
    assert_adds_up(counts)
    ns_without, _ = select_neighbours("q", {"image": c}, RULES)  # the score alone lets it through
    assert ("near", "image") in picked(ns_without)


def test_top_k_is_cut_after_the_exact_rescore_not_by_the_float32_search(bank_dir):
    """A search whose float32 order misplaces the true k-th candidate (a near-tie) does not change the set."""
    bank, examples = load_bank(bank_dir), corpus()
    rules = RetrievalRules(2, 0.9, 0.95, 6)
    expected, _ = retrieve_batch(bank, examples, rules)
    real = bank.index

    class NearTies:  # the true order with ranks k-1 and k+2 swapped, as a different BLAS path might
        d, ntotal = real.d, real.ntotal

        def search(self, queries, n):
            scores, ids = real.search(queries, n)
            ids[:, [5, 8]] = ids[:, [8, 5]]
            return scores, ids

    bank.index = NearTies()
    try:
        got, _ = retrieve_batch(bank, examples, rules)
    finally:
        bank.index = real
    assert got == expected


def test_ivf_bank_selects_like_flat_and_does_not_depend_on_batching(bank_dir, tmp_path):
    """IVF keeps its own per-query scan scores and reconstructs vectors only for the rules that read them."""
    import faiss

    examples = sorted(corpus(), key=lambda e: e.key)
    vecs = np.stack([e.doc_emb for e in examples])
    trained = train_index(vecs, "IVF4,Flat", vecs.shape[1])
    index = merge_parts(trained, [add_part(trained, vecs, np.arange(len(vecs)))])
    faiss.extract_index_ivf(index).nprobe = 4  # every list: the same candidates as exhaustive search
    d = str(tmp_path / "ivf_bank")
    ids = ids_table(np.arange(len(vecs)), [e.key for e in examples], [e.modality for e in examples])
    write_bank(d, index, ids, bank_info(index, "test", "IVF4,Flat", 4))
    ivf, flat = load_bank(d), load_bank(bank_dir)
    assert not ivf.is_flat and flat.is_flat
    queries, rules = corpus(), RetrievalRules(2, 0.9, 0.95, 10)
    got, got_counts = retrieve_batch(ivf, queries, rules)
    parts = [retrieve_batch(ivf, queries[i : i + 7], rules) for i in range(0, len(queries), 7)]
    assert got == [n for ns, _ in parts for n in ns] and got_counts == [c for _, cs in parts for c in cs]
    want, want_counts = retrieve_batch(flat, queries, rules)
    assert [(n.query_key, n.rank, n.doc_key, n.via) for n in got] == [
        (n.query_key, n.rank, n.doc_key, n.via) for n in want
    ]
    np.testing.assert_allclose([n.score for n in got], [n.score for n in want], atol=1e-6)
    assert got_counts == want_counts
