"""transforms/lib/clip_lean.py: the prefix-shared text pass and the pooled-only last block agree with open_clip."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch

from transforms.lib import clip_lean
from transforms.lib.clip import DEMO, resolve_clip
from transforms.lib.embed import ClipEmbedder, dropout_tokens

CAPTIONS = [
    "a red circle",
    "a red circle on a blue square",
    "a red circle",  # duplicate: shares every position
    "a small blue square at the top left of a large green triangle on a white background",
    "x",
    "",
    "wow! a red circle!",  # token 0 is "!" in CLIP's vocabulary: it must not be read as padding
]


def _tiny_vit_clip(text: dict | None = None, **vision) -> torch.nn.Module:
    """A small ViT CLIP built here (no download), in eval mode with seeded random weights."""
    torch.manual_seed(0)
    quick_gelu = vision.pop("qg", False)
    vision_cfg = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "head_width": 16, **vision}
    text_cfg = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3, **(text or {})}
    model = open_clip.CLIP(embed_dim=32, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=quick_gelu)
    return model.eval()


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return clip_lean._max_diff(a, b)


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-32")


def test_prefix_trie_one_node_per_distinct_prefix():
    tokens, positions, rows = clip_lean.prefix_trie([[1, 2, 3], [1, 2, 4], [1, 2, 3], [5], [1, 2, 3, 9]])
    # prefixes: 1, 12, 123, 124, 5, 1239
    assert len(tokens) == 6
    assert rows.shape == (5, 4)
    np.testing.assert_array_equal(rows[0], rows[2])
    assert rows[0, 1] == rows[1, 1] and rows[0, 2] != rows[1, 2]
    assert list(rows[3]) == [rows[3, 0], -1, -1, -1] and rows[3, 0] != rows[0, 0]
    np.testing.assert_array_equal(tokens[rows[4]], [1, 2, 3, 9])
    np.testing.assert_array_equal(positions[rows[4]], [0, 1, 2, 3])


@pytest.mark.parametrize("kind", ["gelu", "quick_gelu", "layer_scale"])
def test_lean_text_matches_encode_text(kind, tokenizer):
    options = {"quick_gelu": {"qg": True}, "layer_scale": {"text": {"ls_init_value": 0.5}}}
    model = _tiny_vit_clip(**options.get(kind, {}))
    tokens = tokenizer(CAPTIONS)
    queries = dropout_tokens(tokens, [f"k{i}" for i in range(len(CAPTIONS))], 0.3, seed=0)
    batch = torch.cat([tokens, queries])
    stats: dict = {}
    with torch.inference_mode():
        ours, theirs = clip_lean.lean_encode_text(model, batch, stats), model.encode_text(batch)
    assert _diff(ours, theirs) < clip_lean.TOL
    assert stats["passes"] == 1 and 0 < stats["computed"] < stats["positions"]  # duplicates/openings shared
    assert clip_lean.lean_text_applies(model, tokenizer)


@pytest.mark.parametrize("vision", [{}, {"qg": True}, {"ls_init_value": 0.5}, {"final_ln_after_pool": True}])
def test_lean_image_matches_encode_image(vision):
    model = _tiny_vit_clip(**vision)
    pixels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert _diff(clip_lean.lean_encode_image(model, pixels), model.encode_image(pixels)) < clip_lean.TOL
    assert clip_lean.lean_image_applies(model)


def test_lean_paths_refuse_towers_they_do_not_fit(tokenizer):
    model = _tiny_vit_clip(pool_type="avg")  # mean over patches: the last block is needed everywhere
    assert not clip_lean.lean_image_applies(model)
    model = _tiny_vit_clip()
    model.text_pool_type = "last"  # pools a padded position
    assert not clip_lean.lean_text_applies(model, tokenizer)
    model = _tiny_vit_clip()
    model.visual.transformer.resblocks[1].mlp.add_module("drop", torch.nn.Identity())  # an unknown MLP
    assert not clip_lean.lean_image_applies(model)
    assert not clip_lean.standard_blocks(model.visual.transformer)
    demo, _, demo_tokenizer = resolve_clip(DEMO, None)  # a ResNet image tower
    assert not clip_lean.lean_image_applies(demo)
    assert clip_lean.lean_text_applies(demo, demo_tokenizer)


def test_load_check_refuses_a_pass_that_disagrees(tokenizer, monkeypatch):
    model = _tiny_vit_clip()
    text, image = clip_lean.lean_encode_text, clip_lean.lean_encode_image
    # Rows swapped: each output belongs to another input, as a wrong pass would give.
    monkeypatch.setattr(clip_lean, "lean_encode_text", lambda m, t, stats=None: text(m, t.roll(1, dims=0), stats))
    monkeypatch.setattr(clip_lean, "lean_encode_image", lambda m, p: image(m, p.roll(1, dims=0)))
    assert not clip_lean.lean_text_applies(model, tokenizer)
    assert not clip_lean.lean_image_applies(model)
    embedder = ClipEmbedder(model, open_clip.image_transform(32, is_train=False), tokenizer)
    assert not embedder.lean_image and not embedder.lean_text and embedder.fast_text  # the sliced pass still fits


def test_embedder_uses_lean_paths_and_agrees_with_open_clip(tokenizer):
    import io

    from PIL import Image

    model = _tiny_vit_clip()
    preprocess = open_clip.image_transform(32, is_train=False)
    embedder = ClipEmbedder(model, preprocess, tokenizer)
    assert embedder.lean_text and embedder.lean_image
    assert embedder.paths == "text prefix-shared, image pooled-only last block"
    images = []
    for i in range(len(CAPTIONS)):
        buf = io.BytesIO()
        Image.new("RGB", (40, 40), (30 * i, 255 - 30 * i, 90)).save(buf, "PNG")
        images.append(buf.getvalue())
    items = [(f"k{i}", img, cap) for i, (img, cap) in enumerate(zip(images, CAPTIONS, strict=True))]
    out = embedder.embed(items, seed=0, dropout=0.2)
    with torch.inference_mode():
        pixels = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
        image_ref = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1).numpy()
        captioned = [i for i, c in enumerate(CAPTIONS) if c]
        text_ref = torch.nn.functional.normalize(model.encode_text(tokenizer([CAPTIONS[i] for i in captioned])), dim=-1)
    np.testing.assert_allclose(np.stack([o[0] for o in out]), image_ref, atol=clip_lean.TOL)
    np.testing.assert_allclose(np.stack([out[i][1] for i in captioned]), text_ref.numpy(), atol=clip_lean.TOL)
    assert embedder.text_stats["computed"] < embedder.text_stats["positions"]
