"""Decode and validate one raw sample into an `Example`, or say why not with a `Reject`.

The policy, one rule per line (README "Input policy" repeats it for users):
- caption bytes must be UTF-8 (else `caption_not_utf8`); surrounding white space is stripped;
  an empty or white-space-only caption (of any length) counts as absent; over `max_caption_chars`
  is `caption_too_long`.
- an encoded image over `max_image_bytes`, or whose header declares more than `max_image_pixels`,
  is `image_too_large`, decided from the header alone so a decompression bomb is never decoded.
- a side under `min_image_side` is `image_too_small`; anything PIL cannot fully decode (not an
  image, truncated data) is `image_undecodable`, and so is any format outside `ALLOWED_FORMATS`:
  Pillow picks its decoder from the bytes, not the name, so a `.jpg` may hold TGA, PCX, SGI, DDS,
  JPEG 2000, ICO, ICNS, EPS (Ghostscript) or FITS; those decoders never run.
- the EXIF orientation is applied (`ImageOps.exif_transpose`), so a photo stands the way it was
  taken; such an image is re-encoded as PNG.
- plain RGB JPEG/PNG keep their original bytes. Other modes are normalised to RGB and re-encoded
  as PNG: CMYK is converted, 16-bit and float images are scaled to 8 bits (a band of rows at a time,
  so the extra memory is bounded whatever the size), palette and alpha images are flattened onto
  white, animated images keep their first frame.
- a sample with neither a usable image nor a caption is `empty_example`; one with either is kept,
  with its modality recorded.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from schemas.records import Example, RawSample, Reject

# Where a sample keeps its image: "image" for manifest rows, else the member or file extension.
IMAGE_PARTS = ("image", "jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
# The decoders Pillow may run: the formats of IMAGE_PARTS' extensions, whatever the name says.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_SAFE_KEY = re.compile(r"[^A-Za-z0-9_\-]")
_ORIENTATION = 0x0112  # the EXIF tag


@dataclass(frozen=True)
class Budgets:
    """The validation limits, taken from BuildConfig."""

    max_image_pixels: int = 64_000_000  # header-declared pixels
    max_image_bytes: int = 32 * 2**20  # encoded bytes
    min_image_side: int = 8  # pixels
    max_caption_chars: int = 8192  # characters after stripping
    hash_pixels: bool = False  # set Example.image_hash (the exact-duplicate filter); about 40% of a decode


def safe_key(raw: str) -> str:
    """A key with only `[A-Za-z0-9_-]`: safe as a WebDataset key and never a path."""
    return _SAFE_KEY.sub("_", raw) or "_"


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def printable(text: str) -> str:
    """`text` safe to write as UTF-8: bytes that were not UTF-8 (kept by Python as lone surrogates,
    as tar member names and file names are) become `\\xNN` escapes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def describe_error(e: BaseException) -> str:
    """`Type: message` without object addresses, so reject details repeat byte for byte across runs."""
    return strip_addresses(f"{type(e).__name__}: {e}")


def strip_addresses(text: str) -> str:
    """`text` without ` at 0x...` object addresses (they differ from run to run)."""
    return _ADDRESS.sub("", text)


class _Rejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def validate(sample: RawSample, budgets: Budgets, caption_ext: str = "txt") -> Example | Reject:
    """Turn a raw sample into an Example or a Reject, per the module's policy."""
    try:
        caption = _caption(sample.parts.get(caption_ext), budgets)
        image_bytes = next((sample.parts[e] for e in IMAGE_PARTS if e in sample.parts), None)
        image, width, height, image_hash = _image(image_bytes, budgets) if image_bytes is not None else (None, 0, 0, "")
    except _Rejected as r:
        return Reject(sample.key, sample.source, r.reason, r.detail)
    if image is None and not caption:
        return Reject(sample.key, sample.source, "empty_example", f"parts present: {sorted(sample.parts) or 'none'}")
    meta = sample.parts.get("json", b"").decode("utf-8", errors="replace")
    return Example(sample.key, sample.source, caption, image, width, height, meta, image_hash)


