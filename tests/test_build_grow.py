"""Growing a corpus: new input is added to an existing memory bank without rebuilding it."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow.parquet as pq

from pipelines import build_corpus
from pipelines.demo.command import demo_build_flags
from pipelines.demo.data import write_demo_corpus
from schemas import artifacts
from transforms.lib.io import read_table


def prefixed_copy(src, dst, prefix: str) -> None:
    """The same samples under new keys (demo keys repeat across seeds)."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            info = tarfile.TarInfo(prefix + m.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


def build(data_glob, out, *extra) -> dict:
    return build_corpus.run(["--input", data_glob, "--output", str(out), *demo_build_flags(), *extra])


def test_new_documents_join_the_old_bank_without_a_rebuild(tmp_path):
    write_demo_corpus(str(tmp_path / "a"), num_examples=120, seed=1, shard_size=60)
    write_demo_corpus(str(tmp_path / "b0"), num_examples=60, seed=2, shard_size=60)
    (tmp_path / "b").mkdir()
    prefixed_copy(tmp_path / "b0" / "00000.tar", tmp_path / "b" / "00000.tar", "new")
    build(f"{tmp_path}/a/*.tar", tmp_path / "out_a")
    old_bank = {p.name: p.read_bytes() for p in (tmp_path / "out_a" / "memory_bank").iterdir()}

    stats = build(
        f"{tmp_path}/b/*.tar",
        tmp_path / "out_b",
        "--memory_bank",
        str(tmp_path / "out_a" / "memory_bank"),
        "--extend_memory_bank",
        "--neighbour_input",
        f"{tmp_path}/a/*.tar",
    )
    assert stats["examples_read"] == 60 == stats["examples_written"] + stats["examples_rejected"]
    assert stats["counters"]["memory_bank/documents_added"] == 60
    # the source bank is untouched; the grown one keeps every old id where it was
    assert {p.name: p.read_bytes() for p in (tmp_path / "out_a" / "memory_bank").iterdir()} == old_bank
    old_ids = pq.read_table(tmp_path / "out_a" / "memory_bank" / "ids.parquet").to_pylist()
    new_ids = pq.read_table(tmp_path / "out_b" / "memory_bank" / "ids.parquet").to_pylist()
    assert new_ids[: len(old_ids)] == old_ids and len(new_ids) == 180
    assert all(r["key"].startswith("new") for r in new_ids[120:])  # added after the old ids, in key order
    info = json.loads((tmp_path / "out_b" / "memory_bank" / "bank.json").read_text())
    assert info["count"] == 180
    # new queries retrieve from both the old and the new documents
    rows = read_table(str(tmp_path / "out_b" / "neighbours"), artifacts.NEIGHBOURS).to_pylist()
    docs = {r["doc_key"] for r in rows}
    assert any(d.startswith("new") for d in docs) and any(not d.startswith("new") for d in docs)
    # the old corpus's documents (--neighbour_input) stand in the new sequences; none went missing
    assert stats["counters"].get("sequences/neighbours_without_document", 0) == 0
    assert stats["counters"]["neighbour_input_read/examples_read"] == 120
    placed = set()
    for shard in sorted((tmp_path / "out_b" / "shards").glob("cm3-*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    placed |= set(json.loads(tf.extractfile(m).read())["neighbour_keys"])
    assert any(not k.startswith("new") for k in placed)


def test_held_out_examples_are_queries_but_never_neighbours(tmp_path):
    from transforms.lib.rng import is_held_out

    write_demo_corpus(str(tmp_path / "data"), num_examples=200, seed=4, shard_size=100)
    stats = build(f"{tmp_path}/data/*.tar", tmp_path / "out", "--holdout_fraction=0.1")
    keys = [
        r["key"] for r in read_table(str(tmp_path / "out" / "embeddings"), artifacts.embeddings_schema(128)).to_pylist()
    ]
    held = {k for k in keys if is_held_out(k, 0.1)}
    assert 5 < len(held) < 40
    assert stats["examples_written"] == 200 == stats["examples_read"]
    bank_keys = {r["key"] for r in pq.read_table(tmp_path / "out" / "memory_bank" / "ids.parquet").to_pylist()}
    assert bank_keys == set(keys) - held
    rows = read_table(str(tmp_path / "out" / "neighbours"), artifacts.NEIGHBOURS).to_pylist()
    assert not held & {r["doc_key"] for r in rows}  # never a neighbour
    assert held <= {r["query_key"] for r in rows}  # still retrieved for
    train = json.loads((tmp_path / "out" / "shards" / "manifest.json").read_text())["total"]["samples"]
    heldout = json.loads((tmp_path / "out" / "shards" / "heldout" / "manifest.json").read_text())["total"]["samples"]
    assert (train, heldout) == (200 - len(held), len(held))


def test_corpora_sharing_keys_fail_loudly_until_their_keys_are_told_apart(tmp_path):
    import pytest

    write_demo_corpus(str(tmp_path / "a"), num_examples=80, seed=1, shard_size=40)
    write_demo_corpus(str(tmp_path / "b"), num_examples=40, seed=2, shard_size=40)  # the same keys as a's first 40
    build(f"{tmp_path}/a/*.tar", tmp_path / "out_a", "--key_prefix", "old_")
    bank_keys = {r["key"] for r in pq.read_table(tmp_path / "out_a" / "memory_bank" / "ids.parquet").to_pylist()}
    assert bank_keys and all(k.startswith("old_") for k in bank_keys)
    grow = ["--memory_bank", str(tmp_path / "out_a" / "memory_bank"), "--neighbour_input", f"{tmp_path}/a/*.tar"]
    # a's documents read under their raw keys collide with b's: joined by key, they would be swapped in silently
    with pytest.raises(Exception, match="in both --input and --neighbour_input"):
        build(f"{tmp_path}/b/*.tar", tmp_path / "out_b", *grow)
    stats = build(f"{tmp_path}/b/*.tar", tmp_path / "out_b", *grow, "--neighbour_key_prefix", "old_")
    assert stats["accounted"] and stats["examples_read"] == 40
    assert stats["counters"].get("sequences/neighbours_without_document", 0) == 0
    rows = read_table(str(tmp_path / "out_b" / "neighbours"), artifacts.NEIGHBOURS).to_pylist()
    assert rows and all(r["doc_key"] in bank_keys for r in rows)  # b's own documents are not in a's bank
