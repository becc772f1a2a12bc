"""Pipeline options: Beam's `PipelineOptions` subclass, turned once into one frozen config.

Stages receive `BuildConfig` (or plain fields of it), never the options object.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from apache_beam.options.pipeline_options import PipelineOptions


class CorpusOptions(PipelineOptions):
    """The `cm3corpus build` flags; every other flag passes through to Beam (`--runner`, ...)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        a = parser.add_argument
        # Input and output.
        a(
            "--input",
            action="append",
            help="Input pattern: tars (globs, {000..009} braces, fsspec URLs), parquet/jsonl/csv manifests or a folder."
            " Repeat the flag for several.",
        )
        # Not argparse-required: Beam parses every registered options class for every pipeline,
        # tests' included, so `from_options` checks these instead.
        a("--output", help="Output directory (local path or any fsspec URL).")
        a("--input_format", default="auto", choices=["auto", "webdataset", "parquet", "jsonl", "csv", "folder"])
        a("--image_column", default="image_path", help="Manifest column holding the image path or URL.")
        a("--caption_column", default="caption", help="Manifest column holding the caption.")
        a("--caption_ext", default="txt", help="Tar member / sidecar file extension holding the caption.")
        a("--key_column", default="key", help="Manifest column holding the key (row number when absent).")
        a(
            "--key_prefix",
            default="",
            help="Put this in front of every input key ([A-Za-z0-9_-]), so corpora that share a memory bank"
            " keep distinct keys (img2dataset keys are shard/row numbers and repeat across corpora).",
        )
        a("--seed", type=int, default=0, help="Seed for every random choice; randomness derives from (seed, key).")
        # Validation budgets.
        a("--max_image_pixels", type=int, default=64_000_000, help="Reject images with more pixels, undecoded.")
        a("--max_image_bytes", type=int, default=32 * 2**20, help="Reject encoded images larger than this.")
        a("--min_image_side", type=int, default=8, help="Reject images with a side shorter than this.")
        a("--max_caption_chars", type=int, default=8192, help="Reject captions longer than this.")
        # Embedding.
        a("--clip_model", default="ViT-B-32", help="open_clip architecture name, a JSON config path, or 'demo'.")
        a("--clip_pretrained", default="laion2b_s34b_b79k", help="open_clip pretrained tag or a local checkpoint path.")
        a("--device", default="cpu", help="cpu or cuda (half precision on cuda).")
        a("--embed_batch_size", type=int, default=64)
        # Memory bank and retrieval.
        a("--memory_bank", default=None, help="Retrieve from this prebuilt bank instead of building one.")
        a(
            "--neighbour_input",
            action="append",
            help="With --memory_bank: the input of the corpus that bank was built from, so its documents"
            " can stand in this run's sequences as neighbours (read and tokenized, never queries). Repeatable.",
        )
        a(
            "--neighbour_key_prefix",
            default="",
            help="The --key_prefix the --neighbour_input corpus was built with (its keys as the bank holds them).",
        )
        a(
            "--extend_memory_bank",
            action="store_true",
            help="With --memory_bank: add this run's documents to a copy of that bank (written as this run's"
            " memory_bank/) instead of only retrieving from it.",
        )
        a("--index_factory", default=None, help="FAISS index-factory string; chosen from the bank size when absent.")
        a("--retrieval_topk", type=int, default=32, help="Candidates fetched per query before the rules.")
        a("--num_retrieved", type=int, default=2, help="Documents selected per query modality (image and text).")
        a("--max_similarity", type=float, default=0.9, help="Relevance rule: skip candidates scoring above this.")
        a("--diversity_threshold", type=float, default=0.95, help="Skip candidates this similar to a selected one.")
        a("--query_dropout", type=float, default=0.2, help="Share of caption tokens dropped from the text query.")
        # Corpus filters (transforms/filters.py); both off by default.
        a(
            "--min_clip_score",
            type=float,
            default=None,
            help="Leave out image+text examples whose image-caption CLIP cosine is below this (listed in"
            " filtered/; the report's histogram shows where the scores lie). Off by default.",
        )
        a(
            "--dedup_threshold",
            type=float,
            default=None,
            help="Leave out exact duplicates (same decoded pixels) and documents whose embedding lies within this"
            " cosine of one that comes first (image+text first, then key hash). Off by default.",
        )
        # Tokenizers, layout and shards.
        a(
            "--holdout_fraction",
            type=float,
            default=0.0,
            help="Share of examples (chosen by key) kept out of the memory bank and written to shards/heldout/,"
            " so evaluation queries never appear in training sequences as neighbours.",
        )
        a("--text_tokenizer", default=None, help="A tokenizer.json to load instead of fitting BPE on the captions.")
        a("--text_vocab_size", type=int, default=56_320)
        a(
            "--image_tokenizer",
            default=None,
            help="An image tokenizer file to load instead of fitting one, or vqgan:DIR (a Chameleon/Anole"
            " tokenizer/vqgan.yaml + vqgan.ckpt, or taming configs/model.yaml + last.ckpt; .safetensors too).",
        )
        a(
            "--vocab",
            default="native",
            help="Token id space: native (specials, text, image ranges) or chameleon:DIR (Chameleon's"
            " text_tokenizer.json from DIR: its BPE for text, IMGIMG entries for image codes).",
        )
        a("--tokenize_batch_size", type=int, default=16, help="Images per image-tokenizer batch (cut from keys).")
        a(
            "--image_tokenizer_dtype",
            default="float32",
            choices=["float32", "bfloat16", "float16"],
            help="A VQ-GAN's convolution dtype (half precision is for --device cuda); codes are picked in float32.",
        )
        a("--image_codebook_size", type=int, default=8192)
        a("--image_size", type=int, default=256, help="Side images are resized to before tokenizing.")
        a("--image_patch_size", type=int, default=8, help="Side of one image token's patch.")
        a("--seq_len", type=int, default=4096)
        a("--neighbours_per_sequence", type=int, default=3, help="Retrieved documents placed before the query.")
        a("--tokenizer_fit_captions", type=int, default=100_000, help="Captions the text BPE is fitted on at most.")
        a("--tokenizer_fit_images", type=int, default=4096, help="Images the VQ codebook is fitted on at most.")
        a("--cm3_masking", default="causal", choices=["causal", "none"])
        a("--shard_max_samples", type=int, default=10_000)
        a("--shard_max_bytes", type=int, default=256 * 2**20)