def _caption(data: bytes | None, budgets: Budgets) -> str | None:
    if data is None:
        return None
    # No byte pre-check: the reader bounds a caption part, and white space of any length is no caption.
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Rejected("caption_not_utf8", str(e)) from None
    text = text.strip()
    if len(text) > budgets.max_caption_chars:
        raise _Rejected("caption_too_long", f"{len(text)} characters > {budgets.max_caption_chars}")
    return text or None


def _image(data: bytes, budgets: Budgets) -> tuple[bytes, int, int, str]:
    if len(data) > budgets.max_image_bytes:
        raise _Rejected("image_too_large", f"{len(data)} bytes > {budgets.max_image_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)  # reads the header only
    except Image.DecompressionBombError as e:
        raise _Rejected("image_too_large", str(e)) from None
    except UnidentifiedImageError:
        raise _Rejected(
            "image_undecodable", f"not an image of an allowed format ({', '.join(ALLOWED_FORMATS)})"
        ) from None
    except Exception as e:  # PIL raises many types for broken headers
        raise _Rejected("image_undecodable", describe_error(e)) from None
    width, height = im.size
    if width * height > budgets.max_image_pixels:
        raise _Rejected("image_too_large", f"{width}x{height} pixels > {budgets.max_image_pixels}")
    if min(width, height) < budgets.min_image_side:
        raise _Rejected("image_too_small", f"{width}x{height} < {budgets.min_image_side}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            animated = getattr(im, "n_frames", 1) > 1
            im.seek(0)
            im.load()
    except Exception as e:
        raise _Rejected("image_undecodable", describe_error(e)) from None
    try:
        orientation = im.getexif().get(_ORIENTATION, 1)
    except Exception:  # a broken EXIF block is no orientation
        orientation = 1
    upright = orientation in (None, 1)
    if upright and im.format in ("JPEG", "PNG") and im.mode == "RGB" and not animated and "transparency" not in im.info:
        return data, width, height, pixel_hash(im) if budgets.hash_pixels else ""
    if not upright:
        try:
            im = ImageOps.exif_transpose(im)
        except Exception as e:
            raise _Rejected("image_undecodable", f"EXIF orientation {orientation}: {describe_error(e)}") from None
        width, height = im.size
    rgb = to_rgb(im)
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    return out.getvalue(), width, height, pixel_hash(rgb) if budgets.hash_pixels else ""


PIXEL_HASH_ROWS = 512  # rows hashed per strip: never a second full copy of a large image's pixels


def pixel_hash(im) -> str:
    """A 128-bit hash of a decoded RGB image's size and pixels: equal for the same picture re-encoded
    losslessly or re-uploaded byte-for-byte, whatever its file format (the exact-duplicate filter)."""
    digest = hashlib.blake2b(f"{im.mode} {im.width}x{im.height}".encode(), digest_size=16)
    for top in range(0, im.height, PIXEL_HASH_ROWS):
        digest.update(im.crop((0, top, im.width, min(top + PIXEL_HASH_ROWS, im.height))).tobytes())
    return digest.hexdigest()


def to_rgb(im):
    """Normalise any PIL mode to 8-bit RGB: alpha and palette onto white, 16-bit scaled down."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # A band of rows at a time: a whole float64 copy would be 8 bytes a pixel (512 MB at the default
        # 64 Mpx budget) on top of the decoded image; the band keeps the extra to about 8 MB.
        arr = np.asarray(im)
        band = max(1, 2**20 // max(1, im.width))
        top = 65535.0 if im.mode.startswith("I;16") else 255.0
        if top == 255.0 and any(arr[i : i + band].max() > 255 for i in range(0, im.height, band)):
            top = 65535.0
        out = np.empty(arr.shape[:2], np.uint8)
        for i in range(0, im.height, band):
            out[i : i + band] = np.clip(arr[i : i + band].astype(np.float64) / top * 255.0 + 0.5, 0, 255)
        del arr
        im = Image.fromarray(out)
    if im.mode == "P" or im.mode == "PA" or im.mode == "LA" or "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    return im.convert("RGB")
