"""Beam mechanics every stage shares, written once.

- `KeyHashBuckets`: "how many buckets follows from the whole input, which bucket from the key alone":
  model batches, bank parts, parquet files and shards are all cut this way, so no runner's bundling
  can change them.
- `KeyedBatches`: model batches made of keys, not of bundles.
- `PerWorker`: a loaded model, bank or tokenizer set, once per worker process, shared by its threads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.utils import shared

from transforms.lib.rng import bucket_of


def _bucketed(element: Any, n: int, key: Callable, value: Callable | None) -> tuple[int, Any]:
    return bucket_of(key(element), n), (element if value is None else value(element))


class KeyHashBuckets(beam.PTransform):
    """PCollection[T] → ((bucket, value(T)) pairs, a one-element PCollection holding the bucket count).

    The bucket count is `num_buckets(total)`, the total being the input's element count, or with
    `measure` and `add` the sum of `measure(element)` (shards count samples and bytes). The bucket is
    `bucket_of(key(element), count)`.

    Args:
        num_buckets: total → how many buckets (at least 1).
        key: element → the string it is hashed by (default: its `.key`).
        value: element → what travels with the bucket (default: the element).
        measure, add: element → its size, and how two sizes add up (default: count elements).
    """

    def __init__(
        self,
        num_buckets: Callable[[Any], int],
        key: Callable[[Any], str] = lambda e: e.key,
        value: Callable | None = None,
        measure: Callable | None = None,
        add: Callable | None = None,
    ):
        super().__init__()
        self._num_buckets, self._key, self._value, self._measure, self._add = num_buckets, key, value, measure, add

    def expand(self, pcoll):
        if self._measure is None:
            total = pcoll | "Count" >> beam.combiners.Count.Globally()
        else:
            total = pcoll | "Sizes" >> beam.Map(self._measure) | "Total" >> beam.CombineGlobally(self._add)
        n = total | "NumBuckets" >> beam.Map(self._num_buckets)
        keyed = pcoll | "Bucket" >> beam.Map(_bucketed, beam.pvalue.AsSingleton(n), self._key, self._value)
        return keyed, n


def _chunks(keyed: tuple[int, Iterable], batch_size: int) -> Iterator[tuple]:
    _, elements = keyed
    ordered = sorted(elements, key=lambda e: e.key)
    for i in range(0, len(ordered), batch_size):
        yield tuple(ordered[i : i + batch_size])


class KeyedBatches(beam.PTransform):
    """PCollection[Example] → tuples of at most `batch_size` examples, chosen by their keys alone.

    Which examples share a model batch decides the last bits of their embeddings (batched matmuls
    round differently by batch shape), so batches follow from (key hash, corpus size), never from
    how a runner cut the data into bundles. The CLIP and the image tokenizers batch this way.
    """

    def __init__(self, batch_size: int):
        super().__init__()
        self._batch_size = batch_size

    def expand(self, examples):
        per_bucket = self._batch_size * 4  # about four model batches per bucket
        keyed, _ = examples | "Buckets" >> KeyHashBuckets(lambda count: max(1, -(-count // per_bucket)))
        return keyed | "Group" >> beam.GroupByKey() | "Chunk" >> beam.FlatMap(_chunks, self._batch_size)


class _Held:
    """A weak-referenceable box: `shared.Shared` caches only such objects (a tuple is not one)."""

    __slots__ = ("value", "__weakref__")

    def __init__(self, value: Any):
        self.value = value


class PerWorker:
    """One loaded object per worker process and tag (`apache_beam.utils.shared`), shared by threads.

    Made where a pipeline is built and handed to the DoFns that use the object: they unpickle to the
    same handle, so two stages of one pipeline share one load (TokenizeDocs and BuildSequences share
    the tokenizers), while the next pipeline in the same process makes a new handle and loads afresh
    (a rebuilt directory is never served from a stale cache). A new tag (another bank or tokenizer
    directory) loads again.
    """

    def __init__(self):
        self._shared = shared.Shared()
        self._tag: str | None = None
        self._held: _Held | None = None

    def get(self, tag: str, load: Callable[[], Any]) -> Any:
        if self._held is None or self._tag != tag:
            self._held = self._shared.acquire(lambda: _Held(load()), tag=tag)
            self._tag = tag
        return self._held.value

    def __getstate__(self):  # what is loaded stays in its process
        return {"_shared": self._shared, "_tag": None, "_held": None}
