"""Stream CM3 shards (`shards/cm3-*.tar`) into training batches, deterministically and resumably.

The stream is a function of (shard list, seed, batch position) only:

- Epoch e visits the shards in the order `permutation(seed, e)` (or sorted order without shuffle),
  identical on every node and worker; `wds.split_by_node` then `split_by_worker_role` (webdataset's
  `split_by_worker`, keyed by a worker role) deal that list round-robin, so nodes and workers read
  disjoint shards. Samples keep their order inside a shard
  (the pipeline sorts them by key, and keys land in shards by hash, which already mixes them).
- Each worker turns its samples into windows of `seq_len + 1` tokens (packed or padded), batches
  them itself and loops over epochs forever, so it never runs dry. The DataLoader hands out batch i
  from worker `i % num_workers` (its in-order default), hence "batches consumed" is the whole data
  position: a resumed stream skips its first `skip_batches` batches, each worker skipping its share
  (with worker ids rotated, as a restarted DataLoader begins with worker 0 mid-cycle), and continues with exactly the batches an uninterrupted run would have seen. Skipping reads the
  consumed part of the stream again (no model work); only the window assembly is repeated.

Shards are untrusted input: `tokens.npy` is read with `allow_pickle=False` and checked to be a 1-D
integer array inside the vocabulary.
"""

from __future__ import annotations

import functools
import glob
import io
import itertools
import json
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from schemas.records import QUERY
from schemas.vocab import BREAK, EOD, EOSS, PAD, Vocab
from transforms.lib.io import atomic_open, expand_patterns, write_tar

# ---------------------------------------------------------------------------------------------
# Shard lists and the vocabulary.


def expand_shards(pattern_or_urls: str | Sequence[str]) -> list[str]:
    """Expand `{000..009}` braces and local globs into a sorted, de-duplicated shard list.

    Args:
        pattern_or_urls: a pattern, a `::`-separated list of patterns, or a sequence of patterns.
            Remote URLs (`s3://`, `gs://`, `pipe:` ...) are only brace-expanded.
    """
    patterns = [pattern_or_urls] if isinstance(pattern_or_urls, str) else list(pattern_or_urls)
    urls: list[str] = []
    for url in expand_patterns(patterns, "::"):
        local = "://" not in url and not url.startswith("pipe:")
        if local and glob.has_magic(url):
            urls += glob.glob(url)
        else:
            urls.append(url)
    if not urls:
        raise FileNotFoundError(f"no shards match {pattern_or_urls!r}")
    return sorted(set(urls))


def split_eval(urls: Sequence[str], eval_pattern: str | None = None) -> tuple[list[str], list[str]]:
    """Train and held-out shard lists.

    Args:
        urls: all shards.
        eval_pattern: the held-out shards; "none" for no evaluation; None takes the build's
            `heldout/` shards beside the (local) training shards when there are any (`--holdout_fraction`:
            their queries never served as training neighbours), else holds out the last shard of
            `urls` when there are at least two.
    """
    urls = list(urls)
    if eval_pattern == "none":
        return urls, []
    if eval_pattern is None and urls and "://" not in urls[0] and not urls[0].startswith("pipe:"):
        heldout = sorted(glob.glob(os.path.join(os.path.dirname(urls[0]), "heldout", "*.tar")))
        if heldout:
            return [u for u in urls if u not in set(heldout)], heldout
    if eval_pattern:
        held = expand_shards(eval_pattern)
        return [u for u in urls if u not in set(held)], held
    return (urls[:-1], urls[-1:]) if len(urls) >= 2 else (urls, [])


def find_vocab(urls: Sequence[str], vocab_path: str | None = None) -> Vocab:
    """The corpus's `Vocab`: from `vocab_path`, or `tokenizers/vocab.json` beside the shards' folder."""
    if vocab_path is None:
        vocab_path = os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(urls[0]))), "tokenizers", "vocab.json"
        )
    with open(vocab_path, encoding="utf-8") as f:
        return Vocab.from_json(f.read())


# ---------------------------------------------------------------------------------------------
# Samples.


# The header np.save writes for a 1-D integer array (format 1.0); anything else takes np.load's path.
_NPY_1D_INT = re.compile(rb"\{'descr': '([<|][iu][1248])', 'fortran_order': False, 'shape': \((\d+),\), \} *\n")


