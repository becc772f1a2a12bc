"""Builds of growing size: does the cost per example stay flat, and memory stay put but for the bank?

    python benchmarks/bench_scale.py                    # 1k, 2k, 4k, 8k examples at demo settings
    python benchmarks/bench_scale.py --sizes 1000,4000,16000,64000
    python benchmarks/bench_scale.py --quick            # 500, 1k, 2k
    python benchmarks/bench_scale.py --defaults         # the defaults (CM3Leon shape), 256 px images, 200 and 400
    python benchmarks/bench_scale.py --held             # also what the runner holds, per PCollection (slower)
    python benchmarks/bench_scale.py --traced           # also the live Python heap's peak (tracemalloc; slower)

The default stops at 8k because a 16k build takes 2 minutes and 64k 7 minutes on the 2-core development
machine when it is quiet (2026-12-06), several times that while other jobs share the cores.

For each size the demo corpus (`pipelines.demo.data.write_demo_corpus`, 250 examples per tar as
`cm3corpus demo`, 64 px images or `--image_size`) is written, then built by `pipelines.build_corpus.run`
with the demo CLIP on the in-process DirectRunner, in a child process of its own: with
`pipelines.demo.command.demo_build_flags()`, or with `--defaults` at the build's own defaults (8,192 codes,
1,024 tokens per 256 px image, 56,320 BPE entries, 4,096-token sequences) but the demo CLIP, since no
hub can be reached, and a prepared codebook (`build_flags`). Reported per size:

- build s: the child's wall time (interpreter start, imports, model load and the pipeline); pipeline s:
  `stats.json`'s `seconds`; ms/example of both;
- peak RSS: `ru_maxrss` of the child and the children it waited for, from `os.wait4` on that child
  alone (the same figure `getrusage(RUSAGE_CHILDREN)` gives, per child);
- bank: the size of `memory_bank/index.faiss` (the one artifact that must sit whole in memory);
- token bytes: the shards' int32 tokens per written example (`shards/manifest.json`);
- per-stage seconds: Beam's own `ptransform_execution_time/total_msecs` per PTransform (sampled by the
  SDK harness), summed by the top-level stage label of `build_corpus.build_pipeline`;
- the per-example memory slope: peak RSS growth per example between the two largest sizes, and the
  least-squares slope over all sizes, each less the bank's own growth;
- with `--held`, `benchmarks/held.py`'s table: the encoded bytes per example of every PCollection the
  runner materialised, and what it held at once at most;
- with `--traced`, the peak of the live Python heap (`tracemalloc`, one frame: every Python object and
  numpy array the pipeline and the runner keep alive) and its growth per example, beside peak RSS's:
  the difference is memory outside Python's heap (native libraries, the allocator's retained pages).

The last line of output is `RESULT {json}` for `benchmarks/run_all.py`.

Mind that the in-process DirectRunner keeps every PCollection of a fused stage boundary (each
GroupByKey, side input and Flatten) in memory, so its peak RSS grows with the corpus whatever the
pipeline does; the per-example growth printed here is that runner cost plus any stage that gathers
data on one worker. Timings swing with the machine's load, printed per size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MS_PER_EXAMPLE_TARGET = 1.10  # pipeline ms/example at the largest size over the next one: flat or falling
JUDGE_FROM = 4000  # the flatness target applies when the largest size has at least this many examples
STAGE_MS = "metric:ptransform_execution_time:total_msecs:v1"
SLOPE_TARGET_KIB = {"demo": 8.0}  # peak RSS growth per example, bank excepted (issue 15); defaults: 2x tokens + 4


def stage_msecs(result) -> dict[str, int]:
    """Beam's sampled execution time per top-level stage label (the first component of the step name)."""
    from apache_beam.metrics.metric import MetricsFilter

    per_stage: dict[str, int] = defaultdict(int)
    try:
        metrics = result.monitoring_metrics().query(MetricsFilter())["counters"]
    except (AttributeError, NotImplementedError):  # a runner without monitoring infos
        return {}
    for m in metrics:
        if m.key.metric.name == STAGE_MS and m.key.step:
            per_stage[m.key.step.split("/", 1)[0]] += int(m.committed or m.attempted or 0)
    return dict(per_stage)


