"""CM3 layout and causal masking of one training sequence, as pure functions (no Beam).

Layout (Meta's metaseq code for RA-CM3/CM3Leon): the retrieved documents first, the query last,
each document contributing its caption then its image as separate segments:

    <eod> T1 <break> I1 <break> T2 <break> I2 <break> ... Tq <break> Iq <eod>

A document with one part contributes one segment. When the whole does not fit `seq_len`, retrieved
documents are dropped from the first one on (the sequence is cut from the left, so what stays is
nearest the query) before the query is ever cut. A query too long by itself loses the tail of its
caption first, the whole caption if need be, and only then the tail of its image: a partial image
cannot be decoded, a shortened caption still reads.

Causal masking (CM3, arXiv 2201.07520; metaseq's `CausalMaskedDocumentToSequenceDataset`): the
number of spans is n ~ Poisson(1) clamped to [0, max_spans] as in metaseq, so about 37% of the
sequences stay plain left-to-right (n = 0). Span ends are drawn uniformly over the sequence (n^2
candidates, overlapping ones rejected), then clipped to the one segment they overlap most, so a
span never covers a `<break>` or `<eod>` (CM3Leon's change). Spans are ordered by position; span i
is replaced in place by `<sentinel:i>` and appended after the final `<eod>` as
`<sentinel:i> span <eoss>`. Each span adds 3 tokens, so `cm3_sequence` reserves 3 * max_spans
tokens of the layout budget and masked sequences always fit `seq_len` (metaseq truncated instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from schemas.records import QUERY
from schemas.vocab import BREAK, EOD, Vocab
from transforms.lib.rng import rng_for

TEXT, IMAGE = "text", "image"
TOKENS_PER_SPAN = 3  # a span costs its in-place sentinel plus `<sentinel:i> ... <eoss>` at the end


@dataclass(frozen=True)
class Doc:
    """A document in global ids (see schemas/vocab.py); a missing part is None or empty.

    `schemas.records.TokenizedDoc` has the same two fields and can be passed wherever a Doc is.
    """

    text_ids: Any = None  # sequence of int, or None
    image_ids: Any = None  # sequence of int, or None


class Segment(NamedTuple):
    """One caption or image of the layout: `tokens[start:stop]`, never a `<break>` or `<eod>`."""

    start: int
    stop: int
    kind: str  # "text" or "image"
    doc_index: int  # index into the neighbours given to `layout`, or QUERY (-1)


@dataclass(frozen=True)
class Layout:
    """A plain (unmasked) CM3 sequence and where its parts are."""

    tokens: np.ndarray  # (T,) int32
    segments: list[Segment]
    dropped: tuple[int, ...] = ()  # neighbour indices left out for length, in the order dropped
    query_text_cut: int = 0  # caption tokens of the query cut off its tail
    query_image_cut: int = 0  # image tokens of the query cut off its tail


class Span(NamedTuple):
    """A masked span `layout.tokens[start:stop]`, lying inside `layout.segments[segment]`."""

    start: int
    stop: int
    segment: int


@dataclass(frozen=True)
class Masked:
    """A training sequence: the layout after causal masking (no spans when n = 0 or masking is off)."""

    tokens: np.ndarray  # (T',) int32, T' = len(layout.tokens) + 3 * len(spans)
    layout: Layout
    spans: list[Span] = field(default_factory=list)  # span i ↔ <sentinel:i>


def _parts(doc: Any) -> list[tuple[str, np.ndarray]]:
    parts = []
    for kind, ids in ((TEXT, doc.text_ids), (IMAGE, doc.image_ids)):
        if ids is not None and len(ids):
            parts.append((kind, np.asarray(ids, dtype=np.int32)))
    return parts


def _cost(parts: list[tuple[str, np.ndarray]]) -> int:
    """Tokens a list of segments takes between the two `<eod>`s: the segments and their breaks."""
    return sum(len(a) for _, a in parts) + max(len(parts) - 1, 0)


def _cut_query(parts: list[tuple[str, np.ndarray]], room: int) -> tuple[list[tuple[str, np.ndarray]], int, int]:
    """Shorten the query's parts to `room` tokens (breaks included): caption tail first, then image tail."""
    text = next((a for k, a in parts if k == TEXT), None)
    image = next((a for k, a in parts if k == IMAGE), None)
    text_cut = image_cut = 0
    if text is not None:
        keep = room - (len(image) + 1 if image is not None else 0)
        if keep >= len(text):
            return parts, 0, 0
        keep = max(keep, 0)
        text_cut, text = len(text) - keep, text[:keep]
        if not len(text):
            text = None
    if image is not None:
        keep = room - (len(text) + 1 if text is not None else 0)
        if keep < len(image):
            image_cut, image = len(image) - keep, image[:keep]
    cut = [(k, a) for k, a in ((TEXT, text), (IMAGE, image)) if a is not None and len(a)]
    return cut, text_cut, image_cut