def decode_tokens(data: bytes, vocab_size: int | None = None) -> np.ndarray:
    """`tokens.npy` bytes → (T,) int64 ids, refusing pickles, non-integer or out-of-vocabulary arrays."""
    header_len = int.from_bytes(data[8:10], "little")
    match = _NPY_1D_INT.fullmatch(data, 10, 10 + header_len) if data[:8] == b"\x93NUMPY\x01\x00" else None
    if match:
        # The pipeline's shards always take this path: np.load parses each header with ast, which
        # costs as much as the rest of reading a short sample.
        arr = np.frombuffer(data, np.dtype(match[1].decode()), count=int(match[2]), offset=10 + header_len)
    else:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tokens.npy must be a 1-D integer array, got {arr.dtype} {arr.shape}")
    arr = arr.astype(np.int64)
    if len(arr) and (arr.min() < 0 or (vocab_size is not None and arr.max() >= vocab_size)):
        raise ValueError(f"token ids outside [0, {vocab_size}): min {arr.min()}, max {arr.max()}")
    return arr


def query_token_loss_mask(tokens: np.ndarray, meta: dict, kinds: Sequence[str] = ("text", "image")) -> np.ndarray:
    """Mark the query's own tokens (the last document) in a masked CM3 sequence.

    `meta["segments"]` and `meta["masked_spans"]` are in the coordinates of the plain layout;
    causal masking moved each span to the end (`<sentinel:i> span <eoss>`), so query tokens inside a
    span are marked where they now stand. Sentinels, breaks and `<eod>`s are never marked. Meant as
    a `loss_mask` to compare the query's loss with and without retrieved documents in context.

    Args:
        tokens: (T,) the stored sequence.
        meta: the sample's json (`segments` as [start, stop, kind, doc_index], `masked_spans` as
            [start, stop, segment]).
        kinds: which of the query's parts to mark ("text", "image").

    Returns:
        (T,) bool.
    """
    spans = sorted((int(s[0]), int(s[1])) for s in meta.get("masked_spans", []))
    layout_len = len(tokens) - 3 * len(spans)  # each span adds an in-place sentinel, a tail sentinel and <eoss>
    if layout_len < 0 or any(int(s[1]) > layout_len for s in meta["segments"]):
        raise ValueError("segments or masked_spans do not fit the sequence")
    # Where every layout position ended up after masking.
    where = np.empty(layout_len, dtype=np.int64)
    shift, prev, tail = 0, 0, layout_len - sum(b - a for a, b in spans) + len(spans)
    for a, b in spans:
        where[prev:a] = np.arange(prev, a) - shift
        where[a:b] = np.arange(tail + 1, tail + 1 + b - a)  # after the tail's sentinel
        shift += b - a - 1
        tail += b - a + 2
        prev = b
    where[prev:] = np.arange(prev, layout_len) - shift
    mask = np.zeros(len(tokens), dtype=bool)
    for start, stop, kind, doc_index in meta["segments"]:
        if int(doc_index) == QUERY and kind in kinds:
            mask[where[int(start) : int(stop)]] = True
    return mask


# ---------------------------------------------------------------------------------------------
# The stream.


def _shard_order(urls: Sequence[str], shuffle: bool, seed: int, epoch: int) -> list[str]:
    if not shuffle:
        return list(urls)
    return [urls[i] for i in np.random.default_rng([seed, epoch]).permutation(len(urls))]


def split_by_worker_role(src: Iterator[Any], role: int, num_workers: int) -> Iterator[Any]:
    """`wds.split_by_worker` for a given worker role: every num_workers-th shard, from the role-th.

    The same deal as webdataset's splitter, but keyed by the role `ShardStream` assigns rather than
    the DataLoader worker id, so a resumed loader can continue the round-robin mid-cycle.
    """
    yield from itertools.islice(src, role, None, num_workers)


def _world() -> tuple[int, int]:
    rank, world_size, _, _ = wds.utils.pytorch_worker_info()
    return rank, world_size


