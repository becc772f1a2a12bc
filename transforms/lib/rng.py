"""Randomness derived from (seed, key, purpose), never from worker state.

Every seeded choice in the pipeline (query dropout, masking spans, neighbour sampling) draws from
a generator made here, so reruns and any runner parallelism give the same bytes.
"""

from __future__ import annotations

import hashlib

import numpy as np


def rng_for(seed: int, key: str, purpose: str) -> np.random.Generator:
    """A numpy Generator determined only by its arguments.

    Args:
        seed: the run's seed.
        key: the example key.
        purpose: a short label so two uses for the same key draw independent streams.
    """
    digest = hashlib.blake2b(f"{seed}\x00{key}\x00{purpose}".encode(), digest_size=16).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))


def stable_hash(text: str) -> int:
    """A 64-bit hash of `text` that is the same in every process (unlike Python's `hash`)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def query_dropout(token_ids: list[int], rate: float, seed: int, key: str) -> list[int]:
    """RA-CM3 query dropout: drop `rate` of a caption's tokens before it is embedded as a query.

    Keeps at least one token, keeps order, and is seeded by (seed, key) so reruns agree.

    Args:
        token_ids: the caption's content tokens (no start/end specials).
        rate: share of tokens to drop (0.2 in the paper).
        seed: the run's seed.
        key: the example key.
    """
    n = len(token_ids)
    n_drop = min(int(round(rate * n)), max(n - 1, 0))
    if n_drop == 0:
        return list(token_ids)
    drop = set(rng_for(seed, key, "query_dropout").choice(n, size=n_drop, replace=False).tolist())
    return [t for i, t in enumerate(token_ids) if i not in drop]


def bucket_of(key: str, num_buckets: int) -> int:
    """The bucket of a key among `num_buckets`: a process-independent hash, so every runner agrees.

    Model batches, bank parts, parquet files and shards are all cut this way (`transforms.common.KeyHashBuckets`).
    """
    return stable_hash(key) % num_buckets


def is_held_out(key: str, fraction: float) -> bool:
    """Whether `key` belongs to the held-out split: decided by the key alone, so the split is the same
    for every seed, runner and corpus size, and an example never changes sides as a corpus grows."""
    return fraction > 0 and stable_hash(f"held_out\x00{key}") % 1_000_000 < fraction * 1_000_000
