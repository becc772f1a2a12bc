"""Frozen CLIP embeddings through Beam's RunInference (DESIGN: "embed with frozen CLIP").

`EmbedExamples` turns each `Example` into an `EmbeddedExample`: `image_emb` when it has an image,
`text_emb` when it has a caption, `query_text_emb` (the caption after RA-CM3 query dropout, the
retrieval's text query) and `doc_emb = normalize(mean(image_emb, text_emb))`, or the one part there
is. All are float32 and unit norm. The model is loaded once per worker process by
`ClipModelHandler.load_model()`; Beam's RunInference batches the examples.

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
import logging
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

from schemas.records import EmbeddedExample, Example, Reject
from transforms.lib.clip_lean import (
    PROBE_CAPTIONS,
    lean_encode_image,
    lean_encode_text,
    lean_image_applies,
    lean_text_applies,
    matches_open_clip,
    project_text,
    row_lengths,
    text_tower,
)
from transforms.lib.rng import query_dropout, stable_hash
from transforms.lib.validate import describe_error, strip_addresses

NAMESPACE = "embed"
FAILED = "failed"  # tag of the reject output of EmbedExamples
DEMO = "demo"  # --clip_model value selecting the shipped demo CLIP
NO_WEIGHTS = ("", "none", "random")  # --clip_pretrained values meaning random weights (speed runs only)

# Model loads in this process, by --clip_model; tests read it (Beam's counter is the run's total).
MODEL_LOADS: Counter = Counter()
_loads_lock = threading.Lock()


class ClipWeightsUnavailable(RuntimeError):
    """The CLIP weights asked for cannot be had here (no network and not cached, or no such file)."""


def _weights_error(what: str) -> ClipWeightsUnavailable:
    return ClipWeightsUnavailable(
        f"{what}. Pass a local checkpoint instead (--clip_pretrained /path/to/open_clip_pytorch_model.bin),"
        " or --clip_model demo for the small CLIP shipped with cm3corpus."
    )


def _cached_pretrained(pcfg: dict) -> str | None:
    """The local file of an open_clip pretrained tag if it is already cached; never touches the network."""
    import os

    if pcfg.get("file"):
        return pcfg["file"]
    hub = pcfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for name in names:
            found = try_to_load_from_cache(repo, name)
            if isinstance(found, str):
                return found
    url = pcfg.get("url", "")
    if url:
        path = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(path):
            return path
    return None


def _host_unreachable(pcfg: dict) -> str | None:
    """Why the host of a pretrained tag's weights cannot be reached, found in seconds; None when it can.

    Without this, huggingface_hub's retries take about a minute to end in the same error. Where a
    proxy is configured a direct connection says nothing, so the download is left to decide.
    """
    import os
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    if pcfg.get("hf_hub"):
        url = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    else:
        url = pcfg.get("url") or ""
    parsed = urlparse(url)
    if not parsed.hostname:
        return None
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        socket.create_connection((parsed.hostname, port), timeout=5).close()
    except OSError as e:
        return f"{parsed.hostname}:{port} is unreachable ({describe_error(e)})"
    return None


def _register_json(path: str) -> str:
    import open_clip

    if not Path(path).is_file():
        raise FileNotFoundError(f"CLIP config {path} not found")
    open_clip.add_model_config(path)
    return Path(path).stem


def _weights_source(name: str, clip_pretrained: str | None) -> tuple[str | None, dict[str, Any]]:
    """What to pass open_clip as `pretrained` (a tag to download, a local file, or None) and extra kwargs."""
    import open_clip

    pretrained = (clip_pretrained or "").strip()
    if pretrained.lower() in NO_WEIGHTS:
        logging.warning("CLIP %s with random weights (--clip_pretrained %r): for speed runs only", name, pretrained)
        return None, {}
    if Path(pretrained).is_file():
        return pretrained, {}
    if open_clip.is_pretrained_cfg(name, pretrained):
        pcfg = open_clip.get_pretrained_cfg(name, pretrained)
        local = _cached_pretrained(pcfg)
        if local is None:
            unreachable = _host_unreachable(pcfg)
            if unreachable:
                raise _weights_error(f"cannot get CLIP weights {name}/{pretrained}: not cached, and {unreachable}")
            return pretrained, {}  # open_clip downloads it (workers with network)
        # A cached file loses the tag's preprocessing and activation settings; carry them over.
        return local, {
            "image_mean": pcfg.get("mean"),
            "image_std": pcfg.get("std"),
            "force_quick_gelu": pcfg.get("quick_gelu", False),
        }
    if "/" in pretrained or Path(pretrained).suffix:
        raise _weights_error(f"CLIP checkpoint {pretrained} does not exist")
    tags = open_clip.list_pretrained_tags_by_model(name)
    raise _weights_error(f"{pretrained!r} is not a pretrained tag of {name} (known: {tags})")


def resolve_clip(clip_model: str, clip_pretrained: str | None, device: str = "cpu"):
    """Load a frozen CLIP in eval mode: (model, preprocess, tokenizer).

    Args:
        clip_model: "demo" (the shipped demo CLIP), a path to an open_clip JSON architecture config,
            or an open_clip model name such as "ViT-B-32".
        clip_pretrained: an open_clip pretrained tag (used from the local cache, else downloaded),
            a local checkpoint path, or "none" for random weights (speed measurements only). With
            "demo" it is ignored unless it names a demo checkpoint file.
        device: "cpu" or "cuda"; cuda runs in half precision.

    Raises:
        ClipWeightsUnavailable: the weights cannot be had (no network, not cached, no such file).
    """
    import open_clip
    import torch

    half = str(device).startswith("cuda")
    if clip_model == DEMO:
        from model.demo_clip import CHECKPOINT_PATH, load_demo_clip

        custom = clip_pretrained and Path(clip_pretrained).suffix in (".pt", ".pth") and Path(clip_pretrained).is_file()
        return load_demo_clip(clip_pretrained if custom else CHECKPOINT_PATH, device=device)
    name = _register_json(clip_model) if clip_model.endswith(".json") else clip_model
    if open_clip.get_model_config(name) is None:
        raise ValueError(f"unknown CLIP architecture {clip_model!r}; see open_clip.list_models()")
    pretrained, kwargs = _weights_source(name, clip_pretrained)
    try:
        # Random weights are seeded so that every worker (and a benchmark's baseline) builds the same model.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=device, precision="fp16" if half else "fp32", **kwargs
            )
    except RuntimeError as e:
        if pretrained is None or Path(pretrained).is_file():
            raise
        # open_clip wraps a failed download in RuntimeError.
        raise _weights_error(f"cannot get CLIP weights {name}/{pretrained} (no network and not cached): {e}") from e
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


def clip_embed_dim(clip_model: str) -> int:
    """The embedding width of an architecture, read from its config without loading weights."""
    import open_clip

    if clip_model == DEMO:
        from model.demo_clip import model_config

        return int(model_config()["embed_dim"])
    name = _register_json(clip_model) if clip_model.endswith(".json") else clip_model
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown CLIP architecture {clip_model!r}")
    return int(cfg["embed_dim"])


def fast_encode_text(model, tokens):
    """`model.encode_text(tokens)` computed only up to the batch's longest sequence.

    Padding comes after the end-of-text token and the attention is causal, so no kept position
    attends to a padded one: slicing the tokens, the positional embedding and the causal mask to the
    batch's length gives the same features as the 77-position pass, at a fraction of the cost.
    Only valid for open_clip's standard text transformer; `fast_text_applies` checks that.

    Args:
        model: an open_clip CLIP (or CustomTextCLIP with a TextTransformer text tower).
        tokens: (B, context_length) token ids, padded with 0.

    Returns:
        (B, embed_dim) unnormalized text features, like `encode_text`.
    """
    from open_clip.transformer import text_global_pool

    spec = text_tower(model)
    if spec is None:
        raise ValueError("fast_encode_text needs open_clip's causal text transformer; use encode_text")
    tower, pool, eos = spec
    nonpad = (tokens != 0).any(dim=0).nonzero()
    length = int(nonpad.max()) + 1 if len(nonpad) else 1
    text = tokens[:, :length]  # (B, L)
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(text).to(cast_dtype)  # (B, L, W)
    x = x + tower.positional_embedding[:length].to(cast_dtype)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
    x = tower.ln_final(x)
    return project_text(tower, text_global_pool(x, text, pool, eos_token_id=eos))  # (B, D)


def fast_text_applies(model, tokenizer) -> bool:
    """Whether `fast_encode_text` matches `model.encode_text` on a probe batch (raw features, max abs diff)."""
    if text_tower(model) is None:
        return False
    tokens = tokenizer(list(PROBE_CAPTIONS)).to(next(model.parameters()).device)
    return matches_open_clip(
        "fast text path",
        lambda: fast_encode_text(model, tokens),
        lambda: model.encode_text(tokens),
        model,
        normalized=False,
    )


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
    import torch

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
        import torch

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
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return self.preprocess(im.convert("RGB"))  # (3, H, W)

    def _decode_all(self, images: Sequence[bytes]) -> list:
        """Each image's pixels, or the exception that decoding it raised."""
        out = []
        for data in images:
            try:
                out.append(self._pixels(data))
            except Exception as e:
                out.append(e)
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
                if isinstance(decoded, Exception):  # undecodable: ingest should have caught it; reject, don't crash
                    errors[i] = f"image_undecodable: {describe_error(decoded)}"
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


