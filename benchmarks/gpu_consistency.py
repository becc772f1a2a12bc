"""Determinism on one device type: the CLIP embeddings twice, and the patch-VQ codes on --device vs the CPU.

    python -m benchmarks.gpu_consistency --corpus WORK/corpus --data WORK/data-N-256 --device cuda

Embeds the same 64 image+caption pairs twice with `ClipEmbedder` on --device (outputs must be equal bit
for bit: model batches are cut from keys, so a rerun sees the same batches), and encodes the same
images with the corpus's patch VQ placed on --device and on the CPU (the search is exact, so the codes
must be identical). Exits non-zero when either differs.
"""

from __future__ import annotations

import argparse
import io
import sys

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--clip_model", default="ViT-B-32")
    ap.add_argument("--clip_pretrained", default="none")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n", type=int, default=64)
    args = ap.parse_args()
    from PIL import Image

    from benchmarks.bench_defaults import demo_pairs
    from transforms.lib.clip import resolve_clip
    from transforms.lib.embed import ClipEmbedder
    from transforms.lib.tokenize import load_image_tokenizer

    examples = demo_pairs(args.data)[: args.n]
    embedder = ClipEmbedder(*resolve_clip(args.clip_model, args.clip_pretrained, args.device), args.device)
    items = [(e.key, e.image, e.caption) for e in examples]
    first, second = embedder.embed(items, 0, 0.2), embedder.embed(items, 0, 0.2)
    same_emb = all(
        all(np.array_equal(a, b) for a, b in zip(x, y, strict=True)) for x, y in zip(first, second, strict=True)
    )
    tok = load_image_tokenizer(f"{args.corpus}/tokenizers/image_tokenizer.npz")
    images = [Image.open(io.BytesIO(e.image)).convert("RGB") for e in examples]
    cpu = tok.encode(images)  # numpy on the CPU
    tok.place(args.device)  # the torch search on --device (on "cpu" too, so the smoke run exercises it)
    dev = tok.nearest_torch(np.concatenate([tok.patches(im) for im in images]), args.device).reshape(cpu.shape)
    same_codes = int((cpu == dev).sum())
    print(f"CLIP on {args.device} ({embedder.paths}), {len(items)} pairs embedded twice: identical {same_emb}")
    print(f"patch VQ, torch on {args.device} vs numpy on cpu: {same_codes:,} of {cpu.size:,} codes equal")
    return 0 if same_emb and same_codes == cpu.size else 1


if __name__ == "__main__":
    sys.exit(main())
