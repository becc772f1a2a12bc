"""The neighbour join: each query gets its neighbours' documents, in rank order, through keyed joins."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from schemas.records import Neighbour, TokenizedDoc
from transforms.assemble import JoinNeighbours


def doc(key):
    return TokenizedDoc(key, "text", np.array([len(key)], dtype=np.int32), None)


def test_join_orders_by_rank_and_keeps_queries_without_neighbours():
    docs = [doc(k) for k in ("q1", "q2", "a", "bb", "ccc")]
    neighbours = [
        Neighbour("q1", 1, "bb", 0.5, "text", "text"),
        Neighbour("q1", 0, "a", 0.7, "image", "text"),
        Neighbour("q1", 2, "elsewhere", 0.4, "text", "text"),  # not in this corpus: skipped
        Neighbour("q2", 0, "a", 0.6, "text", "text"),
    ]
    with TestPipeline() as p:
        ns = p | "N" >> beam.Create(neighbours)
        out = (
            p
            | "D" >> beam.Create([(d.key, d) for d in docs])
            | JoinNeighbours(ns)
            | beam.Map(lambda qn: (qn[0].key, [(n.rank, d.key) for n, d in qn[1]]))
        )
        assert_that(
            out,
            equal_to([("q1", [(0, "a"), (1, "bb")]), ("q2", [(0, "a")]), ("a", []), ("bb", []), ("ccc", [])]),
        )
