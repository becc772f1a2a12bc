"""Records cross fusion breaks compactly and come back exactly (schemas/records.py `__reduce__`)."""

from __future__ import annotations

import numpy as np
import pytest
from apache_beam.coders import typecoders

from schemas.records import EmbeddedExample, Example, Neighbour, RetrievalCounts, ShardSample, TokenizedDoc

CODER = typecoders.registry.get_coder(object)  # what Beam uses for a PCollection of unknown type


def _round_trip(value):
    encoded = CODER.encode(value)
    return CODER.decode(encoded), len(encoded)


def _vec(seed: int, dim: int = 128) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


def test_embedded_example_round_trips_exactly_and_small():
    e = EmbeddedExample("k1", "a red circle", "image+text", _vec(0), _vec(1), _vec(2), _vec(3))
    back, size = _round_trip(e)
    for name in ("image_emb", "text_emb", "doc_emb", "query_text_emb"):
        got, want = getattr(back, name), getattr(e, name)
        assert got.dtype == np.float32 and got.flags.writeable
        np.testing.assert_array_equal(got, want)
    assert (back.key, back.caption, back.modality) == (e.key, e.caption, e.modality)
    # Four 512-byte vectors; a pickled dataclass of ndarrays took about 2.4 KB.
    assert size <= 4 * 128 * 4 + 300, size


def test_missing_parts_float16_and_lists_pass_through():
    half = np.arange(8, dtype=np.float16)
    e = EmbeddedExample("k", None, "image", image_emb=half, doc_emb=[0.5, 0.25])
    back, _ = _round_trip(e)
    assert back.image_emb.dtype == np.float16 and np.array_equal(back.image_emb, half)
    assert back.doc_emb == [0.5, 0.25] and back.text_emb is None and back.caption is None


@pytest.mark.parametrize(
    "ids",
    [
        np.arange(70, dtype=np.int32),  # small ids: stored as uint16
        np.array([65535, 0, 7], dtype=np.int32),  # the largest id uint16 holds
        np.array([65536, 1], dtype=np.int32),  # one past it: stays int32
        np.array([-1, 3], dtype=np.int32),  # negative: stays int32
        np.zeros(0, dtype=np.int32),
    ],
)
def test_token_ids_come_back_as_int32_with_the_same_values(ids):
    back, _ = _round_trip(TokenizedDoc("k", "image", None, ids))
    assert back.image_ids.dtype == np.int32 and np.array_equal(back.image_ids, ids) and back.text_ids is None


def test_token_ids_travel_in_two_bytes_each():
    ids = np.arange(1024, dtype=np.int32) * 60  # below 65,536
    _, size = _round_trip(TokenizedDoc("k", "image", None, ids))
    assert size <= 2 * 1024 + 120, size


def test_shard_sample_neighbour_counts_and_example_round_trip():
    sample = ShardSample("q", np.array([5, 70000, 2], dtype=np.int32), {"query_key": "q", "segments": [[0, 3]]})
    back, _ = _round_trip(sample)
    assert back.key == "q" and back.json == sample.json
    assert back.tokens.dtype == np.int32 and np.array_equal(back.tokens, sample.tokens)
    for record in (
        Neighbour("q", 1, "d", 0.8125, "image", "image+text"),
        RetrievalCounts("q", "text", candidates=9, skipped_self=1, unexamined=3, selected=2),
        Example("k", "a.tar::k", "cap", b"\x89PNG", 64, 32, meta="{}", image_hash="h"),
    ):
        assert _round_trip(record)[0] == record
