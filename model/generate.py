"""`cm3corpus generate`: retrieval-augmented sampling from a trained decoder over a built corpus.

Text to image (`--prompt`), as CM3Leon and RA-CM3 do it at inference:
1. the prompt is embedded with the bank's CLIP and `--retrieve` documents are picked from the bank
   by the build's rules (`transforms.lib.corpus.Corpus.retrieve`: skip above 0.9, image+text first,
   diversity); `--retrieve 0` is the no-retrieval baseline;
2. the documents and the prompt are laid out as the build lays out a training sequence, and
   `--num_samples` images are drawn with the KV cache, classifier-free guidance against RA-CM3's
   unconditional stream (the same documents, caption masked) and optionally CD-K
   (`model.sample.text_to_image_prompt`, `generate`);
3. each image's tokens are decoded with the corpus's image tokenizer, scored with the CLIP against
   the prompt, and ranked.

Image to caption (`--image PATH`) is CM3 infilling: the image's tokens after the retrieved documents
(retrieved with the image), the caption masked, and the model writes the span; each caption is
scored with the CLIP against the image.

Written to `--output`: `sample-NN.png` (text to image), `run.json` (settings, retrieved documents,
each sample's seed, score and rank; no timings, so a seeded rerun writes the same bytes) and
`index.html` (the retrieved documents beside the samples, best first). Sample i draws from its own
generator, seeded from (--seed, i), so a seeded run repeats exactly at the same --batch_size.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import io
import json
import os
import pickle
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from schemas.vocab import EOSS
from transforms.lib.clip import ClipWeightsUnavailable
from transforms.lib.corpus import RULE_CHECKS, Corpus, check_flags, read_image_file
from transforms.lib.io import atomic_open
from transforms.lib.retrieve import RetrievalRules
from transforms.lib.rng import rng_for
from transforms.lib.tokenize import decode_text, encode_caption, encode_image

RUN_JSON = "run.json"
INDEX_HTML = "index.html"


@dataclass(frozen=True)
class GenerateConfig:
    """The settings of one `cm3corpus generate` run (all of them go into run.json)."""

    prompt: str | None = None  # text to image: the caption
    image: str | None = None  # image to caption: the image file
    num_samples: int = 8  # samples drawn
    retrieve: int = 2  # documents retrieved and placed before the prompt (0: none)
    cfg: float = 3.0  # classifier-free guidance scale (1: off); text to image only
    cd_k: int | None = None  # CM3Leon's CD-K with this k (None: off)
    cd_alpha: float = 0.1  # CD-K's alpha
    temperature: float = 1.0  # 0 is greedy
    top_p: float = 0.9  # nucleus mass
    seed: int = 0  # sample i is seeded from (seed, i)
    batch_size: int = 8  # samples drawn together (a rerun repeats exactly at the same batch size)
    max_caption_tokens: int = 48  # image to caption: text tokens at most
    max_similarity: float = 0.9  # retrieval rules, as the build's
    diversity_threshold: float = 0.95
    topk: int = 32


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index`: from (seed, index) alone, so it does not depend on --num_samples."""
    return int(rng_for(seed, f"sample-{index}", "generate").integers(2**62))