class ClipModelHandler(ModelHandler[Example, Any, ClipEmbedder]):
    """RunInference handler: Example → EmbeddedExample (or an error string for that example).

    Keeps only picklable names; the model is built in `load_model()` on the worker.

    Args:
        clip_model: see `resolve_clip`.
        clip_pretrained: see `resolve_clip`.
        device: "cpu" or "cuda".
        batch_size: the largest batch RunInference hands to the model.
        seed: the run's seed (query dropout).
        query_dropout: share of caption tokens dropped from the text query.
        share_across_processes: keep one model per machine instead of one per process (large models on
            one GPU); Beam falls back to per-process where the runner cannot share.
    """

    def __init__(
        self,
        clip_model: str,
        clip_pretrained: str | None,
        device: str = "cpu",
        batch_size: int = 64,
        seed: int = 0,
        query_dropout: float = 0.2,
        share_across_processes: bool = False,
    ):
        super().__init__()
        self._clip_model, self._clip_pretrained, self._device = clip_model, clip_pretrained, device
        self.batch_size, self._seed, self._query_dropout = batch_size, seed, query_dropout
        self._share = share_across_processes

    def load_model(self) -> ClipEmbedder:
        model, preprocess, tokenizer = resolve_clip(self._clip_model, self._clip_pretrained, self._device)
        with _loads_lock:
            MODEL_LOADS[self._clip_model] += 1
        return ClipEmbedder(model, preprocess, tokenizer, self._device)

    def run_inference(
        self, batch: Sequence[Sequence[Example]], model: ClipEmbedder, inference_args: dict[str, Any] | None = None
    ) -> Iterable[PredictionResult]:
        """Each element is one model batch made by `KeyedBatches`; its result lists one entry per example."""
        # Counted on first use, inside a bundle: a counter touched in setup() may never be committed.
        Metrics.counter(NAMESPACE, "clip_model_loads").inc(model.take_load_report())
        return [PredictionResult(group, self.embed_batch(group, model)) for group in batch]

    def embed_batch(self, examples: Sequence[Example], model: ClipEmbedder) -> list[EmbeddedExample | str]:
        """Embed one model batch: per example an EmbeddedExample, or an error string."""
        out = model.embed([(e.key, e.image, e.caption) for e in examples], self._seed, self._query_dropout)
        return [r if isinstance(r, str) else embedded_example(e, *r) for e, r in zip(examples, out, strict=True)]

    def batch_elements_kwargs(self) -> dict[str, Any]:
        # Batches are made upstream from the keys (KeyedBatches): a float result must not depend on
        # which other examples a runner's bundle put beside it, or reruns would differ in the bits.
        return {"min_batch_size": 1, "max_batch_size": 1}

    def share_model_across_processes(self) -> bool:
        return self._share

    def get_metrics_namespace(self) -> str:
        return NAMESPACE

    def get_num_bytes(self, batch: Sequence[Sequence[Example]]) -> int:
        # cheaper than pickling the batch
        return sum(len(e.image or b"") + len(e.caption or "") for group in batch for e in group)


