"""CM3 layout and causal masking: order, over-length policy, span rules, round trip, seeding."""

from __future__ import annotations

import numpy as np
import pytest

from schemas.records import TokenizedDoc
from schemas.vocab import BREAK, EOD, EOSS, Vocab
from transforms.lib.layout import (
    IMAGE,
    QUERY,
    TEXT,
    TOKENS_PER_SPAN,
    Doc,
    Segment,
    cm3_sequence,
    layout,
    mask,
    unmask,
)

VOCAB = Vocab(num_sentinels=8, text_size=100, image_codes=50, tokens_per_image=16)


def text(n: int, offset: int = 0) -> np.ndarray:
    return VOCAB.text_start + (np.arange(n) + offset) % VOCAB.text_size


def image(offset: int = 0) -> np.ndarray:
    return VOCAB.image_start + (np.arange(VOCAB.tokens_per_image) + offset) % VOCAB.image_codes


def corpus_docs(rng: np.random.Generator) -> tuple[list[Doc], Doc]:
    """A query and a few neighbours of mixed modality."""
    docs = []
    for i in range(4):
        kind = rng.integers(3)
        docs.append(
            Doc(
                text_ids=None if kind == 2 else text(int(rng.integers(1, 12)), i),
                image_ids=None if kind == 1 else image(i),
            )
        )
    return docs[:-1], docs[-1]


def test_layout_follows_metaseq_order():
    n0 = Doc(text(3), image(1))
    n1 = Doc(None, image(2))  # one part: one segment
    q = Doc(text(2, 5), image(3))
    lay = layout([n0, n1], q, seq_len=200)
    expected = np.concatenate(
        [[EOD], text(3), [BREAK], image(1), [BREAK], image(2), [BREAK], text(2, 5), [BREAK], image(3), [EOD]]
    )
    assert lay.tokens.dtype == np.int32
    assert np.array_equal(lay.tokens, expected)
    assert [(s.kind, s.doc_index) for s in lay.segments] == [
        (TEXT, 0),
        (IMAGE, 0),
        (IMAGE, 1),
        (TEXT, QUERY),
        (IMAGE, QUERY),
    ]
    assert lay.segments[0] == Segment(1, 4, TEXT, 0)
    for s in lay.segments:
        assert not np.isin(lay.tokens[s.start : s.stop], [EOD, BREAK]).any()
    assert lay.dropped == () and lay.query_text_cut == lay.query_image_cut == 0


def test_tokenized_doc_is_a_doc():
    q = TokenizedDoc("k", "image+text", text_ids=text(2), image_ids=image())
    assert len(layout([], q, 100).segments) == 2


def test_over_long_layout_drops_neighbours_from_the_first():
    ns = [Doc(text(5, i), image(i)) for i in range(3)]  # 5 + 1 + 16 = 22 tokens each, plus a break
    q = Doc(text(4), image(9))  # 21 tokens
    full = layout(ns, q, 1000)
    assert len(full.tokens) == 2 + 3 * 23 + 21
    lay = layout(ns, q, len(full.tokens) - 1)
    assert lay.dropped == (0,)
    assert {s.doc_index for s in lay.segments} == {1, 2, QUERY}
    lay = layout(ns, q, 2 + 21)
    assert lay.dropped == (0, 1, 2) and lay.query_text_cut == 0
    assert np.array_equal(lay.tokens, np.concatenate([[EOD], text(4), [BREAK], image(9), [EOD]]))


def test_query_alone_too_long_cuts_caption_tail_first():
    q = Doc(text(10), image())
    lay = layout([Doc(text(3))], q, 2 + 16 + 1 + 4)
    assert lay.dropped == (0,) and lay.query_text_cut == 6 and lay.query_image_cut == 0
    assert np.array_equal(lay.tokens, np.concatenate([[EOD], text(4), [BREAK], image(), [EOD]]))
    lay = layout([], q, 2 + 10)  # no room for any caption: the caption goes, then the image's tail
    assert lay.query_text_cut == 10 and lay.query_image_cut == 6
    assert np.array_equal(lay.tokens, np.concatenate([[EOD], image()[:10], [EOD]]))
    with pytest.raises(ValueError):
        layout([], Doc(), 100)