@dataclass(frozen=True)
class BuildConfig:
    """Everything a `cm3corpus build` run needs, frozen; built once from the options."""

    input: tuple[str, ...]  # input patterns
    output: str  # output directory
    input_format: str = "auto"  # auto | webdataset | parquet | jsonl | csv | folder
    image_column: str = "image_path"  # manifest column with the image path
    caption_column: str = "caption"  # manifest column with the caption
    caption_ext: str = "txt"  # tar member / sidecar extension with the caption
    key_column: str = "key"  # manifest column with the key
    key_prefix: str = ""  # put in front of every --input key
    seed: int = 0  # all randomness derives from (seed, key)
    max_image_pixels: int = 64_000_000  # decompression-bomb guard, checked before decoding
    max_image_bytes: int = 32 * 2**20  # encoded size budget
    min_image_side: int = 8  # smaller images are rejected
    max_caption_chars: int = 8192  # longer captions are rejected
    clip_model: str = "ViT-B-32"  # CM3Leon's retriever
    clip_pretrained: str = "laion2b_s34b_b79k"  # tag or local checkpoint
    device: str = "cpu"  # cpu | cuda
    embed_batch_size: int = 64  # RunInference batch size
    memory_bank: str | None = None  # prebuilt bank directory
    neighbour_input: tuple[str, ...] = ()  # the bank's own corpus: neighbour documents, never queries
    neighbour_key_prefix: str = ""  # the --key_prefix that corpus was built with
    extend_memory_bank: bool = False  # grow a copy of --memory_bank with this run's documents
    index_factory: str | None = None  # FAISS factory string override
    retrieval_topk: int = 32  # candidates per query
    num_retrieved: int = 2  # selected per query modality
    max_similarity: float = 0.9  # relevance rule threshold
    diversity_threshold: float = 0.95  # diversity rule threshold
    query_dropout: float = 0.2  # RA-CM3 query dropout rate
    holdout_fraction: float = 0.0  # examples kept out of the bank and written to shards/heldout/
    min_clip_score: float | None = None  # leave out image+text examples whose CLIP cosine is below this
    dedup_threshold: float | None = None  # leave out documents this close to one earlier in keep order
    text_tokenizer: str | None = None  # tokenizer.json to load
    text_vocab_size: int = 56_320  # BPE vocabulary size when fitting
    image_tokenizer: str | None = None  # image tokenizer file to load, or vqgan:DIR
    vocab: str = "native"  # native | chameleon:DIR
    tokenize_batch_size: int = 16  # images per image-tokenizer batch
    image_tokenizer_dtype: str = "float32"  # float32 | bfloat16 | float16 (a VQ-GAN's convolutions)
    image_codebook_size: int = 8192  # VQ codes
    image_size: int = 256  # images are resized to this square side
    image_patch_size: int = 8  # one token per patch
    seq_len: int = 4096  # training sequence length
    neighbours_per_sequence: int = 3  # CM3Leon picks 3 of the 4 retrieved per training sequence
    tokenizer_fit_captions: int = 100_000  # key-hash sample the BPE is fitted on
    tokenizer_fit_images: int = 4096  # key-hash sample the VQ codebook is fitted on
    cm3_masking: str = "causal"  # causal | none
    shard_max_samples: int = 10_000  # shard rotation by count
    shard_max_bytes: int = 256 * 2**20  # shard rotation by size

    @classmethod
    def from_options(cls, options: PipelineOptions) -> BuildConfig:
        view = options.view_as(CorpusOptions).get_all_options()
        missing = [f"--{name}" for name in ("input", "output") if not view.get(name)]
        if missing:
            raise SystemExit(f"cm3corpus build: {' and '.join(missing)} required (see cm3corpus build --help)")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in view.items() if k in fields}
        for name in ("input", "neighbour_input"):
            given = values.get(name) or ()
            values[name] = (given,) if isinstance(given, str) else tuple(given)
        for name in ("key_prefix", "neighbour_key_prefix"):
            if values.get(name) and not re.fullmatch(r"[A-Za-z0-9_\-]+", values[name]):
                raise SystemExit(f"cm3corpus build: --{name} {values[name]!r} may only hold letters, digits, _ and -")
        vocab = values.get("vocab") or "native"
        if vocab != "native" and not (vocab.startswith("chameleon:") and len(vocab) > len("chameleon:")):
            raise SystemExit(f"cm3corpus build: --vocab {vocab!r}: expected native or chameleon:DIR")
        if vocab != "native" and values.get("text_tokenizer"):
            raise SystemExit("cm3corpus build: --text_tokenizer and --vocab chameleon:DIR both name the text tokenizer")
        score, threshold = values.get("min_clip_score"), values.get("dedup_threshold")
        if score is not None and not -1.0 <= score <= 1.0:  # NaN fails too
            raise SystemExit(f"cm3corpus build: --min_clip_score {score}: expected a cosine in [-1, 1]")
        if threshold is not None and not 0.0 < threshold <= 1.0:
            raise SystemExit(f"cm3corpus build: --dedup_threshold {threshold}: expected a cosine in (0, 1]")
        if values.get("tokenize_batch_size") is not None and values["tokenize_batch_size"] < 1:
            raise SystemExit("cm3corpus build: --tokenize_batch_size must be at least 1")
        if not values.get("memory_bank"):
            needing = [
                f"--{n}" for n in ("neighbour_input", "extend_memory_bank", "neighbour_key_prefix") if values.get(n)
            ]
            if needing:  # they only mean something with another build's bank; never ignore them silently
                raise SystemExit(f"cm3corpus build: {' and '.join(needing)} need --memory_bank DIR (a prebuilt bank)")
        return cls(**values)
