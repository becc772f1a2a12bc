"""The Beam side of tokenizing, CM3 layout and sharding (the pure pieces live in tokenize.py, cm3.py, shards.py).

- `FitTokenizers`: the second global step. The text BPE is fitted on a bounded, key-hash-chosen
  sample of captions sorted by key, the image codebook on a bounded sample of images, so the fit
  is the same whatever the runner; or both are loaded. Writes `tokenizers/` and yields its path.
- `TokenizeDocs`: Example → (key, TokenizedDoc), tokenizers loaded once per worker; images are
  encoded in model batches cut from the keys (`KeyedBatches`, the embed stage's rule), so a
  VQ-GAN's codes never depend on the runner's bundles.
- `BuildSequences`: query + joined neighbours → CM3 layout, neighbour pick, causal masking → ShardSample.
- `WriteShards`: count and size → number of shards (side input) → key-hash buckets → sorted tars + manifest.
"""

from __future__ import annotations

import io
import sys
import threading
from dataclasses import dataclass, fields

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from schemas.records import Example, Reject, TokenizedDoc
from transforms import progress
from transforms.lib.rng import rng_for, stable_hash
from transforms.lib.validate import describe_error

FAILED = "failed"
NUM_SENTINELS = 8  # P(Poisson(1) >= 8) ~ 1e-5: more spans than this are never drawn in practice


