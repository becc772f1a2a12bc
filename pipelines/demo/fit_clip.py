"""`cm3corpus fit-demo-clip`: train the tiny demo CLIP on freshly drawn demo scenes.

Contrastive (CLIP) training where every step draws a new batch of rendered scenes and their
captions from `pipelines.demo.data.sample_pairs`, so the model never sees a pair twice and cannot
memorise a fixed set (docs/design.md "Frozen models with no network": a fixed 5k-pair set trained far
worse). `evaluate_top1` measures what retrieval needs: on a demo corpus drawn with another seed, how
often the top-1 image for a caption shows the caption's first object (same shape and colour).
"""

from __future__ import annotations

import argparse
import json
import queue
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipelines.demo.data import sample_pairs, write_demo_corpus
from transforms.lib.clip_lean import fast_encode_text
from transforms.lib.demo_clip import CHECKPOINT_PATH, create_demo_clip, load_demo_clip, model_config
from transforms.lib.embed import ClipEmbedder
from transforms.lib.io import atomic_path, read_tar

HELD_OUT_SEED = 123  # the evaluation corpus's seed; training draws from `seed`, so the two never overlap
HELD_OUT_EXAMPLES = 1000


def _batches(seed: int, batch_size: int, image_size: int, preprocess, tokenizer, steps: int, depth: int = 3):
    """Yield (pixels, tokens) for `steps` batches, drawn on a background thread so rendering overlaps training.

    One producer consumes the generator in order, so the batches depend only on `seed`.
    """
    import torch  # lazy: seconds to import; `cm3corpus fit-demo-clip --help` needs none

    out: queue.Queue = queue.Queue(maxsize=depth)

    def produce() -> None:
        rng = np.random.default_rng(seed)
        for _ in range(steps):
            images, captions, _ = sample_pairs(rng, batch_size, image_size)
            out.put((torch.stack([preprocess(im) for im in images]), tokenizer(list(captions))))

    threading.Thread(target=produce, daemon=True, name="demo-batches").start()
    for _ in range(steps):
        yield out.get()


def fit_demo_clip(
    output_path: str | Path,
    steps: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    image_size: int = 64,
    log_every: int = 25,
) -> dict:
    """Train the demo CLIP from scratch and save it (float16) to `output_path`.

    Args:
        output_path: where the checkpoint goes (written to a temporary name, then renamed).
        steps: optimizer steps; each sees `batch_size` freshly drawn pairs.
        batch_size: pairs per step (the contrastive loss's negatives).
        lr: AdamW peak learning rate (linear warmup over the first 10% of steps, then cosine).
        seed: seeds the initialisation and the drawn scenes.
        image_size: side of the rendered images; must match the architecture's image_size.

    Returns:
        The training summary stored in the checkpoint (steps, seconds, final loss, ...).
    """
    import torch  # lazy: as in _batches
    import torch.nn.functional as F

    from model.train import cosine_lr  # lazy: model.train imports torch

    torch.manual_seed(seed)
    model, _, preprocess, tokenizer = create_demo_clip()
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # norms, biases, logit_scale
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    warmup = max(1, steps // 10)
    start, loss_avg = time.time(), None
    labels = torch.arange(batch_size)
    for step, (pixels, tokens) in enumerate(_batches(seed, batch_size, image_size, preprocess, tokenizer, steps)):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup)  # decays to a tenth of `lr`
        img = F.normalize(model.encode_image(pixels), dim=-1)  # (B, D)
        txt = F.normalize(fast_encode_text(model, tokens), dim=-1)  # (B, D); the trick is exact, so train with it
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T  # (B, B)
        loss = (F.cross_entropy(logits, labels[: len(img)]) + F.cross_entropy(logits.T, labels[: len(img)])) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_avg = loss.item() if loss_avg is None else 0.9 * loss_avg + 0.1 * loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"step {step + 1}/{steps}  loss {loss_avg:.3f}  {time.time() - start:.0f}s", flush=True)
    summary = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "image_size": image_size,
        "seconds": round(time.time() - start, 1),
        "final_loss": round(float(loss_avg or 0.0), 4),
    }
    save_checkpoint(model, output_path, {"model_cfg": model_config(), "train": summary})
    return summary


