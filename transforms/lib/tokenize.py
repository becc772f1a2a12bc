"""Text and image tokenizers, and the one global id space they share (`schemas.vocab.Vocab`).

Text: byte-level BPE (HF `tokenizers`), fitted on the captions in the order given (the pipeline
feeds them sorted by key, so a rerun fits the same merges). It holds no special tokens: the
specials (`<eod>`, `<break>`, sentinels, ...) live in `Vocab`, and byte-level pre-tokenisation
with no normaliser makes `decode(encode(caption)) == caption` for every string.

Images: any `ImageTokenizer` (a small protocol, loaded by its `kind`): the built-in patch VQ below,
or a pretrained VQ-GAN (`transforms/lib/vqgan.py`, kind `vqgan`, opened from a release directory with
`vqgan:DIR`). The built-in `PatchVQTokenizer` is a vector quantiser over raw RGB patches:
k-means (faiss) on a sample of patches; its codebook is stored as uint8 pixels, which makes the
nearest-code search exact integer arithmetic and so the same codes on every machine.

Nothing here is ever pickled: the image tokenizer is an `.npz` that loads with
`allow_pickle=False`, and the text tokenizer is HF's JSON.
"""

from __future__ import annotations

import io
import math
import sys
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, runtime_checkable

import fsspec
import numpy as np
import tokenizers
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from schemas.vocab import ChameleonVocab, Vocab, load_vocab
from transforms.lib.chameleon import chameleon_vocab, text_only
from transforms.lib.io import write_bytes
from transforms.lib.rng import rng_for

TEXT_TOKENIZER_FILE = "text_tokenizer.json"
IMAGE_TOKENIZER_FILE = "image_tokenizer.npz"
VOCAB_FILE = "vocab.json"

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest zip timestamp, fixed so saved tokenizers are byte-identical


# --------------------------------------------------------------------------------------- files


def _read_bytes(path: str) -> bytes:
    with fsspec.open(path, "rb") as f:
        return f.read()


def _save_npz(arrays: dict[str, np.ndarray]) -> bytes:
    """An uncompressed `.npz` with fixed member order and timestamps (np.savez stamps the clock)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        for name in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            z.writestr(info, member.getvalue())
    return buf.getvalue()


def _load_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


# ---------------------------------------------------------------------------------------- text


def fit_text_tokenizer(captions: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
    """Fit a byte-level BPE tokenizer with no special tokens and no normalisation.

    The result depends only on the captions and their order. Its vocabulary has at least the 256
    byte symbols, so `vocab_size` below that still yields 256 entries.

    Args:
        captions: training text, in a deterministic order (the pipeline sorts by key).
        vocab_size: target number of entries (CM3Leon: 56,320).
    """
    tok = Tokenizer(models.BPE())
    # No normaliser, no prefix space, no trimming: decode(encode(x)) must give x back byte for byte.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, even unseen ones
        show_progress=False,
    )
    tok.train_from_iterator(captions, trainer=trainer)
    return tok


def load_text_tokenizer(path: str) -> tokenizers.Tokenizer:
    """Load a `tokenizer.json` (HF tokenizers format) from a local path or fsspec URL."""
    return Tokenizer.from_str(_read_bytes(path).decode("utf-8"))


def encode_caption(text_tok: tokenizers.Tokenizer, vocab: Vocab | ChameleonVocab, caption: str) -> list[int]:
    """Caption → global text ids (`vocab.text_start + local id`; Chameleon's ids as they are), no specials added."""
    local = text_tok.encode(caption, add_special_tokens=False).ids
    return vocab.text_ids(local)


def decode_text(text_tok: tokenizers.Tokenizer, vocab: Vocab, ids: Sequence[int]) -> str:
    """Global text ids → the string; raises ValueError on an id outside the text range."""
    if vocab.kind == "chameleon":
        return text_tok.decode(vocab.text_ids(ids), skip_special_tokens=False)
    local = np.asarray(ids, dtype=np.int64) - vocab.text_start
    if local.size and (local.min() < 0 or local.max() >= vocab.text_size):
        raise ValueError("decode_text got ids outside the text range")
    return text_tok.decode(local.tolist(), skip_special_tokens=False)


# --------------------------------------------------------------------------------------- image


@runtime_checkable
class ImageTokenizer(Protocol):
    """Images ↔ fixed-length grids of codes. Implementations also carry a class-level `kind`."""

    @property
    def tokens_per_image(self) -> int: ...

    @property
    def num_codes(self) -> int: ...

    def encode(self, images: list[Image.Image]) -> np.ndarray:
        """Images → (N, tokens_per_image) int32 codes in [0, num_codes)."""
        ...

    def decode(self, codes: np.ndarray) -> list[Image.Image]:
        """(N, tokens_per_image) codes → N RGB images."""
        ...

    def save(self, path: str) -> None: ...


def _to_square_rgb(image: Image.Image, size: int) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)


