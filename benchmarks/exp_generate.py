"""Does retrieval at generation time help? `--retrieve 2` against `--retrieve 0` on held-out demo prompts.

For each held-out prompt of a demo build (a one-object image+text example of `shards/heldout/`, so its
scene is known and it is not in the memory bank), `model.generate.run_generate` draws `--num_samples`
images twice with the same seeds and settings: with two documents retrieved by the build's rules and
laid out before the prompt, and with none. Reported per arm:

- best CLIP score: the demo CLIP's score of the best-ranked sample against the prompt (what
  `cm3corpus generate` ranks by), and the mean over all samples;
- shape / colour accuracy: each generated image classified zero-shot by the demo CLIP over the 40
  prompts "a {colour} {shape}", against the prompt's ground truth (`pipelines.demo.data` scenes);
  for the best-ranked sample and over all samples. The same classifier on the real held-out images
  gives its ceiling, and chance is 1/5 (shape) and 1/8 (colour);
- image NLL: the teacher-forced mean loss of the real image's tokens after the prompt (no sampling
  noise: whether the documents in context make the true image more likely);
- paired differences (retrieve - none) with a 95% bootstrap interval over prompts.

    python benchmarks/exp_generate.py --corpus demo_out/corpus --checkpoint demo_out/train \\
        --data demo_out/data [--prompts 32 --num_samples 4 --seed 0]

Run it under the bench lock (`flock /tmp/cm3-bench.lock ...`) on a shared machine; the last line is
`RESULT {json}`.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.generate import GenerateConfig, load_decoder, run_generate  # noqa: E402
from pipelines.demo.data import COLORS, SHAPES  # noqa: E402
from transforms.lib.corpus import Corpus  # noqa: E402
from transforms.lib.io import read_tar  # noqa: E402


def heldout_prompts(corpus: Corpus, data: str, n: int) -> list[dict]:
    """Up to n held-out one-object image+text examples: key, caption, shape, colour, image bytes."""
    keys: set[str] = set()
    for path in sorted(glob.glob(f"{corpus.root}/shards/heldout/*.tar")):
        keys |= {name.split(".", 1)[0] for name, _ in read_tar(path)}
    found = []
    for path in sorted(glob.glob(f"{data}/*.tar")):
        parts: dict[str, dict[str, bytes]] = {}
        for name, data_ in read_tar(path, keep=lambda name: name.split(".", 1)[0] in keys):
            key, ext = name.split(".", 1)
            parts.setdefault(key, {})[ext] = data_
        for key in sorted(parts):
            p = parts[key]
            if not {"jpg", "txt", "json"} <= p.keys():
                continue
            objects = json.loads(p["json"])["attributes"]["objects"]
            if len(objects) == 1:
                o = objects[0]
                found.append({"key": key, "caption": p["txt"].decode(), "shape": o["shape"], "color": o["color"]})
                found[-1]["image"] = p["jpg"]
    return found[:n]


class ZeroShot:
    """The demo CLIP's zero-shot (shape, colour) classifier over "a {colour} {shape}"."""

    def __init__(self, corpus: Corpus):
        self.labels = [(s, c) for s in SHAPES for c in COLORS]
        self.embedder = corpus.embedder
        self.text = self.embedder.encode_texts([f"a {c} {s}" for s, c in self.labels])  # (40, D)

    def __call__(self, images: list[bytes]) -> list[tuple[str, str]]:
        emb = self.embedder.encode_images(images)  # (N, D)
        return [self.labels[int(i)] for i in (emb @ self.text.T).argmax(axis=1)]


@torch.no_grad()
def image_nll(model, corpus: Corpus, caption: str, key: str, neighbours: list) -> float | None:
    """Mean loss of the example's real image tokens after the prompt (with these documents before it)."""
    from model.sample import text_to_image_prompt
    from transforms.lib.tokenize import encode_caption

    text_tok, _, vocab = corpus.tokenizers
    doc = corpus.documents([key]).get(key)
    if doc is None or not doc.image_ids:
        return None
    prompt = text_to_image_prompt(vocab, encode_caption(text_tok, vocab, caption), neighbours, model.config.seq_len)
    ids = torch.tensor([*prompt.ids, *doc.image_ids], dtype=torch.long)[None]  # (1, T)
    logits, _ = model(ids[:, :-1])  # (1, T-1, V)
    n = len(doc.image_ids)
    logp = torch.log_softmax(logits[0, -n:].float(), dim=-1)  # (n, V)
    return float(-logp.gather(1, ids[0, -n:, None]).mean())


