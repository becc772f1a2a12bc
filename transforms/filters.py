"""Corpus-level quality filters in the pipeline: CLIP-score filtering and near-duplicate removal.

The rules (CLIP score, exact and near duplicates, keep order, the batch-independent range search,
the histogram's bins) are `transforms/lib/filters.py`; this module runs them between the embedding
stage and the memory bank.

Scale: nothing here collects the corpus. The CLIP filter is a map and the histogram a combine of 100
counts; exact dedup shuffles records by pixel hash; the scratch bank is built as the memory bank is
(parts filled where they lie, one merge: the bank's own global step, at most the bank's size once,
on one worker); the search is a batched map with the bank loaded once per worker, as in retrieval.
Left-out examples leave the examples stream through one keyed join (CoGroupByKey), so no worker ever
holds the list of dropped keys. Cost: the scratch bank is a second bank build over the survivors.

Dropped examples are counted (`filtered/<reason>`), written to `filtered/*.parquet` (schema
`FILTERED`), and never reach the embeddings, the bank, the queries, the tokenizer fit or the shards.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from schemas.records import EmbeddedExample, Filtered
from transforms.common import PerWorker
from transforms.lib.filters import (
    HIST_BINS,
    HIST_LO,
    HIST_WIDTH,
    clip_score,
    first_earlier,
    histogram_bin,
    range_search,
    split_exact,
)
from transforms.lib.io import atomic_open
from transforms.lib.memory_bank import load_bank
from transforms.lib.report import report_doc, report_doc_json
from transforms.lib.rng import stable_hash
from transforms.memory_bank import BuildMemoryBank

FILTERED = "filtered"  # tag of the left-out output, and the counter namespace
SCORES = "scores"  # tag of the CLIP-score output
REPORT_GROUPS = 3  # duplicate groups in the report, twice: the closest to T and a key-hash sample
REPORT_GROUP_DROPPED = 4  # dropped members shown per group
REPORT_LOW_CLIP = 6  # left-out examples shown with their captions: the highest scores below S


@dataclass(frozen=True)
class FilterConfig:
    """The filters' parameters (fields of `BuildConfig`); None turns a filter off."""

    min_clip_score: float | None = None  # leave out image+text examples scoring below this
    dedup_threshold: float | None = None  # leave out documents this close to an earlier one
    batch_size: int = 256  # queries per near-duplicate range search

    @classmethod
    def from_config(cls, cfg) -> FilterConfig:
        return cls(min_clip_score=cfg.min_clip_score, dedup_threshold=cfg.dedup_threshold)

    @property
    def active(self) -> bool:
        return self.min_clip_score is not None or self.dedup_threshold is not None


class HistogramFn(beam.CombineFn):
    """Scores → counts in HIST_BINS fixed bins over [-1, 1] (a list of ints; merging is adding)."""

    def create_accumulator(self):
        return [0] * HIST_BINS

    def add_input(self, acc, score):
        acc[histogram_bin(score)] += 1
        return acc

    def merge_accumulators(self, accs):
        accs = iter(accs)
        out = list(next(accs))
        for a in accs:
            out = [x + y for x, y in zip(out, a, strict=True)]
        return out

    def extract_output(self, acc):
        return acc


# ----------------------------------------------------------------------------------------------------
# The DoFns.


def _count(f: Filtered) -> Filtered:
    Metrics.counter(FILTERED, f.reason).inc()
    return f


class _ClipFilter(beam.DoFn):
    """EmbeddedExample → itself (kept), `Filtered` (tag FILTERED) and its score (tag SCORES)."""

    def __init__(self, min_score: float | None):
        self._min = min_score

    def process(self, e: EmbeddedExample):
        score = clip_score(e)
        if score is not None:
            yield beam.pvalue.TaggedOutput(SCORES, score)
            if self._min is not None and score < self._min:
                yield beam.pvalue.TaggedOutput(
                    FILTERED, _count(Filtered(e.key, e.modality, e.caption, "low_clip_score", score))
                )
                return
        yield e


def _exact_groups(keyed):
    _, docs = keyed
    first, dropped = split_exact(list(docs))
    yield first
    for f in dropped:
        yield beam.pvalue.TaggedOutput(FILTERED, _count(f))


def _by_pixels(e: EmbeddedExample):
    # Examples without an image (or a hash) each get a group of their own.
    return (e.image_hash or f"key:{e.key}"), e


