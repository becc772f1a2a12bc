"""`cm3corpus build`: the one Beam pipeline, wiring the stages of DESIGN.md's picture in order.

Every artifact is written under `OUTPUT/_staging/` and moved into place only when the whole
pipeline has succeeded, so a crashed or killed run never leaves a half-written artifact where a
reader would take it for a finished one, and a rerun replaces the previous outputs.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.options import BuildConfig, CorpusOptions
from schemas import artifacts
from schemas.records import Reject
from transforms.parquet_io import WriteSortedParquet
from transforms.progress import counters
from transforms.read import ReadExamples, expand_inputs

STAGING = "_staging"
ARTIFACTS = ("rejects",)  # folders under OUTPUT that one build owns and replaces as a whole


def _reject_rows(r: Reject) -> list[dict]:
    return [{"key": r.key, "source": r.source, "reason": r.reason, "detail": r.detail}]


def _reject_sort_key(r: Reject) -> str:
    return f"{r.source}\x00{r.key}\x00{r.reason}"


def _count_kept(example):
    Metrics.counter("write", "examples_written").inc()
    return example


def build_pipeline(p: beam.Pipeline, cfg: BuildConfig, units: list[tuple[str, str]]) -> None:
    """Add the build's stages to `p`, writing under `cfg.output/_staging`."""
    staging = f"{cfg.output}/{STAGING}"
    examples, rejects = p | "Read" >> ReadExamples(units, cfg)
    examples | "CountKept" >> beam.Map(_count_kept)
    rejects | "WriteRejects" >> WriteSortedParquet(
        f"{staging}/rejects", artifacts.REJECTS, _reject_rows, _reject_sort_key, num_buckets=1, prefix="rejects"
    )


def stats_from_counters(c: dict[str, int], seconds: float) -> dict:
    """The run summary: read == written + rejected, from the pipeline's counters."""
    by_reason = {k.split("/", 1)[1]: v for k, v in sorted(c.items()) if k.startswith("rejected/") and v}
    stats = {
        "examples_read": c.get("read/examples_read", 0),
        "examples_written": c.get("write/examples_written", 0),
        "examples_rejected": sum(by_reason.values()),
        "rejects_by_reason": by_reason,
        "seconds": round(seconds, 3),
        "counters": dict(sorted(c.items())),
        "schema_version": artifacts.SCHEMA_VERSION,
    }
    stats["accounted"] = stats["examples_read"] == stats["examples_written"] + stats["examples_rejected"]
    return stats


def finalize(output: str, stats: dict) -> None:
    """Move each staged artifact over the previous run's and write stats.json last."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(output)
    fs.makedirs(root, exist_ok=True)
    staging = f"{root}/{STAGING}"
    for name in ARTIFACTS:
        if fs.exists(f"{root}/{name}"):
            fs.rm(f"{root}/{name}", recursive=True)
        if fs.exists(f"{staging}/{name}"):
            fs.mv(f"{staging}/{name}", f"{root}/{name}", recursive=True)
    if fs.exists(staging):
        fs.rm(staging, recursive=True)
    with fs.open(f"{root}/stats.json.tmp", "w") as f:
        json.dump(stats, f, indent=2, sort_keys=True)
    fs.mv(f"{root}/stats.json.tmp", f"{root}/stats.json")


def summary_line(stats: dict) -> str:
    reasons = ", ".join(f"{k} {v:,}" for k, v in stats["rejects_by_reason"].items()) or "none"
    return (
        f"cm3corpus build: {stats['examples_read']:,} read · {stats['examples_written']:,} written · "
        f"{stats['examples_rejected']:,} rejected ({reasons}) in {stats['seconds']:.1f} s"
    )


def run(argv: Sequence[str] | None = None) -> dict:
    """Parse flags, run the pipeline, finalize outputs; returns the stats dict."""
    import fsspec

    options = PipelineOptions(argv)
    cfg = BuildConfig.from_options(options.view_as(CorpusOptions))
    units = expand_inputs(cfg.input, cfg.input_format)
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
        raise RuntimeError(f"accounting failed: read {stats['examples_read']} != written + rejected; see stats.json")
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    run(argv if argv is not None else sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
