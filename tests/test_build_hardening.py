"""`cm3corpus build` against careless flags and hostile inputs (issue 16): one-line errors before any
work, inputs never touched, every row and sample counted, corpora with no image, bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap

import pytest

from pipelines import build_corpus
from pipelines.demo.command import demo_build_flags
from schemas import artifacts
from tests.badinputs import add_member, encode, rgb, write_tar
from transforms.lib.io import read_table


def run_build(inp, out, *extra):
    return build_corpus.run(["--input", str(inp), "--output", str(out), *demo_build_flags(), *extra])


@pytest.fixture
def tar(tmp_path):
    path = tmp_path / "in" / "00000.tar"
    path.parent.mkdir()
    write_tar(path, [("a", {"jpg": encode(rgb(), "JPEG"), "txt": b"a caption"})])
    return path


# (extra flags, or a callable making (input, output) from tmp_path; the flag the one-line error must name)
BAD_FLAGS = [
    (["--shard_max_samples", "0"], "--shard_max_samples"),
    (["--shard_max_bytes", "-1"], "--shard_max_bytes"),
    (["--embed_batch_size", "0"], "--embed_batch_size"),
    (["--image_patch_size", "0"], "--image_patch_size"),
    (["--image_codebook_size", "0"], "--image_codebook_size"),
    (["--image_size", "4"], "--image_size"),
    (["--image_size", "60"], "--image_size"),  # not a multiple of the 8 px patch
    (["--holdout_fraction", "1"], "--holdout_fraction"),
    (["--holdout_fraction", "2"], "--holdout_fraction"),
    (["--query_dropout", "1.5"], "--query_dropout"),
    (["--max_similarity", "nan"], "--max_similarity"),
    (["--diversity_threshold", "inf"], "--diversity_threshold"),
    (["--seq_len", "40"], "--seq_len"),  # a 64 px image is 64 tokens
    (["--retrieval_topk", "0"], "--retrieval_topk"),
    (["--num_retrieved", "0"], "--num_retrieved"),
    (["--max_image_bytes", "0"], "--max_image_bytes"),
    (["--tokenizer_fit_images", "0"], "--tokenizer_fit_images"),
]


@pytest.mark.parametrize("extra,flag", BAD_FLAGS, ids=[" ".join(e) for e, _ in BAD_FLAGS])
def test_bad_flag_values_are_one_line_errors_before_any_work(tar, tmp_path, extra, flag):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        run_build(tar, out, *extra)
    message = str(e.value)
    assert message.startswith("cm3corpus build: ") and flag in message and "\n" not in message, message
    assert not out.exists()  # refused before anything was written


def test_bad_inputs_and_outputs_are_one_line_errors(tar, tmp_path):
    (tmp_path / "notes.xyz").write_text("?")
    (tmp_path / "afile").write_text("not a folder")
    cases = [
        ([str(tmp_path / "nothing-*.tar")], str(tmp_path / "o1"), "matches no file"),
        ([str(tmp_path / "notes.xyz")], str(tmp_path / "o2"), "cannot tell the format"),
        ([str(tar)], str(tmp_path / "afile"), "is a file"),
        (["nosuchprotocol://bucket/*.tar"], str(tmp_path / "o3"), "--input"),
    ]
    for inputs, out, words in cases:
        with pytest.raises(SystemExit) as e:
            build_corpus.run([f"--input={i}" for i in inputs] + ["--output", out, *demo_build_flags()])
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_an_output_overlapping_an_input_is_refused_and_the_input_untouched(tmp_path):
    ds = tmp_path / "ds"
    (ds / "shards").mkdir(parents=True)
    write_tar(ds / "shards" / "00000.tar", [("a", {"txt": b"a caption"})])
    before = (ds / "shards" / "00000.tar").read_bytes()
    for inp, out, words in [
        (f"{ds}/shards/*.tar", ds, "holds the input"),  # the build would replace ds/shards
        (f"{ds}/shards/00000.tar", ds / "shards", "holds the input"),
        (str(ds), ds / "built", "lies inside the input folder"),  # a rerun would read ds/built/shards
        (str(ds / "shards"), ds / "shards", "holds the input"),
    ]:
        with pytest.raises(SystemExit, match=words):
            run_build(inp, out)
    assert (ds / "shards" / "00000.tar").read_bytes() == before
    assert sorted(p.name for p in ds.iterdir()) == ["shards"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["text_only", "all_rejected"])
def test_a_corpus_with_no_usable_image_builds_and_is_accounted(tmp_path, kind):
    if kind == "text_only":
        samples = [(f"t{i}", {"txt": f"caption {i} of a red circle".encode()}) for i in range(6)]
    else:
        samples = [(f"b{i}", {"jpg": b"not an image", "txt": b"\xff"}) for i in range(4)]
    write_tar(tmp_path / "in.tar", samples)
    out = tmp_path / "out"
    stats = run_build(tmp_path / "in.tar", out)
    on_disk = json.loads((out / "stats.json").read_text())
    if kind == "all_rejected":  # the command fails, after writing what says why
        argv = ["--input", str(tmp_path / "in.tar"), "--output", str(tmp_path / "again"), *demo_build_flags()]
        assert build_corpus.main(argv) == 1 and (tmp_path / "again" / "stats.json").exists()
    assert on_disk["accounted"] and on_disk["examples_read"] == len(samples)
    assert on_disk["counters"]["tokenizers/image_tokenizer_unfitted"] == 1  # the stats say so
    rejects = read_table(str(out / "rejects"), artifacts.REJECTS).to_pylist()
    assert len(rejects) == stats["examples_rejected"] == (0 if kind == "text_only" else len(samples))
    assert stats["examples_written"] == (len(samples) if kind == "text_only" else 0)


@pytest.mark.slow
def test_hostile_tar_and_manifest_rows_are_each_counted_and_the_rejects_written(tmp_path):
    jpg = encode(rgb(), "JPEG")
    shard = tmp_path / "in" / "00000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tf:
        for name, data in [
            ("good.jpg", jpg),
            ("good.txt", b"a good caption"),
            ("a b.txt", b"the caption of a b"),
            ("a_b.jpg", jpg),  # reduces to a_b as well: a second sample, then a duplicate_key
            ("case.jpg", jpg),
            ("case.JPG", encode(rgb(seed=3), "JPEG")),
            ("\udcffname.jpg", b"not an image"),  # a name that is not UTF-8, on a rejected sample
        ]:
            add_member(tf, name, data)
    lines = [
        b'{"key": "m1", "caption": "first row"}',
        b'{"key": "m2", "caption": "bad \xff byte"}',
        b'{"key": "m3", "caption": "lone \\ud800"}',
        b'{"key": "m4", "caption": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"key": "m5", "caption": "last row"}',
    ]
    (tmp_path / "in" / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    stats = build_corpus.run(
        ["--input", str(shard), "--input", str(tmp_path / "in" / "m.jsonl"), "--output", str(out)] + demo_build_flags()
    )
    rejects = read_table(str(out / "rejects"), artifacts.REJECTS).to_pylist()
    got = sorted((r["key"], r["reason"]) for r in rejects)
    assert got == sorted(
        [
            ("a_b", "duplicate_key"),
            ("case", "duplicate_member"),
            ("_name", "image_undecodable"),
            ("m_000000001", "bad_manifest_row"),
            ("m_000000002", "bad_manifest_row"),
            ("m_000000003", "bad_manifest_row"),
        ]
    )
    assert any("\\xffname" in r["source"] for r in rejects)
    assert stats["examples_read"] == 5 + 5 and stats["examples_written"] == 2 + 2  # good, "a b"; m1, m5
    assert json.loads((out / "stats.json").read_text())["accounted"]


# ---------------------------------------------------------------------------------------------
# Bounded memory: the worst inputs above, made large, in a child build whose peak RSS is measured.

# The caps. A whole build's peak comes from its later stages (CLIP, k-means), so it is also measured
# for the read stage alone, where the hostile bytes arrive: there the old reader held each 256 MiB
# header, line or member whole (about 950 MiB peak each), and a whole parquet row group (820 MiB).
BUILD_EXTRA_MIB = 300  # a whole hostile build over a benign one
READ_EXTRA_MIB = 128  # the read stage over a benign read; the parquet's 24 MiB cells cost about 4 cells

_BUILD_CHILD = textwrap.dedent(
    """
    import resource, sys
    from pipelines import build_corpus
    from pipelines.demo.command import demo_build_flags
    build_corpus.run(["--output", sys.argv[1], "--max_image_bytes=1048576", *demo_build_flags(), *sys.argv[2:]])
    print("MAXRSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """
)

