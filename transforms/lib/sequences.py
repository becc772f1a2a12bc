"""The pure side of the sequences stage (its Beam side is `transforms/sequences.py`).

- `SequenceConfig`: the tokenizer and layout settings, taken from BuildConfig.
- `fit_and_write`: the tokenizers fitted on bounded samples (or loaded) and written to `tokenizers/`;
  `unfitted_patch_vq` stands in for the image tokenizer when there is no image to fit on.
- `make_sample`: query + joined neighbours → CM3 layout, neighbour pick, causal masking → ShardSample.
- `size`, `sum_pairs`: the count and bytes of samples, from which the number of shards follows.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass, fields

import numpy as np
from PIL import Image

from schemas.records import ShardSample, TokenizedDoc
from transforms.lib.chameleon import chameleon_vocab, tokenizer_path
from transforms.lib.layout import cm3_sequence
from transforms.lib.rng import rng_for
from transforms.lib.shards import sample_nbytes
from transforms.lib.tokenize import (
    PatchVQTokenizer,
    build_vocab,
    fit_patch_vq,
    fit_text_tokenizer,
    load_image_tokenizer,
    load_text_tokenizer,
    write_tokenizers,
)

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


def decode_rgb(data: bytes):
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
        return decode_rgb(self._encoded[i])

    def __iter__(self):
        return (decode_rgb(b) for b in self._encoded)


def fit_and_write(directory: str, captions, images, sc: SequenceConfig) -> str:
    """Fit (or load) both tokenizers from the bounded samples and write `tokenizers/` under `directory`."""
    chameleon = sc.vocab.startswith("chameleon:")
    if chameleon:
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
    say so (`tokenizers/image_tokenizer_unfitted`, counted by `transforms.tokenize.FitTokenizers`).
    Pass `--image_tokenizer` to tokenize later images.
    """
    print("cm3corpus build: no usable image to fit the image tokenizer on; sequences are text only", file=sys.stderr)
    dim = sc.image_patch_size * sc.image_patch_size * 3
    codebook = rng_for(sc.seed, "", "unfitted_patch_vq").integers(0, 256, (sc.image_codebook_size, dim), dtype=np.uint8)
    return PatchVQTokenizer(codebook, sc.image_size, sc.image_patch_size)


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


# ---------------------------------------------------------------------------------------------
# Shard sizes.


def size(sample) -> tuple[int, int]:
    """(1, bytes in a shard) of a sample: summed over a corpus, the two totals that fix the shard count."""
    return 1, sample_nbytes(sample)


def sum_pairs(pairs) -> tuple[int, int]:
    pairs = list(pairs)
    return sum(p[0] for p in pairs), sum(p[1] for p in pairs)