class ShardStream(IterableDataset):
    """An IterableDataset of ready batches: dicts of `x`, `y` (B, T) int64 and optionally `loss_mask` (B, T) bool.

    Built by `shard_loader`; see the module docstring for the order and resume rules.
    """

    def __init__(
        self,
        urls: Sequence[str],
        seq_len: int,
        batch_size: int,
        shuffle_shards: bool,
        seed: int,
        pack: bool,
        loop: bool,
        skip_batches: int = 0,
        vocab_size: int | None = None,
        query_mask: bool = False,
    ) -> None:
        self.urls = list(urls)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.shuffle_shards = shuffle_shards
        self.seed = seed
        self.pack = pack
        self.loop = loop
        self.skip_batches = skip_batches
        self.vocab_size = vocab_size
        self.query_mask = query_mask

    def samples(self, epoch: int, role: int, num_workers: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """This node's and worker role's (tokens, query mask or None) for one epoch."""
        dataset = wds.WebDataset(
            _shard_order(self.urls, self.shuffle_shards, self.seed, epoch),
            shardshuffle=False,  # the order is set above, seeded per epoch, the same on every worker
            nodesplitter=wds.split_by_node,
            workersplitter=functools.partial(split_by_worker_role, role=role, num_workers=num_workers),
            empty_check=False,
        )
        for sample in dataset:
            tokens = decode_tokens(sample["tokens.npy"], self.vocab_size)
            mask = query_token_loss_mask(tokens, json.loads(sample["json"])) if self.query_mask else None
            yield tokens, mask

    def windows(self, role: int = 0, num_workers: int = 1) -> Iterator[np.ndarray]:
        """(R, seq_len + 1) windows, packed end to end or one padded sample each; row 0 holds the
        tokens and, with query_mask, row 1 the mask (a second row keeps both in step at no extra cost).
        """
        n = self.seq_len + 1
        buf = np.zeros((2 if self.query_mask else 1, 0), np.int64)  # (R, L)
        for epoch in itertools.count() if self.loop else range(1):
            seen = False
            for tokens, mask in self.samples(epoch, role, num_workers):
                seen = True
                rows = tokens[None] if mask is None else np.stack([tokens, mask])  # (R, L)
                if not self.pack:
                    # Pad after the sample; a sample longer than the window loses its tail.
                    window = np.zeros((len(rows), n), np.int64)
                    window[0] = PAD
                    window[:, : min(rows.shape[1], n)] = rows[:, :n]
                    yield window
                    continue
                buf = np.concatenate([buf, rows], axis=1)
                while buf.shape[1] >= n:
                    yield buf[:, :n]
                    # The window's last token is the next window's first input: every token is a target once.
                    buf = buf[:, n - 1 :]
            if self.loop and not seen:
                raise ValueError(f"an epoch over {len(self.urls)} shards gave this worker no sample")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader takes batch i from worker i % num_workers, starting with worker 0 on every
        # (re)start. After `skip_batches` the next batch is due from role skip % num_workers, so worker
        # ids are rotated onto roles: worker 0 plays that role, and each role skips its share.
        role = (worker + self.skip_batches) % num_workers
        skip = self.skip_batches // num_workers + (role < self.skip_batches % num_workers)
        windows = itertools.islice(self.windows(role, num_workers), skip * self.batch_size, None)
        while batch := list(itertools.islice(windows, self.batch_size)):
            if self.loop and len(batch) < self.batch_size:
                return
            w = torch.from_numpy(np.stack(batch))  # (B, R, T + 1)
            out = {"x": w[:, 0, :-1].contiguous(), "y": w[:, 0, 1:].contiguous()}  # (B, T) each
            if self.query_mask:
                out["loss_mask"] = w[:, 1, 1:].bool()  # (B, T), aligned with y
            yield out


def shard_loader(
    pattern_or_urls: str | Sequence[str],
    seq_len: int,
    batch_size: int,
    shuffle_shards: bool = True,
    seed: int = 0,
    pack: bool = True,
    *,
    num_workers: int = 0,
    loop: bool = True,
    skip_batches: int = 0,
    vocab_size: int | None = None,
    query_mask: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A torch DataLoader streaming batches from WebDataset shards.

    Args:
        pattern_or_urls: shard pattern(s), see `expand_shards`.
        seq_len: tokens per row of `x` and `y` (windows are seq_len + 1 long).
        batch_size: rows per batch.
        shuffle_shards: visit the shards in a seeded order that changes every epoch.
        seed: seeds the shard order.
        pack: concatenate samples end to end (no padding) rather than pad each to a window.
        num_workers: DataLoader worker processes; each reads its own shards (capped at the shards
            per node, so no worker is left without data).
        loop: repeat epochs forever with full batches (training); False gives one pass, last batch
            possibly short (evaluation).
        skip_batches: batches already consumed (resuming).
        vocab_size: when given, ids outside the vocabulary raise.
        query_mask: add `loss_mask` marking the query's own tokens (`query_token_loss_mask`).
        pin_memory: pin batches for faster host-to-GPU copies.

    Returns:
        A DataLoader yielding dicts of `x`, `y` (B, seq_len) int64 and, with query_mask, `loss_mask`.
    """
    urls = expand_shards(pattern_or_urls)
    _, world_size = _world()
    if len(urls) < world_size:
        raise ValueError(f"{len(urls)} shards cannot feed {world_size} nodes")
    num_workers = min(num_workers, len(urls) // world_size)
    stream = ShardStream(
        urls, seq_len, batch_size, shuffle_shards, seed, pack, loop, skip_batches, vocab_size, query_mask
    )
    return DataLoader(
        stream,
        batch_size=None,  # the workers batch, so a batch never mixes two workers' windows
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None,
    )


# ---------------------------------------------------------------------------------------------
# A synthetic corpus in the shard format, for tests, benchmarks and smoke runs of the trainer.

SYNTHETIC_VOCAB = Vocab(num_sentinels=2, text_size=40, image_codes=32, tokens_per_image=8)


def synthetic_sample(rng: np.random.Generator, vocab: Vocab, span: bool) -> tuple[np.ndarray, dict]:
    """One CM3 sequence `<eod> Tn <break> In <break> Tq <break> Iq <eod>` with a learnable structure.

    The image is a fixed function of its caption, and the neighbour is the query itself half of
    the time, so the model can learn both the caption→image map and copying from retrieval. With
    `span`, one span of the query's image is masked CM3-style (sentinel in place, moved to the end).
    """
    words = min(vocab.text_size, 16)

    def doc() -> tuple[np.ndarray, np.ndarray]:
        text = rng.integers(0, words, size=int(rng.integers(3, 7)))
        j = np.arange(vocab.tokens_per_image)
        image = (text[j % len(text)] * 5 + j) % vocab.image_codes
        return text + vocab.text_start, image + vocab.image_start

    query = doc()
    neighbour = query if rng.random() < 0.5 else doc()
    parts = [neighbour[0], neighbour[1], query[0], query[1]]
    tokens, segments, pos = [EOD], [], 1
    for i, (ids, kind) in enumerate(zip(parts, ["text", "image"] * 2, strict=True)):
        if i:
            tokens.append(BREAK)
            pos += 1
        tokens += ids.tolist()
        segments.append([pos, pos + len(ids), kind, 0 if i < 2 else QUERY])
        pos += len(ids)
    tokens.append(EOD)
    spans = []
    if span:
        start, stop = segments[3][0] + 2, segments[3][0] + 5
        spans = [[start, stop, 3]]
        tokens = (
            tokens[:start] + [vocab.sentinel(0)] + tokens[stop:] + [vocab.sentinel(0)] + tokens[start:stop] + [EOSS]
        )
    meta = {"segments": segments, "masked_spans": spans, "neighbour_keys": ["n"], "query_key": "q"}
    return np.asarray(tokens, np.int32), meta


def write_synthetic_corpus(
    out_dir: str, num_shards: int = 4, samples_per_shard: int = 64, seed: int = 0, vocab: Vocab = SYNTHETIC_VOCAB
) -> list[str]:
    """Write `out_dir/shards/cm3-00000i.tar` and `out_dir/tokenizers/vocab.json`; return the shard paths.

    Members are sorted with mtime 0 like the pipeline's shards; every other sample has a masked span.
    """
    os.makedirs(os.path.join(out_dir, "shards"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "tokenizers"), exist_ok=True)
    with open(os.path.join(out_dir, "tokenizers", "vocab.json"), "w", encoding="utf-8") as f:
        f.write(vocab.to_json())
    rng = np.random.default_rng(seed)
    paths = []
    for s in range(num_shards):
        path = os.path.join(out_dir, "shards", f"cm3-{s:06d}.tar")
        members = []
        for i in range(samples_per_shard):
            tokens, meta = synthetic_sample(rng, vocab, span=i % 2 == 1)
            npy = io.BytesIO()
            np.save(npy, tokens, allow_pickle=False)
            key = f"s{s:04d}i{i:06d}"
            members += [
                (f"{key}.json", json.dumps(meta, sort_keys=True).encode()),
                (f"{key}.tokens.npy", npy.getvalue()),
            ]
        with atomic_open(path) as f:
            write_tar(f, members, mode=0o644)
        paths.append(path)
    return paths


__all__ = [
    "SYNTHETIC_VOCAB",
    "ShardStream",
    "decode_tokens",
    "expand_shards",
    "find_vocab",
    "query_token_loss_mask",
    "shard_loader",
    "split_by_worker_role",
    "split_eval",
    "synthetic_sample",
    "write_synthetic_corpus",
]
