"""Querying a built corpus and retrieval-augmented generation (transforms/lib/corpus.py, pipelines/query.py, model/generate.py)."""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import tarfile

import numpy as np
import pytest
import torch

from model.decoder import CM3Config, CM3Decoder
from model.sample import image_to_caption_prompt, text_to_image_prompt
from schemas.records import Neighbour
from schemas.vocab import BREAK, EOD, Vocab
from transforms.lib.layout import Doc
from transforms.lib.retrieve import Candidates, RetrievalRules, select_neighbours

VOCAB = Vocab(num_sentinels=2, text_size=40, image_codes=32, tokens_per_image=8)


def _doc(text: list[int], image: list[int] | None) -> Doc:
    return Doc([VOCAB.text_start + t for t in text], None if image is None else [VOCAB.image_start + c for c in image])


# ---------------------------------------------------------------------------------------------------
# Fast: prompts and selection, no build.


def test_unconditional_stream_is_the_retrieved_documents_without_the_caption():
    docs = [_doc([1, 2], [0] * 8), _doc([3], [5] * 8)]
    caption = [VOCAB.text_start + 7, VOCAB.text_start + 8]
    p = text_to_image_prompt(VOCAB, caption, docs)
    s0 = VOCAB.sentinel(0)
    body = [EOD, *docs[0].text_ids, BREAK, *docs[0].image_ids, BREAK, *docs[1].text_ids, BREAK, *docs[1].image_ids]
    assert p.ids == [*body, BREAK, *caption, BREAK]
    assert p.uncond_ids == [*body, BREAK, s0, BREAK]  # RA-CM3: documents kept, caption masked
    assert p.max_new_tokens == VOCAB.tokens_per_image and p.dropped == ()
    # No documents: the plain CM3Leon streams.
    plain = text_to_image_prompt(VOCAB, caption)
    assert plain.ids == [EOD, *caption, BREAK] and plain.uncond_ids == [EOD, s0, BREAK]


def test_documents_are_dropped_for_length_from_the_first_and_both_streams_keep_the_same_ones():
    docs = [_doc([1] * 6, [0] * 8), _doc([2] * 6, [1] * 8), _doc([3] * 6, [2] * 8)]
    caption = [VOCAB.text_start + 9] * 4
    # Room for the image (8) plus two documents (15 each) and the caption, not three.
    p = text_to_image_prompt(VOCAB, caption, docs, seq_len=8 + 2 + 15 * 2 + 5 + 2)
    assert p.dropped == (0,)
    assert len(p.ids) + VOCAB.tokens_per_image <= 8 + 2 + 15 * 2 + 5 + 2
    assert docs[0].text_ids[0] not in p.ids and docs[0].text_ids[0] not in p.uncond_ids
    assert docs[1].text_ids[0] in p.uncond_ids and docs[2].image_ids[0] in p.uncond_ids


def test_image_to_caption_prompt_places_documents_before_the_masked_caption():
    docs = [_doc([1, 2], [0] * 8)]
    image = [VOCAB.image_start + 3] * 8
    p = image_to_caption_prompt(VOCAB, image, 10, docs)
    s0 = VOCAB.sentinel(0)
    assert p.ids == [EOD, *docs[0].text_ids, BREAK, *docs[0].image_ids, BREAK, s0, BREAK, *image, EOD, s0]
    assert image_to_caption_prompt(VOCAB, image, 10).ids == [EOD, s0, BREAK, *image, EOD, s0]


def _candidates(n: int, mods: list[str]) -> Candidates:
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(n, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    scores = np.linspace(0.8, 0.1, n).tolist()
    return Candidates(list(range(n)), scores, [f"d{i}" for i in range(n)], mods, vecs)


def test_select_neighbours_total_splits_over_vias_and_defaults_to_the_builds_count():
    mods = ["image+text"] * 12
    cands = {"image": _candidates(12, mods), "text": _candidates(12, mods)}
    rules = RetrievalRules(num_retrieved=2, diversity_threshold=1.0)
    default, _ = select_neighbours("q", cands, rules)
    explicit, _ = select_neighbours("q", cands, rules, total=4)
    assert [dataclasses.astuple(n) for n in default] == [dataclasses.astuple(n) for n in explicit]
    assert [n.via for n in default] == ["image", "text", "image", "text"]
    odd, counts = select_neighbours("q", cands, rules, total=3)
    assert [n.via for n in odd] == ["image", "text", "image"] and [c.selected for c in counts] == [2, 1]
    one_via, _ = select_neighbours("q", {"text": cands["text"]}, rules, total=3)
    assert len(one_via) == 3 and all(isinstance(n, Neighbour) for n in one_via)
    assert select_neighbours("q", cands, rules, total=0)[0] == []


def test_bad_generate_flags_are_one_line_errors_naming_the_flag():
    from model.generate import _parser, config_from_args

    base = ["--checkpoint", "c", "--corpus", "o", "--output", "x"]
    for flag, value in (("--top_p", "2"), ("--num_samples", "0"), ("--retrieve", "-1"), ("--cd_k", "0")):
        args = _parser().parse_args([*base, "--prompt", "a red star", flag, value])
        with pytest.raises(SystemExit, match=flag):
            config_from_args(args)
    with pytest.raises(SystemExit, match="--cfg"):
        config_from_args(_parser().parse_args([*base, "--image", "i.png", "--cfg", "3"]))
    gc = config_from_args(_parser().parse_args([*base, "--prompt", "a red star"]))
    assert gc.cfg == 3.0 and gc.retrieve == 2
    assert config_from_args(_parser().parse_args([*base, "--image", "i.png"])).cfg == 1.0


# ---------------------------------------------------------------------------------------------------
# Slow: on a small demo build.


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from pipelines import build_corpus
    from pipelines.demo.command import demo_build_flags
    from pipelines.demo.data import write_demo_corpus

    root = tmp_path_factory.mktemp("gen")
    write_demo_corpus(str(root / "data"), num_examples=160, seed=5, shard_size=80)
    flags = [*demo_build_flags(), "--seq_len=256", "--holdout_fraction=0.1"]
    build_corpus.run(["--input", f"{root}/data/*.tar", "--output", str(root / "out"), *flags])
    vocab = json.loads((root / "out" / "tokenizers" / "vocab.json").read_text())
    torch.manual_seed(0)
    model = CM3Decoder(CM3Config(vocab_size=vocab["size"], seq_len=256, n_layer=1, n_head=2, n_embd=32))
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)  # not the zero init: samples then differ by seed
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config)}, root / "ckpt.pt")
    return root


