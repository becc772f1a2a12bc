"""The build at the default settings (CM3Leon's shape: 8,192 codes, 1,024 tokens per 256 px image): examples/s.

    python benchmarks/bench_defaults.py --examples 200 --clip_model demo            # CPU, the demo CLIP
    python benchmarks/bench_defaults.py --examples 200 --clip_model demo --code DIR # the same with DIR's pipeline
    python benchmarks/bench_defaults.py --examples 3000 --clip_model ViT-B-32 --clip_pretrained none \\
        --device cuda --bare                                                           # what gpu_check.sh runs

Writes the demo corpus with 256 px images (`pipelines.demo.data`, seed 0), then builds it in a child
process with every tokenizer and layout flag at its default (only --clip_model, --clip_pretrained,
--device and the batch sizes are set) on the DirectRunner. Prints the build's examples/s (written
examples over the pipeline's seconds and over the child's wall time), Beam's sampled execution time per
top-level stage as examples/s, and the codebook fit's own log line. With --bare, the same examples'
image+caption pairs also go through a bare open_clip loop (decode, preprocess, `encode_image`,
`encode_text`, batch after batch, `benchmarks.bench_embed.bare_loop`) on the same device, and the
Embed stage's examples/s is given as a ratio to it. `--code DIR` builds with another checkout's
pipeline (before/after comparisons on the same input in one session). `--out FILE` writes the table.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_child(code: str, data: str, output: str, flags: list[str]) -> None:
    """In the child: build with `code`'s pipeline, print one JSON line with the stats and stage times."""
    from bench_scale import run_with_stages  # this checkout's helper, imported before `code` goes first

    sys.path.insert(0, code)
    from pipelines import build_corpus

    argv = ["--input", f"{data}/*.tar", "--output", output, "--seed", "0", *flags]
    print(json.dumps(run_with_stages(build_corpus, argv)), flush=True)


def build(code: str, data: str, output: str, flags: list[str], log: str) -> dict:
    env = {**os.environ, "PYTHONPATH": code}
    with open(log, "w") as err, tempfile.TemporaryFile("w+") as out:
        t0 = time.perf_counter()
        child = subprocess.run(
            [sys.executable, __file__, "--_build", code, data, output, *flags], stdout=out, stderr=err, env=env
        )
        wall = time.perf_counter() - t0
        out.seek(0)
        lines = out.read().strip().splitlines()
    if child.returncode or not lines:
        raise SystemExit(f"build failed (exit {child.returncode}); see {log}")
    got = json.loads(lines[-1])
    fit = [line.strip() for line in open(log) if line.startswith("cm3corpus tokenizers:")]
    return {
        **got,
        "wall_s": wall,
        "fit_line": fit[-1] if fit else "(no fit log line: this checkout does not print one)",
    }


def demo_pairs(data: str) -> list:
    """The image+caption examples of the demo tars, as `Example`s (for the bare loop)."""
    from schemas.records import Example
    from transforms.lib.io import read_tar

    parts: dict[str, dict[str, bytes]] = {}
    for path in sorted(glob.glob(f"{data}/*.tar")):
        for name, data_ in read_tar(path):
            key, ext = name.split(".", 1)
            parts.setdefault(key, {})[ext] = data_
    return [
        Example(key, "bench", p["txt"].decode(), p["jpg"], 0, 0)
        for key, p in sorted(parts.items())
        if "jpg" in p and p.get("txt", b"").strip()
    ]


def bare_rate(args, data: str) -> tuple[float, int, str]:
    """Examples/s of the bare open_clip loop on the corpus's image+caption pairs (after one warm-up batch)."""
    import torch

    from benchmarks.bench_embed import bare_loop
    from transforms.lib.clip import resolve_clip
    from transforms.lib.embed import ClipEmbedder

    examples = demo_pairs(data)
    model, preprocess, tokenizer = resolve_clip(args.clip_model, args.clip_pretrained, args.device)
    paths = ClipEmbedder(model, preprocess, tokenizer, args.device).paths  # the lean passes' load-time checks
    bare_loop(model, preprocess, tokenizer, examples[: args.embed_batch_size], args.embed_batch_size)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    bare_loop(model, preprocess, tokenizer, examples, args.embed_batch_size)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return len(examples) / (time.perf_counter() - t0), len(examples), paths


