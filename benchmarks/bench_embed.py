"""Embedding stage vs a bare open_clip loop, on the same inputs, model and batch size.

    python -m benchmarks.bench_embed                       # ViT-B-32 (CM3Leon's retriever), random weights
    python -m benchmarks.bench_embed --clip_model demo     # the demo CLIP (reported, not judged)

The 1.5x target is judged at ViT-B-32, where the towers are what a real corpus runs. The demo CLIP
is a ResNet image tower of width 16 and a 2-layer text tower: image decode and the image tower are
nearly all of its time and neither has a lean path, so it is reported only.

Both sides embed the same image+caption pairs (demo scenes rendered at --image_size, JPEG-encoded):
- stage: `ClipModelHandler.embed_batch` batch after batch, the code RunInference runs on a worker
  (prefix-shared text pass, pooled-only last blocks, decode on a thread pool while the text batch
  runs; it also embeds the dropped-out query text, work the bare loop does not do). With --pipeline, the same input also goes through a
  DirectRunner pipeline with `EmbedExamples`; its wall time includes Beam's startup and the model load.
- bare: decode, preprocess, `model.encode_image` and `model.encode_text` (77 positions), one batch
  after another on one thread.

Prints both throughputs, their ratio and the largest difference between the two sides' embeddings.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from collections.abc import Sequence

import numpy as np


def make_inputs(n: int, image_size: int, seed: int = 0, scrambled: bool = False):
    """`n` image+text Examples drawn from the demo scene generator.

    With `scrambled`, each caption's words are shuffled: the same lengths, but without the demo's
    templated openings, which the prefix-shared text pass would otherwise share between captions.
    """
    from pipelines.demo.data import sample_pairs
    from schemas.records import Example

    rng = np.random.default_rng(seed)
    images, captions, _ = sample_pairs(rng, n, image_size)
    if scrambled:
        captions = [" ".join(rng.permutation(c.split())) for c in captions]
    out = []
    for i, (im, cap) in enumerate(zip(images, captions, strict=True)):
        buf = io.BytesIO()
        im.convert("RGB").save(buf, "JPEG", quality=90)
        out.append(Example(f"k{i:06d}", "bench", cap, buf.getvalue(), im.width, im.height))
    return out


def bare_loop(model, preprocess, tokenizer, examples, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The baseline: open_clip's own encoders, one batch after another."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    param = next(model.parameters())
    imgs, txts = [], []
    with torch.inference_mode():
        for i in range(0, len(examples), batch_size):
            batch = examples[i : i + batch_size]
            pixels = torch.stack([preprocess(Image.open(io.BytesIO(e.image)).convert("RGB")) for e in batch])
            imgs.append(F.normalize(model.encode_image(pixels.to(param.device, param.dtype)).float(), dim=-1).cpu())
            tokens = tokenizer([e.caption for e in batch]).to(param.device)
            txts.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    return torch.cat(imgs).numpy(), torch.cat(txts).numpy()


def stage_loop(handler, embedder, examples, batch_size: int) -> list:
    out = []
    for i in range(0, len(examples), batch_size):
        out.extend(handler.embed_batch(examples[i : i + batch_size], embedder))
    return out


_COLLECTED: dict = {}  # filled by the DirectRunner, which runs the pipeline in this process


def _keep(e) -> None:
    _COLLECTED[e.key] = e


def pipeline_run(args, examples) -> tuple[list, float]:
    """The same input through a DirectRunner pipeline with EmbedExamples; wall time includes startup and load."""
    import apache_beam as beam

    from benchmarks import bench_embed  # by module: Beam pickles functions of __main__ by value, dict and all
    from transforms.embed import EmbedExamples

    start = time.perf_counter()
    with beam.Pipeline(runner="DirectRunner") as p:
        embedded, _ = (
            p
            | beam.Create(examples)
            | EmbedExamples(args.clip_model, args.clip_pretrained, device=args.device, batch_size=args.batch_size)
        )
        embedded | beam.Map(bench_embed._keep)
    return [bench_embed._COLLECTED.pop(e.key) for e in examples], time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    from transforms.embed import ClipModelHandler
    from transforms.lib.clip import resolve_clip
    from transforms.lib.embed import ClipEmbedder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip_model", default="ViT-B-32")
    parser.add_argument("--clip_pretrained", default="none")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument(
        "--image_size",
        type=int,
        default=None,
        help="Side of the input JPEGs (default: 64 for demo, as its corpus; else 256).",
    )
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs of each side; the best counts.")
    parser.add_argument("--pipeline", action="store_true", help="Also time a DirectRunner pipeline run.")
    parser.add_argument(
        "--scrambled_captions",
        action="store_true",
        help="Shuffle each caption's words: no templated openings to share (closer to web captions).",
    )
    args = parser.parse_args(argv)

    args.image_size = args.image_size or (64 if args.clip_model == "demo" else 256)
    examples = make_inputs(args.examples, args.image_size, scrambled=args.scrambled_captions)
    model, preprocess, tokenizer = resolve_clip(args.clip_model, args.clip_pretrained, args.device)
    embedder = ClipEmbedder(model, preprocess, tokenizer, args.device)
    handler = ClipModelHandler(args.clip_model, args.clip_pretrained, args.device, args.batch_size)
    print(f"{args.clip_model}: {len(examples)} image+text examples, batch {args.batch_size}; {embedder.paths}")

    warm = examples[: args.batch_size]  # first calls pay one-off allocation costs on both sides
    bare_loop(model, preprocess, tokenizer, warm, args.batch_size)
    stage_loop(handler, embedder, warm, args.batch_size)

    # Interleaved repeats, best of each: the machine is shared and single timings swing.
    bare_s = stage_s = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        bare_img, bare_txt = bare_loop(model, preprocess, tokenizer, examples, args.batch_size)
        bare_s = min(bare_s, time.perf_counter() - t0)
        t0 = time.perf_counter()
        ours = stage_loop(handler, embedder, examples, args.batch_size)
        stage_s = min(stage_s, time.perf_counter() - t0)

    def max_diff(embs) -> float:
        img = np.stack([e.image_emb for e in embs])
        txt = np.stack([e.text_emb for e in embs])
        return float(max(np.abs(img - bare_img).max(), np.abs(txt - bare_txt).max()))

    n = len(examples)
    print(f"bare loop (encode_image + encode_text):  {n / bare_s:8.1f} examples/s  ({bare_s:.2f}s)")
    print(f"stage (handler.embed_batch):             {n / stage_s:8.1f} examples/s  ({stage_s:.2f}s)")
    print(f"speed-up {bare_s / stage_s:.2f}x   max abs diff of embeddings {max_diff(ours):.2e}")
    stats = embedder.text_stats
    if stats.get("positions"):
        context = getattr(model, "context_length", 77)
        print(
            f"text positions per pass (captions + queries): {stats['positions'] / stats['passes']:.0f} unpadded, "
            f"{stats['computed'] / stats['passes']:.0f} computed after prefix sharing "
            f"({stats['computed'] / stats['positions']:.2f}); the bare loop runs {context} per caption"
        )
    if args.pipeline:
        embs, wall = pipeline_run(args, examples)
        print(f"DirectRunner pipeline (incl. startup and model load): {n / wall:8.1f} examples/s  ({wall:.2f}s)")
        print(f"pipeline max abs diff of embeddings {max_diff(embs):.2e}")
    row = {  # the machine-readable line benchmarks/run_all.py reads
        "stage": f"embed ({args.clip_model}, batch {args.batch_size}{', scrambled captions' * args.scrambled_captions})",
        "baseline": f"bare open_clip loop {n / bare_s:,.1f} ex/s",
        "figure": f"{n / stage_s:,.1f} ex/s, max diff {max_diff(ours):.1e}",
        "ratio": round(bare_s / stage_s, 3),
        # issue 3: the stage at least 1.5x the bare open_clip loop, at a real model's size
        "target": ">= 1.5" if args.clip_model != "demo" else "report (demo CLIP)",
        "pass": bare_s / stage_s >= 1.5 if args.clip_model != "demo" else None,
    }
    print("RESULT " + json.dumps({"bench": "embed", "rows": [row]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