@dataclass(frozen=True)
class SequenceConfig:
    """The tokenizer and layout settings, taken from BuildConfig."""

    text_tokenizer: str | None  # tokenizer.json to load, or None to fit
    text_vocab_size: int  # BPE entries when fitting
    image_tokenizer: str | None  # image tokenizer file to load, or None to fit
    image_codebook_size: int  # VQ codes when fitting
    image_size: int  # square side images are resized to
    image_patch_size: int  # one token per patch
    seq_len: int  # tokens per training sequence at most
    cm3_masking: str  # causal | none
    neighbours_per_sequence: int  # retrieved documents placed before the query (CM3Leon: 3 of 4)
    tokenizer_fit_captions: int  # captions the BPE is fitted on at most
    tokenizer_fit_images: int  # images the codebook is fitted on at most
    seed: int
    vocab: str = "native"  # native | chameleon:DIR (Chameleon's text_tokenizer.json and id space)
    tokenize_batch_size: int = 16  # images per image-tokenizer batch
    device: str = "cpu"  # where the image tokenizer runs (VQ-GAN, or the patch VQ search)
    image_tokenizer_dtype: str = "float32"  # a VQ-GAN's convolution dtype (float32 | bfloat16 | float16)

    @classmethod
    def from_config(cls, cfg) -> SequenceConfig:
        """The fields of the same names in `cfg` (a BuildConfig)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})


# ---------------------------------------------------------------------------------------------
# Fitting (or loading) the tokenizers: one worker, bounded samples.


def _decode_rgb(data: bytes):
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


class DecodedImages:
    """A sequence of encoded images that decodes each only when it is read.

    The fit sample is up to `--tokenizer_fit_images` images at their original size: decoded all at
    once they would take gigabytes (4,096 images of 512 px are 3.2 GB of pixels) where one at a time
    takes one image.
    """

    def __init__(self, encoded: list[bytes]):
        self._encoded = encoded

    def __len__(self) -> int:
        return len(self._encoded)

    def __getitem__(self, i: int):
        return _decode_rgb(self._encoded[i])

    def __iter__(self):
        return (_decode_rgb(b) for b in self._encoded)


def _fit_and_write(directory: str, captions, images, sc: SequenceConfig) -> str:
    from transforms.lib.tokenize import (
        build_vocab,
        fit_patch_vq,
        fit_text_tokenizer,
        load_image_tokenizer,
        load_text_tokenizer,
        write_tokenizers,
    )

    chameleon = sc.vocab.startswith("chameleon:")
    if chameleon:
        from transforms.lib.chameleon import tokenizer_path

        text_tok = load_text_tokenizer(tokenizer_path(sc.vocab[len("chameleon:") :]))
    elif sc.text_tokenizer:
        text_tok = load_text_tokenizer(sc.text_tokenizer)
    else:
        text_tok = fit_text_tokenizer([c for _, c in sorted(captions)], sc.text_vocab_size)
    if sc.image_tokenizer:
        image_tok = load_image_tokenizer(sc.image_tokenizer)
    elif not images:
        image_tok = unfitted_patch_vq(sc)
    else:
        pictures = DecodedImages([b for _, b in sorted(images)])  # decoded one at a time, not all at once
        image_tok = fit_patch_vq(pictures, sc.image_codebook_size, sc.image_size, sc.image_patch_size, sc.seed)
    if chameleon:
        from transforms.lib.chameleon import chameleon_vocab

        vocab = chameleon_vocab(text_tok, image_tok.num_codes, image_tok.tokens_per_image, NUM_SENTINELS)
    else:
        vocab = build_vocab(text_tok, image_tok, NUM_SENTINELS)
    write_tokenizers(directory, text_tok, image_tok, vocab)
    return directory


def unfitted_patch_vq(sc: SequenceConfig):
    """The image tokenizer of a corpus with no usable image (text only, or every image rejected).

    Nothing to fit on, and no document of this corpus has an image token to write, so its sequences
    are text only. A codebook drawn from the seed stands in, so `tokenizers/` and the id space keep
    their shape (`--image_codebook_size` codes); it is not a trained tokenizer, and the run's stats
    say so (`tokenizers/image_tokenizer_unfitted`). Pass `--image_tokenizer` to tokenize later images.
    """
    from transforms.lib.tokenize import PatchVQTokenizer

    Metrics.counter("tokenizers", "image_tokenizer_unfitted").inc()
    print("cm3corpus build: no usable image to fit the image tokenizer on; sequences are text only", file=sys.stderr)
    dim = sc.image_patch_size * sc.image_patch_size * 3
    codebook = rng_for(sc.seed, "", "unfitted_patch_vq").integers(0, 256, (sc.image_codebook_size, dim), dtype=np.uint8)
    return PatchVQTokenizer(codebook, sc.image_size, sc.image_patch_size)


def _hash_of_pair(pair) -> int:
    return stable_hash(pair[0])


class FitTokenizers(beam.PTransform):
    """PCollection[Example] → one-element PCollection with the `tokenizers/` directory.

    Args:
        directory: where `text_tokenizer.json`, the image tokenizer and `vocab.json` go.
        sc: the sequence settings.
    """

    def __init__(self, directory: str, sc: SequenceConfig):
        super().__init__()
        self._directory, self._sc = directory, sc

    def expand(self, examples):
        sc = self._sc
        pipeline = examples.pipeline
        if sc.text_tokenizer:  # loaded, not fitted: gather no sample
            captions = pipeline | "NoCaptionSample" >> beam.Create([[]])
        else:
            captions = (
                examples
                | "Captions" >> beam.FlatMap(lambda e: [(e.key, e.caption)] if e.caption else [])
                | "CaptionSample" >> beam.combiners.Top.Of(sc.tokenizer_fit_captions, key=_hash_of_pair, reverse=True)
            )
        if sc.image_tokenizer:
            images = pipeline | "NoImageSample" >> beam.Create([[]])
        else:
            images = (
                examples
                | "Images" >> beam.FlatMap(lambda e: [(e.key, e.image)] if e.image is not None else [])
                | "ImageSample" >> beam.combiners.Top.Of(sc.tokenizer_fit_images, key=_hash_of_pair, reverse=True)
            )
        return (
            examples.pipeline
            | "Directory" >> beam.Create([self._directory])
            | "Fit" >> beam.Map(_fit_and_write, beam.pvalue.AsSingleton(captions), beam.pvalue.AsSingleton(images), sc)
        )


# ---------------------------------------------------------------------------------------------
# Tokenizing documents, with the tokenizers loaded once per worker process.

_loaded: dict[str, tuple] = {}
_loaded_lock = threading.Lock()


def forget_loaded() -> None:
    """Drop cached tokenizers (a new build may rewrite the same directory)."""
    with _loaded_lock:
        _loaded.clear()


def load_once(directory: str) -> tuple:
    """(text tokenizer, image tokenizer, vocab) of `directory`, loaded once per process."""
    from transforms.lib.tokenize import load_tokenizers

    with _loaded_lock:
        if directory not in _loaded:
            _loaded[directory] = load_tokenizers(directory)
        return _loaded[directory]


class _TokenizeBatch(beam.DoFn):
    """One keyed batch of Examples → (key, TokenizedDoc) each, its images encoded as one model batch."""

    def __init__(self, reject_ns: str = "rejected", device: str = "cpu", dtype: str = "float32"):
        self._reject_ns, self._device, self._dtype = reject_ns, device, dtype

    def _reject(self, example: Example, what: str, error: Exception):
        Metrics.counter(self._reject_ns, "stage_error").inc()
        return beam.pvalue.TaggedOutput(
            FAILED, Reject(example.key, example.source, "stage_error", f"{what}: {describe_error(error)}")
        )

    def process(self, batch, directory: str):
        from transforms.lib.tokenize import encode_caption, encode_images

        text_tok, image_tok, vocab = load_once(directory)
        if hasattr(image_tok, "place"):  # a VQ-GAN or the patch VQ: onto --device (a no-op after the first)
            image_tok.place(self._device, self._dtype)
        texts, pictures, failed = {}, {}, set()
        for i, example in enumerate(batch):
            try:  # a document that cannot be tokenized is rejected, not fatal
                if example.caption:
                    texts[i] = np.asarray(encode_caption(text_tok, vocab, example.caption), np.int32)
                if example.image is not None:
                    pictures[i] = _decode_rgb(example.image)
            except Exception as e:
                failed.add(i)
                yield self._reject(example, "tokenize", e)
        order = [i for i in pictures if i not in failed]
        images = {}
        if order:
            try:
                ids = encode_images(image_tok, vocab, [pictures[i] for i in order])
                images = {i: np.asarray(v, np.int32) for i, v in zip(order, ids, strict=True)}
            except Exception as e:  # the whole model batch failed: each of its documents is rejected
                for i in order:
                    failed.add(i)
                    yield self._reject(batch[i], "tokenize batch", e)
        for i, example in enumerate(batch):
            if i in failed:
                continue
            progress.note("tokenized")
            yield example.key, TokenizedDoc(example.key, example.modality, texts.get(i), images.get(i))


class TokenizeDocs(beam.PTransform):
    """PCollection[Example] → ((key, TokenizedDoc) pairs, Rejects), given the tokenizers directory.

    `counters` prefixes the reject counter's namespace, as in `ReadExamples`. Images are encoded
    `batch_size` at a time in batches made from the keys (see `transforms.embed.KeyedBatches`).
    """

    def __init__(
        self,
        tokenizers_dir,
        counters: str = "",
        batch_size: int = 16,
        device: str = "cpu",
        dtype: str = "float32",
    ):
        super().__init__()
        self._dir, self._reject_ns = tokenizers_dir, f"{counters}rejected"
        self._batch_size, self._device, self._dtype = batch_size, device, dtype

    def expand(self, examples):
        from transforms.embed import KeyedBatches

        side = beam.pvalue.AsSingleton(self._dir)
        batches = examples | "KeyedBatches" >> KeyedBatches(self._batch_size)
        fn = _TokenizeBatch(self._reject_ns, self._device, self._dtype)
        out = batches | "Tokenize" >> beam.ParDo(fn, side).with_outputs(FAILED, main="docs")
        return out.docs, out[FAILED]


# ---------------------------------------------------------------------------------------------
# CM3 sequences.


def pick_neighbours(pairs: list, k: int, seed: int, key: str) -> list:
    """CM3Leon's training-time pick: k of the retrieved documents, chosen by (seed, key), rank order kept."""
    if len(pairs) <= k:
        return pairs
    chosen = sorted(rng_for(seed, key, "pick_neighbours").choice(len(pairs), size=k, replace=False).tolist())
    return [pairs[i] for i in chosen]