def table(args, r: dict, bare: tuple[float, int, str] | None) -> str:
    stats, n = r["stats"], r["stats"]["examples_read"]
    lines = [
        f"Build at the defaults: {n:,} examples of {args.image_size} px, --clip_model {args.clip_model}"
        f" --clip_pretrained {args.clip_pretrained} --device {args.device}; code {r['code']}",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| examples written | {stats['examples_written']:,} |",
        f"| pipeline seconds | {stats['seconds']:.1f} |",
        f"| build wall seconds (child: imports, model loads, pipeline) | {r['wall_s']:.1f} |",
        f"| examples/s (pipeline) | {n / stats['seconds']:.2f} |",
        f"| examples/s (wall) | {n / r['wall_s']:.2f} |",
        "",
        f"Codebook fit: {r['fit_line']}",
        "",
        "| stage (Beam's sampled time) | seconds | examples/s |",
        "| --- | --- | --- |",
    ]
    for stage, ms in sorted(r["stages"].items(), key=lambda kv: -kv[1]):
        if ms and not stage.startswith("ref_"):
            lines.append(f"| {stage} | {ms / 1000:.1f} | {n / (ms / 1000):.1f} |")
    if bare is not None:
        rate, count, paths = bare
        embed_ms = r["stages"].get("Embed", 0)
        embed_rate = n / (embed_ms / 1000) if embed_ms else float("nan")
        lines += [
            "",
            f"Embed stage {embed_rate:.1f} examples/s vs a bare open_clip loop {rate:.1f} examples/s"
            f" ({count:,} image+caption pairs, batch {args.embed_batch_size}, same device):"
            f" ratio {embed_rate / rate:.2f}. Lean passes after the load-time check on {args.device}: {paths}.",
        ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="24 examples (what run_all.py --quick runs)")
    ap.add_argument("--image_size", type=int, default=256, help="side of the demo images written")
    ap.add_argument("--clip_model", default="demo")
    ap.add_argument("--clip_pretrained", default="none")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--embed_batch_size", type=int, default=64)
    ap.add_argument("--tokenize_batch_size", type=int, default=16)
    ap.add_argument("--extra", default="", help='more build flags, space-separated: --extra="--flag=V ..."')
    ap.add_argument("--bare", action="store_true", help="also time a bare open_clip loop on the same examples")
    ap.add_argument("--code", default=str(REPO), help="the checkout whose pipeline builds (default: this one)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None, help="also write the table to this file")
    if sys.argv[1:2] == ["--_build"]:  # the child: the rest are build flags, not this script's
        code, data, output, *flags = sys.argv[2:]
        build_child(code, data, output, flags)
        return 0
    args = ap.parse_args()
    if args.quick:
        args.examples = 24
    sys.path.insert(0, str(REPO))
    from pipelines.demo.data import write_demo_corpus

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or tmp
        data = f"{work}/data-{args.examples}-{args.image_size}"
        if not glob.glob(f"{data}/*.tar"):
            write_demo_corpus(data, num_examples=args.examples, seed=0, image_size=args.image_size, shard_size=250)
        flags = [
            f"--clip_model={args.clip_model}",
            f"--clip_pretrained={args.clip_pretrained}",
            f"--device={args.device}",
            f"--embed_batch_size={args.embed_batch_size}",
            f"--tokenize_batch_size={args.tokenize_batch_size}",
            *args.extra.split(),
        ]
        code = str(Path(args.code).resolve())
        r = build(code, data, f"{work}/corpus", flags, f"{work}/build.log")
        r["code"] = code
        bare = bare_rate(args, data) if args.bare else None
        text = table(args, r, bare)
        print(text, flush=True)
        if args.out:
            Path(args.out).write_text(text + "\n")
        rate = r["stats"]["examples_read"] / r["stats"]["seconds"]
        rows = [
            {
                "stage": f"build at the defaults, {args.examples:,} examples, {args.device}",
                "baseline": "",
                "figure": f"{rate:.2f} examples/s",
                "ratio": None,
                "target": "report",
                "pass": None,
            }
        ]
        if bare is not None and r["stages"].get("Embed"):
            embed_rate = r["stats"]["examples_read"] / (r["stages"]["Embed"] / 1000)
            rows.append(
                {
                    "stage": f"Embed stage in the build, {args.clip_model}, {args.device}",
                    "baseline": f"bare open_clip loop {bare[0]:.1f} examples/s",
                    "figure": f"{embed_rate:.1f} examples/s",
                    "ratio": round(embed_rate / bare[0], 2),
                    "target": "report",
                    "pass": None,
                }
            )
        print("RESULT " + json.dumps({"rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