def run_with_stages(build_corpus, argv: list[str]) -> dict:
    """`build_corpus.run(argv)` → {"stats": ..., "stages": Beam's sampled msecs per top-level stage}.

    `build_corpus` is passed in so a benchmark can run another checkout's pipeline (bench_defaults --code).
    """
    captured: dict = {}
    counters = build_corpus.counters

    def counters_and_stages(result):  # run() hands its finished PipelineResult to `counters`
        captured["stages"] = stage_msecs(result)
        return counters(result)

    build_corpus.counters = counters_and_stages
    try:
        stats = build_corpus.run(argv)
    finally:
        build_corpus.counters = counters
    return {"stats": stats, "stages": captured.get("stages", {})}


def build_flags(settings: str, workdir: str) -> list[str]:
    """The build flags of a settings name: `demo` (the demo's) or `defaults` (the build's, demo CLIP).

    At the defaults the 8,192-code patch codebook is made once per workdir (random patches, seeded)
    and loaded: fitting it is one global step whose k-means (262k patches x 8,192 codes x 20
    iterations) takes tens of minutes on 2 cores and says nothing of the cost per example, which is
    the same for any codebook of that size.
    """
    from pipelines.demo.command import demo_build_flags

    if settings == "demo":
        return demo_build_flags()
    codebook = Path(workdir, "image_tokenizer-8192.npz")
    if not codebook.exists():
        import numpy as np

        from transforms.lib.tokenize import PatchVQTokenizer

        patches = np.random.default_rng(0).integers(0, 256, (8192, 8 * 8 * 3), dtype=np.uint8)
        PatchVQTokenizer(patches, 256, 8).save(str(codebook))
    return ["--clip_model=demo", f"--image_tokenizer={codebook}"]


def build_child(data: str, output: str, settings: str, held: bool, traced: bool = False) -> None:
    """In the child: build `data` into `output`, print one JSON line with the stats and stage times."""
    import contextlib
    import tracemalloc

    from pipelines import build_corpus

    watching = contextlib.nullcontext()
    if held:
        from benchmarks.held import watch

        watching = watch()
    flags = build_flags(settings, str(Path(output).parent))
    argv = ["--input", f"{data}/*.tar", "--output", output, "--seed", "0", *flags]
    if traced:
        tracemalloc.start(1)
    with watching as seen:
        got = run_with_stages(build_corpus, argv)
    if traced:
        got["traced_peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    stats = got["stats"]
    if held:
        n = max(1, stats["examples_read"])
        print(seen.table(n), file=sys.stderr, flush=True)
        got["held"] = {
            "per_example": {k: round(v / n) for k, v in sorted(seen.sizes.items(), key=lambda kv: -kv[1]) if v},
            "peak_total_per_example": round(seen.peak_total / n),
            "peak_after": seen.peak_after,
        }
    print(json.dumps(got), flush=True)


def _token_bytes(output: str) -> float:
    """int32 token bytes per written sample, from the shards' manifests (training and held-out)."""
    tokens = samples = 0
    for manifest in Path(output, "shards").rglob("manifest.json"):
        total = json.loads(manifest.read_text())["total"]
        tokens, samples = tokens + total["tokens"], samples + total["samples"]
    return 4 * tokens / max(1, samples)


def measure(
    size: int, workdir: str, settings: str = "demo", image_size: int = 64, held: bool = False, traced: bool = False
) -> dict:
    """Write the demo corpus of `size` examples, build it in a child process, return its figures."""
    from pipelines.demo.data import write_demo_corpus

    tag = f"{settings}-{image_size}px-{size}"
    data, output, log = f"{workdir}/data-{tag}", f"{workdir}/corpus-{tag}", f"{workdir}/build-{tag}.log"
    t0 = time.perf_counter()
    if not Path(data).exists():
        write_demo_corpus(data, num_examples=size, seed=0, image_size=image_size, shard_size=250)
    data_s = time.perf_counter() - t0
    cmd = [sys.executable, __file__, "--_build", data, output, "--settings", settings]
    cmd += (["--held"] if held else []) + (["--traced"] if traced else [])
    with open(log, "w") as err, tempfile.TemporaryFile("w+") as out:
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=out, stderr=err)
        # wait4 on this pid: its rusage covers this child and its reaped descendants only.
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        lines = out.read().strip().splitlines()
    if child.returncode or not lines:
        raise SystemExit(f"build of {size} examples failed (exit {child.returncode}); see {log}")
    got = json.loads(lines[-1])
    stats = got["stats"]
    return {
        "size": size,
        "settings": settings,
        "image_size": image_size,
        "written": stats["examples_written"],
        "data_s": data_s,
        "build_s": wall,
        "pipeline_s": stats["seconds"],
        "peak_rss": usage.ru_maxrss * 1024,  # KiB on Linux
        "bank_bytes": os.path.getsize(f"{output}/memory_bank/index.faiss"),
        "token_bytes": _token_bytes(output),
        "stages_ms": got["stages"],
        "held": got.get("held"),
        "traced_peak": got.get("traced_peak"),
        "load_avg_1m": os.getloadavg()[0],  # the machine may be shared: timings swing with its load
    }