def save_checkpoint(model, path: str | Path, extra: dict) -> None:
    """Float16 state dict plus `extra` (the model config, how it was trained), written atomically."""
    import torch  # lazy: as in _batches

    state = {k: v.detach().half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    with atomic_path(str(path)) as tmp:
        torch.save({"state_dict": state, **extra}, tmp)


def _read_pairs(corpus_dir: str | Path) -> tuple[list[bytes], list[str], list[tuple[str, str]]]:
    """(jpg bytes, caption, (shape, colour) of the first object) of every image+text sample in the tars."""
    parts: dict[str, dict[str, bytes]] = {}
    for shard in sorted(Path(corpus_dir).glob("*.tar")):
        for name, data in read_tar(str(shard)):
            key, _, ext = name.rpartition(".")
            parts.setdefault(f"{shard.name}/{key}", {})[ext] = data
    images, captions, firsts = [], [], []
    for p in (parts[k] for k in sorted(parts)):
        caption = p.get("txt", b"").decode().strip()
        objects = json.loads(p.get("json", b"{}")).get("attributes", {}).get("objects", [])
        if "jpg" in p and caption and objects:
            images.append(p["jpg"])
            captions.append(caption)
            firsts.append((objects[0]["shape"], objects[0]["color"]))
    return images, captions, firsts


def evaluate_top1(model, preprocess, tokenizer, corpus_dir: str | Path, batch_size: int = 256) -> float:
    """Share of captions whose top-1 image by CLIP score has the caption's first object's shape and colour.

    Only image+text samples count; the first object is `attributes.objects[0]` of each sample's JSON.

    Args:
        model, preprocess, tokenizer: a CLIP as `load_demo_clip` returns it.
        corpus_dir: a folder of demo `*.tar` shards (drawn with a seed the model was not trained on).
    """
    images, captions, firsts = _read_pairs(corpus_dir)
    if not images:
        raise ValueError(f"no image+text samples with object attributes under {corpus_dir}")
    model.eval()
    embedder = ClipEmbedder(model, preprocess, tokenizer)
    img = np.concatenate(
        [embedder.encode_images(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    )
    txt = np.concatenate(
        [embedder.encode_texts(captions[i : i + batch_size]) for i in range(0, len(captions), batch_size)]
    )
    top = (txt @ img.T).argmax(axis=1)  # (N,) best image per caption
    return float(np.mean([firsts[j] == firsts[i] for i, j in enumerate(top)]))


def evaluate_checkpoint(checkpoint: str | Path, examples: int = HELD_OUT_EXAMPLES, seed: int = HELD_OUT_SEED) -> float:
    """`evaluate_top1` of a saved checkpoint on a freshly written held-out demo corpus."""
    model, preprocess, tokenizer = load_demo_clip(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        write_demo_corpus(tmp, num_examples=examples, seed=seed)
        return evaluate_top1(model, preprocess, tokenizer, tmp)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cm3corpus fit-demo-clip", description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(CHECKPOINT_PATH), help="Checkpoint path (default: the shipped one).")
    parser.add_argument("--steps", type=int, default=1000, help="Optimizer steps, each on a fresh batch.")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_eval", action="store_true", help="Skip the held-out top-1 evaluation.")
    args = parser.parse_args(argv)
    summary = fit_demo_clip(args.output, args.steps, args.batch_size, args.lr, args.seed)
    size_mb = Path(args.output).stat().st_size / 2**20
    print(f"saved {args.output} ({size_mb:.2f} MiB) after {summary['seconds']}s")
    if not args.no_eval:
        top1 = evaluate_checkpoint(args.output)
        print(f"held-out top-1 shape+colour agreement: {top1:.3f} ({HELD_OUT_EXAMPLES} examples, seed {HELD_OUT_SEED})")
    return 0
