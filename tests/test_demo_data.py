"""The synthetic demo corpus: scenes, captions, and img2dataset's output layout, byte for byte."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.demo.data import (
    BACKGROUNDS,
    COLORS,
    IMG2DATASET_PARQUET_SCHEMA,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    describe,
    random_scene,
    render,
    sample_pairs,
    write_demo_corpus,
)

IMG2DATASET_COLUMNS = [
    "key",
    "caption",
    "url",
    "status",
    "error_message",
    "width",
    "height",
    "original_width",
    "original_height",
    "exif",
    "sha256",
]


def _groups(tar_path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of a tar, checking members are sorted regular files with fixed metadata."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == sorted(m.name for m in members)
        for m in members:
            assert m.isfile() and m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" and m.gname == ""
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "data"
    summary = write_demo_corpus(str(out), num_examples=500, seed=3, image_size=48)
    return out, summary


def test_scene_vocabulary_is_as_documented():
    assert len(SHAPES) >= 5 and len(COLORS) >= 8 and SIZES == ("small", "medium", "large")
    assert set(POSITIONS) >= {"left", "right", "top", "bottom", "center"}
    colors = np.array(list(COLORS.values()), dtype=float)
    gaps = np.linalg.norm(colors[:, None] - colors[None], axis=-1) + np.eye(len(colors)) * 1e9
    assert gaps.min() > 60  # well separated, so a tiny CLIP can tell them apart
    assert all(len(rgb) == 3 for rgb in BACKGROUNDS.values())


def test_random_scene_and_attributes_round_trip():
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(200)]
    assert {len(s.objects) for s in scenes} == {1, 2}
    for s in scenes:
        attrs = s.to_attributes()
        assert set(attrs) == {"objects", "background"} and attrs["background"] in BACKGROUNDS
        assert all(set(o) == {"shape", "color", "size", "position"} for o in attrs["objects"])
        assert Scene.from_attributes(json.loads(json.dumps(attrs))) == s
        if len(s.objects) == 2:
            assert s.objects[0].color != s.objects[1].color
            assert s.objects[0].position != s.objects[1].position


def test_render_size_jitter_and_determinism():
    scene = Scene(
        (SceneObject("star", "red", "large", "left"), SceneObject("cross", "blue", "small", "right")), "white"
    )
    a = render(scene, 64, np.random.default_rng(1))
    b = render(scene, 64, np.random.default_rng(1))
    c = render(scene, 64, np.random.default_rng(2))
    assert a.mode == "RGB" and a.size == (64, 64)
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()
    pixels = np.asarray(render(scene, 64, np.random.default_rng(1), jitter=0.0))
    assert (pixels[32, 17] == COLORS["red"]).all() and (pixels[32, 47] == COLORS["blue"]).all()
    assert (pixels[2, 2] == BACKGROUNDS["white"]).all()


def test_describe_mentions_first_object_first_and_varies():
    rng = np.random.default_rng(0)
    captions = set()
    for _ in range(300):
        scene = random_scene(rng)
        caption = describe(scene, rng)
        captions.add(caption)
        words = re.findall(r"[a-z]+", caption.lower())
        first = scene.objects[0]
        assert first.shape in words and first.color in words
        if len(scene.objects) == 2:
            assert words.index(first.color) < words.index(scene.objects[1].color)
    assert len(captions) > 250
    assert any("background" in c or "backdrop" in c for c in captions)


def test_sample_pairs():
    images, captions, scenes = sample_pairs(np.random.default_rng(0), 16, 32)
    assert len(images) == len(captions) == len(scenes) == 16
    assert all(im.size == (32, 32) and im.mode == "RGB" for im in images)
    again = sample_pairs(np.random.default_rng(0), 16, 32)
    assert again[1] == captions and again[2] == scenes


def test_layout_is_img2datasets(corpus):
    out, summary = corpus
    assert sorted(p.name for p in out.iterdir()) == ["00000.parquet", "00000.tar", "00000_stats.json"]
    groups = _groups(out / "00000.tar")
    assert sorted(groups) == [f"{i:09d}" for i in range(500)]
    table = pq.read_table(out / "00000.parquet")
    assert table.schema.names == IMG2DATASET_COLUMNS and table.schema.equals(IMG2DATASET_PARQUET_SCHEMA)
    assert table.column("key").to_pylist() == sorted(groups)
    stats = json.loads((out / "00000_stats.json").read_text())
    assert {"count", "successes", "failed_to_download", "failed_to_resize", "duration", "status_dict"} <= set(stats)
    assert stats["count"] == stats["successes"] == 500
    assert summary["examples"] == 500 and summary["shards"] == 1


def test_samples_match_their_scene_and_parquet(corpus):
    out, summary = corpus
    groups = _groups(out / "00000.tar")
    rows = {r["key"]: r for r in pq.read_table(out / "00000.parquet").to_pylist()}
    kinds = {"image_text": 0, "text_only": 0, "image_only": 0, "near_duplicates": 0}
    for key, parts in groups.items():
        meta = json.loads(parts["json"])
        row = rows[key]
        assert meta["key"] == key and meta["url"] == row["url"] == f"demo://scene/{key}" and meta["status"] == "success"
        scene = Scene.from_attributes(meta["attributes"])
        assert scene.to_attributes() == meta["attributes"]
        if "txt" in parts:
            caption = parts["txt"].decode()
            assert caption == meta["caption"] == row["caption"]
            words = re.findall(r"[a-z]+", caption.lower())
            assert scene.objects[0].shape in words and scene.objects[0].color in words
        else:
            assert meta["caption"] is None and row["caption"] is None
        if "jpg" in parts:
            image = Image.open(io.BytesIO(parts["jpg"]))
            assert image.format == "JPEG" and image.size == (48, 48) and image.convert("RGB").mode == "RGB"
            assert meta["width"] == row["width"] == 48 and row["sha256"] is not None
        else:
            assert meta["width"] is None and row["sha256"] is None
        if "near_duplicate_of" in meta:
            original = json.loads(groups[meta["near_duplicate_of"]]["json"])
            assert meta["near_duplicate_of"] < key and original["attributes"] == meta["attributes"]
            assert "jpg" in parts and "txt" in parts and "jpg" in groups[meta["near_duplicate_of"]]
            assert parts["jpg"] != groups[meta["near_duplicate_of"]]["jpg"]
            assert parts["txt"] == groups[meta["near_duplicate_of"]]["txt"]  # a re-upload keeps its caption
            kinds["near_duplicates"] += 1
        elif "jpg" in parts and "txt" in parts:
            kinds["image_text"] += 1
        elif "jpg" in parts:
            kinds["image_only"] += 1
        else:
            kinds["text_only"] += 1
    assert kinds == {k: summary[k] for k in kinds}
    assert all(v > 0 for v in kinds.values())


def test_tar_reads_with_webdataset(corpus):
    import webdataset as wds

    out, summary = corpus
    samples = list(wds.WebDataset(str(out / "00000.tar"), shardshuffle=False))
    assert len(samples) == 500
    with_both = [s for s in samples if "jpg" in s and "txt" in s]
    assert len(with_both) == summary["image_text"] + summary["near_duplicates"]
    assert all(json.loads(s["json"])["key"] == s["__key__"] for s in samples)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for path, seed in ((a, 7), (b, 7), (c, 8)):
        write_demo_corpus(str(path), num_examples=120, seed=seed, image_size=32, shard_size=50)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert [n for n in names if n.endswith(".tar")] == ["00000.tar", "00001.tar", "00002.tar"]
    for name in names:
        if name.endswith((".tar", ".parquet")):
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
            assert (a / name).read_bytes() != (c / name).read_bytes(), name
    # img2dataset keys: shard id (5 digits) then the index padded to ceil(log10(shard_size)) digits.
    assert sorted(_groups(a / "00001.tar"))[:2] == ["0000100", "0000101"]
    assert len(_groups(a / "00002.tar")) == 20
    assert not list(a.glob(".*")), "no temporary files left behind"


def test_rerun_replaces_and_drops_stale_shards(tmp_path):
    write_demo_corpus(str(tmp_path), num_examples=30, seed=0, image_size=16, shard_size=10)
    summary = write_demo_corpus(str(tmp_path), num_examples=12, seed=0, image_size=16, shard_size=10)
    assert summary["shards"] == 2
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert not (tmp_path / "00002.parquet").exists() and not (tmp_path / "00002_stats.json").exists()
