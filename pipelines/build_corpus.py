"""`cm3corpus build`: the one Beam pipeline, wiring the stages of docs/design.md's picture in order.

Every artifact is written under `OUTPUT/_staging/` and moved into place only when the whole
pipeline has succeeded, so a crashed or killed run never leaves a half-written artifact where a
reader would take it for a finished one, and a rerun replaces the previous outputs.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import difflib
import json
import os
import sys
import time
from collections.abc import Sequence

import apache_beam as beam
import fsspec
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.options import BuildConfig, CorpusOptions, resolve_inputs
from schemas import artifacts
from schemas.records import Example
from transforms.assemble import JoinNeighbours
from transforms.common import PerWorker
from transforms.filters import FilterConfig, FilterCorpus, filtered_rows, filtered_sort_key
from transforms.lib.clip import clip_embed_dim
from transforms.lib.embed import embedding_rows, file_view
from transforms.lib.io import atomic_open
from transforms.lib.read import expand_inputs
from transforms.lib.report import FILTER_REPORT, REPORT_SAMPLE, render_staged_report
from transforms.lib.retrieve import RetrievalRules
from transforms.lib.rng import is_held_out
from transforms.lib.sequences import SequenceConfig
from transforms.memory_bank import BuildMemoryBank, ExtendMemoryBank
from transforms.parquet_io import WriteSortedParquet
from transforms.progress import counters
from transforms.read import FailOnSharedKeys, ReadExamples
from transforms.rejects import OneRejectPerExample, reject_rows, reject_sort_key
from transforms.report import ReportSample
from transforms.retrieve import Retrieve, WriteNeighbours, WriteRetrievalCounts
from transforms.sequences import BuildSequences
from transforms.shards import WriteShards
from transforms.tokenize import FitTokenizers, TokenizeDocs

STAGING = "_staging"
# Folders under OUTPUT that one build owns and replaces as a whole.
ARTIFACTS = (
    "rejects",
    "filtered",
    "embeddings",
    "memory_bank",
    "neighbours",
    "retrieval_counts",
    "tokenizers",
    "shards",
)


def build_pipeline(p: beam.Pipeline, cfg: BuildConfig, units: list[tuple[str, str]]) -> None:
    """Add the build's stages to `p`, writing under `cfg.output/_staging`."""
    # lazy: transforms.embed imports torch, which `cm3corpus build --help` and a bad flag's error do not need
    from transforms.embed import EmbedExamples

    staging = f"{cfg.output}/{STAGING}"
    dim = clip_embed_dim(cfg.clip_model)
    examples, read_rejects = p | "Read" >> ReadExamples(units, cfg)
    # No stage after this reads the JSON sidecar or the image size, and every branch below holds the
    # examples (an in-process runner keeps them until the last branch has read them): a demo
    # example's sidecar alone is a third of it.
    examples = examples | "ForStages" >> beam.Map(_for_stages)
    embedded, embed_rejects = examples | "Embed" >> EmbedExamples.from_config(cfg)
    examples, embedded, filtered = (examples, embedded) | "Filter" >> FilterCorpus(
        FilterConfig.from_config(cfg),
        f"{staging}/_dedup_bank",
        f"{staging}/{FILTER_REPORT}",
        cfg.clip_model,
        dim,
        cfg.seed,
    )
    filtered | "WriteFiltered" >> WriteSortedParquet(
        f"{staging}/filtered", artifacts.FILTERED, filtered_rows, filtered_sort_key, prefix="filtered"
    )
    (
        embedded
        | "EmbeddingRows" >> beam.Map(file_view)
        | "WriteEmbeddings"
        >> WriteSortedParquet(
            f"{staging}/embeddings", artifacts.embeddings_schema(dim), embedding_rows, _key, None, "embeddings", 20_000
        )
    )
    bank_dir = f"{staging}/memory_bank"
    # Held-out examples are queries but never documents: their sequences must not leak into
    # training sequences as someone else's neighbours.
    in_bank = embedded | "BankDocuments" >> beam.Filter(lambda e, f: not is_held_out(e.key, f), cfg.holdout_fraction)
    if cfg.memory_bank and cfg.extend_memory_bank:
        bank = in_bank | "ExtendMemoryBank" >> ExtendMemoryBank(cfg.memory_bank, bank_dir)
    elif cfg.memory_bank:
        bank = cfg.memory_bank
    else:
        factory = cfg.index_factory
        bank = in_bank | "MemoryBank" >> BuildMemoryBank(
            bank_dir, cfg.clip_model, factory, dim=dim, seed=cfg.seed, clip_pretrained=cfg.clip_pretrained
        )
    retrieved = embedded | "Retrieve" >> Retrieve(bank, RetrievalRules.from_config(cfg))
    retrieved.neighbours | "WriteNeighbours" >> WriteNeighbours(f"{staging}/neighbours")
    retrieved.counts | "WriteCounts" >> WriteRetrievalCounts(f"{staging}/retrieval_counts")
    examples | "ReportSample" >> ReportSample(f"{staging}/{REPORT_SAMPLE}", retrieved.neighbours)

    sc = SequenceConfig.from_config(cfg)
    tokenizers = examples | "FitTokenizers" >> FitTokenizers(f"{staging}/tokenizers", sc)
    loaded = PerWorker()  # one load of the tokenizers per worker, for both tokenizing steps and the layout
    tok_opts = {
        "batch_size": sc.tokenize_batch_size,
        "device": sc.device,
        "dtype": sc.image_tokenizer_dtype,
        "loaded": loaded,
    }
    docs, token_rejects = examples | "TokenizeDocs" >> TokenizeDocs(tokenizers, **tok_opts)
    embedded_keys = embedded | "EmbeddedKeys" >> beam.Map(lambda e: (e.key, None))
    others = None
    if cfg.neighbour_input:  # documents of the bank's own corpus: neighbours, never queries, not counted
        other_units = expand_inputs(cfg.neighbour_input, cfg.input_format)
        other_examples, _ = p | "ReadNeighbourDocs" >> ReadExamples(
            other_units, cfg, counters="neighbour_input_", key_prefix=cfg.neighbour_key_prefix
        )
        (examples, other_examples) | "KeysDistinct" >> FailOnSharedKeys()
        others, _ = other_examples | "TokenizeNeighbourDocs" >> TokenizeDocs(
            tokenizers, counters="neighbour_input_", **tok_opts
        )
    joined = docs | "JoinNeighbours" >> JoinNeighbours(retrieved.neighbours, keep=embedded_keys, documents=others)
    samples, sequence_rejects = joined | "BuildSequences" >> BuildSequences(tokenizers, sc, loaded)
    if cfg.holdout_fraction > 0:
        train, held = samples | "Split" >> beam.Partition(
            lambda s, _, f: int(is_held_out(s.key, f)), 2, cfg.holdout_fraction
        )
        held | "WriteHeldOut" >> WriteShards(f"{staging}/shards/heldout", cfg.shard_max_samples, cfg.shard_max_bytes)
    else:
        train = samples
    train | "WriteShards" >> WriteShards(f"{staging}/shards", cfg.shard_max_samples, cfg.shard_max_bytes)

    rejects = (
        (read_rejects, embed_rejects, token_rejects, sequence_rejects)
        | "AllRejects" >> beam.Flatten()
        | "OnePerExample" >> OneRejectPerExample()
    )
    rejects | "WriteRejects" >> WriteSortedParquet(
        f"{staging}/rejects", artifacts.REJECTS, reject_rows, reject_sort_key, prefix="rejects"
    )


