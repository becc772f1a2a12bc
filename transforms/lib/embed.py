"""Embedding examples with a frozen CLIP, without Beam: `ClipEmbedder` (a loaded CLIP's batched
text and image passes), the query dropout of the text query, and the records and rows it gives.

What makes this stage faster than a plain loop over open_clip (`benchmarks/bench_embed.py`), each
checked against open_clip's own encoders when the model loads and skipped where it does not hold:
- text: the transformer is causal and pools at the end-of-text token, so no padding needs running
  and rows sharing a prefix (a caption and its dropped-out query, duplicate captions, common
  openings) share its states: the batch runs as a prefix trie (`clip_lean.lean_encode_text`). Where
  only the causal part holds, each batch runs up to its longest row (`fast_encode_text`);
- both towers: the last block runs only at the pooled position (`clip_lean`);
- images are decoded and preprocessed in one background job while the text batch runs.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from schemas.records import EmbeddedExample, Example
from transforms.lib.clip_lean import (
    fast_encode_text,
    fast_text_applies,
    lean_encode_image,
    lean_encode_text,
    lean_image_applies,
    lean_text_applies,
    row_lengths,
)
from transforms.lib.rng import query_dropout
from transforms.lib.validate import describe_error


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def dropout_tokens(tokens, keys: Sequence[str], rate: float, seed: int):
    """Apply `query_dropout` to each row's content tokens, the ids between the start and end tokens.

    Args:
        tokens: (B, context_length) token ids as the tokenizer made them (start, content, end, 0 padding).
        keys: the example key of each row (the dropout is seeded by (seed, key)).
        rate: share of content tokens to drop.
        seed: the run's seed.
    """
    import torch  # lazy: workers load torch with the model; the pipeline's construction needs none

    rows = tokens.cpu().numpy()  # numpy rows: a python loop over torch rows costs more than the model here
    out = np.zeros_like(rows)
    for i, (row, n, key) in enumerate(zip(rows, row_lengths(rows), keys, strict=True)):
        ids = row[:n].tolist()  # [start, content..., end], trailing padding cut (id 0 may also be content)
        kept = [ids[0], *query_dropout(ids[1:-1], rate, seed, key), ids[-1]] if len(ids) > 2 else ids
        out[i, : len(kept)] = kept
    return torch.from_numpy(out)


TEXT_BUCKET_ROWS = 32  # rows per length bucket of the fast text path


class ClipEmbedder:
    """A loaded CLIP with its preprocess and tokenizer: what `ClipModelHandler.load_model()` returns.

    Its methods take and return plain data (bytes, strings, numpy arrays), so it also works behind
    Beam's cross-process model sharing.
    """

    def __init__(self, model, preprocess, tokenizer, device: str = "cpu", decode_threads: int = 1):
        import torch  # lazy: as in dropout_tokens

        self.model, self.preprocess, self.tokenizer, self.device = model, preprocess, tokenizer, device
        self.dtype = next(model.parameters()).dtype
        # Text: prefix-shared pass > sliced pass > open_clip's encode_text, the first that matches open_clip.
        self.lean_text = lean_text_applies(model, tokenizer)
        self.fast_text = self.lean_text or fast_text_applies(model, tokenizer)
        self.lean_image = lean_image_applies(model)
        self.text_stats: dict[str, int] = {}  # positions a padded-to-row-length pass needs vs computed
        self._pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="clip-decode")
        self._unreported_loads = 1
        self._torch = torch

    @property
    def paths(self) -> str:
        """Which forward each tower runs, for logs and benchmarks."""
        text = "prefix-shared" if self.lean_text else "sliced" if self.fast_text else "open_clip"
        return f"text {text}, image {'pooled-only last block' if self.lean_image else 'open_clip'}"

    def take_load_report(self) -> int:
        """1 the first time it is asked (so the load is counted inside a bundle), then 0."""
        n, self._unreported_loads = self._unreported_loads, 0
        return n

    def _pixels(self, data: bytes):
        with Image.open(io.BytesIO(data)) as im:
            return self.preprocess(im.convert("RGB"))  # (3, H, W)

    def _decode_all(self, images: Sequence[bytes]) -> list:
        """Each image's pixels, or why decoding it failed (`describe_error`'s string).

        A string, not the exception: a kept exception's traceback holds this frame, whose `out` holds the
        exception, a reference cycle that keeps the whole batch's pixels alive until Python's rare full
        collection. Embedding the 256 px demo tars' images directly (their deliberately broken ones
        included), memory grew 69 KiB per image from 300 to 900 images; now it stays flat
        (benchmarks/results/2026-12-06-memory.md). In a build the read stage rejects most such images first.
        """
        out = []
        for data in images:
            try:
                out.append(self._pixels(data))
            except Exception as e:
                out.append(describe_error(e))
        return out

    def _encode_text(self, tokens) -> np.ndarray:
        tokens = tokens.to(self.device)
        if self.lean_text:
            return _unit(lean_encode_text(self.model, tokens, self.text_stats).float().cpu().numpy())
        if not self.fast_text:
            return _unit(self.model.encode_text(tokens).float().cpu().numpy())
        # Length buckets: rows sorted by length and run in groups, each only up to its own longest
        # row, so short rows (the dropped-out queries) do not pay for the longest caption.
        lengths = (tokens != 0).sum(dim=1)
        order = self._torch.argsort(lengths, stable=True)
        out = self._torch.empty(0)
        for start in range(0, len(order), TEXT_BUCKET_ROWS):
            rows = order[start : start + TEXT_BUCKET_ROWS]
            part = fast_encode_text(self.model, tokens[rows])
            if start == 0:
                out = part.new_empty((len(order), part.shape[1]))
            out[rows] = part
        return _unit(out.float().cpu().numpy())

    def encode_texts(self, captions: Sequence[str]) -> np.ndarray:
        """(N, D) unit-norm text embeddings."""
        with self._torch.inference_mode():
            return self._encode_text(self.tokenizer(list(captions)))

    def encode_images(self, images: Sequence[bytes]) -> np.ndarray:
        """(N, D) unit-norm image embeddings of encoded images."""
        pixels = list(self._pool.map(self._pixels, images))
        with self._torch.inference_mode():
            return self._encode_pixels(pixels)

    def _encode_pixels(self, pixels: list) -> np.ndarray:
        batch = self._torch.stack(pixels).to(self.device, self.dtype)  # (N, 3, H, W)
        features = lean_encode_image(self.model, batch) if self.lean_image else self.model.encode_image(batch)
        return _unit(features.float().cpu().numpy())

    def embed(
        self, items: Sequence[tuple[str, bytes | None, str | None]], seed: int, dropout: float
    ) -> list[tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None] | str]:
        """Embed a batch of (key, image bytes, caption).

        Returns:
            Per item either (image_emb, text_emb, query_text_emb), each (D,) or None, or an error
            string when its image could not be decoded.
        """
        # Decode the batch's images in one background job while the text batch runs on this thread.
        # One job, not one per image: parallel decode threads fight over the GIL and torch's own
        # threads, and on 2 cores decoded 64 images in 23 ms where one thread took 15 ms.
        wanted = [(i, img) for i, (_, img, _) in enumerate(items) if img is not None]
        decoding = self._pool.submit(self._decode_all, [img for _, img in wanted])
        texts = [i for i, (_, _, cap) in enumerate(items) if cap]
        text_emb, query_emb = {}, {}
        with self._torch.inference_mode():
            if texts:
                tokens = self.tokenizer([items[i][2] for i in texts])
                queries = dropout_tokens(tokens, [items[i][0] for i in texts], dropout, seed)
                both = self._encode_text(self._torch.cat([tokens, queries]))  # one pass for captions and queries
                text_emb = dict(zip(texts, both[: len(texts)], strict=True))
                query_emb = dict(zip(texts, both[len(texts) :], strict=True))
            pixels = {}
            errors = {
                i: "nothing to embed: no image and no caption"
                for i, (_, img, cap) in enumerate(items)
                if not (img or cap)
            }
            for (i, _), decoded in zip(wanted, decoding.result(), strict=True):
                if isinstance(decoded, str):  # undecodable: ingest should have caught it; reject, don't crash
                    errors[i] = f"image_undecodable: {decoded}"
                else:
                    pixels[i] = decoded
            order = sorted(pixels)
            image_emb = dict(zip(order, self._encode_pixels([pixels[i] for i in order]), strict=True)) if order else {}
        return [
            errors[i] if i in errors else (image_emb.get(i), text_emb.get(i), query_emb.get(i))
            for i in range(len(items))
        ]


def embedded_example(example: Example, image_emb, text_emb, query_text_emb) -> EmbeddedExample:
    """Assemble the record; doc_emb = normalize(mean(image_emb, text_emb)), or the one part there is."""
    parts = [v for v in (image_emb, text_emb) if v is not None]
    # One part is already unit: renormalising it would move its last bits (and the bank's) with the BLAS.
    doc = _unit(np.mean(parts, axis=0)) if len(parts) == 2 else (parts[0] if parts else None)
    return EmbeddedExample(
        key=example.key,
        caption=example.caption,
        modality=example.modality,
        image_emb=image_emb,
        text_emb=text_emb,
        doc_emb=doc,
        query_text_emb=query_text_emb,
        image_hash=example.image_hash,
    )


def _half(v) -> np.ndarray | None:
    return None if v is None else np.asarray(v, dtype=np.float16)


def file_view(e: EmbeddedExample) -> EmbeddedExample:
    """What `embeddings/` keeps of an example: its vectors already in the float16 they are written in.

    The writer's rows wait for the row count, so they are held whole by an in-process runner; halved
    and without the query vector they weigh about 40% of the full record.
    """
    return EmbeddedExample(e.key, e.caption, e.modality, _half(e.image_emb), _half(e.text_emb), _half(e.doc_emb))


def embedding_row(e: EmbeddedExample) -> dict[str, Any]:
    """One `embeddings/*.parquet` row matching `schemas.artifacts.embeddings_schema(dim)` (missing parts null)."""
    return {
        "key": e.key,
        "caption": e.caption,
        "modality": e.modality,
        "image_emb": _half(e.image_emb),
        "text_emb": _half(e.text_emb),
        "doc_emb": _half(e.doc_emb),
    }


def embedding_rows(e: EmbeddedExample) -> list[dict[str, Any]]:
    """`embedding_row` as the one-element list `WriteSortedParquet` expects."""
    return [embedding_row(e)]
