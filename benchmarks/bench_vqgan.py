"""VQ-GAN image tokenizing: the pipeline stage against a batched bare loop over the same model.

    python -m benchmarks.bench_vqgan                                   # Chameleon's VQ-GAN shape, 512 px, CPU
    python -m benchmarks.bench_vqgan --quick                           # a tiny VQ-GAN at 64 px
    python -m benchmarks.bench_vqgan --device cuda --dtype bfloat16    # see benchmarks/gpu_vqgan.sh

The model has Chameleon's architecture (`tokenizer/vqgan.yaml`: ch 128, ch_mult 1,1,2,2,4, two
res blocks, 8192 codes of 256 dims, 512 px → 32 x 32 codes) with random weights, saved in the
release layout and opened by `--image_tokenizer vqgan:DIR`'s loader, then written into a corpus's
`tokenizers/` and read back as a worker does.

Both sides start from the same JPEGs (640 x 512, so the resize and the centre crop both happen):
- stage: `_TokenizeBatch.process` on key-sorted batches of `Example`s, the DoFn `TokenizeDocs`
  runs after `KeyedBatches` (decode, Chameleon preprocessing, one model batch, codes → vocab ids,
  one `TokenizedDoc` per example; the caption too);
- bare: decode, the same preprocessing, `torch.stack`, `model.encode` per batch: no Beam records,
  no vocab, no caption.

Prints images/s of both, the ratio (target: stage >= 0.9x the bare loop) and whether the codes agree.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

CHAMELEON_ARCH = dict(n_embed=8192, embed_dim=256, z_channels=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2)
TINY_ARCH = dict(n_embed=64, embed_dim=8, z_channels=8, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)


def save_release(root: Path, arch: dict, resolution: int, seed: int = 0) -> Path:
    """Random weights in Meta's layout: root/tokenizer/vqgan.yaml + vqgan.ckpt (`state_dict`)."""
    import torch
    import yaml

    from transforms.lib.vqgan import VQGANConfig, build_model

    cfg = VQGANConfig(resolution=resolution, **arch)
    torch.manual_seed(seed)
    model = build_model(cfg)
    dd = {
        "double_z": False,
        "z_channels": cfg.z_channels,
        "resolution": resolution,
        "in_channels": 3,
        "out_ch": 3,
        "ch": cfg.ch,
        "ch_mult": list(cfg.ch_mult),
        "num_res_blocks": cfg.num_res_blocks,
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    doc = {
        "model": {
            "target": "chameleon.inference.vqgan.VQModel",
            "params": {"embed_dim": cfg.embed_dim, "n_embed": cfg.n_embed, "ddconfig": dd},
        }
    }
    (root / "tokenizer").mkdir(parents=True, exist_ok=True)
    (root / "tokenizer" / "vqgan.yaml").write_text(yaml.safe_dump(doc))
    torch.save({"state_dict": model.state_dict()}, root / "tokenizer" / "vqgan.ckpt")
    return root


def make_examples(n: int, resolution: int, seed: int = 0) -> list:
    """`n` image+caption Examples: smooth random colour fields as 5:4 JPEGs (short side `resolution`)."""
    from PIL import Image

    from schemas.records import Example

    rng = np.random.default_rng(seed)
    out = []
    w, h = resolution * 5 // 4, resolution
    for i in range(n):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        im = Image.fromarray(small, "RGB").resize((w, h), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        out.append(Example(f"k{i:06d}", "bench", f"a field of colour number {i}", buf.getvalue(), w, h))
    return out


def tokenizers_dir(directory: str, release: Path, device: str, dtype: str):
    """Write a corpus's `tokenizers/` with the VQ-GAN, and load it as a worker does (once)."""
    from transforms.lib.tokenize import build_vocab, fit_text_tokenizer, load_tokenizers, write_tokenizers
    from transforms.lib.vqgan import load_vqgan

    text_tok = fit_text_tokenizer([f"a field of colour number {i}" for i in range(64)], 300)
    image_tok = load_vqgan(str(release))
    write_tokenizers(directory, text_tok, image_tok, build_vocab(text_tok, image_tok, 8))
    _, loaded, vocab = load_tokenizers(directory)
    loaded.place(device, dtype)
    return loaded, vocab


def bare_loop(tok, examples, batch_size: int) -> np.ndarray:
    """The baseline: decode, preprocess, stack and `model.encode`, batch after batch."""
    import torch
    from PIL import Image

    from transforms.lib.vqgan import preprocess

    param = next(tok.model.encoder.parameters())
    out = []
    with torch.inference_mode():
        for i in range(0, len(examples), batch_size):
            batch = examples[i : i + batch_size]
            x = np.stack([preprocess(Image.open(io.BytesIO(e.image)).convert("RGB"), tok.cfg) for e in batch])
            out.append(tok.model.encode(torch.from_numpy(x).to(param.device, param.dtype)).cpu().numpy())
    return np.concatenate(out)


def stage_loop(directory: str, examples, batch_size: int, device: str, dtype: str) -> list:
    from transforms.tokenize import _TokenizeBatch

    fn = _TokenizeBatch("rejected", device, dtype)
    out = []
    for i in range(0, len(examples), batch_size):
        out.extend(fn.process(tuple(examples[i : i + batch_size]), directory))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=None, help="default: 512 (64 with --quick)")
    parser.add_argument("--images", type=int, default=None, help="default: 8 on CPU, 256 on CUDA (32 with --quick)")
    parser.add_argument("--batch_size", type=int, default=None, help="default: 4 on CPU, 32 on CUDA")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=2, help="Interleaved timed runs of each side; the best counts.")
    parser.add_argument("--quick", action="store_true", help="A tiny VQ-GAN at 64 px (seconds).")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    arch = TINY_ARCH if args.quick else CHAMELEON_ARCH
    resolution = args.resolution or (64 if args.quick else 512)
    images = args.images or (32 if args.quick else 256 if cuda else 8)
    batch = args.batch_size or (32 if cuda else 4)

    import torch

    from schemas.records import TokenizedDoc

    with tempfile.TemporaryDirectory() as tmp:
        release = save_release(Path(tmp) / "release", arch, resolution)
        directory = str(Path(tmp) / "tokenizers")
        tok, vocab = tokenizers_dir(directory, release, args.device, args.dtype)
        examples = make_examples(images, resolution)
        name = "chameleon-shaped" if not args.quick else "tiny"
        params = sum(p.numel() for p in tok.model.encoder.parameters()) / 1e6
        print(
            f"VQ-GAN {name} ({params:.1f}M encoder params), {resolution} px -> {tok.tokens_per_image} codes, "
            f"{images} images, batch {batch}, {args.device} {args.dtype}, torch threads {torch.get_num_threads()}"
        )
        warm = examples[:batch]  # first calls pay one-off allocation (and cuDNN) costs on both sides
        bare_loop(tok, warm, batch)
        stage_loop(directory, warm, batch, args.device, args.dtype)
        bare_s = stage_s = float("inf")
        for _ in range(args.repeats):  # interleaved, best of each: the machine is shared
            t0 = time.perf_counter()
            bare = bare_loop(tok, examples, batch)
            bare_s = min(bare_s, time.perf_counter() - t0)
            t0 = time.perf_counter()
            ours = stage_loop(directory, examples, batch, args.device, args.dtype)
            stage_s = min(stage_s, time.perf_counter() - t0)
        agreement = None
        if args.dtype != "float32":  # half precision moves some codes: how many, against float32 on the same device
            tok.place(args.device, "float32")
            agreement = float(np.mean(bare_loop(tok, examples, batch) == bare))
    docs = [d for _, d in ours if isinstance(d, TokenizedDoc)]
    agree = len(docs) == images and all(
        vocab.codes_of_image(d.image_ids) == b.tolist() for d, b in zip(docs, bare, strict=True)
    )
    ratio = bare_s / stage_s
    print(f"bare loop (decode, preprocess, model.encode): {images / bare_s:8.2f} images/s  ({bare_s:.2f}s)")
    print(f"stage (_TokenizeBatch.process):               {images / stage_s:8.2f} images/s  ({stage_s:.2f}s)")
    print(f"ratio stage/bare: {ratio:.3f} (target >= 0.9); codes identical: {agree}")
    if agreement is not None:
        print(f"codes equal to float32's on {args.device}: {agreement:.4f}")
    row = {
        "stage": f"vqgan tokenize ({name}, {resolution} px, batch {batch}, {args.device} {args.dtype})",
        "baseline": f"batched bare loop {images / bare_s:,.2f} img/s",
        "figure": f"{images / stage_s:,.2f} img/s, codes identical {agree}",
        "ratio": round(ratio, 3),
        "target": ">= 0.9",
        "pass": ratio >= 0.9 and agree,
    }
    print("RESULT " + json.dumps({"bench": "vqgan", "rows": [row]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