def _for_stages(e: Example) -> Example:
    return dataclasses.replace(e, width=0, height=0, meta="") if e.meta or e.width or e.height else e


def _key(record) -> str:
    return record.key


MMAP_THRESHOLD = 2**20  # bytes; the sliding threshold starts at 128 KiB and climbs to 32 MiB


def fixed_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Keep glibc's mmap threshold fixed, so every large buffer is its own mapping, unmapped when freed.

    glibc raises the threshold each time a mapped block is freed (up to 32 MiB). The in-process
    runner frees multi-megabyte buffers all the time (10 MiB data-plane chunks, encoded groupings,
    model batches); after that they come from the heap, between records that stay, and the heap
    never shrinks. Measured between a 1k and a 4k demo build: peak RSS grew 69 KiB per example with
    the sliding threshold, 26 KiB fixed at 1 MiB (27 at 128 KiB, 44 at 4 MiB; see
    benchmarks/results/2026-12-06-memory.md). Returns whether it was set: not where
    MALLOC_MMAP_THRESHOLD_ already sets it, nor off glibc.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def stats_from_counters(c: dict[str, int], seconds: float) -> dict:
    """The run summary: read == written + rejected + filtered, from the pipeline's counters."""
    by_reason = {k.split("/", 1)[1]: v for k, v in sorted(c.items()) if k.startswith("rejected/") and v}
    filtered = {k.split("/", 1)[1]: v for k, v in sorted(c.items()) if k.startswith("filtered/") and v}
    stats = {
        "examples_read": c.get("read/examples_read", 0),
        "examples_written": c.get("write/examples_written", 0),
        "examples_rejected": sum(by_reason.values()),
        "rejects_by_reason": by_reason,
        "examples_filtered": sum(filtered.values()),  # valid examples a corpus filter left out (filtered/)
        "filtered_by_reason": filtered,
        "seconds": round(seconds, 3),
        "counters": dict(sorted(c.items())),
        "schema_version": artifacts.SCHEMA_VERSION,
    }
    stats["accounted"] = stats["examples_read"] == (
        stats["examples_written"] + stats["examples_rejected"] + stats["examples_filtered"]
    )
    return stats