# The read stage as ReadExamples runs it on a worker: read, fetch, validate each unit's samples.
_READ_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    from pipelines.options import BuildConfig
    from schemas.records import RawSample
    from transforms.lib.read import _budgets, expand_inputs, fetch_parts, read_unit
    from transforms.lib.validate import validate
    cfg = BuildConfig(input=tuple(a.split("=", 1)[1] for a in sys.argv[2:]), output="unused", max_image_bytes=2**20)
    budgets = _budgets(cfg)
    for unit in expand_inputs(cfg.input):
        for item in read_unit(unit, cfg):
            if isinstance(item, RawSample) and item.paths:
                item = fetch_parts(item, budgets)
            if isinstance(item, RawSample):
                validate(item, budgets)
    print("MAXRSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """
)


def _peak_rss_mib(out, inputs, child: str = _BUILD_CHILD) -> float:
    argv = [sys.executable, "-c", child, str(out)] + [f"--input={i}" for i in inputs]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env, cwd=os.getcwd())
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("MAXRSS_KIB")]
    return int(line.split()[1]) / 1024


def _hostile_inputs(root) -> list[str]:
    """Each input claims or holds hundreds of MB, compressed or declared, against a 1 MiB image budget."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    jpg = encode(rgb(), "JPEG")
    big = 256 * 2**20
    with tarfile.open(root / "long.tar.gz", "w:gz", format=tarfile.GNU_FORMAT, compresslevel=1) as tf:
        add_member(tf, "ok.jpg", jpg)
        add_member(tf, "ok.txt", b"kept")
        info = tarfile.TarInfo("n" * big + ".txt")  # a 256 MiB GNU long name, a few hundred KiB gzipped
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    with tarfile.open(root / "pax.tar.gz", "w:gz", format=tarfile.PAX_FORMAT, compresslevel=1) as tf:
        info = tarfile.TarInfo("p.txt")
        info.pax_headers = {"comment": "c" * big}
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    with tarfile.open(root / "members.tar.gz", "w:gz", compresslevel=1) as tf:
        add_member(tf, "w.jpg", jpg)
        add_member(tf, "w.txt", b" " * big)  # white space past the sample budget: refused from its header
        for i in range(300):  # 300 unused members of 1 MiB each: counted, never kept
            add_member(tf, f"u.b{i:03d}", b"\0" * 2**20)
        add_member(tf, "s.jpg", jpg)
        add_member(tf, "s.json", b" " * (64 * 2**20))  # a 64 MiB sidecar: member_too_large, unread
    (root / "rows.jsonl").write_bytes(b'{"caption": "' + b"z" * big + b'"}\n{"caption": "after the long line"}\n')
    rows = [{"key": f"p{i}", "image_path": b"\0" * (24 * 2**20), "caption": "big cell"} for i in range(8)]
    rows.append({"key": "p_ok", "image_path": jpg, "caption": "a fine row"})
    # One page per cell, as a writer with a page-size limit makes them: the reader holds one batch of cells.
    pq.write_table(pa.Table.from_pylist(rows), root / "cells.parquet", write_batch_size=1, compression="zstd")
    return [str(root / n) for n in ("long.tar.gz", "pax.tar.gz", "members.tar.gz", "rows.jsonl", "cells.parquet")]


@pytest.mark.slow
def test_hostile_inputs_build_in_bounded_memory(tmp_path):
    benign = tmp_path / "benign" / "00000.tar"
    benign.parent.mkdir()
    write_tar(benign, [(f"k{i}", {"jpg": encode(rgb(seed=i), "JPEG"), "txt": b"caption"}) for i in range(8)])
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    inputs = [str(benign), *_hostile_inputs(hostile)]
    read_base = _peak_rss_mib(tmp_path / "unused", [str(benign)], _READ_CHILD)
    read_worst = _peak_rss_mib(tmp_path / "unused", inputs, _READ_CHILD)
    assert read_worst - read_base < READ_EXTRA_MIB, f"read stage: benign {read_base:.0f}, hostile {read_worst:.0f} MiB"
    base = _peak_rss_mib(tmp_path / "out_benign", [str(benign)])
    worst = _peak_rss_mib(tmp_path / "out_hostile", inputs)
    assert worst - base < BUILD_EXTRA_MIB, f"build: benign {base:.0f} MiB, hostile {worst:.0f} MiB"
    stats = json.loads((tmp_path / "out_hostile" / "stats.json").read_text())
    # benign 8; long and pax: the sample being read when the header came; w, u, s; 2 lines; 9 rows
    assert stats["accounted"] and stats["examples_read"] == 8 + 1 + 1 + 3 + 2 + 9
    assert stats["rejects_by_reason"] == {
        "bad_manifest_row": 1,  # the 256 MiB line; the line after it is kept
        "image_too_large": 8,  # the 24 MiB parquet cells; the fine row beside them is kept
        "member_too_large": 1,  # the 64 MiB .json sidecar
        "sample_too_large": 2,  # 300 unused members of one key; the 256 MiB white-space caption
        "shard_unreadable": 2,  # the 256 MiB GNU long name and PAX header
    }