class _SplitResults(beam.DoFn):
    def process(self, result: PredictionResult):
        for example, inference in zip(result.example, result.inference, strict=True):
            if isinstance(inference, str):
                Metrics.counter("rejected", "stage_error").inc()
                yield beam.pvalue.TaggedOutput(
                    FAILED, Reject(example.key, example.source, "stage_error", f"embed: {inference}")
                )
            else:
                Metrics.counter(NAMESPACE, "examples_embedded").inc()
                yield inference


def _batch_rejects(failed) -> list[Reject]:
    """A RunInference dead letter → one Reject per example of the failed batch.

    Beam 2.78's dead letter is `(batch, (exception class, repr, traceback lines))`; earlier releases
    gave the exception itself. Untyped on purpose: a hint for one form fails pipeline construction on the other.
    """
    groups, error = failed
    batch = [e for group in groups for e in group]
    Metrics.counter("rejected", "stage_error").inc(len(batch))
    detail = f"embed batch failed: {_describe_dead_letter(error)}"
    return [Reject(e.key, e.source, "stage_error", detail) for e in batch]


def _describe_dead_letter(error) -> str:
    """`describe_error`'s `Type: message` for an exception or Beam's (class, repr, traceback lines)."""
    if isinstance(error, BaseException):
        return describe_error(error)
    cls, rep, lines = error
    last = lines[-1].strip() if lines else rep  # traceback.format_exception's last entry: "pkg.Type: message"
    message = last.split(": ", 1)[1] if ": " in last else ""
    return strip_addresses(f"{cls.__name__}: {message}")


