"""Memory bank: factory choice, write → load round trip, IVF parts merged vs exact search, extend, the Beam build."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from schemas.artifacts import MEMORY_BANK_IDS
from schemas.records import IMAGE_ONLY, IMAGE_TEXT, TEXT_ONLY, EmbeddedExample
from transforms.lib.memory_bank import (
    add_part,
    bank_info,
    choose_index_factory,
    deserialize,
    extend_bank,
    ids_table,
    load_bank,
    merge_parts,
    serialize,
    train_index,
    write_bank,
)
from transforms.lib.rng import stable_hash
from transforms.memory_bank import BuildMemoryBank


def unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def build(vectors: np.ndarray, factory: str, parts: int = 3):
    """Train on a sample, fill `parts` contiguous id ranges independently, merge them in order."""
    trained = serialize(train_index(vectors[: min(len(vectors), 5000)], factory, vectors.shape[1]))
    bounds = np.linspace(0, len(vectors), parts + 1).astype(int)
    filled = (add_part(trained, vectors[a:b], np.arange(a, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    return merge_parts(deserialize(trained), filled)


def test_choose_index_factory_scales_with_the_bank():
    assert choose_index_factory(1_000, 512) == "Flat"
    assert choose_index_factory(49_999, 768) == "Flat"
    assert choose_index_factory(1_000_000, 512) == "IVF4096,Flat"
    assert choose_index_factory(1_000_000, 512, max_train=2**17) == "IVF2048,Flat"  # ≥ 39 points per list
    assert choose_index_factory(10_000_000, 768) == "IVF16384_HNSW32,PQ192x8"
    assert choose_index_factory(20_000_000, 100).endswith("PQ25x8")  # m divides dim


def test_round_trip_keeps_ids_keys_and_vectors(tmp_path):
    vectors = unit_vectors(500, 16)
    keys = [f"k{i:04d}" for i in range(500)]
    mods = [(IMAGE_TEXT, IMAGE_ONLY, TEXT_ONLY)[i % 3] for i in range(500)]
    index = build(vectors, "Flat")
    d = str(tmp_path / "memory_bank")
    write_bank(d, index, ids_table(np.arange(500), keys, mods), bank_info(index, "ViT-B-32", "Flat", None))
    bank = load_bank(d)
    assert bank.keys == keys and bank.modalities == mods and bank.count == 500
    assert bank.info["dim"] == 16 and bank.info["metric"] == "inner_product" and bank.info["clip_model"] == "ViT-B-32"
    np.testing.assert_array_equal(bank.vectors(np.array([0, 499])), vectors[[0, 499]])
    _, ids = bank.index.search(vectors[:20], 1)
    assert ids[:, 0].tolist() == list(range(20))
    assert pq.read_table(f"{d}/ids.parquet").schema.equals(MEMORY_BANK_IDS, check_metadata=False)
    assert not list((tmp_path / "memory_bank").glob("*.tmp"))


def test_ivf_parts_merged_recall_against_exact_search(tmp_path):
    vectors, queries = unit_vectors(20_000, 32), unit_vectors(200, 32, seed=1)
    flat, ivf = build(vectors, "Flat"), build(vectors, "IVF64,Flat", parts=4)
    d = str(tmp_path / "ivf")
    write_bank(
        d,
        ivf,
        ids_table(np.arange(20_000), [f"k{i}" for i in range(20_000)], [IMAGE_TEXT] * 20_000),
        bank_info(ivf, "m", "IVF64,Flat", 32),
    )
    bank = load_bank(d)  # nprobe 32 of 64 lists from bank.json (random vectors are IVF's worst case)
    _, truth = flat.search(queries, 10)
    _, found = bank.index.search(queries, 10)
    recall = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found, strict=True)])
    assert recall > 0.9, recall
    np.testing.assert_array_equal(bank.vectors(np.array([3, 19_999])), vectors[[3, 19_999]])  # direct map saved


@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat"])
def test_extend_bank_adds_documents_in_key_order(tmp_path, factory):
    vectors = unit_vectors(600, 16)
    d = str(tmp_path / "bank")
    index = build(vectors[:500], factory)
    write_bank(
        d,
        index,
        ids_table(np.arange(500), [f"k{i:04d}" for i in range(500)], [IMAGE_TEXT] * 500),
        bank_info(index, "m", factory, 8),
    )
    new_keys = [f"n{i:03d}" for i in range(100)][::-1]  # given out of order
    bank = extend_bank(d, vectors[500:], new_keys, [TEXT_ONLY] * 100)
    assert bank.count == 600 and bank.info["count"] == 600
    assert bank.keys[500:] == sorted(new_keys) and bank.modalities[599] == TEXT_ONLY
    _, ids = bank.index.search(vectors[500:], 1)  # each new document finds itself under its key
    assert [bank.keys[i] for i in ids[:, 0]] == new_keys
    with pytest.raises(ValueError, match="already in the bank"):
        extend_bank(d, vectors[:1], ["k0001"])


def examples(n: int, dim: int = 16) -> list[EmbeddedExample]:
    vecs = unit_vectors(n, dim, seed=3)
    mods = (IMAGE_TEXT, IMAGE_ONLY, TEXT_ONLY)
    return [EmbeddedExample(f"e{i:04d}", None, mods[i % 3], doc_emb=vecs[i]) for i in range(n)]


def run_build(out: str, corpus, **kwargs) -> None:
    with TestPipeline() as p:
        result = p | beam.Create(corpus) | BuildMemoryBank(out, "demo", num_parts=4, **kwargs)
        assert_that(result, equal_to([out]))


def test_build_memory_bank_ids_follow_the_keys_and_reruns_give_the_same_bytes(tmp_path):
    corpus = examples(300)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run_build(a, corpus, index_factory="IVF4,Flat", train_size=200, nprobe=4)
    run_build(b, corpus[::-1], index_factory="IVF4,Flat", train_size=200, nprobe=4)  # another input order
    for name in ("index.faiss", "ids.parquet", "bank.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert not (tmp_path / "a" / "_parts").exists()
    bank = load_bank(a)
    expected = sorted(corpus, key=lambda e: (stable_hash(e.key) % 4, e.key))  # part, then key order
    assert bank.keys == [e.key for e in expected] and bank.modalities == [e.modality for e in expected]
    assert bank.info["index_factory"] == "IVF4,Flat" and bank.info["count"] == 300 and bank.info["nprobe"] == 4
    _, ids = bank.index.search(np.stack([e.doc_emb for e in expected]), 1)
    assert ids[:, 0].tolist() == list(range(300))


def test_build_memory_bank_chooses_flat_for_a_small_corpus(tmp_path):
    out = str(tmp_path / "bank")
    run_build(out, examples(50))
    bank = load_bank(out)
    assert bank.info["index_factory"] == "Flat" and bank.info["nprobe"] is None and bank.count == 50