class _NearDuplicates(beam.DoFn):
    """Batches of EmbeddedExample → the kept ones, and `Filtered` near duplicates (tag FILTERED).

    The scratch bank is loaded once per worker process (`transforms.common.PerWorker`), as in retrieval.
    """

    def __init__(self, threshold: float):
        self._threshold = threshold
        self._bank = PerWorker()
        self._latency = Metrics.distribution(FILTERED, "near_duplicate_batch_ms")

    def process(self, batch: list[EmbeddedExample], bank_dir: str):
        start = time.perf_counter()
        bank = self._bank.get(bank_dir, lambda: load_bank(bank_dir))
        found = range_search(bank, np.stack([e.doc_emb for e in batch]), self._threshold)
        keys, modalities = bank.keys, bank.modalities
        for e, pairs in zip(batch, found, strict=True):
            hit = first_earlier(e.key, e.modality, [(keys[i], modalities[i], s) for i, s in pairs], self._threshold)
            if hit is None:
                yield e
            else:
                f = Filtered(e.key, e.modality, e.caption, "near_duplicate", hit[1], hit[0])
                yield beam.pvalue.TaggedOutput(FILTERED, _count(f))
        self._latency.update(int((time.perf_counter() - start) * 1000))


# ----------------------------------------------------------------------------------------------------
# The composite transform.


class FilterResult(NamedTuple):
    """What `FilterCorpus` hands back: the kept streams and the left-out examples."""

    examples: beam.PCollection  # Example, left-out ones removed (embedding failures pass through)
    embedded: beam.PCollection  # EmbeddedExample, kept only
    filtered: beam.PCollection  # Filtered


def _anti_join(keyed):
    _, grouped = keyed
    if not list(grouped["dropped"]):
        yield from grouped["example"]


class FilterCorpus(beam.PTransform):
    """(PCollection[Example], PCollection[EmbeddedExample]) → `FilterResult` (module docstring).

    Also stages `report_path`, a JSON the report renders: the CLIP-score histogram, the thresholds, a
    few duplicate groups and the left-out examples scoring closest below S, with their images.
    With both filters off only the histogram is made and the streams pass through untouched.

    Args:
        cfg: the thresholds.
        scratch_dir: where the near-duplicate scratch bank is written (under `_staging/`).
        report_path: the staged report JSON.
        clip_model: recorded in the scratch bank's bank.json.
        dim: embedding dimension.
        seed: the run's seed (the scratch bank's training sample).
    """

    def __init__(self, cfg: FilterConfig, scratch_dir: str, report_path: str, clip_model: str, dim: int, seed: int):
        super().__init__()
        self._cfg, self._scratch, self._report = cfg, scratch_dir, report_path
        self._clip, self._dim, self._seed = clip_model, dim, seed

    def expand(self, pcolls):
        examples, embedded = pcolls
        cfg = self._cfg
        clip = embedded | "ClipScore" >> beam.ParDo(_ClipFilter(cfg.min_clip_score)).with_outputs(
            FILTERED, SCORES, main="kept"
        )
        histogram = clip[SCORES] | "Histogram" >> beam.CombineGlobally(HistogramFn())
        kept, dropped = clip.kept, [clip[FILTERED]]
        if cfg.dedup_threshold is not None:
            exact = (
                kept
                | "ByPixels" >> beam.Map(_by_pixels)
                | "SamePixels" >> beam.GroupByKey()
                | "ExactDuplicates" >> beam.FlatMap(_exact_groups).with_outputs(FILTERED, main="kept")
            )
            bank = exact.kept | "ScratchBank" >> BuildMemoryBank(
                self._scratch, self._clip, dim=self._dim, seed=self._seed
            )
            near = (
                exact.kept
                | "Batch" >> beam.BatchElements(min_batch_size=cfg.batch_size, max_batch_size=cfg.batch_size)
                | "NearDuplicates"
                >> beam.ParDo(_NearDuplicates(cfg.dedup_threshold), beam.pvalue.AsSingleton(bank)).with_outputs(
                    FILTERED, main="kept"
                )
            )
            kept = near.kept
            dropped += [exact[FILTERED], near[FILTERED]]
        filtered = tuple(dropped) | "AllFiltered" >> beam.Flatten()
        if cfg.active:
            dropped_keys = filtered | "DroppedKeys" >> beam.Map(lambda f: (f.key, None))
            examples = (
                {"example": examples | "ExampleByKey" >> beam.Map(lambda e: (e.key, e)), "dropped": dropped_keys}
                | "JoinDropped" >> beam.CoGroupByKey()
                | "KeptExamples" >> beam.FlatMap(_anti_join)
            )
        pcolls[0] | "ReportSample" >> FilterReportSample(self._report, cfg, filtered, histogram)
        return FilterResult(examples, kept, filtered)


# ----------------------------------------------------------------------------------------------------
# The report's sample: histogram, duplicate groups, the left-out examples closest to S.


