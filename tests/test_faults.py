"""Faults a long distributed build meets: a kill mid-run, one bad element deep in the pipeline,
an output folder that already holds a run, and code that must pickle to reach remote workers."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import apache_beam as beam
import pytest

from pipelines import build_corpus
from pipelines.demo.command import demo_build_flags
from pipelines.demo.data import write_demo_corpus
from pipelines.options import BuildConfig
from transforms.lib.read import expand_inputs

NUM_EXAMPLES = 160


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    write_demo_corpus(str(root / "data"), num_examples=NUM_EXAMPLES, seed=5, shard_size=40)
    return root


def argv(data: Path, out: Path) -> list[str]:
    return ["--input", f"{data}/*.tar", "--output", str(out), *demo_build_flags(), "--shard_max_samples=50"]


def snapshot(out: Path) -> dict[str, bytes]:
    """Every finished artifact's bytes (timings in stats.json and report.html aside)."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and build_corpus.STAGING not in p.parts and p.name not in ("stats.json", "report.html")
    }


def start(data: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipelines.build_corpus", *argv(data, out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


@pytest.mark.slow
def test_kill_at_random_points_then_rerun_gives_the_uninterrupted_bytes(corpus, tmp_path):
    reference = tmp_path / "reference"
    began = time.monotonic()
    assert start(corpus / "data", reference).wait(timeout=300) == 0
    duration = time.monotonic() - began  # imports included: kill points spread over the whole command
    expected = snapshot(reference)
    assert len(expected) > 10

    out = tmp_path / "out"
    rng = random.Random(7)
    for _ in range(2):  # first into an empty folder, then over a finished run
        proc = start(corpus / "data", out)
        time.sleep(rng.uniform(0.4, 0.9) * duration)
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished before the signal
        visible = snapshot(out)
        # Nothing half-written is ever visible: either no artifact yet, or a whole earlier run.
        assert visible in ({}, expected)
        assert not [p for p in out.rglob("*.tmp*") if build_corpus.STAGING not in p.parts]
        done = start(corpus / "data", out)
        assert done.wait(timeout=300) == 0
        assert snapshot(out) == expected
        assert not (out / build_corpus.STAGING).exists()


def test_an_exception_on_one_element_lands_in_rejects_and_the_rest_completes(corpus, tmp_path, monkeypatch):
    import transforms.tokenize as tokenize  # the stage binds encode_caption at import

    real = tokenize.encode_caption
    victim = {}

    def flaky(text_tok, vocab, caption):
        if caption.startswith(victim.setdefault("caption", caption)):  # the first caption seen, every time
            raise RuntimeError("injected fault")
        return real(text_tok, vocab, caption)

    monkeypatch.setattr(tokenize, "encode_caption", flaky)
    stats = build_corpus.run(argv(corpus / "data", tmp_path / "out"))
    assert stats["rejects_by_reason"].get("stage_error", 0) >= 1
    assert stats["examples_written"] >= NUM_EXAMPLES - stats["rejects_by_reason"]["stage_error"]
    assert stats["examples_read"] == stats["examples_written"] + stats["examples_rejected"] == NUM_EXAMPLES
    import pyarrow.parquet as pq

    rejects = pq.read_table(tmp_path / "out" / "rejects").to_pylist()
    assert rejects and all("injected fault" in r["detail"] for r in rejects)


def test_every_transform_pickles_for_remote_workers(corpus, tmp_path):
    from apache_beam.internal import pickler
    from apache_beam.options.pipeline_options import PipelineOptions

    options = PipelineOptions(argv(corpus / "data", tmp_path / "out"))
    cfg = BuildConfig.from_options(options)
    p = beam.Pipeline(options=options)
    build_corpus.build_pipeline(p, cfg, expand_inputs(cfg.input))
    proto = p.to_runner_api()  # pickles every DoFn, CombineFn and side-input function, as a runner does
    pardos = [t for t in proto.components.transforms.values() if t.spec.urn == "beam:transform:pardo:v1"]
    assert len(pardos) > 20
    for transform in p.transforms_stack[0].parts:
        pickler.loads(pickler.dumps(transform.transform))


def test_an_example_failing_in_two_branches_is_rejected_once(corpus, tmp_path, monkeypatch):
    import tarfile

    import pyarrow.parquet as pq

    import transforms.lib.embed as embed
    import transforms.tokenize as tokenize  # the stage binds encode_caption at import

    with tarfile.open(sorted((corpus / "data").glob("*.tar"))[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".txt"))
        victim_key, victim_caption = member.name.rsplit(".", 1)[0], tar.extractfile(member).read().decode().strip()
    real_encode, real_embed = tokenize.encode_caption, embed.ClipEmbedder.embed

    def failing_encode(text_tok, vocab, caption):
        if caption == victim_caption:
            raise RuntimeError("injected tokenize fault")
        return real_encode(text_tok, vocab, caption)

    def failing_embed(self, items, seed, dropout):
        out = real_embed(self, items, seed, dropout)
        return ["injected embed fault" if key == victim_key else r for (key, _, _), r in zip(items, out, strict=True)]

    monkeypatch.setattr(tokenize, "encode_caption", failing_encode)
    monkeypatch.setattr(embed.ClipEmbedder, "embed", failing_embed)
    stats = build_corpus.run(argv(corpus / "data", tmp_path / "out"))
    rejects = [r for r in pq.read_table(tmp_path / "out" / "rejects").to_pylist() if r["key"] == victim_key]
    assert len(rejects) == 1, rejects
    assert "injected embed fault" in rejects[0]["detail"] and "injected tokenize fault" in rejects[0]["detail"]
    assert stats["accounted"] and stats["examples_read"] == NUM_EXAMPLES