def finalize(output: str, stats: dict) -> None:
    """Move each staged artifact over the previous run's and write stats.json last."""
    fs, root = fsspec.core.url_to_fs(output)
    fs.makedirs(root, exist_ok=True)
    staging = f"{root}/{STAGING}"
    for name in ARTIFACTS:
        if not fs.exists(f"{staging}/{name}"):
            continue  # not made by this run (e.g. a prebuilt --memory_bank, possibly this very folder)
        if fs.exists(f"{root}/{name}"):
            fs.rm(f"{root}/{name}", recursive=True)
        fs.mv(f"{staging}/{name}", f"{root}/{name}", recursive=True)
    render_staged_report(fs, f"{root}/{STAGING}", f"{root}/report.html", stats)
    if fs.exists(staging):
        fs.rm(staging, recursive=True)
    with atomic_open(f"{output}/stats.json", "w") as f:
        json.dump(stats, f, indent=2, sort_keys=True)


def summary_line(stats: dict) -> str:
    reasons = ", ".join(f"{k} {v:,}" for k, v in stats["rejects_by_reason"].items()) or "none"
    return (
        f"cm3corpus build: {stats['examples_read']:,} read · {stats['examples_written']:,} written · "
        f"{stats['examples_rejected']:,} rejected ({reasons}) · {stats['examples_filtered']:,} filtered"
        f" in {stats['seconds']:.1f} s"
    )


def run(argv: Sequence[str] | None = None) -> dict:
    """Parse flags, run the pipeline, finalize outputs; returns the stats dict."""
    if argv is not None and ({"-h", "--help"} & set(argv)):
        print_help()
        raise SystemExit(0)
    check_known_flags(list(argv) if argv is not None else sys.argv[1:])
    options = PipelineOptions(argv)
    cfg = BuildConfig.from_options(options.view_as(CorpusOptions))
    units = resolve_inputs(cfg)  # a bad pattern, or an output overlapping an input: one line, before any work
    fixed_mmap_threshold()
    fs, root = fsspec.core.url_to_fs(cfg.output)
    if fs.exists(f"{root}/{STAGING}"):  # left by an interrupted run: start its staging afresh
        fs.rm(f"{root}/{STAGING}", recursive=True)
    print(f"cm3corpus build: {len(units):,} input units → {cfg.output}", file=sys.stderr, flush=True)
    start = time.monotonic()
    p = beam.Pipeline(options=options)
    build_pipeline(p, cfg, units)
    result = p.run()
    result.wait_until_finish()
    stats = stats_from_counters(counters(result), time.monotonic() - start)
    finalize(cfg.output, stats)
    print(summary_line(stats), file=sys.stderr, flush=True)
    if not stats["accounted"]:
        raise RuntimeError(
            f"accounting failed: read {stats['examples_read']} != written + rejected + filtered; see stats.json"
        )
    return stats


def _all_option_classes(cls=PipelineOptions):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_option_classes(sub)


def check_known_flags(argv: Sequence[str]) -> None:
    """Refuse a flag that neither the build nor any Beam options class knows, in one line.

    Beam alone only logs "Discarding unparseable args" and runs with the default, so a typo such as
    `--image_codebok_size 16` would build a corpus the user did not ask for.
    """

    class _Parser(argparse.ArgumentParser):
        def error(self, message):
            raise SystemExit(f"cm3corpus build: {message}")

    parser = _Parser(add_help=False, allow_abbrev=False, conflict_handler="resolve")
    for cls in dict.fromkeys(_all_option_classes()):  # CorpusOptions among them; a fixed order
        cls._add_argparse_args(parser)
    _, unknown = parser.parse_known_args(argv)
    flags = [a.split("=", 1)[0] for a in unknown if a.startswith("--")]
    if flags:
        known = [o for a in parser._actions for o in a.option_strings]
        close = difflib.get_close_matches(flags[0], known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise SystemExit(f"cm3corpus build: unknown flag {flags[0]}{hint}; see cm3corpus build --help")


def print_help() -> None:
    """The build's own flags; Beam's (`--runner`, `--direct_num_workers`, ...) pass through."""
    parser = argparse.ArgumentParser(
        prog="cm3corpus build",
        description="Build a retrieval-augmented CM3 corpus (see README.md). Any Beam pipeline option "
        "(--runner, --direct_running_mode, --direct_num_workers, --project, --setup_file, ...) passes through.",
    )
    CorpusOptions._add_argparse_args(parser)
    parser.print_help()


def main(argv: Sequence[str] | None = None) -> int:
    stats = run(argv if argv is not None else sys.argv[1:])
    if not stats["examples_written"]:
        # stats.json and rejects/ are written: they say why. Exiting 0 would let a script train on nothing.
        print(
            f"cm3corpus build: no example was written ({stats['examples_read']:,} read, all rejected or filtered);"
            " see rejects/ and stats.json",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