def _group_key(f: Filtered) -> tuple:
    return (stable_hash(f.duplicate_of), f.duplicate_of)


class FilterReportSample(beam.PTransform):
    """Stage the filters' report data as JSON (only a few dozen documents ever meet on one worker)."""

    def __init__(self, path: str, cfg: FilterConfig, filtered, histogram):
        super().__init__()
        self._path, self._cfg, self._filtered, self._histogram = path, cfg, filtered, histogram

    def expand(self, examples):
        side = beam.pvalue
        dups = self._filtered | "Duplicates" >> beam.Filter(lambda f: f.duplicate_of is not None)
        closest = dups | "ClosestToT" >> beam.combiners.Top.Smallest(
            REPORT_GROUPS, key=lambda f: (f.reason != "near_duplicate", f.score or 0.0, f.key)
        )
        sample = dups | "SampleGroups" >> beam.combiners.Top.Smallest(REPORT_GROUPS, key=_group_key)
        chosen = (
            (closest, sample)
            | "BothPicks" >> beam.Flatten()
            | "GroupKeys" >> beam.FlatMap(lambda fs: [f.duplicate_of for f in fs])
            | "KeyList" >> beam.combiners.ToList()
            | "KeySet" >> beam.Map(lambda keys: sorted(set(keys)))
        )
        members = (
            dups
            | "InChosen" >> beam.Filter(lambda f, keys: f.duplicate_of in keys, side.AsSingleton(chosen))
            | "ByGroup" >> beam.Map(lambda f: (f.duplicate_of, f))
            | "FewPerGroup"
            >> beam.combiners.Top.SmallestPerKey(REPORT_GROUP_DROPPED, key=lambda f: (f.score or 0, f.key))
            | "Members" >> beam.FlatMap(lambda kv: kv[1])
        )
        low = (
            self._filtered
            | "LowClip" >> beam.Filter(lambda f: f.reason == "low_clip_score")
            | "ClosestToS" >> beam.combiners.Top.Largest(REPORT_LOW_CLIP, key=lambda f: (f.score, f.key))
        )
        wanted = (
            (
                chosen,
                members | "MemberKeys" >> beam.Map(lambda f: [f.key]),
                low | "LowKeys" >> beam.Map(lambda fs: [f.key for f in fs]),
            )
            | "AllWanted" >> beam.Flatten()
            | "WantedLists" >> beam.combiners.ToList()
            | "WantedSet" >> beam.Map(lambda lists: {k for keys in lists for k in keys})
        )
        docs = (
            examples
            | "Thumbnails" >> beam.Map(report_doc)  # waits for the dedup: thumbnails, not whole examples
            | "Docs" >> beam.Filter(lambda d, keys: d[0] in keys, side.AsSingleton(wanted))
            | "DocList" >> beam.combiners.ToList()
        )
        return docs | "Write" >> beam.Map(
            _write_report_sample,
            self._path,
            self._cfg,
            side.AsSingleton(self._histogram),
            side.AsSingleton(chosen),
            side.AsList(members),
            side.AsSingleton(low),
        )


def _write_report_sample(docs, path, cfg: FilterConfig, histogram, chosen, members, low) -> str:
    by_key = {d[0]: d for d in docs}

    def doc(key: str) -> dict:
        return report_doc_json(by_key.get(key), key)

    groups = []
    for key in chosen:  # sorted keys: the same page whatever the runner
        dropped = sorted((f for f in members if f.duplicate_of == key), key=lambda f: (f.score or 0, f.key))
        groups.append(
            {
                "kept": doc(key),
                "dropped": [{**doc(f.key), "reason": f.reason, "score": f.score} for f in dropped],
            }
        )
    data = {
        "min_clip_score": cfg.min_clip_score,
        "dedup_threshold": cfg.dedup_threshold,
        "histogram": {"lo": HIST_LO, "width": HIST_WIDTH, "counts": list(histogram)},
        "groups": groups,
        "low_clip": [{**doc(f.key), "score": f.score} for f in sorted(low, key=lambda f: (-f.score, f.key))],
    }
    with atomic_open(path, "w") as f:
        json.dump(data, f, sort_keys=True)
    return path


def filtered_rows(f: Filtered) -> list[dict]:
    """One FILTERED row, as the one-element list `WriteSortedParquet` expects."""
    return [
        {
            "key": f.key,
            "modality": f.modality,
            "caption": f.caption,
            "reason": f.reason,
            "score": f.score,
            "duplicate_of": f.duplicate_of,
        }
    ]


def filtered_sort_key(f: Filtered) -> str:
    return f.key