def psnr(a: np.ndarray | Image.Image, b: np.ndarray | Image.Image) -> float:
    """Peak signal-to-noise ratio in dB of two 8-bit images of the same shape (inf when equal)."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"psnr of different shapes {x.shape} and {y.shape}")
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


class PatchVQTokenizer:
    """Vector quantiser of raw RGB patches: one code per `patch_size` square of the resized image.

    Args:
        codebook: (num_codes, patch_size * patch_size * 3) uint8, each row a patch in HWC order.
        image_size: side images are resized to (square, RGB).
        patch_size: side of one patch; divides `image_size`.
    """

    kind = "patch_vq"

    def __init__(self, codebook: np.ndarray, image_size: int, patch_size: int):
        if image_size % patch_size:
            raise ValueError(f"patch_size {patch_size} does not divide image_size {image_size}")
        codebook = np.ascontiguousarray(codebook, dtype=np.uint8)
        if codebook.ndim != 2 or codebook.shape[1] != patch_size * patch_size * 3:
            raise ValueError(f"codebook shape {codebook.shape} does not fit {patch_size}px RGB patches")
        self.codebook = codebook
        self.image_size = image_size
        self.patch_size = patch_size
        # Pixels centred on 128 lie in [-128, 127]. The search computes |c|^2 - 2 x.c (= |x - c|^2 - |x|^2) as ONE
        # matrix product, [x, 1] @ [-2 C^T; |c|^2], so no pass over the (patches x codes) result is needed but the
        # argmin. Every term and partial sum is an integer of magnitude below 3 * patch_dim * 128^2, under 2^24 when
        # patch_dim <= 341 (8 px patches and smaller): a float32 product is then exact whatever the BLAS's
        # summation order or blocking, at about twice float64's rate. Larger patches take float64, exact below 2^53.
        centred = codebook.astype(np.float64) - 128.0
        self._exact_f32 = 3.0 * codebook.shape[1] * 128.0**2 < 2.0**24
        dtype = np.float32 if self._exact_f32 else np.float64
        width = -(-(codebook.shape[1] + 1) // 16) * 16  # patch values, the constant 1, zero padding to 16
        weights = np.zeros((width, codebook.shape[0]), dtype)
        weights[: codebook.shape[1]] = -2.0 * centred.T
        weights[codebook.shape[1]] = np.sum(centred**2, axis=1)
        self._weights = weights  # (width, num_codes)
        self._device = "cpu"  # where `nearest` runs (`place`)
        self._placed: dict[str, object] = {}  # device → (-2 C^T, |c|^2) as torch tensors there

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_image(self) -> int:
        return self.grid * self.grid

    @property
    def num_codes(self) -> int:
        return int(self.codebook.shape[0])

    def patches(self, image: Image.Image) -> np.ndarray:
        """One image → (tokens_per_image, patch_dim) uint8 patches, row-major over the grid."""
        g, p = self.grid, self.patch_size
        pixels = _to_square_rgb(image, self.image_size)  # (S, S, 3)
        return pixels.reshape(g, p, g, p, 3).transpose(0, 2, 1, 3, 4).reshape(g * g, p * p * 3)

    def nearest(self, patches: np.ndarray, chunk: int = 512) -> np.ndarray:
        """(M, patch_dim) uint8 patches → (M,) int32 nearest codes (ties go to the lowest code).

        argmin over codes of |c|^2 - 2 x.c (= |x - c|^2 - |x|^2), computed exactly (see `__init__`), so every
        machine, chunk and batch size picks the same code. The product is written into one preallocated
        (chunk, num_codes) buffer: a fresh 16-32 MB result per chunk costs page faults comparable to the product.
        """
        if self._device != "cpu":
            return self.nearest_torch(patches, self._device)
        patches = np.asarray(patches)
        m, dim = len(patches), self.codebook.shape[1]
        out = np.empty(m, dtype=np.int32)
        rows = max(1, min(chunk, m))
        x = np.zeros((rows, self._weights.shape[0]), self._weights.dtype)  # (rows, width)
        x[:, dim] = 1.0
        dist = np.empty((rows, self.num_codes), self._weights.dtype)  # (rows, num_codes)
        for start in range(0, m, rows):
            n = min(rows, m - start)
            x[:n, :dim] = patches[start : start + n]
            x[:n, :dim] -= 128.0
            np.matmul(x[:n], self._weights, out=dist[:n])
            out[start : start + n] = np.argmin(dist[:n], axis=1)
        return out

    def place(self, device: str, dtype: str = "float32") -> None:
        """Run `nearest` on `device`: "cpu" (numpy) or a torch device such as "cuda"; codes do not change.

        `dtype` is the VQ-GAN's option and has no meaning here: the search is exact (see `nearest_torch`).
        """
        del dtype
        self._device = str(device)

    def nearest_torch(self, patches: np.ndarray, device: str, chunk: int = 4096) -> np.ndarray:
        """`nearest` with torch on `device` (what `place("cuda")` runs); the same codes on any device.

        dist = |c|^2 + x @ (-2 C^T) with `addmm`. Centred pixels (8 bits) and -2c (at most 256) are exact in
        float32 and in TF32 (11 significant bits), the products and every partial sum are integers below 2^24
        accumulated in float32 (patch_dim <= 341), and |c|^2 is added in float32 after: exact whatever the
        GPU's matmul precision setting, blocking or split. Ties go to the lowest code (`argmin`'s first minimum).
        """
        import torch  # lazy: seconds to import; the build's wiring, query and generate import this module

        if not self._exact_f32:
            raise ValueError(f"nearest_torch needs patches of at most 341 values, not {self.codebook.shape[1]}")
        dim = self.codebook.shape[1]
        if device not in self._placed:
            weights = torch.from_numpy(self._weights[:dim]).to(device)  # (patch_dim, num_codes)
            norms = torch.from_numpy(self._weights[dim]).to(device)  # (num_codes,)
            self._placed[device] = (weights, norms)
        weights, norms = self._placed[device]
        out = []
        with torch.inference_mode():
            x_all = torch.from_numpy(np.ascontiguousarray(patches)).to(device)  # uint8 over the bus, cast there
            for start in range(0, len(patches), chunk):
                x = x_all[start : start + chunk].float() - 128.0  # (rows, patch_dim)
                out.append(torch.addmm(norms, x, weights).argmin(dim=1))  # (rows,)
            codes = torch.cat(out).cpu().numpy() if out else np.zeros(0, np.int64)
        return codes.astype(np.int32)

    def nearest_reference(self, patches: np.ndarray) -> np.ndarray:
        """The same codes from the plain float64 formula on raw pixels: the check for `nearest`."""
        codes = self.codebook.astype(np.float64)
        dist = np.sum(codes**2, axis=1)[None, :] - 2.0 * (patches.astype(np.float64) @ codes.T)
        return np.argmin(dist, axis=1).astype(np.int32)

    def encode(self, images: list[Image.Image]) -> np.ndarray:
        """Images → (len(images), tokens_per_image) int32 codes; each distinct patch of the batch searched once.

        A patch's code depends on its pixels alone (`nearest` is exact), so searching each distinct patch once
        and copying its code to the repeats gives the same codes. Flat backgrounds, borders, clip art and
        screenshots repeat patches exactly (on the demo images about 4 in 5 do); where nothing repeats the
        sort costs about 4% of the search (benchmarks/bench_patchvq.py, 2026-12-06).
        """
        if not images:
            return np.zeros((0, self.tokens_per_image), dtype=np.int32)
        patches = np.concatenate([self.patches(im) for im in images])
        return self.nearest_distinct(patches).reshape(len(images), self.tokens_per_image)

    def nearest_distinct(self, patches: np.ndarray) -> np.ndarray:
        """`nearest`'s codes, searching each distinct row of `patches` once (see `encode`).

        On the CPU only: on a GPU the search of a batch takes about a millisecond, less than the sort.
        """
        if self._device != "cpu":
            return self.nearest(patches)
        distinct, inverse = unique_rows(patches, inverse=True)
        return self.nearest(distinct)[inverse]

    def decode(self, codes: np.ndarray) -> list[Image.Image]:
        codes = np.asarray(codes, dtype=np.int64).reshape(-1, self.tokens_per_image)
        if codes.size and (codes.min() < 0 or codes.max() >= self.num_codes):
            raise ValueError("image codes out of range")
        g, p = self.grid, self.patch_size
        pix = self.codebook[codes].reshape(-1, g, g, p, p, 3).transpose(0, 1, 3, 2, 4, 5)
        pix = pix.reshape(-1, self.image_size, self.image_size, 3)
        return [Image.fromarray(np.ascontiguousarray(im), mode="RGB") for im in pix]

    def to_bytes(self) -> bytes:
        return _save_npz(
            {
                "kind": np.array(self.kind),
                "codebook": self.codebook,
                "image_size": np.array(self.image_size, dtype=np.int64),
                "patch_size": np.array(self.patch_size, dtype=np.int64),
            }
        )

    def save(self, path: str) -> None:
        write_bytes(path, self.to_bytes())

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> PatchVQTokenizer:
        return cls(arrays["codebook"], int(arrays["image_size"]), int(arrays["patch_size"]))


FIT_POINTS_PER_CODE = 39  # faiss's minimum training points per centroid (its warning below that)
FIT_MIN_POINTS = 262_144  # small codebooks still see this many (cheap for them, and their error is lower)
FIT_NITER = 5  # k-means iterations; see fit_patch_vq


def unique_rows(rows: np.ndarray, inverse: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`np.unique(rows, axis=0, return_counts=True)` for a 2-D uint8 array: the same rows in the same order.

    Each row is viewed as one opaque item of its bytes, which numpy sorts with memcmp, the order of the
    uint8 rows; `axis=0` compares field by field instead, 150x slower (19 s of a 24 s fit of 319,712
    patches of 192 values, benchmarks/results/2026-12-06-throughput.md). With `inverse`, the second array
    is `return_inverse`'s instead of the counts: `unique[inverse]` is `rows`.
    """
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    items = rows.view(np.dtype((np.void, rows.shape[1]))).ravel()
    if inverse:
        unique, where = np.unique(items, return_inverse=True)
        return unique.view(np.uint8).reshape(-1, rows.shape[1]), where.reshape(-1)
    unique, counts = np.unique(items, return_counts=True)
    return unique.view(np.uint8).reshape(-1, rows.shape[1]), counts


