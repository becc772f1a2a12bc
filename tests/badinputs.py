"""Builders for the bad-input cases of the ingest policy; each returns what the pipeline must do."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib

import numpy as np
from PIL import Image


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    im.save(out, format=fmt, **kw)
    return out.getvalue()


def rgb(size: int = 32, seed: int = 0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but whose data is tiny: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def animated_gif() -> bytes:
    frames = [Image.new("P", (24, 24), i * 40) for i in range(3)]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    return out.getvalue()


def cases() -> list[tuple[str, dict[str, bytes], str]]:
    """(key, members by extension, expected outcome): a modality for kept samples, else the reject reason."""
    jpg = encode(rgb(), "JPEG")
    sixteen = Image.fromarray(np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60)  # uint16 is mode I;16
    palette = Image.new("P", (32, 32), 3)
    palette.info["transparency"] = 3
    return [
        ("good", {"jpg": jpg, "txt": b"a red circle", "json": b'{"k": 1}'}, "image+text"),
        ("rgba", {"png": encode(rgb().convert("RGBA"), "PNG"), "txt": b"alpha"}, "image+text"),
        ("cmyk", {"jpg": encode(rgb().convert("CMYK"), "JPEG"), "txt": b"cmyk"}, "image+text"),
        ("sixteen", {"png": encode(sixteen, "PNG"), "txt": b"16 bit"}, "image+text"),
        ("palette", {"png": encode(palette, "PNG", transparency=3), "txt": b"palette"}, "image+text"),
        ("animated", {"gif": animated_gif(), "txt": b"animated"}, "image+text"),
        ("imageonly", {"jpg": jpg}, "image"),
        ("blankcaption", {"jpg": jpg, "txt": b"  \n "}, "image"),
        ("textonly", {"txt": "un cercle rouge \u00e9".encode()}, "text"),
        ("truncated", {"jpg": jpg[: len(jpg) // 2], "txt": b"cut"}, "image_undecodable"),
        ("notimage", {"jpg": b"this is not an image at all", "txt": b"x"}, "image_undecodable"),
        ("bomb", {"png": png_with_header(100_000, 100_000), "txt": b"bomb"}, "image_too_large"),
        ("overbudget", {"png": png_with_header(5000, 5000), "txt": b"big"}, "image_too_large"),
        ("tiny", {"png": encode(rgb(4), "PNG"), "txt": b"tiny"}, "image_too_small"),
        ("badutf8", {"jpg": jpg, "txt": b"\xff\xfe caption"}, "caption_not_utf8"),
        ("hugecaption", {"jpg": jpg, "txt": b"word " * 3000}, "caption_too_long"),
        ("empty", {"txt": b"", "json": b"{}"}, "empty_example"),
    ]


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_tar(path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tf:
        for key, parts in samples:
            for ext, data in sorted(parts.items()):
                add_member(tf, f"{key}.{ext}", data)