def _mib(b: float) -> str:
    return f"{b / 2**20:,.1f} MiB"


def slopes(results: list[dict]) -> dict:
    """Peak RSS growth per example, bank excepted: between the two largest sizes, and least squares over all."""
    if len(results) < 2:
        return {}
    a, b = results[-2], results[-1]
    step = ((b["peak_rss"] - b["bank_bytes"]) - (a["peak_rss"] - a["bank_bytes"])) / (b["size"] - a["size"])
    xs = [r["size"] for r in results]
    ys = [r["peak_rss"] - r["bank_bytes"] for r in results]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    fit = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    bank = (b["bank_bytes"] - results[0]["bank_bytes"]) / (b["size"] - results[0]["size"])
    return {"last_step": step, "least_squares": fit, "bank": bank}


def slope_target(results: list[dict]) -> float:
    """Bytes per example the slope should stay under: 8 KiB at demo settings, 2x token bytes + 4 KiB at defaults."""
    if results[-1]["settings"] == "demo":
        return SLOPE_TARGET_KIB["demo"] * 1024
    return 2 * results[-1]["token_bytes"] + 4096


def tables(results: list[dict]) -> str:
    """The size table, the slope, and the per-stage table (seconds), markdown."""
    lines = [
        "| examples | build s | pipeline s | build ms/example | pipeline ms/example | peak RSS | bank (index.faiss) "
        "| token bytes/example |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['size']:,} | {r['build_s']:.1f} | {r['pipeline_s']:.1f} | {1000 * r['build_s'] / r['size']:.2f} | "
            f"{1000 * r['pipeline_s'] / r['size']:.2f} | {_mib(r['peak_rss'])} | {_mib(r['bank_bytes'])} "
            f"| {r['token_bytes']:,.0f} |"
        )
    if len(results) > 1:
        a, b = results[0], results[-1]
        marginal = (b["pipeline_s"] - a["pipeline_s"]) / (b["size"] - a["size"])
        sl = slopes(results)
        lines.append("")
        lines.append(
            f"Marginal cost {1000 * marginal:.2f} ms/example. Peak RSS grows {sl['last_step'] / 1024:.1f} KiB per "
            f"example between the two largest sizes ({sl['least_squares'] / 1024:.1f} KiB least squares over all), "
            f"the bank's {sl['bank'] / 1024:.2f} KiB excepted; target {slope_target(results) / 1024:.1f} KiB."
        )
    traced = [r for r in results if r.get("traced_peak")]
    if len(traced) > 1:
        a, b = traced[-2], traced[-1]
        live = (b["traced_peak"] - a["traced_peak"]) / (b["size"] - a["size"])
        rss = (b["peak_rss"] - a["peak_rss"]) / (b["size"] - a["size"])
        lines.append("")
        lines.append(
            f"Live Python heap at its peak (tracemalloc): {_mib(a['traced_peak'])} at {a['size']:,}, "
            f"{_mib(b['traced_peak'])} at {b['size']:,}: {live / 1024:.1f} KiB per example, against peak RSS's "
            f"{rss / 1024:.1f} KiB in the same runs; the rest is outside Python's heap."
        )
    # Beam's own ref_PCollection_* steps (runner plumbing) and stages that never took a sampled msec are left out.
    named = {s for r in results for s, ms in r["stages_ms"].items() if ms and not s.startswith("ref_")}
    stages = sorted(named, key=lambda s: -results[-1]["stages_ms"].get(s, 0))
    if stages:
        lines += ["", "Per stage, seconds (Beam's sampled ptransform execution time):", ""]
        lines.append("| stage | " + " | ".join(f"{r['size']:,}" for r in results) + " |")
        lines.append("| --- |" + " --- |" * len(results))
        for s in stages:
            cells = " | ".join(f"{r['stages_ms'].get(s, 0) / 1000:.1f}" for r in results)
            lines.append(f"| {s} | {cells} |")
    held = [r for r in results if r.get("held")]
    if held:
        r = held[-1]
        lines += ["", f"What the runner materialised at {r['size']:,} examples, encoded bytes per example:", ""]
        lines += ["| PCollection | bytes/example |", "| --- | --- |"]
        lines += [f"| {k} | {v:,} |" for k, v in list(r["held"]["per_example"].items())[:25]]
        lines.append(f"| held at once at most | {r['held']['peak_total_per_example']:,} |")
    return "\n".join(lines)