def _bucket(example: Example, batch_size: int, count: int) -> tuple[int, Example]:
    buckets = max(1, -(-count // (batch_size * 4)))  # about four model batches per bucket
    return stable_hash(example.key) % buckets, example


def _chunks(keyed: tuple[int, Iterable[Example]], batch_size: int) -> Iterator[tuple[Example, ...]]:
    _, examples = keyed
    ordered = sorted(examples, key=lambda e: e.key)
    for i in range(0, len(ordered), batch_size):
        yield tuple(ordered[i : i + batch_size])


class KeyedBatches(beam.PTransform):
    """PCollection[Example] → tuples of at most `batch_size` examples, chosen by their keys alone.

    Which examples share a model batch decides the last bits of their embeddings (batched matmuls
    round differently by batch shape), so batches follow from (key hash, corpus size), never from
    how a runner cut the data into bundles.
    """

    def __init__(self, batch_size: int):
        super().__init__()
        self._batch_size = batch_size

    def expand(self, examples):
        count = examples | "Count" >> beam.combiners.Count.Globally()
        return (
            examples
            | "Bucket" >> beam.Map(_bucket, self._batch_size, beam.pvalue.AsSingleton(count))
            | "Group" >> beam.GroupByKey()
            | "Chunk" >> beam.FlatMap(_chunks, self._batch_size)
        )


class EmbedExamples(beam.PTransform):
    """PCollection[Example] → (PCollection[EmbeddedExample], PCollection[Reject]).

    An example whose embedding fails (an image that will not decode, a batch that raises) becomes a
    `Reject(key, source, "stage_error", detail)` instead of failing the pipeline.

    Args: as `ClipModelHandler` (clip_model, clip_pretrained, then its keyword options); `from_config`
    takes them from a BuildConfig.
    """

    def __init__(self, clip_model: str, clip_pretrained: str | None, **options: Any):
        super().__init__()
        # One model per GPU machine rather than per process: big towers, one device.
        options.setdefault("share_across_processes", str(options.get("device", "cpu")).startswith("cuda"))
        self._handler = ClipModelHandler(clip_model, clip_pretrained, **options)
        self._batch_size = self._handler.batch_size

    @classmethod
    def from_config(cls, cfg) -> EmbedExamples:
        """Build from a BuildConfig's clip_model, clip_pretrained, device, embed_batch_size, seed, query_dropout."""
        return cls(
            cfg.clip_model,
            cfg.clip_pretrained,
            device=cfg.device,
            batch_size=cfg.embed_batch_size,
            seed=cfg.seed,
            query_dropout=cfg.query_dropout,
        )

    def expand(self, examples):
        batches = examples | "KeyedBatches" >> KeyedBatches(self._batch_size)
        results, dlq = batches | "RunInference" >> RunInference(self._handler).with_exception_handling()
        split = results | "Split" >> beam.ParDo(_SplitResults()).with_outputs(FAILED, main="embedded")
        batch_failed = dlq.failed_inferences | "BatchFailures" >> beam.FlatMap(_batch_rejects)
        return split.embedded, (split[FAILED], batch_failed) | "AllFailed" >> beam.Flatten()


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