def layout(neighbours: Sequence[Any], query: Any, seq_len: int, reserve: int = 0, vocab: Any = None) -> Layout:
    """Lay out the retrieved documents then the query in at most `seq_len - reserve` tokens.

    Args:
        neighbours: retrieved documents in sequence order (each with `text_ids`, `image_ids`).
        query: the caption–image pair being trained on; must have at least one part.
        seq_len: the training sequence length.
        reserve: tokens kept free for masking (3 per span; `cm3_sequence` passes it).
        vocab: the id space whose `<eod>` / `<break>` to write (`eod_id`, `break_id`); native ids when None.
    """
    eod, brk = (EOD, BREAK) if vocab is None else (vocab.eod_id, vocab.break_id)
    budget = seq_len - reserve
    query_parts = _parts(query)
    if not query_parts:
        raise ValueError("the query document has neither text nor image tokens")
    if budget < 3:  # <eod> x <eod> is the shortest sequence
        raise ValueError(f"seq_len {seq_len} with reserve {reserve} leaves no room for a document")
    docs = [(i, _parts(n)) for i, n in enumerate(neighbours)]
    docs = [(i, p) for i, p in docs if p]  # an empty neighbour has nothing to contribute

    def total(kept: list[tuple[int, list]]) -> int:
        segments = [s for _, p in kept for s in p] + query_parts
        return 2 + _cost(segments)

    dropped: list[int] = []
    while docs and total(docs) > budget:
        dropped.append(docs.pop(0)[0])  # from the first: the left end is farthest from the query
    text_cut = image_cut = 0
    if total(docs) > budget:
        query_parts, text_cut, image_cut = _cut_query(query_parts, budget - 2)

    tokens: list[np.ndarray] = [np.array([eod], np.int32)]
    segments: list[Segment] = []
    pos = 1
    for doc_index, parts in [*docs, (QUERY, query_parts)]:
        for kind, ids in parts:
            if segments:
                tokens.append(np.array([brk], np.int32))
                pos += 1
            tokens.append(ids)
            segments.append(Segment(pos, pos + len(ids), kind, doc_index))
            pos += len(ids)
    tokens.append(np.array([eod], np.int32))
    out = np.concatenate(tokens).astype(np.int32)
    assert len(out) <= budget, (len(out), budget)
    return Layout(out, segments, tuple(dropped), text_cut, image_cut)


def draw_spans(lay: Layout, rng: np.random.Generator, n: int) -> list[Span]:
    """Up to `n` non-overlapping spans, each inside one segment, ordered by start (metaseq's sampler).

    Args:
        lay: the plain layout.
        rng: the example's generator.
        n: spans wanted; fewer come back when candidates collide or miss every segment.
    """
    if n <= 0 or not lay.segments:
        return []
    length = len(lay.tokens)
    starts = np.array([s.start for s in lay.segments])
    stops = np.array([s.stop for s in lay.segments])
    chosen: list[Span] = []
    for u in rng.uniform(size=(n * n, 2)):
        lo, hi = min(u), max(u)
        start, stop = int(lo * length), int(hi * length + 0.5)
        overlap = np.minimum(stops, stop) - np.maximum(starts, start)
        best = int(np.argmax(overlap))  # the first segment on a tie
        if overlap[best] <= 0:
            continue
        start, stop = max(start, int(starts[best])), min(stop, int(stops[best]))
        if any(max(start, s.start) < min(stop, s.stop) for s in chosen):
            continue
        chosen.append(Span(start, stop, best))
        if len(chosen) == n:
            break
    return sorted(chosen)