def fit_patch_vq(
    images: Sequence[Image.Image],
    codebook_size: int,
    image_size: int,
    patch_size: int,
    seed: int,
    points_per_code: int = FIT_POINTS_PER_CODE,
    niter: int = FIT_NITER,
    min_points: int = FIT_MIN_POINTS,
) -> PatchVQTokenizer:
    """Fit a `PatchVQTokenizer` with seeded faiss k-means on a sample of the images' patches.

    The sample is `points_per_code * codebook_size` patches (faiss's 39 a centroid: 319,488 at 8,192 codes)
    or `min_points` when that is more (small codebooks: more points are cheap there and lower the error),
    an equal share from each image at positions drawn from `seed`; all patches when the images have fewer.
    Identical patches (flat backgrounds, letterboxing: on the demo images a fifth of the sample is one
    colour) are fitted once with their count as weight: the same k-means objective at a fraction of the
    cost. 5 iterations from faiss's seeded random start, not 20: at 8,192 codes on 256 px demo images the
    held-out quantisation error was 19.84 after 5, 19.79 after 10 and 19.78 after 20 (388 images), and 31.78
    after 5 against 32.86 for the old fit (262,144 points unweighted, 20 iterations) on 62 images
    (benchmarks/results/2026-12-06-throughput.md). The fit's size and
    seconds go to stderr.

    Args:
        images: the training images, in a deterministic order.
        codebook_size: number of codes (CM3Leon: 8192).
        image_size: side images are resized to.
        patch_size: side of a patch; one token per patch.
        seed: seeds the patch sample and k-means.
        points_per_code: sample size per code.
        niter: k-means iterations.
        min_points: sample size at least (when the images have that many patches).
    """
    import faiss  # lazy: 0.13 s to import, for fitting only; the build's wiring, query and generate import this module

    if not images:
        raise ValueError("fit_patch_vq needs at least one image")
    start = time.monotonic()
    # A throwaway tokenizer only to cut patches the same way encoding will.
    cutter = PatchVQTokenizer(np.zeros((1, patch_size * patch_size * 3), np.uint8), image_size, patch_size)
    wanted = max(points_per_code * codebook_size, min_points)
    per_image = max(1, math.ceil(wanted / len(images)))
    rng = rng_for(seed, "", "patch_vq_sample")
    sample = []
    for image in images:
        patches = cutter.patches(image)
        if per_image < len(patches):
            patches = patches[np.sort(rng.choice(len(patches), size=per_image, replace=False))]
        sample.append(patches)
    sample = np.concatenate(sample)
    unique, counts = unique_rows(sample)  # sorted rows: independent of image order
    x, weights = unique.astype(np.float32), counts.astype(np.float32)
    if len(x) < codebook_size:
        # k-means needs a point per centroid; repeats let it run, and duplicate codes cost only range.
        reps = math.ceil(codebook_size / len(x))
        x, weights = np.tile(x, (reps, 1)), np.tile(weights / reps, reps)
    kmeans = faiss.Kmeans(x.shape[1], codebook_size, niter=niter, seed=seed, verbose=False)
    # The weighted sample holds `wanted` points even when few are distinct; faiss counts rows, so its
    # too-few-points warning is judged here instead. Every row is used (no subsampling to 256 a centroid).
    kmeans.cp.min_points_per_centroid = 1
    kmeans.cp.max_points_per_centroid = max(1, -(-len(x) // codebook_size))
    kmeans.train(x, weights=weights)
    codebook = np.clip(np.rint(kmeans.centroids), 0, 255).astype(np.uint8)
    seconds = time.monotonic() - start
    asks = points_per_code * codebook_size
    short = f" (faiss asks for {asks:,}: fit on more images for a better codebook)" if len(sample) < asks else ""
    print(
        f"cm3corpus tokenizers: patch codebook of {codebook_size:,} codes fitted on {len(sample):,} patches"
        f" ({len(unique):,} distinct) from {len(images):,} images, {niter} iterations, in {seconds:.1f} s{short}",
        file=sys.stderr,
        flush=True,
    )
    return PatchVQTokenizer(codebook, image_size, patch_size)


def _vqgan_from_arrays(arrays: dict[str, np.ndarray]) -> ImageTokenizer:
    from transforms.lib.vqgan import VQGANTokenizer  # lazy: vqgan imports torch; only a VQ-GAN tokenizer needs it

    return VQGANTokenizer.from_arrays(arrays)


# Loaders by `kind`.
_IMAGE_TOKENIZER_LOADERS: dict[str, Callable[[dict[str, np.ndarray]], ImageTokenizer]] = {
    PatchVQTokenizer.kind: PatchVQTokenizer.from_arrays,
    "vqgan": _vqgan_from_arrays,
}
VQGAN_PREFIX = "vqgan:"  # `--image_tokenizer vqgan:DIR`: a Chameleon/Anole or taming release directory


def register_image_tokenizer(kind: str, from_arrays: Callable[[dict[str, np.ndarray]], ImageTokenizer]) -> None:
    """Let `load_image_tokenizer` open `.npz` files whose `kind` array is `kind`."""
    _IMAGE_TOKENIZER_LOADERS[kind] = from_arrays


def load_image_tokenizer(path: str) -> ImageTokenizer:
    """Load an image tokenizer `.npz` (never unpickled), dispatching on its `kind` field, or `vqgan:DIR`."""
    if path.startswith(VQGAN_PREFIX):
        from transforms.lib.vqgan import load_vqgan  # lazy: vqgan imports torch, as above

        return load_vqgan(path[len(VQGAN_PREFIX) :])
    arrays = _load_npz(_read_bytes(path))
    if "kind" not in arrays:
        raise ValueError(f"{path} has no 'kind' field; not an image tokenizer file")
    kind = str(arrays["kind"])
    if kind not in _IMAGE_TOKENIZER_LOADERS:
        raise ValueError(f"unknown image tokenizer kind {kind!r} in {path}; known: {sorted(_IMAGE_TOKENIZER_LOADERS)}")
    return _IMAGE_TOKENIZER_LOADERS[kind](arrays)


def encode_image(image_tok: ImageTokenizer, vocab: Vocab | ChameleonVocab, image: Image.Image) -> list[int]:
    """One image → its segment's global ids (`vocab.image_start + code`; in Chameleon's space boi, codes, eoi)."""
    return encode_images(image_tok, vocab, [image])[0]


def encode_images(
    image_tok: ImageTokenizer, vocab: Vocab | ChameleonVocab, images: list[Image.Image]
) -> list[list[int]]:
    """`encode_image` of several images as one model batch (the batch is the caller's, cut from keys)."""
    return [vocab.image_ids(codes.tolist()) for codes in image_tok.encode(images)]


def decode_image(image_tok: ImageTokenizer, vocab: Vocab | ChameleonVocab, ids: Sequence[int]) -> Image.Image:
    """An image segment's global ids → the decoded image; raises ValueError on a bad id or length."""
    if vocab.kind == "native":  # the historical messages, which tests and tools match on
        codes = np.asarray(ids, dtype=np.int64) - vocab.image_start
        if codes.shape != (image_tok.tokens_per_image,):
            raise ValueError(f"expected {image_tok.tokens_per_image} image ids, got {codes.shape[0]}")
        if codes.min() < 0 or codes.max() >= vocab.image_codes:
            raise ValueError("decode_image got ids outside the image range")
    else:
        codes = np.asarray(vocab.codes_of_image(ids), dtype=np.int64)
    return image_tok.decode(codes[None, :])[0]


# --------------------------------------------------------------------------------------- vocab


def build_vocab(text_tok: tokenizers.Tokenizer, image_tok: ImageTokenizer, num_sentinels: int) -> Vocab:
    """The corpus's id space: specials, `num_sentinels` sentinels, the text tokens, then the image codes."""
    return Vocab(
        num_sentinels=num_sentinels,
        text_size=text_tok.get_vocab_size(with_added_tokens=True),
        image_codes=image_tok.num_codes,
        tokens_per_image=image_tok.tokens_per_image,
    )


def write_tokenizers(directory: str, text_tok: tokenizers.Tokenizer, image_tok: ImageTokenizer, vocab: Vocab) -> None:
    """Write `text_tokenizer.json`, `image_tokenizer.npz` and `vocab.json` under `directory`."""
    write_bytes(f"{directory}/{TEXT_TOKENIZER_FILE}", text_tok.to_str(pretty=True).encode("utf-8"))
    image_tok.save(f"{directory}/{IMAGE_TOKENIZER_FILE}")
    write_bytes(f"{directory}/{VOCAB_FILE}", vocab.to_json().encode("utf-8"))


def load_tokenizers(directory: str) -> tuple[tokenizers.Tokenizer, ImageTokenizer, Vocab | ChameleonVocab]:
    """Read back what `write_tokenizers` wrote, checking that the three files agree."""
    text_tok = load_text_tokenizer(f"{directory}/{TEXT_TOKENIZER_FILE}")
    image_tok = load_image_tokenizer(f"{directory}/{IMAGE_TOKENIZER_FILE}")
    vocab = load_vocab(_read_bytes(f"{directory}/{VOCAB_FILE}").decode("utf-8"))
    if vocab.kind == "chameleon":
        text_tok = text_only(text_tok)
        expected = chameleon_vocab(text_tok, image_tok.num_codes, image_tok.tokens_per_image, vocab.num_sentinels)
    else:
        expected = build_vocab(text_tok, image_tok, vocab.num_sentinels)
    if expected != vocab:
        raise ValueError(f"{directory}/{VOCAB_FILE} does not match its tokenizers: {vocab} vs {expected}")
    return text_tok, image_tok, vocab


__all__ = [
    "IMAGE_TOKENIZER_FILE",
    "TEXT_TOKENIZER_FILE",
    "VOCAB_FILE",
    "ImageTokenizer",
    "PatchVQTokenizer",
    "build_vocab",
    "decode_image",
    "decode_text",
    "encode_caption",
    "encode_image",
    "encode_images",
    "fit_patch_vq",
    "fit_text_tokenizer",
    "load_image_tokenizer",
    "load_text_tokenizer",
    "load_tokenizers",
    "psnr",
    "register_image_tokenizer",
    "unique_rows",
    "write_tokenizers",
]
