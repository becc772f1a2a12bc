"""Text BPE and patch-VQ image tokenizers: exact round trips, determinism, safe files."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image, ImageDraw

from schemas.vocab import Vocab
from transforms.lib.tokenize import (
    IMAGE_TOKENIZER_FILE,
    TEXT_TOKENIZER_FILE,
    VOCAB_FILE,
    ImageTokenizer,
    PatchVQTokenizer,
    build_vocab,
    decode_image,
    decode_text,
    encode_caption,
    encode_image,
    fit_patch_vq,
    fit_text_tokenizer,
    load_image_tokenizer,
    load_tokenizers,
    psnr,
    unique_rows,
    write_tokenizers,
)

CAPTIONS = sorted(
    f"a {size} {colour} {shape} on a {bg} background"
    for size in ("small", "large")
    for colour in ("red", "green", "blue")
    for shape in ("circle", "square", "triangle")
    for bg in ("white", "grey")
)

_COLOURS = ((220, 40, 40), (40, 160, 60), (40, 60, 220), (230, 200, 40), (160, 60, 200))


def shapes(n: int, seed: int, size: int = 64) -> list[Image.Image]:
    """Simple drawn scenes: two filled circles/squares/triangles on a light background."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        im = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(180, 256, 3)))
        draw = ImageDraw.Draw(im)
        for _ in range(2):
            x, y = (int(v) for v in rng.integers(4, size - 24, 2))
            r = int(rng.integers(8, 20))
            colour = _COLOURS[int(rng.integers(len(_COLOURS)))]
            kind = int(rng.integers(3))
            if kind == 0:
                draw.ellipse([x, y, x + r, y + r], fill=colour)
            elif kind == 1:
                draw.rectangle([x, y, x + r, y + r], fill=colour)
            else:
                draw.polygon([(x, y + r), (x + r, y + r), (x + r // 2, y)], fill=colour)
        out.append(im)
    return out


@pytest.fixture(scope="module")
def text_tok():
    return fit_text_tokenizer(CAPTIONS, 300)


@pytest.fixture(scope="module")
def image_tok():
    return fit_patch_vq(shapes(24, seed=0), codebook_size=128, image_size=64, patch_size=4, seed=0, niter=10)


@pytest.mark.parametrize(
    "caption",
    ["a small red circle on a white background", "  Héllo\n\tWÖRLD 🙂 ", "日本語", "", "x  y   ", "<eod> <break>"],
)
def test_caption_round_trip_is_exact(text_tok, caption):
    vocab = build_vocab(text_tok, PatchVQTokenizer(np.zeros((4, 48), np.uint8), 16, 4), num_sentinels=4)
    ids = encode_caption(text_tok, vocab, caption)
    assert all(vocab.text_start <= i < vocab.image_start for i in ids)
    assert decode_text(text_tok, vocab, ids) == caption


def test_text_tokenizer_has_no_specials_and_learns_merges(text_tok):
    assert text_tok.get_added_tokens_decoder() == {}
    assert 256 < text_tok.get_vocab_size() <= 300
    assert len(text_tok.encode("a small red circle").ids) < len("a small red circle")


def test_text_fit_is_deterministic_across_processes():
    script = (
        "import hashlib; from transforms.lib.tokenize import fit_text_tokenizer; "
        f"t = fit_text_tokenizer({CAPTIONS!r}, 300); print(hashlib.sha256(t.to_str().encode()).hexdigest())"
    )
    runs = {
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    }
    assert len(runs) == 1


def test_decode_text_rejects_non_text_ids(text_tok, image_tok):
    vocab = build_vocab(text_tok, image_tok, num_sentinels=2)
    with pytest.raises(ValueError):
        decode_text(text_tok, vocab, [vocab.image_start])


def test_image_round_trip_within_psnr(image_tok):
    held_out = shapes(8, seed=1)
    codes = image_tok.encode(held_out)
    assert codes.shape == (8, 256) and codes.dtype == np.int32
    assert 0 <= codes.min() and codes.max() < image_tok.num_codes
    decoded = image_tok.decode(codes)
    scores = [psnr(np.asarray(a), np.asarray(b)) for a, b in zip(held_out, decoded, strict=True)]
    # Measured: mean 25.4 dB, min 23.3 dB (128 codes, 4px patches, held-out 64px scenes).
    assert min(scores) > 21.0, scores


def test_image_ids_round_trip_through_vocab(text_tok, image_tok):
    vocab = build_vocab(text_tok, image_tok, num_sentinels=2)
    image = shapes(1, seed=3)[0]
    ids = encode_image(image_tok, vocab, image)
    assert len(ids) == vocab.tokens_per_image == 256
    assert all(vocab.image_start <= i < vocab.size for i in ids)
    assert psnr(np.asarray(decode_image(image_tok, vocab, ids)), np.asarray(image)) > 20.0
    with pytest.raises(ValueError):
        decode_image(image_tok, vocab, ids[:-1])


def test_encode_is_exact_nearest_code(image_tok):
    patches = image_tok.patches(shapes(1, seed=5)[0])
    dist = ((patches[:, None, :].astype(np.int64) - image_tok.codebook[None].astype(np.int64)) ** 2).sum(-1)
    assert np.array_equal(image_tok.nearest(patches), dist.argmin(1))


def test_encode_searches_each_distinct_patch_once_with_the_same_codes(image_tok, monkeypatch):
    # Repeated patches (flat backgrounds, the same image twice) are searched once; every code equals the
    # exact per-patch search, and an image's codes do not depend on what else is in its batch.
    images = shapes(3, seed=11)
    flat = Image.new("RGB", images[0].size, (200, 30, 90))
    batch = [images[0], flat, images[1], images[0], images[2]]
    searched = []
    nearest = image_tok.nearest
    monkeypatch.setattr(image_tok, "nearest", lambda p, **kw: searched.append(len(p)) or nearest(p, **kw))
    codes = image_tok.encode(batch)
    all_patches = np.concatenate([image_tok.patches(im) for im in batch])
    assert searched == [len(np.unique(all_patches, axis=0))] and searched[0] < len(all_patches)
    monkeypatch.undo()
    assert np.array_equal(codes.reshape(-1), image_tok.nearest(all_patches))
    assert len(set(codes[1].tolist())) == 1 and np.array_equal(codes[0], codes[3])
    for i, im in enumerate(batch):
        assert np.array_equal(image_tok.encode([im])[0], codes[i])


def test_unique_rows_inverse_rebuilds_the_rows():
    rng = np.random.default_rng(3)
    rows = rng.integers(0, 4, size=(500, 6), dtype=np.uint8)
    unique, inverse = unique_rows(rows, inverse=True)
    assert np.array_equal(unique, np.unique(rows, axis=0)) and len(unique) < len(rows)
    assert inverse.shape == (500,) and np.array_equal(unique[inverse], rows)


def test_patch_vq_fit_is_seeded():
    images = shapes(6, seed=0)
    a = fit_patch_vq(images, 32, 32, 8, seed=1, niter=5)
    b = fit_patch_vq(images, 32, 32, 8, seed=1, niter=5)
    assert np.array_equal(a.codebook, b.codebook)
    assert isinstance(a, ImageTokenizer)


def test_fit_with_fewer_patches_than_codes():
    tok = fit_patch_vq(shapes(1, seed=0), codebook_size=64, image_size=16, patch_size=4, seed=0, niter=2)
    assert tok.num_codes == 64 and tok.tokens_per_image == 16


def test_files_round_trip_byte_identical_and_pickle_free(tmp_path, text_tok, image_tok):
    vocab = build_vocab(text_tok, image_tok, num_sentinels=8)
    write_tokenizers(str(tmp_path / "a"), text_tok, image_tok, vocab)
    write_tokenizers(str(tmp_path / "b"), text_tok, image_tok, vocab)
    for name in (TEXT_TOKENIZER_FILE, IMAGE_TOKENIZER_FILE, VOCAB_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with zipfile.ZipFile(tmp_path / "a" / IMAGE_TOKENIZER_FILE) as z:
        for name in z.namelist():
            arr = np.load(z.open(name), allow_pickle=False)  # raises on any object array
            assert arr.dtype != object
    t2, i2, v2 = load_tokenizers(str(tmp_path / "a"))
    assert v2 == vocab == Vocab.from_json((tmp_path / "a" / VOCAB_FILE).read_text())
    assert np.array_equal(i2.codebook, image_tok.codebook)
    caption = CAPTIONS[3]
    assert encode_caption(t2, v2, caption) == encode_caption(text_tok, vocab, caption)
    assert list(tmp_path.glob("a/*tmp*")) == []


def test_load_image_tokenizer_rejects_unknown_kind(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, kind=np.array("vqgan-nope"))
    with pytest.raises(ValueError, match="unknown image tokenizer kind"):
        load_image_tokenizer(str(path))


def test_psnr():
    a = np.zeros((4, 4, 3), np.uint8)
    assert psnr(a, a) == float("inf")
    assert psnr(a, a + 255) == pytest.approx(0.0)


def test_fit_decodes_images_one_at_a_time_with_the_same_codebook():
    import io

    from transforms.lib.sequences import DecodedImages

    images = shapes(6, seed=3)
    encoded = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, "PNG")
        encoded.append(buf.getvalue())
    lazy = DecodedImages(encoded)
    assert len(lazy) == 6 and np.array_equal(np.asarray(lazy[2]), np.asarray(images[2]))
    a = fit_patch_vq(images, 32, 32, 8, seed=1, niter=5)
    b = fit_patch_vq(lazy, 32, 32, 8, seed=1, niter=5)
    assert np.array_equal(a.codebook, b.codebook)


def test_loading_both_tokenizers_gathers_no_fit_sample(tmp_path, text_tok, image_tok):
    import apache_beam as beam

    from schemas.records import Example
    from transforms.lib.sequences import SequenceConfig
    from transforms.tokenize import FitTokenizers

    source = tmp_path / "given"
    write_tokenizers(str(source), text_tok, image_tok, build_vocab(text_tok, image_tok, 8))
    sc = SequenceConfig(
        str(source / TEXT_TOKENIZER_FILE), 300, str(source / IMAGE_TOKENIZER_FILE), 32, 32, 8, 256, "none", 3, 10, 10, 0
    )
    out = tmp_path / "tokenizers"
    with beam.Pipeline() as p:
        examples = p | beam.Create([Example("k", "s", "a red circle", None)])
        examples | FitTokenizers(str(out), sc)
        names = [t.unique_name for t in p.to_runner_api().components.transforms.values()]
    steps = {part for n in names for part in n.split("/")}
    assert not steps & {"CaptionSample", "ImageSample"} and {"NoCaptionSample", "NoImageSample"} <= steps
    for name in (TEXT_TOKENIZER_FILE, IMAGE_TOKENIZER_FILE, VOCAB_FILE):
        assert (out / name).read_bytes() == (source / name).read_bytes()


@pytest.mark.parametrize("patch_size", [8, 16])
def test_nearest_matches_float64_reference_exactly(patch_size):
    # 8 px patches take the float32 path, 16 px the float64 one; both must equal the plain formula,
    # ties included (duplicate codes), for extreme pixels and for any chunking.
    rng = np.random.default_rng(0)
    dim = patch_size * patch_size * 3
    codebook = rng.integers(0, 256, size=(512, dim), dtype=np.uint8)
    codebook[0], codebook[1] = 0, 255
    codebook[7] = codebook[3]  # a tie: code 3 must win
    tok = PatchVQTokenizer(codebook, image_size=patch_size * 4, patch_size=patch_size)
    assert tok._exact_f32 == (patch_size == 8)
    patches = rng.integers(0, 256, size=(3000, dim), dtype=np.uint8)
    patches[:5] = 0
    patches[5:10] = 255
    patches[10:20] = codebook[3]
    patches[20:30] = np.clip(codebook[3].astype(int) + rng.integers(-2, 3, size=dim), 0, 255)
    # near-ties: patches half way between two codes
    patches[30:40] = ((codebook[40].astype(int) + codebook[41].astype(int)) // 2).astype(np.uint8)
    want = tok.nearest_reference(patches)
    assert (want[10:20] == 3).all()
    for chunk in (1, 7, 512, 1024, 4096):
        np.testing.assert_array_equal(tok.nearest(patches, chunk=chunk), want)
    if tok._exact_f32:  # the torch search `place("cuda")` runs: the same codes, here on the CPU
        np.testing.assert_array_equal(tok.nearest_torch(patches, "cpu"), want)
        np.testing.assert_array_equal(tok.nearest_torch(patches, "cpu", chunk=7), want)
        tok.place("cpu")
        np.testing.assert_array_equal(tok.nearest(patches), want)


def test_fit_samples_what_faiss_asks_and_logs_its_seconds(capsys):
    # 8 images x 64 patches = 512 patches; 4 codes x 39 = 156 wanted, an equal share (20) from each image.
    tok = fit_patch_vq(shapes(8, seed=2), codebook_size=4, image_size=32, patch_size=4, seed=0, niter=3, min_points=0)
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("cm3corpus tokenizers:")]
    assert len(line) == 1 and "fitted on 160 patches" in line[0] and "3 iterations" in line[0]
    assert "distinct" in line[0] and " s" in line[0] and "faiss asks" not in line[0]
    assert tok.num_codes == 4
    fit_patch_vq(shapes(1, seed=2), codebook_size=16, image_size=16, patch_size=4, seed=0, niter=1)
    err = capsys.readouterr().err
    assert "fitted on 16 patches" in err and "faiss asks for 624" in err  # fewer than 39 x 16: all, and it says so
    fit_patch_vq(shapes(8, seed=2), codebook_size=4, image_size=32, patch_size=4, seed=0, niter=1, min_points=300)
    assert "fitted on 304 patches" in capsys.readouterr().err  # min_points over 39 x 4: 38 from each image


def test_fit_weights_repeated_patches_as_the_full_sample():
    # A flat image repeated: one distinct patch with the count of all of them. The codebook must hold that
    # colour exactly (a weighted centroid of identical points), and fitting twice gives the same bytes.
    from PIL import Image

    flat = [Image.new("RGB", (32, 32), (200, 30, 90))] * 6 + shapes(2, seed=4)
    a = fit_patch_vq(flat, codebook_size=8, image_size=32, patch_size=4, seed=3, niter=4)
    b = fit_patch_vq(flat, codebook_size=8, image_size=32, patch_size=4, seed=3, niter=4)
    assert np.array_equal(a.codebook, b.codebook)
    colour = np.tile(np.array([200, 30, 90], np.uint8), 16)
    assert (a.codebook == colour).all(axis=1).any()


def test_unique_rows_is_numpys_unique_over_rows():
    """The fit's dedup gives np.unique(axis=0)'s rows, order and counts: the codebook cannot move."""
    rng = np.random.default_rng(7)
    base = rng.integers(0, 256, size=(300, 12), dtype=np.uint8)
    base[:40, :6] = 0  # rows that differ only past a shared prefix, and the byte extremes 0 and 255
    base[40:80, :6] = 255
    rows = base[rng.integers(0, len(base), size=2000)]
    want_rows, want_counts = np.unique(rows, axis=0, return_counts=True)
    got_rows, got_counts = unique_rows(rows)
    assert got_rows.dtype == np.uint8 and got_rows.shape == want_rows.shape and len(got_rows) < len(rows)
    assert np.array_equal(got_rows, want_rows) and np.array_equal(got_counts, want_counts)
