"""The Beam side of CM3 sequences (the pure pieces live in `transforms/lib/sequences.py` and `transforms/lib/layout.py`).

`BuildSequences`: query + joined neighbours → CM3 layout, neighbour pick, causal masking → ShardSample.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics

from schemas.records import Reject
from transforms.lib.sequences import SequenceConfig, make_sample
from transforms.lib.validate import describe_error
from transforms.tokenize import FAILED, load_once


class _BuildSequence(beam.DoFn):
    def __init__(self, sc: SequenceConfig):
        self._sc = sc

    def process(self, joined, directory: str):
        query, pairs = joined
        _, _, vocab = load_once(directory)
        try:
            sample = make_sample(query, pairs, self._sc, vocab)
        except Exception as e:
            Metrics.counter("rejected", "stage_error").inc()
            yield beam.pvalue.TaggedOutput(FAILED, Reject(query.key, "", "stage_error", f"layout: {describe_error(e)}"))
            return
        Metrics.distribution("sequences", "tokens").update(len(sample.tokens))
        if sample.json["dropped_for_length"]:
            Metrics.counter("sequences", "neighbours_dropped_for_length").inc(len(sample.json["dropped_for_length"]))
        yield sample


class BuildSequences(beam.PTransform):
    """(query, [(Neighbour, doc)]) pairs → (ShardSamples, Rejects)."""

    def __init__(self, tokenizers_dir, sc: SequenceConfig):
        super().__init__()
        self._dir, self._sc = tokenizers_dir, sc

    def expand(self, joined):
        side = beam.pvalue.AsSingleton(self._dir)
        out = joined | "Sequence" >> beam.ParDo(_BuildSequence(self._sc), side).with_outputs(FAILED, main="samples")
        return out.samples, out[FAILED]
