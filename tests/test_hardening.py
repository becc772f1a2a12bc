"""Hostile inputs at the reader and decoder (issue 16): bounded reads, every row and sample counted,
reasons that say what happened. Each test makes its own small input."""

from __future__ import annotations

import io
import json
import tarfile
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from schemas.records import REJECT_REASONS, Example, RawSample, Reject
from tests.badinputs import add_member, encode, rgb, write_tar
from transforms.lib.read import MAX_MEMBERS_PER_SAMPLE, _read_capped, fetch_parts, read_manifest, read_tar
from transforms.lib.validate import Budgets, to_rgb, validate

BUDGETS = Budgets(max_image_pixels=1_000_000, max_image_bytes=2**20, min_image_side=8, max_caption_chars=8192)


def outcome(item) -> str:
    if isinstance(item, RawSample):
        item = validate(item, BUDGETS)
    return item.reason if isinstance(item, Reject) else item.modality


def read_all(path) -> list:
    return list(read_tar(str(path), BUDGETS))


def manifest(path, fmt: str) -> list:
    return list(read_manifest(str(path), fmt, "image_path", "caption", "key", "txt", BUDGETS))


# ---------------------------------------------------------------------------------------------
# Class 3: extended tar headers and the bytes of one sample are bounded.


@pytest.mark.parametrize("fmt,kind", [(tarfile.GNU_FORMAT, "GNU long-name"), (tarfile.PAX_FORMAT, "PAX")])
def test_huge_extended_header_in_a_gzipped_tar_ends_the_shard_unread(tmp_path, fmt, kind):
    # 8 MiB of header compresses to a few KiB: tarfile would read it whole before any member is seen.
    path = tmp_path / "h.tar.gz"
    with tarfile.open(path, "w:gz", format=fmt) as tf:
        add_member(tf, "ok.txt", b"kept before the damage")
        add_member(tf, "cut.txt", b"being read when the damage comes")
        info = tarfile.TarInfo("a" * (8 * 2**20) + ".txt" if fmt == tarfile.GNU_FORMAT else "p.txt")
        if fmt == tarfile.PAX_FORMAT:
            info.pax_headers = {"comment": "x" * (8 * 2**20)}
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    assert path.stat().st_size < 200_000
    items = read_all(path)
    assert [outcome(i) for i in items] == ["text", "shard_unreadable"]
    assert kind in items[1].detail and "limit" in items[1].detail


def test_a_chain_of_extended_headers_ends_the_shard_without_recursing(tmp_path):
    # tarfile parses each GNU long-name header by recursing into the next: thousands in a row raised
    # RecursionError, which no reader expects.
    def header(name: str, kind: bytes, size: int) -> bytes:
        info = tarfile.TarInfo(name)
        info.type, info.size = kind, size
        return info.tobuf(tarfile.USTAR_FORMAT)

    data = bytearray()
    for name in ("ok.txt", "cut.txt"):
        data += header(name, tarfile.REGTYPE, 4) + b"text".ljust(512, b"\0")
    for _ in range(3000):
        data += header("././@LongLink", tarfile.GNUTYPE_LONGNAME, 6) + b"abc.tx".ljust(512, b"\0")
    data += header("x.txt", tarfile.REGTYPE, 1) + b"x".ljust(512, b"\0") + b"\0" * 1024
    (tmp_path / "chain.tar").write_bytes(bytes(data))
    items = read_all(tmp_path / "chain.tar")
    assert [outcome(i) for i in items] == ["text", "shard_unreadable"]
    assert "extended headers in a row" in items[1].detail


def test_thousands_of_unused_members_of_one_key_are_capped(tmp_path):
    path = tmp_path / "many.tar"
    with tarfile.open(path, "w") as tf:
        add_member(tf, "k.txt", b"a caption")
        for i in range(2000):
            add_member(tf, f"k.b{i:04d}", b"\0" * 1000)
        add_member(tf, "next.txt", b"the next sample is read")
    many, after = read_all(path)
    assert (many.reason, str(MAX_MEMBERS_PER_SAMPLE) in many.detail) == ("sample_too_large", True)
    assert (outcome(after), after.key) == ("text", "next")


def test_unused_members_each_under_budget_are_capped_in_total(tmp_path):
    # Each .bin passes the per-member budget (the image budget, 1 MiB); four of them do not fit one sample.
    path = tmp_path / "total.tar"
    write_tar(path, [("k", {"txt": b"caption", **{f"b{i}": b"\0" * (2**20 - 10) for i in range(4)}})])
    (item,) = read_all(path)
    assert item.reason == "sample_too_large" and "total" in item.detail


def test_members_nothing_reads_are_not_kept(tmp_path):
    path = tmp_path / "extra.tar"
    write_tar(path, [("k", {"txt": b"caption", "cls": b"7", "npy": b"\0" * 5000})])
    (item,) = read_all(path)
    assert isinstance(item, RawSample) and sorted(item.parts) == ["txt"]


