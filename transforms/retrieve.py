"""RA-CM3 retrieval in the pipeline: batches of examples search the memory bank, and the rows are written.

The rules, the search and the selection are `transforms/lib/retrieve.py`; this module holds the DoFn
that runs them on batches (the bank loaded once per worker), the composite `Retrieve`, and the writers
of `neighbours/` and `retrieval_counts/`.
"""

from __future__ import annotations

import dataclasses
import time

import apache_beam as beam
from apache_beam.metrics import Metrics

from schemas.artifacts import NEIGHBOURS, RETRIEVAL_COUNTS
from schemas.records import EmbeddedExample, Neighbour, RetrievalCounts
from transforms.common import PerWorker
from transforms.lib.memory_bank import load_bank
from transforms.lib.retrieve import VIAS, RetrievalRules, query_view, retrieve_batch
from transforms.parquet_io import WriteSortedParquet

COUNTS = "counts"  # tag of the DoFn's counts output


class RetrieveDoFn(beam.DoFn):
    """Batches of EmbeddedExample → Neighbour (main output) and RetrievalCounts (tag `counts`).

    The bank is loaded once per worker process and shared by its threads (`transforms.common.PerWorker`).
    With a fixed `bank_dir` it loads in setup(); with the directory as a side input (a bank built in
    the same pipeline) it loads on the first batch.

    Args:
        bank_dir: the bank directory, or None when it comes as the `bank_dir` side input of process().
        rules: selection parameters.
    """

    def __init__(self, bank_dir: str | None, rules: RetrievalRules):
        self._bank_dir, self._rules = bank_dir, rules
        self._bank = PerWorker()
        self._queries = Metrics.counter("retrieve", "queries")
        self._selected = Metrics.counter("retrieve", "neighbours_selected")
        self._latency = Metrics.distribution("retrieve", "batch_ms")
        self._skips = {f: Metrics.counter("retrieve", f) for f in _SKIP_FIELDS}

    def setup(self) -> None:
        if self._bank_dir is not None:
            self._bank_for(self._bank_dir)

    def _bank_for(self, bank_dir: str):
        return self._bank.get(bank_dir, lambda: load_bank(bank_dir))

    def process(self, batch: list[EmbeddedExample], bank_dir: str | None = None):
        start = time.perf_counter()
        bank = self._bank_for(bank_dir or self._bank_dir)
        neighbours, counts = retrieve_batch(bank, batch, self._rules)
        self._latency.update(int((time.perf_counter() - start) * 1000))
        self._queries.inc(len(counts))
        self._selected.inc(len(neighbours))
        for c in counts:
            for f, counter in self._skips.items():
                if n := getattr(c, f):
                    counter.inc(n)
        yield from neighbours
        for c in counts:
            yield beam.pvalue.TaggedOutput(COUNTS, c)


_SKIP_FIELDS = tuple(f.name for f in dataclasses.fields(RetrievalCounts) if f.name.startswith("skipped_"))


class Retrieve(beam.PTransform):
    """PCollection[EmbeddedExample] → outputs `.neighbours` (Neighbour) and `.counts` (RetrievalCounts).

    Args:
        bank: the bank directory (str, e.g. `--memory_bank`) or the one-element PCollection that
            `BuildMemoryBank` returns.
        rules: selection parameters (`RetrievalRules.from_config(cfg)`).
        batch_size: most queries per `index.search` call.
    """

    def __init__(self, bank, rules: RetrievalRules, batch_size: int = 256):
        super().__init__()
        self._bank, self._rules, self._batch_size = bank, rules, batch_size

    def expand(self, examples):
        fixed = isinstance(self._bank, str)
        side = () if fixed else (beam.pvalue.AsSingleton(self._bank),)
        dofn = RetrieveDoFn(self._bank if fixed else None, self._rules)
        return (
            examples
            | "Queries" >> beam.Map(query_view)
            | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=self._batch_size)
            | "SearchAndSelect" >> beam.ParDo(dofn, *side).with_outputs(COUNTS, main="neighbours")
        )


def neighbour_rows(n: Neighbour) -> list[dict]:
    """One NEIGHBOURS row, as the one-element list `WriteSortedParquet` expects."""
    return [dataclasses.asdict(n)]


def counts_rows(c: RetrievalCounts) -> list[dict]:
    return [c.row()]


class WriteNeighbours(beam.PTransform):
    """PCollection[Neighbour] → `{directory}/neighbours-BBBBB-of-NNNNN.parquet`, rows by (query_key, rank)."""

    def __init__(self, directory: str, num_shards: int | None = None):
        super().__init__()
        self._directory, self._n = directory, num_shards  # None: files follow the row count

    def expand(self, neighbours):
        return neighbours | "WriteSorted" >> WriteSortedParquet(
            self._directory, NEIGHBOURS, neighbour_rows, _neighbour_sort_key, self._n, prefix="neighbours"
        )


class WriteRetrievalCounts(beam.PTransform):
    """PCollection[RetrievalCounts] → `{directory}/counts-BBBBB-of-NNNNN.parquet`, rows by (query_key, via)."""

    def __init__(self, directory: str, num_shards: int | None = None):
        super().__init__()
        self._directory, self._n = directory, num_shards  # None: files follow the row count

    def expand(self, counts):
        return counts | "WriteSorted" >> WriteSortedParquet(
            self._directory, RETRIEVAL_COUNTS, counts_rows, _counts_sort_key, self._n, prefix="counts"
        )


def _neighbour_sort_key(n: Neighbour) -> str:
    return f"{n.query_key}\x00{n.rank:06d}"


def _counts_sort_key(c: RetrievalCounts) -> str:
    return f"{c.query_key}\x00{VIAS.index(c.via)}"
