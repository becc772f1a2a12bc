"""`cm3corpus demo`: the whole job on the built-in demo corpus, in one command.

Writes a synthetic img2dataset-style corpus, builds it with the demo CLIP into `OUTPUT/corpus/`,
then trains a tiny CM3 decoder on its shards for a few minutes and adds the loss curve and a few
generations to `OUTPUT/corpus/report.html`. Extra flags pass through to `cm3corpus build` (for example
`--direct_running_mode=multi_processing --direct_num_workers=2`).
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import sys
from collections.abc import Sequence

from PIL import Image

from pipelines.demo.data import write_demo_corpus
from transforms.lib.io import read_tar
from transforms.lib.report import append_section, training_section
from transforms.lib.tokenize import decode_text, encode_caption, encode_image, load_tokenizers


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cm3corpus demo", description=__doc__)
    parser.add_argument("--output", default="demo_out", help="Folder for the demo data and the built corpus.")
    parser.add_argument("--num_examples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--shard_size", type=int, default=250, help="Examples per input tar.")
    parser.add_argument("--train_steps", type=int, default=150, help="Steps of the closing training run (0: none).")
    args, build_flags = parser.parse_known_args(argv)

    from pipelines import build_corpus  # lazy: Beam takes seconds to import; `cm3corpus demo --help` needs none

    data, corpus = f"{args.output}/data", f"{args.output}/corpus"
    summary = write_demo_corpus(
        data, num_examples=args.num_examples, seed=args.seed, image_size=args.image_size, shard_size=args.shard_size
    )
    print(f"demo data: {summary} → {data}", file=sys.stderr)
    build_corpus.run(
        ["--input", f"{data}/*.tar", "--output", corpus, "--seed", str(args.seed), *demo_build_flags()]
        + ["--holdout_fraction=0.05", *build_flags]
    )
    if args.train_steps > 0:
        train_and_sample(corpus, f"{args.output}/train", args.train_steps, args.seed)
    print(f"demo corpus built in {corpus}/ — open {corpus}/report.html", file=sys.stderr)
    return 0


def train_and_sample(corpus: str, run_dir: str, steps: int, seed: int) -> dict:
    """A short training run on the corpus's shards, then a few generations, added to report.html."""
    # lazy: torch and Beam take seconds to import; `cm3corpus demo --help` and `--train_steps 0` need neither
    import torch

    # lazy: as torch above (model imports torch, transforms.tokenize imports Beam)
    from model.sample import generate_caption, generate_image
    from model.train import TrainConfig, load_model, train

    cfg = TrainConfig(
        shards=f"{corpus}/shards/cm3-*.tar",
        eval_shards=f"{corpus}/shards/heldout/cm3-*.tar",
        output=run_dir,
        max_steps=steps,
        batch_size=8,
        seq_len=512,
        n_layer=2,
        n_head=4,
        n_embd=128,
        lr=2e-3,
        warmup_steps=max(1, steps // 10),
        eval_every=max(1, steps // 4),
        eval_batches=4,
        ckpt_every=steps,
        log_every=max(1, steps // 10),
        seed=seed,
    )
    summary = train(cfg)
    model = load_model(f"{run_dir}/ckpt.pt")
    text_tok, image_tok, vocab = load_tokenizers(f"{corpus}/tokenizers")
    rng = torch.Generator().manual_seed(seed)

    def png(codes) -> bytes:
        out = io.BytesIO()
        image_tok.decode(codes[None, :])[0].save(out, format="PNG")
        return out.getvalue()

    prompts = ["a large red circle in the center", "a small blue square on the left side"]
    text_to_image = []
    for caption in prompts:
        codes, _ = generate_image(model, vocab, encode_caption(text_tok, vocab, caption), cfg_scale=3.0, generator=rng)
        text_to_image.append((caption, png(codes)))
    image_to_text = []
    for _, (original, caption) in zip(range(2), _demo_pairs(corpus), strict=False):
        image = Image.open(io.BytesIO(original)).convert("RGB")
        ids = generate_caption(model, vocab, encode_image(image_tok, vocab, image), generator=rng)
        text = decode_text(text_tok, vocab, [i for i in ids if vocab.text_start <= i < vocab.image_start])
        image_to_text.append((original, f"{text}  (original: {caption})"))

    rows = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
    points = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    figures = {
        "steps": summary["step"],
        "parameters": summary.get("params", 0),
        "first loss": points[0][1] if points else float("nan"),
        "last loss": points[-1][1] if points else float("nan"),
        "held-out loss": evals[-1][1] if evals else float("nan"),
        "tokens/s": summary.get("tokens_per_s", 0),
    }
    append_section(f"{corpus}/report.html", training_section(points, evals, text_to_image, image_to_text, figures))
    print(f"demo training: {figures}", file=sys.stderr)
    return figures


def _demo_pairs(corpus: str):
    """(image bytes, caption) of a few documents, from the report's own sample: the embeddings hold captions."""
    data = corpus.rsplit("/", 1)[0] + "/data"
    for path in sorted(glob.glob(f"{data}/*.tar"))[-1:]:
        parts: dict[str, dict[str, bytes]] = {}
        for name, member in read_tar(path):
            key, ext = name.split(".", 1)
            parts.setdefault(key, {})[ext] = member
        for key in sorted(parts)[::-1]:
            if "jpg" in parts[key] and "txt" in parts[key]:
                yield parts[key]["jpg"], parts[key]["txt"].decode()


def demo_build_flags() -> list[str]:
    """Build settings sized for the demo corpus (the defaults are CM3Leon's full-size ones)."""
    return [
        "--clip_model=demo",
        "--embed_batch_size=128",
        "--text_vocab_size=1024",
        "--image_size=64",
        "--image_patch_size=8",
        "--image_codebook_size=256",
        "--tokenizer_fit_images=512",
        "--seq_len=512",
        "--shard_max_samples=200",
    ]


if __name__ == "__main__":
    sys.exit(main())