def mask(lay: Layout, seed: int, key: str, vocab: Vocab, max_spans: int, seq_len: int | None = None) -> Masked:
    """CM3 causal masking of a layout, seeded by (seed, key).

    Args:
        lay: the plain layout.
        seed: the run's seed.
        key: the query's key.
        vocab: the id space (sentinel ids).
        max_spans: most spans per sequence; at most `vocab.num_sentinels`.
        seq_len: when given, fewer spans are drawn if the masked sequence would not fit.
    """
    if max_spans > vocab.num_sentinels:
        raise ValueError(f"max_spans {max_spans} exceeds the vocab's {vocab.num_sentinels} sentinels")
    rng = rng_for(seed, key, "cm3_mask")
    n = min(int(rng.poisson(1.0)), max_spans)
    if seq_len is not None:
        n = min(n, max((seq_len - len(lay.tokens)) // TOKENS_PER_SPAN, 0))
    spans = draw_spans(lay, rng, n)
    if not spans:
        return Masked(lay.tokens.copy(), lay, [])
    head: list[np.ndarray] = []
    tail: list[np.ndarray] = []
    pos = 0
    for i, span in enumerate(spans):
        sentinel = np.array([vocab.sentinel(i)], np.int32)
        head += [lay.tokens[pos : span.start], sentinel]
        tail += [sentinel, lay.tokens[span.start : span.stop], np.array([vocab.eoss_id], np.int32)]
        pos = span.stop
    head.append(lay.tokens[pos:])
    return Masked(np.concatenate(head + tail).astype(np.int32), lay, spans)


def unmask(tokens: np.ndarray, vocab: Vocab) -> np.ndarray:
    """Undo `mask`: put each appended span back in place of its sentinel and drop the tail.

    Raises ValueError when the sequence is not a well-formed masked layout (a sentinel without
    its span, a span without `<eoss>`, a span used twice or never).
    """
    toks = np.asarray(tokens, dtype=np.int32)
    eod, eoss = vocab.eod_id, vocab.eoss_id
    eods = np.flatnonzero(toks == eod)
    if len(toks) == 0 or toks[0] != eod or len(eods) < 2:
        raise ValueError("not a CM3 layout: expected <eod> ... <eod>")
    end = int(eods[1]) + 1  # spans never hold <eod>, so the second one closes the layout

    is_sentinel = vocab.is_sentinel

    tail = toks[end:].tolist()
    spans: dict[int, list[int]] = {}
    i = 0
    while i < len(tail):
        if not is_sentinel(tail[i]) or tail[i] in spans:
            raise ValueError(f"expected a new sentinel at tail position {i}, got {tail[i]}")
        try:
            j = tail.index(eoss, i + 1)
        except ValueError:
            raise ValueError(f"span of sentinel {tail[i]} has no <eoss>") from None
        spans[tail[i]] = tail[i + 1 : j]
        i = j + 1
    out: list[int] = []
    used = set()
    for t in toks[:end].tolist():
        if is_sentinel(t):
            if t not in spans or t in used:
                raise ValueError(f"sentinel {t} in place has no (or a reused) span at the end")
            used.add(t)
            out += spans[t]
        else:
            out.append(t)
    if used != set(spans):
        raise ValueError("a span at the end has no sentinel in place")
    return np.asarray(out, dtype=np.int32)


def cm3_sequence(
    neighbours: Sequence[Any],
    query: Any,
    vocab: Vocab,
    seq_len: int,
    seed: int,
    key: str,
    masking: str = "causal",
    max_spans: int | None = None,
) -> Masked:
    """Layout then (optionally) causal masking: one training sequence of at most `seq_len` tokens.

    Args:
        neighbours: retrieved documents in sequence order.
        query: the caption–image pair.
        vocab: the id space.
        seq_len: the training sequence length.
        seed: the run's seed.
        key: the query's key.
        masking: "causal" or "none" (`BuildConfig.cm3_masking`).
        max_spans: most spans; defaults to `vocab.num_sentinels`.
    """
    if masking not in ("causal", "none"):
        raise ValueError(f"unknown masking {masking!r}")
    spans = vocab.num_sentinels if max_spans is None else max_spans
    if masking == "none" or spans == 0:
        lay = layout(neighbours, query, seq_len, vocab=vocab)
        return Masked(lay.tokens.copy(), lay, [])
    lay = layout(neighbours, query, seq_len, reserve=TOKENS_PER_SPAN * spans, vocab=vocab)
    return mask(lay, seed, key, vocab, spans, seq_len)


__all__ = [
    "IMAGE",
    "QUERY",
    "TEXT",
    "TOKENS_PER_SPAN",
    "Doc",
    "Layout",
    "Masked",
    "Segment",
    "Span",
    "cm3_sequence",
    "draw_spans",
    "layout",
    "mask",
    "unmask",
]
