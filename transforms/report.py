"""The report stage's Beam part: stage a deterministic sample of queries and their neighbours.

`ReportSample` writes the sample as JSON under the build's staging folder; once the run's counts
are known the build renders it into `report.html` (`transforms.lib.report.render_staged_report`).
"""

from __future__ import annotations

import json

import apache_beam as beam
import fsspec

from transforms.lib.report import report_doc, report_doc_json
from transforms.lib.rng import stable_hash

REPORT_QUERIES = 12


class ReportSample(beam.PTransform):
    """Stage a deterministic sample of queries with their neighbours (images included) as JSON.

    The sample is the REPORT_QUERIES keys with the smallest stable hash among queries that got
    neighbours; only those queries' documents ever meet on one worker.
    """

    def __init__(self, path: str, neighbours):
        super().__init__()
        self._path, self._neighbours = path, neighbours

    def expand(self, examples):
        chosen = (
            self._neighbours
            | "QueryKeys" >> beam.Map(lambda nb: nb.query_key)
            | "Distinct" >> beam.Distinct()
            | "Smallest" >> beam.combiners.Top.Of(REPORT_QUERIES, key=stable_hash, reverse=True)
        )
        picked = self._neighbours | "Picked" >> beam.Filter(
            lambda nb, keys: nb.query_key in keys, beam.pvalue.AsSingleton(chosen)
        )
        wanted = (
            picked
            | "Wanted" >> beam.FlatMap(lambda nb: (nb.query_key, nb.doc_key))
            | "WantedList" >> beam.combiners.ToList()
            | "WantedSet" >> beam.Map(set)
        )
        docs = (
            examples
            | "Thumbnails" >> beam.Map(report_doc)  # waits for retrieval: thumbnails, not whole examples
            | "Docs" >> beam.Filter(lambda d, keys: d[0] in keys, beam.pvalue.AsSingleton(wanted))
            | "DocList" >> beam.combiners.ToList()
        )
        return docs | "Write" >> beam.Map(
            _write_report_sample, self._path, beam.pvalue.AsList(picked), beam.pvalue.AsSingleton(chosen)
        )


def _write_report_sample(docs, path: str, neighbours, chosen) -> str:
    by_key = {d[0]: d for d in docs}

    def doc(key: str) -> dict:
        return report_doc_json(by_key.get(key), key)

    queries = []
    for key in sorted(chosen, key=stable_hash):
        q = doc(key)
        rows = sorted((nb for nb in neighbours if nb.query_key == key), key=lambda nb: nb.rank)
        q["neighbours"] = [
            {**doc(nb.doc_key), "score": nb.score, "via": nb.via, "rank": nb.rank, "modality": nb.doc_modality}
            for nb in rows
        ]
        queries.append(q)
    with fsspec.open(path, "w") as f:
        json.dump(queries, f, sort_keys=True)
    return path
