"""Pipeline options: Beam's `PipelineOptions` subclass, turned once into one frozen config.

Stages receive `BuildConfig` (or plain fields of it), never the options object.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass

import fsspec
from apache_beam.options.pipeline_options import PipelineOptions
from fsspec.implementations.local import LocalFileSystem

from transforms.lib.config import add_flags, flag
from transforms.lib.layout import TOKENS_PER_SPAN
from transforms.lib.read import expand_inputs
from transforms.lib.sequences import NUM_SENTINELS


class CorpusOptions(PipelineOptions):
    """The `cm3corpus build` flags (BuildConfig's fields); every other flag passes through to Beam (`--runner`, ...)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        # Not argparse-required: Beam parses every registered options class for every pipeline,
        # tests' included, so `from_options` checks --input and --output instead.
        add_flags(parser, BuildConfig, required=False)


@dataclass(frozen=True)
class BuildConfig:
    """Everything a `cm3corpus build` run needs, frozen; built once from the options.

    Each field is the flag of its name (`transforms.lib.config.flag`): its default and help are the flag's.
    """

    # Input and output.
    input: tuple[str, ...] = flag(
        help="Input pattern: tars (globs, {000..009} braces, fsspec URLs), parquet/jsonl/csv manifests or a folder."
        " Repeat the flag for several."
    )
    output: str = flag(help="Output directory (local path or any fsspec URL).")
    input_format: str = flag("auto", choices=["auto", "webdataset", "parquet", "jsonl", "csv", "folder"])
    image_column: str = flag("image_path", "Manifest column holding the image path or URL.")
    caption_column: str = flag("caption", "Manifest column holding the caption.")
    caption_ext: str = flag("txt", "Tar member / sidecar file extension holding the caption.")
    key_column: str = flag("key", "Manifest column holding the key (row number when absent).")
    key_prefix: str = flag(
        "",
        "Put this in front of every input key ([A-Za-z0-9_-]), so corpora that share a memory bank"
        " keep distinct keys (img2dataset keys are shard/row numbers and repeat across corpora).",
    )
    seed: int = flag(0, "Seed for every random choice; randomness derives from (seed, key).")
    # Validation budgets.
    max_image_pixels: int = flag(64_000_000, "Reject images with more pixels, undecoded.")
    max_image_bytes: int = flag(32 * 2**20, "Reject encoded images larger than this.")
    min_image_side: int = flag(8, "Reject images with a side shorter than this.")
    max_caption_chars: int = flag(8192, "Reject captions longer than this.")
    # Embedding.
    clip_model: str = flag("ViT-B-32", "open_clip architecture name, a JSON config path, or 'demo'.")
    clip_pretrained: str = flag("laion2b_s34b_b79k", "open_clip pretrained tag or a local checkpoint path.")
    device: str = flag("cpu", "cpu or cuda (half precision on cuda).")
    embed_batch_size: int = flag(64)  # RunInference batch size
    # Memory bank and retrieval.
    memory_bank: str | None = flag(None, "Retrieve from this prebuilt bank instead of building one.")
    neighbour_input: tuple[str, ...] = flag(
        (),
        "With --memory_bank: the input of the corpus that bank was built from, so its documents"
        " can stand in this run's sequences as neighbours (read and tokenized, never queries). Repeatable.",
    )
    neighbour_key_prefix: str = flag(
        "", "The --key_prefix the --neighbour_input corpus was built with (its keys as the bank holds them)."
    )
    extend_memory_bank: bool = flag(
        False,
        "With --memory_bank: add this run's documents to a copy of that bank (written as this run's"
        " memory_bank/) instead of only retrieving from it.",
        action="store_true",
    )
    index_factory: str | None = flag(None, "FAISS index-factory string; chosen from the bank size when absent.")
    retrieval_topk: int = flag(32, "Candidates fetched per query before the rules.")
    num_retrieved: int = flag(2, "Documents selected per query modality (image and text).")
    max_similarity: float = flag(0.9, "Relevance rule: skip candidates scoring above this.")
    diversity_threshold: float = flag(0.95, "Skip candidates this similar to a selected one.")
    query_dropout: float = flag(0.2, "Share of caption tokens dropped from the text query.")
    # Corpus filters (transforms/filters.py); both off by default.
    min_clip_score: float | None = flag(
        None,
        "Leave out image+text examples whose image-caption CLIP cosine is below this (listed in"
        " filtered/; the report's histogram shows where the scores lie). Off by default.",
    )
    dedup_threshold: float | None = flag(
        None,
        "Leave out exact duplicates (same decoded pixels) and documents whose embedding lies within this"
        " cosine of one that comes first (image+text first, then key hash). Off by default.",
    )
    # Tokenizers, layout and shards.
    holdout_fraction: float = flag(
        0.0,
        "Share of examples (chosen by key) kept out of the memory bank and written to shards/heldout/,"
        " so evaluation queries never appear in training sequences as neighbours.",
    )
    text_tokenizer: str | None = flag(None, "A tokenizer.json to load instead of fitting BPE on the captions.")
    text_vocab_size: int = flag(56_320)  # BPE vocabulary size when fitting
    image_tokenizer: str | None = flag(
        None,
        "An image tokenizer file to load instead of fitting one, or vqgan:DIR (a Chameleon/Anole"
        " tokenizer/vqgan.yaml + vqgan.ckpt, or taming configs/model.yaml + last.ckpt; .safetensors too).",
    )
    vocab: str = flag(
        "native",
        "Token id space: native (specials, text, image ranges) or chameleon:DIR (Chameleon's"
        " text_tokenizer.json from DIR: its BPE for text, IMGIMG entries for image codes).",
    )
    tokenize_batch_size: int = flag(16, "Images per image-tokenizer batch (cut from keys).")
    image_tokenizer_dtype: str = flag(
        "float32",
        "A VQ-GAN's convolution dtype (half precision is for --device cuda); codes are picked in float32.",
        choices=["float32", "bfloat16", "float16"],
    )
    image_codebook_size: int = flag(8192)  # VQ codes
    image_size: int = flag(256, "Side images are resized to before tokenizing.")
    image_patch_size: int = flag(8, "Side of one image token's patch.")
    seq_len: int = flag(4096)  # training sequence length
    neighbours_per_sequence: int = flag(3, "Retrieved documents placed before the query.")
    tokenizer_fit_captions: int = flag(100_000, "Captions the text BPE is fitted on at most.")
    tokenizer_fit_images: int = flag(4096, "Images the VQ codebook is fitted on at most.")
    cm3_masking: str = flag("causal", choices=["causal", "none"])
    shard_max_samples: int = flag(10_000)  # shard rotation by count
    shard_max_bytes: int = flag(256 * 2**20)  # shard rotation by size

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
        check_ranges(values)
        if not values.get("memory_bank"):
            needing = [
                f"--{n}" for n in ("neighbour_input", "extend_memory_bank", "neighbour_key_prefix") if values.get(n)
            ]
            if needing:  # they only mean something with another build's bank; never ignore them silently
                raise SystemExit(f"cm3corpus build: {' and '.join(needing)} need --memory_bank DIR (a prebuilt bank)")
        return cls(**values)


# Every numeric flag's range, checked before any work starts: (flag, smallest, largest, what it must be).
# None is no bound; an excluded end is written as its float neighbour (math.nextafter).
_AT_LEAST_1 = (1, None, "at least 1")
RANGES = {
    "max_image_pixels": _AT_LEAST_1,
    "max_image_bytes": _AT_LEAST_1,
    "min_image_side": _AT_LEAST_1,
    "max_caption_chars": _AT_LEAST_1,
    "embed_batch_size": _AT_LEAST_1,
    "retrieval_topk": _AT_LEAST_1,
    "num_retrieved": _AT_LEAST_1,
    "max_similarity": (-1.0, 1.0, "a number from -1 to 1 (a cosine similarity)"),
    "diversity_threshold": (-1.0, 1.0, "a number from -1 to 1 (a cosine similarity)"),
    "query_dropout": (0.0, 1.0, "a share from 0 to 1"),
    "holdout_fraction": (0.0, math.nextafter(1.0, 0.0), "a share from 0 up to (not including) 1"),
    "min_clip_score": (-1.0, 1.0, "a number from -1 to 1 (a cosine similarity)"),
    "dedup_threshold": (math.nextafter(0.0, 1.0), 1.0, "a cosine above 0, up to 1"),
    "text_vocab_size": _AT_LEAST_1,
    "tokenize_batch_size": _AT_LEAST_1,
    "image_codebook_size": (2, None, "at least 2"),
    "image_size": _AT_LEAST_1,
    "image_patch_size": _AT_LEAST_1,
    "seq_len": _AT_LEAST_1,
    "neighbours_per_sequence": (0, None, "at least 0"),
    "tokenizer_fit_captions": _AT_LEAST_1,
    "tokenizer_fit_images": _AT_LEAST_1,
    "shard_max_samples": _AT_LEAST_1,
    "shard_max_bytes": _AT_LEAST_1,
}


def check_ranges(values: dict) -> None:
    """Refuse, in one line naming the flag, a value that would fail later or build a useless corpus."""

    def refuse(name: str, why: str) -> None:
        raise SystemExit(f"cm3corpus build: --{name} {why} (got {values[name]!r})")

    for name, (low, high, what) in RANGES.items():
        v = values.get(name)
        if v is None:
            continue
        if (
            (isinstance(v, float) and not math.isfinite(v))
            or (low is not None and v < low)
            or (high is not None and v > high)
        ):
            refuse(name, f"must be {what}")
    if values.get("image_tokenizer"):  # a loaded tokenizer brings its own image size and grid
        return
    size, patch = values.get("image_size", 256), values.get("image_patch_size", 8)
    if size % patch:
        refuse("image_size", f"must be a multiple of --image_patch_size {patch}")
    # One document whole: <eod> caption <break> image <eod>, and the causal-masking reserve.
    reserve = TOKENS_PER_SPAN * NUM_SENTINELS if values.get("cm3_masking", "causal") == "causal" else 0
    shortest = (size // patch) ** 2 + 4 + reserve
    if values.get("seq_len") is not None and values["seq_len"] < shortest:
        refuse(
            "seq_len",
            f"too short for one document: a {size} px image is {(size // patch) ** 2} tokens, and a sequence"
            f" needs {shortest} for one image, a caption token, the separators and the masking reserve",
        )


def resolve_inputs(cfg: BuildConfig) -> list[tuple[str, str]]:
    """The input units of `cfg.input` (and check `--neighbour_input`), or a one-line SystemExit.

    Refused before any work: a pattern that matches nothing, a suffix with no format, a protocol
    whose fsspec package is missing, an `--output` that is a file, and an `--output` that is, holds
    or lies inside an input (the build replaces `OUTPUT/shards` and friends, so `--input
    'ds/shards/*.tar' --output ds` would delete its own input, and a folder input holding the output
    would read the last build's shards as input).
    """

    def expand(flag: str, patterns: tuple[str, ...]) -> list[tuple[str, str]]:
        try:
            return expand_inputs(patterns, cfg.input_format)
        except (FileNotFoundError, ValueError, ImportError) as e:
            raise SystemExit(f"cm3corpus build: --{flag}: {e}") from None

    units = expand("input", cfg.input)
    others = expand("neighbour_input", cfg.neighbour_input) if cfg.neighbour_input else []
    try:
        fs, _ = fsspec.core.url_to_fs(cfg.output)
        out = _normal(cfg.output)
    except (ImportError, ValueError) as e:
        raise SystemExit(f"cm3corpus build: --output {cfg.output!r}: {e}") from None
    if fs.isfile(out[1]):
        raise SystemExit(f"cm3corpus build: --output {cfg.output!r} is a file; it must be a directory")
    folders = []
    for pattern in (*cfg.input, *cfg.neighbour_input):
        pfs, path = fsspec.core.url_to_fs(pattern)
        if pfs.isdir(path):
            folders.append((pattern, _normal(pattern)))
    for _, url in (*units, *others):
        if _inside(_normal(url), out):
            raise SystemExit(
                f"cm3corpus build: --output {cfg.output!r} holds the input {url!r} and would replace it;"
                " choose an output outside every input"
            )
    for pattern, folder in folders:
        if _inside(out, folder):
            raise SystemExit(
                f"cm3corpus build: --output {cfg.output!r} lies inside the input folder {pattern!r}: a later build"
                " would read this build's output as input; choose an output outside every input"
            )
    return units


def _normal(url: str) -> tuple[str, str]:
    """(protocol, absolute path without a trailing slash); local paths with their links resolved."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        return "file", os.path.realpath(path)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol, path.rstrip("/")


def _inside(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """Whether `a` is `b` or lies under it."""
    return a[0] == b[0] and (a[1] == b[1] or a[1].startswith(b[1].rstrip("/") + "/"))
