"""transforms/embed.py and transforms/lib/{clip,embed}.py: the CLIP handler, the fast text path, the Beam stage and
the parquet rows."""

from __future__ import annotations

import io

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from schemas.artifacts import embeddings_schema
from schemas.records import IMAGE_ONLY, IMAGE_TEXT, TEXT_ONLY, Example
from transforms import embed
from transforms.lib import clip_lean
from transforms.lib.clip import ClipWeightsUnavailable, clip_embed_dim, resolve_clip
from transforms.lib.demo_clip import CONFIG_PATH
from transforms.lib.embed import ClipEmbedder, dropout_tokens, embedding_row

# The demo architecture with random weights: every code path, no checkpoint, loads in well under a second.
ARCH = str(CONFIG_PATH)


def _jpeg(rgb: tuple[int, int, int], size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, "JPEG")
    return buf.getvalue()


def _examples() -> list[Example]:
    return [
        Example("both", "t.tar::both", "a red circle at the top left of a big blue square", _jpeg((255, 0, 0))),
        Example("img", "t.tar::img", None, _jpeg((0, 0, 255))),
        Example("txt", "t.tar::txt", "a small green triangle", None),
    ]


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return resolve_clip(ARCH, "none")


@pytest.fixture(scope="module")
def embedder(clip):
    return ClipEmbedder(*clip)


def _handler(**kw) -> embed.ClipModelHandler:
    return embed.ClipModelHandler(ARCH, "none", **kw)


def test_embeddings_unit_norm_doc_rule_and_modality(embedder):
    results = {e.key: r for e, r in zip(_examples(), _handler().embed_batch(_examples(), embedder), strict=True)}
    both, img, txt = results["both"], results["img"], results["txt"]
    assert (both.modality, img.modality, txt.modality) == (IMAGE_TEXT, IMAGE_ONLY, TEXT_ONLY)
    for e in results.values():
        for v in (e.image_emb, e.text_emb, e.doc_emb, e.query_text_emb):
            if v is not None:
                assert v.dtype == np.float32 and abs(np.linalg.norm(v) - 1) < 1e-5
    mean = (both.image_emb + both.text_emb) / 2
    np.testing.assert_allclose(both.doc_emb, mean / np.linalg.norm(mean), atol=1e-6)
    assert img.text_emb is None and img.query_text_emb is None
    np.testing.assert_array_equal(img.doc_emb, img.image_emb)
    assert txt.image_emb is None
    np.testing.assert_array_equal(txt.doc_emb, txt.text_emb)


def test_query_dropout_seeded_on_content_tokens(embedder, clip):
    _, _, tokenizer = clip
    tokens = tokenizer(["one two three four five six seven eight nine ten"])
    dropped = dropout_tokens(tokens, ["k"], 0.2, seed=0)
    ids, kept = tokens[0][tokens[0] != 0].tolist(), dropped[0][dropped[0] != 0].tolist()
    assert kept[0] == ids[0] and kept[-1] == ids[-1]  # start and end tokens stay
    assert len(kept) == len(ids) - 2 and set(kept) <= set(ids)  # 20% of the 10 content tokens
    assert torch.equal(dropped, dropout_tokens(tokens, ["k"], 0.2, seed=0))
    (_, text, query), (_, _, same) = (
        embedder.embed([("k", None, "one two three four five six seven")], 0, 0.2)[0],
        (embedder.embed([("k", None, "one two three four five six seven")], 0, 0.0)[0]),
    )
    assert not np.allclose(text, query)
    np.testing.assert_allclose(text, same, atol=1e-6)  # rate 0: the query is the caption


def test_fast_text_matches_encode_text(clip):
    model, _, tokenizer = clip
    captions = ["a", "a red circle", "a small blue square at the top left of a large green triangle " * 3, ""]
    tokens = tokenizer(captions)
    with torch.inference_mode():
        diff = (clip_lean.fast_encode_text(model, tokens) - model.encode_text(tokens)).abs().max().item()
    assert diff < 1e-5
    assert clip_lean.fast_text_applies(model, tokenizer)


def test_fast_text_falls_back_where_it_does_not_apply(clip):
    model, _, tokenizer = clip
    model.text_pool_type = "last"  # pooling the last (padded) position: slicing would change the result
    try:
        assert not clip_lean.fast_text_applies(model, tokenizer)
        assert not ClipEmbedder(model, *clip[1:]).fast_text
    finally:
        model.text_pool_type = "argmax"


def test_undecodable_image_is_an_error_for_that_example_only(embedder):
    bad = Example("bad", "t.tar::bad", "a caption", b"\xff\xd8 not really a jpeg")
    empty = Example("empty", "t.tar::empty", None, None)
    batch = [*_examples(), bad, empty]
    results = {e.key: r for e, r in zip(batch, _handler().embed_batch(batch, embedder), strict=True)}
    assert isinstance(results["bad"], str) and results["bad"].startswith("image_undecodable")
    assert isinstance(results["empty"], str)
    assert results["both"].image_emb is not None


