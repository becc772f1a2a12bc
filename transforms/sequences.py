"""The Beam side of CM3 sequences (the pure pieces live in `transforms/lib/sequences.py` and `transforms/lib/layout.py`).

`BuildSequences`: query + joined neighbours → CM3 layout, neighbour pick, causal masking → ShardSample.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.common import PerWorker
from transforms.lib.sequences import SequenceConfig, make_sample
from transforms.lib.tokenize import load_tokenizers
from transforms.rejects import REJECTED, stage_error


class _BuildSequence(beam.DoFn):
    def __init__(self, sc: SequenceConfig, loaded: PerWorker):
        self._sc, self._loaded = sc, loaded

    def process(self, joined, directory: str):
        query, pairs = joined
        _, _, vocab = self._loaded.get(directory, lambda: load_tokenizers(directory))
        try:
            sample = make_sample(query, pairs, self._sc, vocab)
        except Exception as e:  # the TokenizedDoc carries no source (it would ride every join): the row has none
            yield stage_error(query.key, "", "layout", e)
            return
        Metrics.distribution("sequences", "tokens").update(len(sample.tokens))
        if sample.json["dropped_for_length"]:
            Metrics.counter("sequences", "neighbours_dropped_for_length").inc(len(sample.json["dropped_for_length"]))
        yield sample


class BuildSequences(beam.PTransform):
    """(query, [(Neighbour, doc)]) pairs → (ShardSamples, Rejects)."""

    def __init__(self, tokenizers_dir, sc: SequenceConfig, loaded: PerWorker | None = None):
        super().__init__()
        self._dir, self._sc, self._loaded = tokenizers_dir, sc, loaded or PerWorker()

    def expand(self, joined):
        side = beam.pvalue.AsSingleton(self._dir)
        out = joined | "Sequence" >> beam.ParDo(_BuildSequence(self._sc, self._loaded), side).with_outputs(
            REJECTED, main="samples"
        )
        return out.samples, out[REJECTED]
