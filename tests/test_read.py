"""Ingest: every bad-input case has its exact outcome, and every sample is accounted for."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from schemas.records import Example, RawSample, Reject
from tests.badinputs import add_member, cases, encode, rgb, write_tar
from transforms.lib.read import expand_inputs, fetch_parts, read_manifest, read_tar, read_unit
from transforms.lib.validate import Budgets, validate

BUDGETS = Budgets(max_image_pixels=1_000_000, max_image_bytes=2**20, min_image_side=8, max_caption_chars=8192)


def outcome(item) -> str:
    return item.reason if isinstance(item, Reject) else item.modality


@pytest.mark.parametrize("key,parts,expected", cases(), ids=[c[0] for c in cases()])
def test_validate_policy(key, parts, expected):
    item = validate(RawSample(key, f"x::{key}", parts=dict(parts)), BUDGETS)
    assert outcome(item) == expected, getattr(item, "detail", "")
    if isinstance(item, Example) and item.image is not None:
        decoded = Image.open(io.BytesIO(item.image))
        assert decoded.mode == "RGB" and decoded.size == (item.width, item.height)


def test_alpha_is_flattened_onto_white():
    im = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # fully transparent red
    item = validate(RawSample("k", "s", parts={"png": encode(im, "PNG")}), BUDGETS)
    assert Image.open(io.BytesIO(item.image)).getpixel((3, 3)) == (255, 255, 255)


def test_plain_rgb_jpeg_keeps_its_bytes():
    jpg = encode(rgb(), "JPEG")
    assert validate(RawSample("k", "s", parts={"jpg": jpg}), BUDGETS).image == jpg


def read_all(path) -> list:
    return list(read_tar(str(path), BUDGETS))


def test_tar_groups_members_like_webdataset(tmp_path):
    write_tar(tmp_path / "a.tar", [(k, p) for k, p, _ in cases()])
    items = read_all(tmp_path / "a.tar")
    assert [i.key for i in items] == [k for k, _, _ in cases()]
    assert all(isinstance(i, RawSample) for i in items if i.key not in ("bomb", "overbudget", "hugecaption"))


def test_oversized_member_is_rejected_from_its_header(tmp_path):
    write_tar(tmp_path / "a.tar", [("big", {"jpg": b"\0" * (2**20 + 1), "txt": b"x"}), ("ok", {"txt": b"fine"})])
    big, ok = read_all(tmp_path / "a.tar")
    assert (big.reason, ok.key) == ("image_too_large", "ok")


def test_truncated_tar_keeps_whole_samples_before_the_damage(tmp_path):
    samples = [(f"s{i}", {"jpg": encode(rgb(seed=i), "JPEG"), "txt": b"caption"}) for i in range(6)]
    write_tar(tmp_path / "full.tar", samples)
    data = (tmp_path / "full.tar").read_bytes()
    offsets = []
    with tarfile.open(tmp_path / "full.tar") as tf:
        offsets = [m.offset_data for m in tf.getmembers()]
    cut = offsets[7] + 100  # inside s3's caption? no: member 7 is s3.txt's data; cut in its middle
    (tmp_path / "cut.tar").write_bytes(data[:cut])
    items = read_all(tmp_path / "cut.tar")
    kept = [i.key for i in items if isinstance(i, RawSample)]
    rejects = [i for i in items if isinstance(i, Reject)]
    assert kept == ["s0", "s1", "s2"]
    assert [(r.key, r.reason) for r in rejects] == [("s3", "shard_unreadable")]


def test_tar_cut_between_members_is_still_reported(tmp_path):
    samples = [(f"s{i}", {"txt": b"caption %d" % i}) for i in range(4)]
    write_tar(tmp_path / "full.tar", samples)
    with tarfile.open(tmp_path / "full.tar") as tf:
        third = tf.getmembers()[2].offset  # header of s2.txt
    (tmp_path / "cut.tar").write_bytes((tmp_path / "full.tar").read_bytes()[:third])
    items = read_all(tmp_path / "cut.tar")
    assert [i.key for i in items if isinstance(i, RawSample)] == ["s0"]
    assert [(r.key, r.reason) for r in items if isinstance(r, Reject)] == [("s1", "shard_unreadable")]


def test_garbage_after_members_is_reported(tmp_path):
    write_tar(tmp_path / "a.tar", [("s0", {"txt": b"a"})])
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[:1024] + b"\x07" * 512 + data[1024:])
    assert [outcome(i) for i in read_all(tmp_path / "b.tar")][-1] == "shard_unreadable"


def test_not_a_tar(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"hello, I am plain text pretending to be a tar file" * 40)
    (item,) = read_all(tmp_path / "x.tar")
    assert (item.key, item.reason) == ("", "shard_unreadable")


def test_links_devices_and_odd_names_are_unsafe_and_never_paths(tmp_path):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tf:
        add_member(tf, "ok.txt", b"fine")
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
        add_member(tf, "link.txt", b"caption of a link")
        add_member(tf, "../escape.txt", b"up and out")
        add_member(tf, "/abs/olute.txt", b"absolute")
        hard = tarfile.TarInfo("hard.txt")
        hard.type, hard.linkname = tarfile.LNKTYPE, "ok.txt"
        tf.addfile(hard)
    before = sorted(p.name for p in tmp_path.iterdir())
    items = read_all(path)
    assert [(i.key, outcome(i)) for i in items if isinstance(i, Reject)] == [
        ("link", "unsafe_member"),
        ("___escape", "unsafe_member"),
        ("_abs_olute", "unsafe_member"),
        ("hard", "unsafe_member"),
    ]
    assert [i.key for i in items if isinstance(i, RawSample)] == ["ok"]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing was extracted anywhere


def test_manifests_resolve_paths_and_reject_bad_rows(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(encode(rgb(), "JPEG"))
    rows = [
        {"key": "a", "image_path": "img/a.jpg", "caption": "first"},
        {"key": "b", "image_path": "img/missing.jpg", "caption": "second"},
        {"key": "c", "caption": "text only"},
        {"other": 1},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    pq.write_table(pa.Table.from_pylist(rows[:3]), tmp_path / "m.parquet")
    (tmp_path / "m.csv").write_text("key,image_path,caption\na,img/a.jpg,first\nb,img/missing.jpg,second\n")
    for name, n in (("m.jsonl", 5), ("m.parquet", 3), ("m.csv", 2)):
        items = list(read_manifest(str(tmp_path / name), name.split(".")[1], "image_path", "caption", "key"))
        fetched = [fetch_parts(i, BUDGETS) if isinstance(i, RawSample) else i for i in items]
        got = [outcome(validate(i, BUDGETS) if isinstance(i, RawSample) else i) for i in fetched]
        want = ["image+text", "missing_file", "text", "bad_manifest_row", "bad_manifest_row"][:n]
        assert got == want, name


def test_expand_inputs_braces_globs_folders_and_missing(tmp_path):
    for i in range(3):
        write_tar(tmp_path / f"{i:05d}.tar", [(f"k{i}", {"txt": b"x"})])
    units = expand_inputs((str(tmp_path / "{00000..00001}.tar"),))
    assert [u[1].rsplit("/", 1)[1] for u in units] == ["00000.tar", "00001.tar"]
    assert len(expand_inputs((str(tmp_path / "*.tar"),))) == 3
    assert len(expand_inputs((str(tmp_path),))) == 3  # a folder of tars
    assert len(expand_inputs(("file://" + str(tmp_path / "*.tar"),))) == 3  # fsspec URL
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_inputs((str(tmp_path / "nothing-*.tar"),))


def test_folder_of_images_with_sidecars(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "one.png").write_bytes(encode(rgb(), "PNG"))
    (tmp_path / "d" / "one.txt").write_text("a caption")
    (tmp_path / "d" / "two.jpg").write_bytes(encode(rgb(), "JPEG"))
    (tmp_path / "d" / "three.txt").write_text("just words")
    units = expand_inputs((str(tmp_path / "d"),))
    assert [u[0] for u in units] == ["folder"] * 3

    class Cfg:
        caption_ext, image_column, caption_column, key_column = "txt", "image_path", "caption", "key"
        max_image_pixels, max_image_bytes, min_image_side, max_caption_chars = 10**7, 2**20, 8, 8192

    got = {}
    for unit in units:
        (raw,) = read_unit(unit, Cfg)
        ex = validate(fetch_parts(raw, BUDGETS), BUDGETS)
        got[ex.key] = ex.modality
    assert got == {"one": "image+text", "two": "image", "three": "text"}


def test_folder_entries_are_not_samples(tmp_path):
    path = tmp_path / "d.tar"
    with tarfile.open(path, "w") as tf:
        folder = tarfile.TarInfo("shard")
        folder.type = tarfile.DIRTYPE
        tf.addfile(folder)
        add_member(tf, "shard/a.txt", b"a caption")
    items = read_all(path)
    assert [(i.key, type(i).__name__) for i in items] == [("shard_a", "RawSample")]


def _set_size_field(header: bytearray, size: int) -> None:
    """Write `size` into a tar header as base-256 (how a negative size is spelled) and fix the checksum."""
    field = size % 256**11  # two's complement over 11 bytes, after the 0xff marker
    header[124:136] = b"\xff" + field.to_bytes(11, "big")
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)


def test_header_that_moves_backwards_ends_the_shard(tmp_path):
    # A negative member size sends tarfile back to an earlier header; read naively, the same samples
    # come round for ever (phantom samples, growing memory). The shard must end as shard_unreadable.
    samples = [(f"s{i}", {"txt": b"caption %d" % i}) for i in range(3)]
    write_tar(tmp_path / "full.tar", samples)
    data = bytearray((tmp_path / "full.tar").read_bytes())
    with tarfile.open(tmp_path / "full.tar") as tf:
        second = tf.getmembers()[1].offset  # header of s1.txt
    header = bytearray(data[second : second + 512])
    _set_size_field(header, -1024)
    data[second : second + 512] = header
    (tmp_path / "loop.tar").write_bytes(bytes(data))
    with tarfile.open(tmp_path / "loop.tar") as tf:  # the crafted header parses, with its negative size
        tf.next()
        assert tf.next().size == -1024
    items = read_all(tmp_path / "loop.tar")
    assert len(items) <= 3
    assert [i for i in items if isinstance(i, RawSample)] == []
    (bad,) = items  # s0 was being read when the bad header came: it cannot be known whole
    assert (bad.key, bad.reason) == ("s0", "shard_unreadable") and "forward" in bad.detail


def test_folder_links_fifos_and_devices_are_refused_and_never_read(tmp_path):
    import os

    secret = tmp_path / "secret.txt"
    secret.write_text("API_KEY=hunter2")
    d = tmp_path / "d"
    d.mkdir()
    (d / "plain.png").write_bytes(encode(rgb(), "PNG"))
    (d / "plain.txt").write_text("a caption")
    (d / "leak.png").write_bytes(encode(rgb(), "PNG"))
    (d / "leak.txt").symlink_to(secret)  # sidecar that is a link to a secret
    (d / "env.txt").symlink_to("/proc/self/environ")
    (d / "zero.jpg").symlink_to("/dev/zero")
    os.mkfifo(d / "pipe.txt")  # would block a plain read for ever

    class Cfg:
        caption_ext, image_column, caption_column, key_column = "txt", "image_path", "caption", "key"
        max_image_pixels, max_image_bytes, min_image_side, max_caption_chars = 10**7, 2**20, 8, 8192

    got = {}
    for unit in expand_inputs((str(d),)):
        (raw,) = read_unit(unit, Cfg)
        item = fetch_parts(raw, BUDGETS)
        got[item.key] = item
    assert isinstance(got["plain"], RawSample)
    for key, why in [("leak", "symbolic link"), ("env", "symbolic link"), ("zero", "symbolic link"), ("pipe", "FIFO")]:
        assert (got[key].reason, why in got[key].detail) == ("not_regular_file", True), key
    assert all("hunter2" not in repr(item) for item in got.values())


def test_manifest_path_to_a_device_is_refused_and_reads_are_capped(tmp_path):
    # A device reports size 0; it is refused, and a regular file that grows past the budget is read
    # only to the budget plus one byte.
    dev = fetch_parts(RawSample("k", "m.jsonl", ("m", 0), paths={"image": "/dev/zero"}), BUDGETS)
    assert (dev.reason, "device" in dev.detail) == ("not_regular_file", True)
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * (2**20 + 5000))
    over = fetch_parts(RawSample("b", "m.jsonl", ("m", 0), paths={"image": str(big)}), BUDGETS)
    assert over.reason == "image_too_large"