def test_an_undecodable_image_does_not_keep_its_batch_alive(embedder):
    # The failure comes back as a string, not the exception: a kept exception's traceback holds the frame
    # that holds the batch's decoded pixels, a cycle only Python's rare full collection frees (the Embed
    # stage's memory grew with the corpus). With the collector off, the pixels must go with the list.
    import gc
    import weakref

    gc.collect()
    gc.disable()
    try:
        out = embedder._decode_all([_jpeg((0, 255, 0)), b"\xff\xd8 not really a jpeg"])
        assert isinstance(out[1], str) and out[1].startswith("UnidentifiedImageError")
        pixels = weakref.ref(out[0])
        del out
        assert pixels() is None
    finally:
        gc.enable()


def test_embedding_rows_round_trip_parquet_with_nulls(embedder, tmp_path):
    results = _handler().embed_batch(_examples(), embedder)
    dim = clip_embed_dim(ARCH)
    schema = embeddings_schema(dim)
    table = pa.Table.from_pylist([embedding_row(e) for e in results], schema=schema)
    # pyarrow 25 cannot read back a null fixed-size list stored with its Arrow schema (apache/arrow#35692):
    # stored as plain lists, read, then cast to the artifact schema.
    pq.write_table(table, tmp_path / "e.parquet", store_schema=False)
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "e.parquet").cast(schema).to_pylist()}
    assert rows["img"]["text_emb"] is None and rows["img"]["caption"] is None
    assert rows["txt"]["image_emb"] is None
    assert rows["both"]["modality"] == IMAGE_TEXT and len(rows["both"]["doc_emb"]) == dim
    np.testing.assert_allclose(rows["both"]["doc_emb"], results[0].doc_emb, atol=1e-3)  # float16 storage


def test_pipeline_loads_model_once_and_rejects_bad_image():
    good = [Example(f"k{i}", f"t.tar::k{i}", f"caption number {i}", _jpeg((i * 20, 0, 0))) for i in range(9)]
    bad = Example("bad", "t.tar::bad", "a caption", b"GIF89a truncated")
    before = embed.MODEL_LOADS[ARCH]
    p = TestPipeline()
    embedded, rejects = p | beam.Create([*good, bad]) | embed.EmbedExamples(ARCH, "none", batch_size=4)
    assert_that(embedded | "Keys" >> beam.Map(lambda e: e.key), equal_to([e.key for e in good]))
    assert_that(
        rejects | "Reasons" >> beam.Map(lambda r: (r.key, r.reason)), equal_to([("bad", "stage_error")]), label="Rej"
    )
    result = p.run()
    result.wait_until_finish()
    assert embed.MODEL_LOADS[ARCH] - before == 1  # three batches, one load
    loads = result.metrics().query(MetricsFilter().with_name("clip_model_loads"))["counters"]
    assert sum(c.committed for c in loads) == 1


def test_missing_weights_give_a_plain_error(monkeypatch):
    with pytest.raises(ClipWeightsUnavailable, match="--clip_model demo"):
        resolve_clip("ViT-B-32", "/nonexistent/open_clip_pytorch_model.bin")
    with pytest.raises(ClipWeightsUnavailable, match="not a pretrained tag"):
        resolve_clip("ViT-B-32", "no_such_tag")
    # A real tag, not cached, hub unreachable: no waiting on retries, the same plain error.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr("transforms.lib.clip._cached_pretrained", lambda pcfg: None)
    with pytest.raises(ClipWeightsUnavailable, match="--clip_pretrained /path/to/open_clip_pytorch_model.bin"):
        resolve_clip("RN50", "yfcc15m")


def test_unreachable_weights_host_fails_in_seconds_not_after_retries(monkeypatch):
    import socket
    import time

    def refuse(address, timeout=None):
        raise OSError(f"no route to {address[0]}")

    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr("transforms.lib.clip._cached_pretrained", lambda pcfg: None)
    start = time.monotonic()
    with pytest.raises(ClipWeightsUnavailable, match="huggingface.co:443 is unreachable.*--clip_model demo"):
        resolve_clip("ViT-B-32", "laion2b_s34b_b79k")
    assert time.monotonic() - start < 5  # no download attempted


def test_demo_resolves_to_the_shipped_checkpoint():
    model, preprocess, tokenizer = resolve_clip("demo", "laion2b_s34b_b79k")  # the build's default tag is ignored
    assert not model.training
    assert clip_embed_dim("demo") == model.text_projection.shape[1]