def _ci(diffs: np.ndarray, seed: int = 0, reps: int = 2000) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = [rng.choice(diffs, size=len(diffs), replace=True).mean() for _ in range(reps)]
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True, help="The demo data folder (ground truth scenes).")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--num_samples", type=int, default=4)
    ap.add_argument("--retrieve", type=int, default=2)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)

    start = time.perf_counter()
    corpus = Corpus(args.corpus)
    model, ckpt = load_decoder(args.checkpoint)
    prompts = heldout_prompts(corpus, args.data, args.prompts)
    classify = ZeroShot(corpus)
    ceiling = classify([p["image"] for p in prompts])
    arms = {"retrieve": args.retrieve, "none": 0}
    per: dict[str, dict[str, list]] = {a: {} for a in arms}
    generated_tokens = 0
    for i, p in enumerate(prompts):
        for arm, n in arms.items():
            gc = GenerateConfig(prompt=p["caption"], num_samples=args.num_samples, retrieve=n, cfg=args.cfg)
            gc = GenerateConfig(**{**gc.__dict__, "seed": args.seed + i, "batch_size": args.num_samples})
            run = run_generate(gc, corpus, model, quiet=True)
            generated_tokens += args.num_samples * corpus.tokenizers[2].tokens_per_image
            order = run["ranking"]
            labels = classify([run["images"][j] for j in range(args.num_samples)])
            best = order[0]
            r = per[arm]
            r.setdefault("best_clip", []).append(run["samples"][best]["clip_score"])
            r.setdefault("mean_clip", []).append(np.mean([s["clip_score"] for s in run["samples"]]))
            r.setdefault("best_shape", []).append(labels[best][0] == p["shape"])
            r.setdefault("best_color", []).append(labels[best][1] == p["color"])
            r.setdefault("all_shape", []).append(np.mean([lab[0] == p["shape"] for lab in labels]))
            r.setdefault("all_color", []).append(np.mean([lab[1] == p["color"] for lab in labels]))
            used = [h["key"] for h in run["retrieved"] if h["in_context"]]
            docs = corpus.documents(used)
            nll = image_nll(model, corpus, p["caption"], p["key"], [docs[k] for k in used])
            r.setdefault("image_nll", []).append(np.nan if nll is None else nll)
        print(f"[exp] {i + 1}/{len(prompts)} prompts", file=sys.stderr, flush=True)

    result = {
        "checkpoint": ckpt,
        "prompts": len(prompts),
        "num_samples": args.num_samples,
        "cfg": args.cfg,
        "retrieve": args.retrieve,
        "ceiling_shape": float(np.mean([c[0] == p["shape"] for c, p in zip(ceiling, prompts, strict=True)])),
        "ceiling_color": float(np.mean([c[1] == p["color"] for c, p in zip(ceiling, prompts, strict=True)])),
        "chance_shape": 1 / len(SHAPES),
        "chance_color": 1 / len(COLORS),
        "seconds": round(time.perf_counter() - start, 1),
        "generated_tokens": generated_tokens,
    }
    print(f"{'metric':<12} {'retrieve':>9} {'none':>9} {'diff':>9}  95% CI of diff")
    for m in per["none"]:
        a, b = np.asarray(per["retrieve"][m], float), np.asarray(per["none"][m], float)
        ok = ~(np.isnan(a) | np.isnan(b))
        d = a[ok] - b[ok]
        lo, hi = _ci(d)
        result[m] = {"retrieve": float(a[ok].mean()), "none": float(b[ok].mean()), "diff": float(d.mean())}
        result[m]["ci95"] = [round(lo, 4), round(hi, 4)]
        print(f"{m:<12} {a[ok].mean():9.4f} {b[ok].mean():9.4f} {d.mean():+9.4f}  [{lo:+.4f}, {hi:+.4f}]")
    print(f"ceiling (real images): shape {result['ceiling_shape']:.3f}, colour {result['ceiling_color']:.3f}")
    print("RESULT " + json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