def load_decoder(checkpoint: str, device: str = "cpu"):
    """A trained decoder from a `cm3corpus train` run folder (its ckpt.pt) or a checkpoint file.

    Loaded with `weights_only=True` (`model.train.load_checkpoint`): nothing in it runs as code.
    """
    from model.train import CKPT, load_model  # lazy: torch takes seconds; `generate --help` and flag errors need none

    path = os.path.join(checkpoint, CKPT) if os.path.isdir(checkpoint) else checkpoint
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--checkpoint: no checkpoint at {path}")
    return load_model(path, device), path


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class _Progress:
    """`[generate] samples 8/16 · 412 tokens/s` lines on stderr, at most one every `every` seconds."""

    def __init__(self, total: int, every: float = 2.0, quiet: bool = False) -> None:
        self.total, self.every, self.quiet = total, every, quiet
        self.start = self.last = time.monotonic()
        self.done = 0  # samples finished
        self.tokens = 0  # tokens generated in finished batches, all rows counted

    def step(self, rows: int, tokens_in_batch: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._line(self.tokens + rows * tokens_in_batch, now)

    def batch_done(self, rows: int, tokens: int) -> None:
        self.done += rows
        self.tokens += rows * tokens
        self._line(self.tokens, time.monotonic())

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(time.monotonic() - self.start, 1e-9)

    def _line(self, tokens: int, now: float) -> None:
        if not self.quiet:
            rate = tokens / max(now - self.start, 1e-9)
            print(
                f"[generate] samples {self.done}/{self.total} · {tokens:,} tokens · {rate:,.0f} tokens/s",
                file=sys.stderr,
            )


def run_generate(
    gc: GenerateConfig,
    corpus,
    model,
    output: str | None = None,
    quiet: bool = False,
    checkpoint: str | None = None,
) -> dict:
    """Retrieve, sample, decode, score and rank; write the outputs when `output` is given.

    Args:
        gc: the settings.
        corpus: a `transforms.lib.corpus.Corpus` (the bank, its CLIP, the tokenizers, the documents).
        model: a trained `CM3Decoder` over the corpus's id space.
        output: the folder for the PNGs, run.json and index.html; None writes nothing.
        quiet: no progress lines.
        checkpoint: the checkpoint file, recorded in run.json.

    Returns:
        The run.json contents, plus (not written) `images`: sample index → PNG bytes.
    """
    # lazy: torch takes seconds; `generate --help` and flag errors need none
    import torch

    # lazy: model.sample imports torch (as above)
    from model.sample import generate, image_to_caption_prompt, text_to_image_prompt

    text_tok, image_tok, vocab = corpus.tokenizers
    if getattr(vocab, "kind", "native") != "native":
        raise ValueError("cm3corpus generate reads native corpora only (a Chameleon corpus trains with Hugging Face)")
    if model.config.vocab_size != vocab.size:
        raise ValueError(
            f"the checkpoint's vocabulary ({model.config.vocab_size}) is not the corpus's ({vocab.size}):"
            " --checkpoint must be trained on --corpus's shards"
        )
    to_image = gc.image is None
    image_bytes = None if to_image else read_image_file(gc.image)
    query = corpus.embed(gc.prompt, None) if to_image else corpus.embed(None, image_bytes)
    rules = RetrievalRules(1, gc.max_similarity, gc.diversity_threshold, gc.topk)
    hits = corpus.retrieve(query, gc.retrieve, rules) if gc.retrieve > 0 else []
    docs = corpus.documents([h.key for h in hits])
    used = [h for h in hits if h.key in docs]  # a document with no tokens in shards/ cannot be laid out
    neighbours = [docs[h.key] for h in used]
    seq_len = model.config.seq_len
    if to_image:
        prompt = text_to_image_prompt(vocab, encode_caption(text_tok, vocab, gc.prompt), neighbours, seq_len)
    else:
        with Image.open(io.BytesIO(image_bytes)) as im:
            image_ids = encode_image(image_tok, vocab, im.convert("RGB"))
        prompt = image_to_caption_prompt(vocab, image_ids, gc.max_caption_tokens, neighbours, seq_len)
    kept = [h for i, h in enumerate(used) if i not in prompt.dropped]
    guided = to_image and (gc.cfg != 1.0 or gc.cd_k is not None)

    device = next(model.parameters()).device
    seeds = [sample_seed(gc.seed, i) for i in range(gc.num_samples)]
    progress = _Progress(gc.num_samples, quiet=quiet)
    rows: list[list[int]] = []
    for start in range(0, gc.num_samples, gc.batch_size):
        batch_seeds = seeds[start : start + gc.batch_size]
        B = len(batch_seeds)
        gens = [torch.Generator(device=device).manual_seed(s) for s in batch_seeds]
        ids = torch.tensor(prompt.ids, dtype=torch.long, device=device).unsqueeze(0).expand(B, -1)  # (B, T)
        new = generate(
            model,
            ids,
            prompt.max_new_tokens,
            temperature=gc.temperature,
            top_p=gc.top_p,
            cfg_scale=gc.cfg if guided else 1.0,
            uncond_prompt_ids=prompt.uncond_ids if guided else None,
            allowed_range=prompt.allowed_range,
            stop_token=prompt.stop_token,
            generator=gens,
            cd_k=gc.cd_k if to_image else None,
            cd_alpha=gc.cd_alpha,
            on_token=lambda n, B=B: progress.step(B, n),
        )  # (B, n)
        rows += new.cpu().tolist()
        progress.batch_done(B, new.size(1))

    samples: list[dict[str, Any]] = []
    images: dict[int, bytes] = {}
    if to_image:
        for i, row in enumerate(rows):
            codes = np.asarray(row, dtype=np.int64) - vocab.image_start
            images[i] = _png(image_tok.decode(codes[None, :])[0])
        emb = corpus.embedder.encode_images([images[i] for i in range(len(rows))])  # (N, D)
        scores = emb @ np.asarray(query.text_emb, np.float32)  # (N,)
        for i in range(len(rows)):
            samples.append({"index": i, "seed": seeds[i], "file": f"sample-{i:02d}.png"})
    else:
        texts = []
        for row in rows:
            row = row[: row.index(EOSS)] if EOSS in row else row
            texts.append(decode_text(text_tok, vocab, [t for t in row if vocab.text_start <= t < vocab.image_start]))
        emb = corpus.embedder.encode_texts([t or " " for t in texts])  # (N, D)
        scores = emb @ np.asarray(query.image_emb, np.float32)
        scores[[not t.strip() for t in texts]] = -np.inf  # an empty caption says nothing: ranked last, unscored
        for i, text in enumerate(texts):
            samples.append({"index": i, "seed": seeds[i], "caption": text})
    order = sorted(range(len(samples)), key=lambda i: (-float(scores[i]), i))
    for rank, i in enumerate(order):
        samples[i]["clip_score"] = round(float(scores[i]), 6) if np.isfinite(scores[i]) else None
        samples[i]["rank"] = rank

    run = {
        "mode": "text-to-image" if to_image else "image-to-caption",
        "prompt": gc.prompt,
        "image": os.path.basename(gc.image) if gc.image else None,
        "settings": asdict(gc),
        "corpus": corpus.root,
        "clip_model": corpus.info["clip_model"],
        "checkpoint": checkpoint,
        "checkpoint_sha256": _sha256(checkpoint) if checkpoint else None,
        "retrieved": [{**h.row(), "score": round(h.score, 6), "in_context": h in kept} for h in hits],
        "missing_tokens": [h.key for h in hits if h.key not in docs],
        "prompt_tokens": len(prompt.ids),
        "uncond_tokens": len(prompt.uncond_ids) if guided else None,
        "samples": samples,
        "ranking": order,
    }
    if output is not None:
        write_outputs(output, run, images, corpus, docs)
    if not quiet:
        best = samples[order[0]] if order else None
        print(
            f"[generate] {len(samples)} samples, {progress.tokens_per_s:,.0f} tokens/s; best clip score"
            f" {_score(best['clip_score'] if best else None)}" + (f" → {output}" if output else ""),
            file=sys.stderr,
        )
    return {**run, "images": images}


# ----------------------------------------------------------------------------------------------------
# Writing.


def _data_uri(png: bytes | None) -> str | None:
    return None if png is None else "data:image/png;base64," + base64.b64encode(png).decode("ascii")


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:21px;margin:0 0 6px}h2{font-size:16px;margin:22px 0 8px}.sub{color:#666}
.row{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
.card{width:160px;background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}
.card img{width:144px;height:144px;image-rendering:pixelated;background:#eee}
.cap{font-size:12.5px;overflow-wrap:anywhere}.meta{font-size:12px;color:#555}
.key{font:11px ui-monospace,monospace;color:#888;overflow-wrap:anywhere}
"""


def _score(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def render_html(run: dict, images: dict[int, bytes], doc_images: dict[str, bytes | None]) -> str:
    """index.html: the retrieved documents, then the samples best first (every text escaped)."""
    e = html.escape

    def card(img: str | None, caption: str | None, meta: str, key: str = "") -> str:
        pic = f'<img src="{img}" alt="">' if img else '<div class="meta">(no image)</div>'
        cap = f'<div class="cap">{e(caption)}</div>' if caption else ""
        return f'<div class="card">{pic}{cap}<div class="meta">{meta}</div><div class="key">{e(key)}</div></div>'

    s = run["settings"]
    what = e(run["prompt"]) if run["prompt"] is not None else f"image {e(str(run['image']))}"
    docs = (
        "".join(
            card(
                _data_uri(doc_images.get(h["key"])),
                h["caption"],
                f"#{h['rank']} score {h['score']:.3f} · {e(h['modality'])}"
                + ("" if h["in_context"] else " · not used"),
                h["key"],
            )
            for h in run["retrieved"]
        )
        or '<div class="meta">none (--retrieve 0)</div>'
    )
    ranked = sorted(run["samples"], key=lambda x: x["rank"])
    samples = "".join(
        card(
            _data_uri(images.get(x["index"])),
            x.get("caption"),
            f"rank {x['rank']} · clip {_score(x['clip_score'])} · sample {x['index']}",
            x.get("file", ""),
        )
        for x in ranked
    )
    settings = ", ".join(f"{k} {e(str(v))}" for k, v in s.items() if k not in ("prompt", "image"))
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>cm3corpus generate</title><style>{CSS}</style>"
        f"</head><body><h1>{e(run['mode'])}: {what}</h1><div class='sub'>{settings}</div>"
        f"<h2>Retrieved documents ({len(run['retrieved'])})</h2><div class='row'>{docs}</div>"
        f"<h2>Samples, best CLIP score first</h2><div class='row'>{samples}</div></body></html>\n"
    )


def write_outputs(output: str, run: dict, images: dict[int, bytes], corpus, docs: dict) -> None:
    """The PNGs, run.json and index.html under `output` (each to a temporary name, then renamed)."""
    os.makedirs(output, exist_ok=True)
    for x in run["samples"]:
        if x["index"] in images:
            with atomic_open(os.path.join(output, x["file"])) as f:
                f.write(images[x["index"]])
    doc_images = {}
    for h in run["retrieved"]:
        doc = docs.get(h["key"])
        thumb = corpus.thumbnail(doc, side=0) if doc is not None else None
        doc_images[h["key"]] = _png(thumb) if thumb is not None else None
    with atomic_open(os.path.join(output, RUN_JSON), "w") as f:
        json.dump(run, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    with atomic_open(os.path.join(output, INDEX_HTML), "w") as f:
        f.write(render_html(run, images, doc_images))


# ----------------------------------------------------------------------------------------------------
# The command.


def _parser() -> argparse.ArgumentParser:
    d = GenerateConfig()
    p = argparse.ArgumentParser(prog="cm3corpus generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="A `cm3corpus train` run folder (its ckpt.pt) or a .pt file.")
    p.add_argument("--corpus", required=True, help="The build's output folder the model was trained on.")
    p.add_argument("--output", required=True, help="Folder for the PNGs, run.json and index.html.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="Text to image: the caption.")
    what.add_argument("--image", help="Image to caption: the image file.")
    p.add_argument("--num_samples", type=int, default=d.num_samples)
    p.add_argument("--retrieve", type=int, default=d.retrieve, help="Documents placed before the prompt (0: none).")
    p.add_argument("--cfg", type=float, default=None, help="Guidance scale (text to image; default 3, 1 is off).")
    p.add_argument("--cd_k", type=int, default=None, help="CM3Leon's contrastive decoding with this k (off).")
    p.add_argument("--cd_alpha", type=float, default=d.cd_alpha)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top_p", type=float, default=d.top_p)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch_size", type=int, default=d.batch_size)
    p.add_argument("--max_caption_tokens", type=int, default=d.max_caption_tokens)
    p.add_argument("--max_similarity", type=float, default=d.max_similarity)
    p.add_argument("--diversity_threshold", type=float, default=d.diversity_threshold)
    p.add_argument("--topk", type=int, default=d.topk)
    p.add_argument("--clip_pretrained", help="CLIP weights, when bank.json does not record them.")
    p.add_argument("--device", default="cpu")
    return p


CHECKS = (
    ("--num_samples", lambda a: a.num_samples >= 1, "at least 1"),
    ("--retrieve", lambda a: a.retrieve >= 0, "0 or more"),
    ("--cfg", lambda a: a.cfg is None or a.cfg >= 0, "0 or more"),
    ("--cd_k", lambda a: a.cd_k is None or a.cd_k >= 1, "at least 1"),
    ("--cd_alpha", lambda a: 0 <= a.cd_alpha <= 1, "in [0, 1]"),
    ("--temperature", lambda a: a.temperature >= 0, "0 or more"),
    ("--top_p", lambda a: 0 < a.top_p <= 1, "in (0, 1]"),
    ("--batch_size", lambda a: a.batch_size >= 1, "at least 1"),
    ("--max_caption_tokens", lambda a: a.max_caption_tokens >= 1, "at least 1"),
    *RULE_CHECKS,
)


def config_from_args(args: argparse.Namespace) -> GenerateConfig:
    """The settings from parsed flags; a bad value is a one-line error naming the flag."""
    check_flags(args, CHECKS, "generate")
    if args.image and args.cfg not in (None, 1.0):
        raise SystemExit("cm3corpus generate: --cfg applies to text to image (--prompt) only")
    if args.image and args.cd_k is not None:
        raise SystemExit("cm3corpus generate: --cd_k applies to text to image (--prompt) only")
    if args.prompt is not None and not args.prompt.strip():
        raise SystemExit("cm3corpus generate: --prompt is empty")
    fields = {f: getattr(args, f) for f in GenerateConfig.__dataclass_fields__ if f != "cfg"}
    return GenerateConfig(**fields, cfg=(3.0 if args.prompt else 1.0) if args.cfg is None else args.cfg)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    gc = config_from_args(args)
    try:
        model, path = load_decoder(args.checkpoint, args.device)
    except (pickle.UnpicklingError, RuntimeError, KeyError) as e:  # not a checkpoint `cm3corpus train` wrote
        raise SystemExit(f"cm3corpus generate: --checkpoint cannot be loaded: {str(e).splitlines()[0]}") from None
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"cm3corpus generate: {e}") from None
    try:
        corpus = Corpus(args.corpus, args.device, args.clip_pretrained)
        run_generate(gc, corpus, model, args.output, checkpoint=path)
    except (FileNotFoundError, ValueError, ClipWeightsUnavailable) as e:
        raise SystemExit(f"cm3corpus generate: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