def check_masked(key: int) -> int:
    """Build one masked sequence and check every masking rule on it; returns its span count."""
    rng = np.random.default_rng(key)
    neighbours, q = corpus_docs(rng)
    seq_len = int(rng.integers(30, 90))
    out = cm3_sequence(neighbours, q, VOCAB, seq_len, seed=7, key=f"k{key}")
    lay = out.layout
    assert len(out.tokens) <= seq_len
    assert len(out.tokens) == len(lay.tokens) + TOKENS_PER_SPAN * len(out.spans)
    # Spans lie inside one segment and never overlap.
    for span in out.spans:
        seg = lay.segments[span.segment]
        assert seg.start <= span.start < span.stop <= seg.stop
        assert not np.isin(lay.tokens[span.start : span.stop], [EOD, BREAK]).any()
    for a, b in zip(out.spans, out.spans[1:], strict=False):
        assert a.stop <= b.start
    # Each sentinel appears twice: in place, then at the end followed by its span and <eoss>.
    toks = out.tokens.tolist()
    end = toks.index(EOD, 1) + 1
    tail = toks[end:]
    pos = 0
    for i, span in enumerate(out.spans):
        s = VOCAB.sentinel(i)
        assert toks.count(s) == 2 and toks[:end].count(s) == 1
        body = lay.tokens[span.start : span.stop].tolist()
        assert tail[pos : pos + len(body) + 2] == [s, *body, EOSS]
        pos += len(body) + 2
    assert pos == len(tail)
    assert np.array_equal(unmask(out.tokens, VOCAB), lay.tokens)
    return len(out.spans)


def test_masking_rules_and_round_trip():
    counts = [check_masked(key) for key in range(300)]
    assert sum(counts) > 100 and max(counts) >= 2


def test_masking_is_seeded_per_key():
    neighbours, q = corpus_docs(np.random.default_rng(0))
    lay = layout(neighbours, q, 500)
    same = [mask(lay, 3, "abc", VOCAB, 8).tokens for _ in range(2)]
    assert np.array_equal(*same)
    spans = {tuple(mask(lay, 3, f"key{i}", VOCAB, 8).spans) for i in range(40)}
    assert len(spans) > 10  # different keys draw different spans
    counts = [len(mask(lay, 3, f"key{i}", VOCAB, 8).spans) for i in range(300)]
    assert 0 in counts and max(counts) >= 2  # Poisson(1): some unmasked, some with several spans


def test_mask_respects_limits():
    lay = layout([], Doc(text(30), image()), 200)
    assert all(len(mask(lay, 0, f"k{i}", VOCAB, 1).spans) <= 1 for i in range(50))
    tight = len(lay.tokens) + 2  # room for no span at all
    assert all(not mask(lay, 0, f"k{i}", VOCAB, 8, seq_len=tight).spans for i in range(50))
    with pytest.raises(ValueError):
        mask(lay, 0, "k", VOCAB, VOCAB.num_sentinels + 1)


def test_masking_none_keeps_the_layout():
    neighbours, q = corpus_docs(np.random.default_rng(1))
    out = cm3_sequence(neighbours, q, VOCAB, 500, seed=0, key="k", masking="none")
    assert out.spans == [] and np.array_equal(out.tokens, layout(neighbours, q, 500).tokens)


def test_unmask_rejects_malformed():
    s0 = VOCAB.sentinel(0)
    t = int(text(1)[0])
    for bad in ([EOD, s0, EOD], [EOD, s0, EOD, s0, t], [EOD, t, EOD, s0, t, EOSS], [t, EOD]):
        with pytest.raises(ValueError):
            unmask(np.array(bad), VOCAB)
    assert unmask(np.array([EOD, s0, EOD, s0, t, EOSS]), VOCAB).tolist() == [EOD, t, EOD]