# ---------------------------------------------------------------------------------------------
# Class 4: one bad row is one reject; raw keys are grouped before they are reduced.


def test_jsonl_bad_rows_reject_only_themselves(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    lines = [
        json.dumps({"key": "a", "caption": "first"}).encode(),
        b'{"key": "b", "caption": "bad \xff byte"}',
        b'{"key": "c", "caption": "lone \\ud800 surrogate"}',
        ('{"key": "d", "caption": ' + deep + "}").encode(),
        b'{"key": "e", "caption": "x' + b"y" * (2**21) + b'"}',  # a line over the row budget
        json.dumps({"key": "f", "caption": "last"}).encode(),
    ]
    (tmp_path / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    items = manifest(tmp_path / "m.jsonl", "jsonl")
    got = [outcome(validate(i, BUDGETS) if isinstance(i, RawSample) else i) for i in items]
    assert got == ["text"] + ["bad_manifest_row"] * 4 + ["text"]
    assert [i.key for i in items][::5] == ["a", "f"]
    assert len({i.key for i in items}) == 6  # each lost row has its own key (file stem and row number)


def test_csv_field_over_the_parser_limit_rejects_its_row_only(tmp_path):
    body = "key,caption\na,first\nb," + "x" * 200_000 + "\nc,third\nd,bad \udcff byte\ne,fifth\n"
    (tmp_path / "m.csv").write_bytes(body.encode("utf-8", "surrogateescape"))
    items = manifest(tmp_path / "m.csv", "csv")
    assert [outcome(i) if isinstance(i, Reject) else i.key for i in items] == [
        "a",
        "bad_manifest_row",
        "c",
        "bad_manifest_row",
        "e",
    ]


def test_parquet_cell_over_budget_rejects_its_row_not_its_neighbours(tmp_path):
    rows = [{"key": k, "image_path": encode(rgb(), "PNG"), "caption": k} for k in "abc"]
    rows[1]["image_path"] = b"\0" * (2 * 2**20)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    items = manifest(tmp_path / "m.parquet", "parquet")
    assert [outcome(i) if isinstance(i, Reject) else i.key for i in items] == ["a", "image_too_large", "c"]
    assert "2097152 bytes" in items[1].detail


def test_keys_that_reduce_alike_stay_distinct_samples(tmp_path):
    path = tmp_path / "k.tar"
    write_tar(path, [("a b", {"txt": b"caption of a b"}), ("a_b", {"jpg": encode(rgb(), "JPEG")})])
    first, second = read_all(path)
    assert (first.key, second.key) == ("a_b", "a_b")  # the later one is a duplicate_key at the dedup step
    assert first.parts == {"txt": b"caption of a b"} and sorted(second.parts) == ["jpg"]
    assert first.source.endswith("::a b") and second.source.endswith("::a_b")


def test_two_members_giving_one_part_are_a_reject_not_an_overwrite(tmp_path):
    path = tmp_path / "case.tar"
    with tarfile.open(path, "w") as tf:
        add_member(tf, "k.jpg", encode(rgb(seed=1), "JPEG"))
        add_member(tf, "k.JPG", encode(rgb(seed=2), "JPEG"))
        add_member(tf, "k.txt", b"caption")
    (item,) = read_all(path)
    assert item.reason == "duplicate_member" and "k.JPG" in item.detail


# ---------------------------------------------------------------------------------------------
# Class 5: names that are not UTF-8, URLs nobody can open.


def test_non_utf8_member_name_is_escaped_in_the_reject(tmp_path):
    path = tmp_path / "names.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tf:
        add_member(tf, "\udcff\udcfe.jpg", b"not an image")
    (item,) = read_all(path)
    item = validate(item, BUDGETS) if isinstance(item, RawSample) else item
    assert item.reason == "image_undecodable"
    for text in (item.key, item.source, item.detail):
        text.encode("utf-8")  # what the rejects writer does; a lone surrogate raised here
    assert "\\xff\\xfe" in item.source


@pytest.mark.parametrize("url", ["nosuchprotocol://host/a.jpg", "sftp://host/a.jpg"])
def test_url_whose_protocol_is_not_installed_is_a_reject(url):
    if url.startswith("sftp"):
        try:
            import paramiko  # noqa: F401

            pytest.skip("paramiko is installed here: sftp:// has its package")
        except ImportError:
            pass
    item = fetch_parts(RawSample("k", "m.jsonl::row 0", ("m", 0), paths={"image": url}), BUDGETS)
    assert item.reason == "unsupported_url" and url.split("://")[0] in item.detail


# ---------------------------------------------------------------------------------------------
# Class 7: decoders.


def tga_named_jpg() -> bytes:
    return encode(rgb(), "TGA")


@pytest.mark.parametrize("fmt", ["TGA", "PCX", "PPM", "SGI", "ICO", "ICNS", "QOI"])
def test_formats_outside_the_allow_list_are_never_decoded(fmt):
    try:
        data = encode(rgb(), fmt)
    except (KeyError, OSError, ValueError):
        pytest.skip(f"this Pillow cannot write {fmt}")
    roomy = Budgets(max_image_pixels=2**24, max_image_bytes=2**25)  # ICNS holds every size up to 1024 px
    item = validate(RawSample("k", "s", parts={"jpg": data, "txt": b"x"}), roomy)
    assert item.reason == "image_undecodable" and "allowed format" in item.detail


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_allowed_formats_are_kept(fmt):
    item = validate(RawSample("k", "s", parts={"jpg": encode(rgb(), fmt)}), BUDGETS)
    assert isinstance(item, Example) and item.modality == "image"


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (40, 20), (200, 0, 0))
    im.paste((0, 0, 200), (0, 0, 10, 20))  # a blue left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: turn 90 degrees clockwise to view
    data = encode(im, "JPEG", exif=exif.tobytes(), quality=95)
    item = validate(RawSample("k", "s", parts={"jpg": data}), BUDGETS)
    assert (item.width, item.height) == (20, 40)
    upright = Image.open(io.BytesIO(item.image)).convert("RGB")
    assert upright.size == (20, 40) and upright.getpixel((10, 2))[2] > 150  # the blue edge is now on top


def test_sixteen_bit_conversion_memory_is_bounded():
    # 4096 x 4096 at 16 bits is 32 MiB decoded; the old float64 copy plus its clipped twin took 256 MiB more.
    im = Image.fromarray(np.full((4096, 4096), 40000, dtype=np.uint16))
    tracemalloc.start()
    try:
        out = to_rgb(im)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.mode == "RGB" and out.getpixel((5, 5)) == (156, 156, 156)
    # 2 bytes a pixel for the array, 1 for the 8-bit result, bands of 1 Mpx: under 5 bytes a pixel
    assert peak < 5 * 4096 * 4096, f"{peak / 2**20:.0f} MiB"


# ---------------------------------------------------------------------------------------------
# Class 9: reasons that say what happened.


def test_big_sidecars_are_member_too_large_not_caption_too_long(tmp_path):
    path = tmp_path / "side.tar"
    jpg = encode(rgb(), "JPEG")
    write_tar(
        path,
        [
            ("j", {"jpg": jpg, "json": b"{" + b" " * (3 * 2**20) + b"}"}),
            ("b", {"jpg": jpg, "bin": b"\0" * (2**20 + 1)}),
        ],
    )
    j, b = read_all(path)
    assert (j.reason, b.reason) == ("member_too_large", "member_too_large")
    assert "j.json" in j.detail and "b.bin" in b.detail


@pytest.mark.parametrize("size", [10, 200_000, 3 * 2**20])
def test_white_space_caption_of_any_length_is_image_only(tmp_path, size):
    path = tmp_path / "ws.tar"
    write_tar(path, [("k", {"jpg": encode(rgb(), "JPEG"), "txt": b" \n\t" * (size // 3)})])
    (raw,) = read_all(path)
    assert outcome(validate(raw, BUDGETS)) == "image"
    side = tmp_path / "ws.txt"
    side.write_bytes(b" " * size)
    fetched = fetch_parts(RawSample("k", "d/ws", ("d", 0), paths={"txt": str(side)}), BUDGETS)
    assert fetched.parts["txt"].strip() == b""


def test_white_space_caption_past_the_sample_budget_is_refused_after_a_bounded_read(tmp_path):
    big = 4 * 2**20  # over BUDGETS' sample budget (image bytes + 2 caption budgets, about 3.1 MiB)
    path = tmp_path / "ws.tar.gz"
    with tarfile.open(path, "w:gz") as tf:  # 4 MiB of spaces, a few KiB on disk
        add_member(tf, "k.jpg", encode(rgb(), "JPEG"))
        add_member(tf, "k.txt", b" " * big)
    (rej,) = read_all(path)
    assert rej.reason == "sample_too_large"  # decided from the header: nothing scanned
    side = tmp_path / "ws.txt"
    side.write_bytes(b" " * big)
    fetched = fetch_parts(RawSample("k", "d/ws", ("d", 0), paths={"txt": str(side)}), BUDGETS)
    assert isinstance(fetched, Reject) and fetched.reason == "caption_too_long"

    read_bytes = 0

    def endless_spaces(n: int) -> bytes:  # a stream that never ends, as /dev/zero-like inputs are
        nonlocal read_bytes
        assert n >= 0, "an unbounded read(-1) was asked for"
        read_bytes += n
        return b" " * n

    assert _read_capped(endless_spaces, 100, True, 10_000) is None
    assert read_bytes == 10_001  # the budget plus one byte, never more


def test_every_reason_used_here_is_in_the_vocabulary():
    for reason in ("member_too_large", "sample_too_large", "duplicate_member", "unsupported_url"):
        assert reason in REJECT_REASONS