def make_sample(query: TokenizedDoc, pairs: list, sc: SequenceConfig, vocab):
    """One ShardSample: picked neighbours first (rank order), the query last, masked per CM3."""
    from transforms.lib.layout import cm3_sequence
    from transforms.lib.shards import ShardSample

    picked = pick_neighbours(pairs, sc.neighbours_per_sequence, sc.seed, query.key)
    docs = [doc for _, doc in picked]
    masked = cm3_sequence(docs, query, vocab, sc.seq_len, sc.seed, query.key, sc.cm3_masking)
    lay = masked.layout
    meta = {
        "query_key": query.key,
        "query_modality": query.modality,
        "neighbour_keys": [n.doc_key for n, _ in picked],
        "neighbour_via": [n.via for n, _ in picked],
        "neighbour_scores": [round(float(n.score), 6) for n, _ in picked],
        "retrieved_keys": [n.doc_key for n, _ in pairs],
        "dropped_for_length": [picked[i][0].doc_key for i in lay.dropped],
        "query_text_cut": lay.query_text_cut,
        "query_image_cut": lay.query_image_cut,
        "segments": [[s.start, s.stop, s.kind, s.doc_index] for s in lay.segments],
        "masked_spans": [[s.start, s.stop, s.segment] for s in masked.spans],
        "masking": sc.cm3_masking,
        "seq_len": sc.seq_len,
    }
    return ShardSample(query.key, masked.tokens.astype(np.int32), meta)