def result_rows(results: list[dict]) -> list[dict]:
    """run_all's rows: pipeline ms/example across the last step of sizes, and peak RSS largest vs smallest.

    The last step, not largest vs smallest: fixed costs (Beam start, model load, tokenizer fit) dominate
    the small builds, so against the smallest size any pipeline would look as if it got cheaper.
    """
    a, b = results[-2] if len(results) > 1 else results[0], results[-1]
    per = [1000 * r["pipeline_s"] / r["size"] for r in (a, b)]
    small = results[0]
    return [
        {
            "stage": f"scale: pipeline ms/example at {b['size']:,}",
            "baseline": f"{per[0]:.2f} ms/example at {a['size']:,}",
            "figure": f"{per[1]:.2f} ms/example",
            "ratio": round(per[1] / per[0], 2),
            # Below JUDGE_FROM examples fixed costs and a shared machine's noise swamp the per-example cost.
            "target": f"<= {MS_PER_EXAMPLE_TARGET}" if b["size"] >= JUDGE_FROM else "report (sizes too small)",
            "pass": per[1] / per[0] <= MS_PER_EXAMPLE_TARGET if b["size"] >= JUDGE_FROM else None,
        },
        {
            "stage": f"scale: build peak RSS at {b['size']:,}",
            "baseline": f"{_mib(small['peak_rss'])} at {small['size']:,}",
            "figure": f"{_mib(b['peak_rss'])} (bank {_mib(b['bank_bytes'])})",
            "ratio": round(b["peak_rss"] / small["peak_rss"], 2),
            "target": "report (DirectRunner holds PCollections)",
            "pass": None,
        },
    ] + _slope_row(results)


def _slope_row(results: list[dict]) -> list[dict]:
    if len(results) < 2:
        return []
    step, target = slopes(results)["last_step"], slope_target(results)
    return [
        {
            "stage": f"scale: peak RSS growth per example, {results[-1]['settings']} settings",
            "baseline": f"{results[-2]['size']:,} -> {results[-1]['size']:,} examples, bank excepted",
            "figure": f"{step / 1024:.1f} KiB",
            "ratio": round(step / target, 2),
            "target": f"<= {target / 1024:.1f} KiB",
            "pass": step <= target,
        }
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=None, help="comma-separated corpus sizes (default 1k-8k; --defaults 200,400)")
    ap.add_argument("--workdir", default=None, help="keep the data and corpora here (default: a temp folder)")
    ap.add_argument("--quick", action="store_true", help="sizes 500, 1000, 2000")
    ap.add_argument("--defaults", action="store_true", help="the build's default settings with 256 px images")
    ap.add_argument("--image_size", type=int, default=None, help="demo image side (64; 256 with --defaults)")
    ap.add_argument("--held", action="store_true", help="also size what the runner holds per PCollection (slower)")
    ap.add_argument("--traced", action="store_true", help="also the live Python heap's peak (tracemalloc; slower)")
    ap.add_argument("--_build", nargs=2, metavar=("DATA", "OUTPUT"), help=argparse.SUPPRESS)
    ap.add_argument("--settings", default="demo", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._build:
        build_child(*args._build, args.settings, args.held, args.traced)
        return 0
    settings = "defaults" if args.defaults else "demo"
    image_size = args.image_size or (256 if args.defaults else 64)
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",") if s]
    elif args.quick:
        sizes = [100, 200] if args.defaults else [500, 1000, 2000]
    else:
        sizes = [200, 400] if args.defaults else [1000, 2000, 4000, 8000]

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        results = []
        for size in sizes:
            r = measure(size, workdir, settings, image_size, args.held, args.traced)
            results.append(r)
            print(
                f"{size:,} examples ({settings} settings, {image_size} px): data {r['data_s']:.1f} s, build "
                f"{r['build_s']:.1f} s (pipeline {r['pipeline_s']:.1f} s), peak RSS {_mib(r['peak_rss'])}, "
                f"bank {_mib(r['bank_bytes'])}, load average {r['load_avg_1m']:.1f}",
                flush=True,
            )
    print(tables(results))
    print("RESULT " + json.dumps({"bench": "scale", "rows": result_rows(results), "runs": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