def _first_image(root) -> bytes:
    with tarfile.open(sorted(glob.glob(f"{root}/data/*.tar"))[0]) as tf:
        name = next(m.name for m in tf.getmembers() if m.name.endswith(".jpg"))
        return tf.extractfile(name).read()


@pytest.mark.slow
def test_query_returns_what_a_direct_faiss_search_returns(built, capsys):
    import faiss
    import pyarrow.parquet as pq

    from pipelines.query import main
    from transforms.lib.clip import resolve_clip
    from transforms.lib.corpus import Corpus, query

    out = str(built / "out")
    index = faiss.read_index(f"{out}/memory_bank/index.faiss")
    keys = pq.read_table(f"{out}/memory_bank/ids.parquet").column("key").to_pylist()
    model, preprocess, tokenizer = resolve_clip("demo", None)  # the CLIP bank.json names, loaded by hand
    with torch.no_grad():
        t = model.encode_text(tokenizer(["a small green star on the left"])).float().numpy()
        from PIL import Image

        pixels = preprocess(Image.open(io.BytesIO(_first_image(built))).convert("RGB"))[None]
        i = model.encode_image(pixels).float().numpy()
    corpus = Corpus(out)
    for vec, kwargs in ((t, {"text": "a small green star on the left"}), (i, {"image": _first_image(built)})):
        vec = vec / np.linalg.norm(vec, axis=1, keepdims=True)
        scores, ids = index.search(vec.astype(np.float32), 6)
        hits = query(corpus, k=6, **kwargs)
        assert [h.key for h in hits] == [keys[j] for j in ids[0]]
        np.testing.assert_allclose([h.score for h in hits], scores[0], atol=1e-5)
        assert all(h.caption == corpus.captions()[h.key] for h in hits)
    # The command prints the same, one JSON object per line.
    main(["--corpus", out, "--text", "a small green star on the left", "--k", "6", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["key"] for r in rows] == [h.key for h in query(corpus, text="a small green star on the left", k=6)]
    assert json.loads((built / "out" / "memory_bank" / "bank.json").read_text())["clip_pretrained"] is not None


@pytest.mark.slow
def test_rules_skip_the_near_duplicate_the_plain_search_ranks_first(built, tmp_path, capsys):
    from pipelines.query import main
    from transforms.lib.corpus import Corpus, query

    corpus = Corpus(str(built / "out"))
    key, caption = next((k, c) for k, c in sorted(corpus.captions().items()) if c)
    plain = query(corpus, text=caption, k=4)
    assert plain[0].score > 0.9  # its own caption: a near-duplicate of the query
    ruled = query(corpus, text=caption, k=4, rules=RetrievalRules())
    assert len(ruled) == 4 and all(h.score <= 0.9 for h in ruled)
    assert plain[0].key not in {h.key for h in ruled}
    main(["--corpus", str(built / "out"), "--text", caption, "--rules", "--k", "4", "--thumbnails", str(tmp_path)])
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:5] == ["rank", "score", "modality", "via", "key"] and len(table) == 5
    pngs = sorted(tmp_path.glob("*.png"))
    assert pngs and all(key not in p.name for p in pngs)  # names from a hash, never the key