class _BuildSequence(beam.DoFn):
    def __init__(self, sc: SequenceConfig):
        self._sc = sc

    def process(self, joined, directory: str):
        query, pairs = joined
        _, _, vocab = load_once(directory)
        try:
            sample = make_sample(query, pairs, self._sc, vocab)
        except Exception as e:
            Metrics.counter("rejected", "stage_error").inc()
            yield beam.pvalue.TaggedOutput(FAILED, Reject(query.key, "", "stage_error", f"layout: {describe_error(e)}"))
            return
        Metrics.distribution("sequences", "tokens").update(len(sample.tokens))
        if sample.json["dropped_for_length"]:
            Metrics.counter("sequences", "neighbours_dropped_for_length").inc(len(sample.json["dropped_for_length"]))
        yield sample


class BuildSequences(beam.PTransform):
    """(query, [(Neighbour, doc)]) pairs → (ShardSamples, Rejects)."""

    def __init__(self, tokenizers_dir, sc: SequenceConfig):
        super().__init__()
        self._dir, self._sc = tokenizers_dir, sc

    def expand(self, joined):
        side = beam.pvalue.AsSingleton(self._dir)
        out = joined | "Sequence" >> beam.ParDo(_BuildSequence(self._sc), side).with_outputs(FAILED, main="samples")
        return out.samples, out[FAILED]


# ---------------------------------------------------------------------------------------------
# Shards.


def _size(sample) -> tuple[int, int]:
    from transforms.lib.shards import sample_nbytes

    return 1, sample_nbytes(sample)


def _sum_pairs(pairs) -> tuple[int, int]:
    pairs = list(pairs)
    return sum(p[0] for p in pairs), sum(p[1] for p in pairs)


def _write_bucket(keyed, directory: str, max_samples: int, max_bytes: int) -> list:
    from transforms.lib.shards import write_bucket

    bucket, samples = keyed
    rows = write_bucket(directory, bucket, list(samples), max_samples, max_bytes)
    Metrics.counter("write", "examples_written").inc(sum(r.samples for r in rows))
    Metrics.counter("write", "shards").inc(len(rows))
    return rows


def _write_manifest(rows, directory: str) -> str:
    from transforms.lib.shards import write_manifest

    write_manifest(directory, sorted(rows, key=lambda r: r.shard))
    return directory


class WriteShards(beam.PTransform):
    """ShardSamples → `shards/cm3-BBBBBB.tar` + manifest; the shard of a sample follows from its key."""

    def __init__(self, directory: str, max_samples: int, max_bytes: int):
        super().__init__()
        self._directory, self._max_samples, self._max_bytes = directory, max_samples, max_bytes

    def expand(self, samples):
        from transforms.lib.shards import num_shards_for, shard_of

        totals = samples | "Sizes" >> beam.Map(_size) | "Total" >> beam.CombineGlobally(_sum_pairs)
        n = totals | "NumShards" >> beam.Map(lambda t: num_shards_for(t[0], t[1], self._max_samples, self._max_bytes))
        rows = (
            samples
            | "ByShard" >> beam.Map(lambda s, k: (shard_of(s.key, k), s), beam.pvalue.AsSingleton(n))
            | "Group" >> beam.GroupByKey()
            | "Write" >> beam.FlatMap(_write_bucket, self._directory, self._max_samples, self._max_bytes)
        )
        return rows | "Rows" >> beam.combiners.ToList() | "Manifest" >> beam.Map(_write_manifest, self._directory)
