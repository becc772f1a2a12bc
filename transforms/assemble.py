"""Join each query with its neighbours' documents by key, never collecting the corpus on one worker.

Two keyed joins (CoGroupByKey): neighbours meet their documents by `doc_key`, then the fetched
documents meet their query by `query_key`. A document retrieved by many queries is shuffled once
per query that wants it, which is the size of the output anyway.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics

from schemas.records import Neighbour, TokenizedDoc


def _fetch(keyed):
    _, grouped = keyed
    docs = list(grouped["doc"])
    if not docs:  # a bank document that is not in this run's input (e.g. --memory_bank of another corpus)
        Metrics.counter("sequences", "neighbours_without_document").inc(sum(1 for _ in grouped["wanted"]))
        return
    for n in grouped["wanted"]:
        yield n.query_key, (n, docs[0])


def _gather(keyed):
    key, grouped = keyed
    queries = list(grouped["query"])
    if not queries or ("keep" in grouped and not list(grouped["keep"])):
        return
    neighbours = sorted(grouped["neighbours"], key=lambda nd: nd[0].rank)
    yield queries[0], [(n, doc) for n, doc in neighbours]


class JoinNeighbours(beam.PTransform):
    """(docs keyed by key, Neighbour rows) → (query TokenizedDoc, [(Neighbour, TokenizedDoc)] by rank).

    Every query document comes out once, with an empty list when nothing was retrieved for it.

    Args:
        neighbours: PCollection[Neighbour].
        keep: optional PCollection of (key, anything): only these keys come out as queries (the
            examples that got through every earlier stage).
        documents: optional extra (key, TokenizedDoc) pairs that can be neighbours but are never
            queries (another corpus's documents, when retrieving from its bank).
    """

    def __init__(self, neighbours, keep=None, documents=None):
        super().__init__()
        self._neighbours, self._keep, self._documents = neighbours, keep, documents

    def expand(self, docs):
        by_doc = self._neighbours | "ByDocKey" >> beam.Map(lambda n: (n.doc_key, n))
        candidates = docs if self._documents is None else (docs, self._documents) | "AllDocs" >> beam.Flatten()
        fetched = (
            {"doc": candidates, "wanted": by_doc}
            | "FetchDocs" >> beam.CoGroupByKey()
            | "ToQuery" >> beam.FlatMap(_fetch)
        )
        inputs = {"query": docs, "neighbours": fetched}
        if self._keep is not None:
            inputs["keep"] = self._keep
        return inputs | "GatherByQuery" >> beam.CoGroupByKey() | "Ordered" >> beam.FlatMap(_gather)


__all__ = ["JoinNeighbours", "Neighbour", "TokenizedDoc"]
