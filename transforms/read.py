"""Read every input into validated `Example`s on Beam, each key once, routing each failure to a `Reject`.

The reading itself (formats, the untrusted-archive checks, the bounded reads) is `transforms/lib/read.py`;
`ReadExamples` spreads the units `transforms.lib.read.expand_inputs` resolved on the driver over the
workers, validates each sample and keeps the first of samples sharing a key. Every input sample ends as
exactly one Example or one Reject; a damaged shard adds one `shard_unreadable` row, so
`examples_read == examples_written + examples_rejected` holds.
"""

from __future__ import annotations

import dataclasses

import apache_beam as beam
from apache_beam.metrics import Metrics

from schemas.records import RawSample, Reject
from transforms import progress
from transforms.lib.read import _budgets, fetch_parts, read_unit
from transforms.lib.validate import validate
from transforms.rejects import REJECTED, reject


class _ReadAndValidate(beam.DoFn):
    """Reads one unit and validates each of its samples; rejects go to the REJECTED output."""

    def __init__(self, cfg, read_ns: str, reject_ns: str, key_prefix: str = ""):
        self._cfg, self._reject_ns, self._prefix = cfg, reject_ns, key_prefix
        self._read = Metrics.counter(read_ns, "examples_read")

    def process(self, unit):
        budgets = _budgets(self._cfg)
        for item in read_unit(unit, self._cfg):
            self._read.inc()
            order = item.order if isinstance(item, RawSample) else ()
            if isinstance(item, RawSample) and item.paths:
                item = fetch_parts(item, budgets, self._cfg.caption_ext)
            if isinstance(item, RawSample):
                item = validate(item, budgets, self._cfg.caption_ext)
            if self._prefix and item.key:
                item = dataclasses.replace(item, key=self._prefix + item.key)
            if isinstance(item, Reject):
                progress.note("rejected")
                yield reject(item, self._reject_ns)
            else:
                progress.note("read ok")
                yield item.key, (order, item)


def _first_of_duplicates(keyed, reject_ns: str):
    """Keep the first occurrence of a key by source order; the others become duplicate_key rejects."""
    key, examples = keyed
    ordered = sorted(examples, key=lambda e: e[0])
    yield ordered[0][1]
    for _, dup in ordered[1:]:
        yield reject(Reject(key, dup.source, "duplicate_key", f"first: {ordered[0][1].source}"), reject_ns)


class ReadExamples(beam.PTransform):
    """Inputs → (PCollection[Example], PCollection[Reject]), each key once.

    Args:
        units: from `expand_inputs`, resolved on the driver.
        cfg: a BuildConfig (columns and budgets).
        counters: namespace prefix of its counters; the run's accounting (`stats.json`) reads the
            default one, so inputs that are not this run's examples (neighbour documents) use another.
        key_prefix: put in front of every key (`--key_prefix`); None takes `cfg.key_prefix`.
    """

    def __init__(self, units: list[tuple[str, str]], cfg, counters: str = "", key_prefix: str | None = None):
        super().__init__()
        self._units = units
        self._cfg = cfg
        self._prefix = cfg.key_prefix if key_prefix is None else key_prefix
        self._read_ns, self._reject_ns = (f"{counters}read", f"{counters}{REJECTED}")

    def expand(self, pbegin):
        read = (
            pbegin
            | "Units" >> beam.Create(self._units)
            | "Spread" >> beam.Reshuffle()
            | "ReadValidate"
            >> beam.ParDo(_ReadAndValidate(self._cfg, self._read_ns, self._reject_ns, self._prefix)).with_outputs(
                REJECTED, main="examples"
            )
        )
        unique = (
            read.examples
            | "ByKey" >> beam.GroupByKey()
            | "Dedup" >> beam.FlatMap(_first_of_duplicates, self._reject_ns).with_outputs(REJECTED, main="examples")
        )
        rejects = (read[REJECTED], unique[REJECTED]) | "AllRejects" >> beam.Flatten()
        return unique.examples, rejects


class FailOnSharedKeys(beam.PTransform):
    """Fail the run when this run's examples and the --neighbour_input documents share a key.

    Neighbour documents are joined to neighbours by key, so a shared key would put one corpus's
    document where the other's was retrieved, silently. img2dataset keys are shard/row numbers and
    repeat across corpora: `--key_prefix` (this run) and `--neighbour_key_prefix` keep them apart.
    """

    def expand(self, pcolls):
        ours, theirs = pcolls
        return (
            (ours | "Ours" >> beam.Map(lambda e: (e.key, 0)), theirs | "Theirs" >> beam.Map(lambda e: (e.key, 1)))
            | "Flatten" >> beam.Flatten()
            | "ByKey" >> beam.GroupByKey()
            | "Shared" >> beam.FlatMap(lambda kv: [kv[0]] if len(set(kv[1])) == 2 else [])
            | "Collect" >> beam.combiners.Top.Smallest(3)
            | "Fail" >> beam.Map(_fail_if_shared)
        )


def _fail_if_shared(shared: list[str]) -> None:
    if shared:
        raise ValueError(
            f"keys such as {', '.join(shared)} are in both --input and --neighbour_input: documents are joined by"
            " key, so the two corpora need distinct keys. Rebuild one with --key_prefix P (and pass"
            " --neighbour_key_prefix P when its documents are --neighbour_input)."
        )
