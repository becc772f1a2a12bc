"""The Beam side of tokenizing (the pure pieces live in `transforms/lib/tokenize.py` and `transforms/lib/sequences.py`).

- `FitTokenizers`: the second global step. The text BPE is fitted on a bounded, key-hash-chosen
  sample of captions sorted by key, the image codebook on a bounded sample of images, so the fit
  is the same whatever the runner; or both are loaded. Writes `tokenizers/` and yields its path.
- `TokenizeDocs`: Example → (key, TokenizedDoc), tokenizers loaded once per worker; images are
  encoded in model batches cut from the keys (`transforms.common.KeyedBatches`, as the CLIP's), so a
  VQ-GAN's codes never depend on the runner's bundles.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from schemas.records import Example, TokenizedDoc
from transforms import progress
from transforms.common import KeyedBatches, PerWorker
from transforms.lib.rng import stable_hash
from transforms.lib.sequences import SequenceConfig, decode_rgb, fit_and_write
from transforms.lib.tokenize import encode_caption, encode_images, load_tokenizers
from transforms.rejects import REJECTED, stage_error

# ---------------------------------------------------------------------------------------------
# Fitting (or loading) the tokenizers: one worker, bounded samples.


def _hash_of_pair(pair) -> int:
    return stable_hash(pair[0])


def _fit_and_write(directory: str, captions, images, sc: SequenceConfig) -> str:
    if not sc.image_tokenizer and not images:  # `fit_and_write` falls back on `unfitted_patch_vq`
        Metrics.counter("tokenizers", "image_tokenizer_unfitted").inc()
    return fit_and_write(directory, captions, images, sc)


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


class _TokenizeBatch(beam.DoFn):
    """One keyed batch of Examples → (key, TokenizedDoc) each, its images encoded as one model batch."""

    def __init__(self, loaded: PerWorker, reject_ns: str = REJECTED, device: str = "cpu", dtype: str = "float32"):
        self._loaded, self._reject_ns, self._device, self._dtype = loaded, reject_ns, device, dtype

    def _reject(self, example: Example, what: str, error: Exception):
        return stage_error(example.key, example.source, what, error, self._reject_ns)

    def process(self, batch, directory: str):
        text_tok, image_tok, vocab = self._loaded.get(directory, lambda: load_tokenizers(directory))
        if hasattr(image_tok, "place"):  # a VQ-GAN or the patch VQ: onto --device (a no-op after the first)
            image_tok.place(self._device, self._dtype)
        texts, pictures, failed = {}, {}, set()
        for i, example in enumerate(batch):
            try:  # a document that cannot be tokenized is rejected, not fatal
                if example.caption:
                    texts[i] = np.asarray(encode_caption(text_tok, vocab, example.caption), np.int32)
                if example.image is not None:
                    pictures[i] = decode_rgb(example.image)
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
    `batch_size` at a time in batches made from the keys (see `transforms.common.KeyedBatches`).
    `loaded`: the per-worker handle of the loaded tokenizers; pass the pipeline's one handle to every
    stage that reads the same `tokenizers/` so a worker loads them once (default: a handle of its own).
    """

    def __init__(
        self,
        tokenizers_dir,
        counters: str = "",
        batch_size: int = 16,
        device: str = "cpu",
        dtype: str = "float32",
        loaded: PerWorker | None = None,
    ):
        super().__init__()
        self._dir, self._reject_ns = tokenizers_dir, f"{counters}{REJECTED}"
        self._loaded = loaded or PerWorker()
        self._batch_size, self._device, self._dtype = batch_size, device, dtype

    def expand(self, examples):
        side = beam.pvalue.AsSingleton(self._dir)
        batches = examples | "KeyedBatches" >> KeyedBatches(self._batch_size)
        fn = _TokenizeBatch(self._loaded, self._reject_ns, self._device, self._dtype)
        out = batches | "Tokenize" >> beam.ParDo(fn, side).with_outputs(REJECTED, main="docs")
        return out.docs, out[REJECTED]