@pytest.mark.slow
def test_an_old_bank_without_clip_pretrained_still_opens(built, tmp_path):
    import shutil

    from transforms.lib.corpus import Corpus

    old = tmp_path / "out"
    shutil.copytree(built / "out", old)
    info_path = old / "memory_bank" / "bank.json"
    info = json.loads(info_path.read_text())
    info.pop("clip_pretrained")
    info_path.write_text(json.dumps(info))
    assert len(Corpus(str(old)).search(Corpus(str(old)).embed("a red circle"), 3)) == 3  # demo: no weights needed
    info["clip_model"] = "ViT-B-32"
    info_path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match="--clip_pretrained"):
        Corpus(str(old)).embed("a red circle")
    # The command says the same in one line (the CLIP loads lazily, at the first query), not a traceback.
    from pipelines.query import main

    with pytest.raises(SystemExit, match=r"^cm3corpus query: .*--clip_pretrained"):
        main(["--corpus", str(old), "--text", "a red circle"])


def test_a_query_image_is_prepared_as_the_build_prepares_documents(tmp_path):
    from PIL import Image

    from transforms.lib.corpus import read_image_file

    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent: the build flattens onto white
    rgba.save(tmp_path / "a.png")
    with Image.open(io.BytesIO(read_image_file(str(tmp_path / "a.png")))) as im:
        assert im.mode == "RGB" and im.getpixel((5, 5)) == (255, 255, 255)  # convert("RGB") alone gives black
    tall = Image.new("RGB", (16, 32), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees to display
    tall.save(tmp_path / "r.jpg", exif=exif)
    with Image.open(io.BytesIO(read_image_file(str(tmp_path / "r.jpg")))) as im:
        assert im.size == (32, 16)  # turned as the build turns it
    (tmp_path / "x.jpg").write_bytes(b"not an image")
    with pytest.raises(SystemExit, match=r"^--image: cannot use image .*image_undecodable"):
        read_image_file(str(tmp_path / "x.jpg"))


@pytest.mark.slow
def test_generate_writes_consistent_files_and_a_seeded_rerun_repeats_exactly(built, tmp_path):
    from model.generate import main

    common = ["--checkpoint", str(built / "ckpt.pt"), "--corpus", str(built / "out"), "--prompt", "a red circle"]
    common += ["--num_samples", "3", "--seed", "7", "--batch_size", "2"]
    for name in ("a", "b"):
        assert main([*common, "--output", str(tmp_path / name)]) == 0
    main([*common, "--output", str(tmp_path / "none"), "--retrieve", "0"])
    a, b = tmp_path / "a", tmp_path / "b"
    run = json.loads((a / "run.json").read_text())
    assert (a / "run.json").read_bytes() == (b / "run.json").read_bytes()
    files = [s["file"] for s in run["samples"]]
    assert sorted(p.name for p in a.glob("*.png")) == files == ["sample-00.png", "sample-01.png", "sample-02.png"]
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert len({(a / f).read_bytes() for f in files}) == 3  # seeds differ per sample
    from PIL import Image

    assert all(Image.open(a / f).size == (64, 64) for f in files)
    ranked = sorted(run["samples"], key=lambda s: s["rank"])
    assert [s["clip_score"] for s in ranked] == sorted((s["clip_score"] for s in ranked), reverse=True)
    assert sorted(run["ranking"]) == [0, 1, 2] and run["samples"][run["ranking"][0]]["rank"] == 0
    assert len(run["retrieved"]) == 2 and all(r["score"] <= 0.9 for r in run["retrieved"])
    page = (a / "index.html").read_text()
    assert all(r["key"] in page for r in run["retrieved"]) and page.index(ranked[0]["file"]) < page.index(
        ranked[-1]["file"]
    )
    base = json.loads((tmp_path / "none" / "run.json").read_text())
    assert base["retrieved"] == [] and base["prompt_tokens"] < run["prompt_tokens"]
    assert run["uncond_tokens"] == run["prompt_tokens"] - (base["prompt_tokens"] - base["uncond_tokens"])
    # Sample i's seed comes from (--seed, i) alone, whatever else the run does.
    assert [s["seed"] for s in base["samples"]] == [s["seed"] for s in run["samples"]]


@pytest.mark.slow
def test_image_to_caption_writes_scored_captions(built, tmp_path):
    from model.generate import main

    image = tmp_path / "q.jpg"
    image.write_bytes(_first_image(built))
    args = ["--checkpoint", str(built / "ckpt.pt"), "--corpus", str(built / "out"), "--image", str(image)]
    main([*args, "--num_samples", "2", "--max_caption_tokens", "6", "--output", str(tmp_path / "cap")])
    run = json.loads((tmp_path / "cap" / "run.json").read_text())
    assert run["mode"] == "image-to-caption" and len(run["samples"]) == 2
    ranked = sorted(run["samples"], key=lambda s: s["rank"])
    for s in ranked:  # an empty caption is unscored and ranked after every scored one
        assert isinstance(s["caption"], str) and (s["clip_score"] is None) == (not s["caption"].strip())
    scored = [s["clip_score"] for s in ranked if s["clip_score"] is not None]
    assert scored == sorted(scored, reverse=True) and ranked[: len(scored)] == [
        s for s in ranked if s["caption"].strip()
    ]
    assert not list((tmp_path / "cap").glob("*.png"))
