"""The VQ-GAN image tokenizer: each release layout loads, codes match transformers' ChameleonVQVAE
exactly, pickle-bearing checkpoints are refused, and the corpus file round-trips."""

from __future__ import annotations

import argparse
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny_vqgan import TINY, pictures, save_chameleon, save_safetensors, save_taming, tiny_weights
from transforms.lib.tokenize import ImageTokenizer, load_image_tokenizer, psnr
from transforms.lib.vqgan import CHAMELEON, TAMING, VQGANTokenizer, find_layout, load_vqgan, main, preprocess


@pytest.fixture(scope="module")
def weights():
    return tiny_weights()


@pytest.fixture(scope="module")
def images():
    return pictures(6, seed=1)


def _same_weights(tok: VQGANTokenizer, weights: dict) -> bool:
    state = tok.model.state_dict()
    return set(state) == set(weights) and all(torch.equal(state[k], weights[k]) for k in weights)


def test_each_release_layout_loads_with_its_convention(tmp_path, weights, images):
    cham = load_vqgan(str(save_chameleon(tmp_path / "cham", weights)))
    taming = load_vqgan(str(save_taming(tmp_path / "taming", weights)))
    safe = load_image_tokenizer(f"vqgan:{save_safetensors(tmp_path / 'safe', weights)}")
    assert isinstance(cham, ImageTokenizer) and isinstance(safe, ImageTokenizer)
    assert (cham.cfg.preprocess, taming.cfg.preprocess, safe.cfg.preprocess) == (CHAMELEON, TAMING, CHAMELEON)
    for tok in (cham, taming, safe):
        assert _same_weights(tok, weights)  # loss.* left out, every model key present
        assert (tok.num_codes, tok.tokens_per_image) == (64, 64)
    codes = cham.encode(images)
    assert codes.shape == (6, 64) and codes.dtype == np.int32
    assert len(np.unique(codes)) > 8  # the tiny codebook is used, not one code everywhere
    assert np.array_equal(codes, safe.encode(images))
    assert np.array_equal(codes, cham.encode(images))  # deterministic


def test_codes_equal_transformers_chameleon_vqvae(tmp_path, weights, images):
    """An independent implementation on the same weights, converted as transformers' script does."""
    from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

    ours = load_vqgan(str(save_chameleon(tmp_path / "cham", weights)))
    hf_cfg = ChameleonVQVAEConfig(
        embed_dim=TINY.embed_dim,
        num_embeddings=TINY.n_embed,
        latent_channels=TINY.z_channels,
        resolution=TINY.resolution,
        base_channels=TINY.ch,
        channel_multiplier=list(TINY.ch_mult),
        num_res_blocks=TINY.num_res_blocks,
        attn_resolutions=list(TINY.attn_resolutions),
    )
    reference = ChameleonVQVAE(hf_cfg).eval()
    # convert_chameleon_weights_to_hf.py: the vqgan.ckpt keys as they are, minus the decoder.
    converted = {k: v for k, v in weights.items() if not k.startswith("decoder.")}
    reference.load_state_dict(converted, strict=True)
    x = ours.preprocess(images)
    with torch.no_grad():
        expected = reference.encode(torch.from_numpy(x)).image_tokens.reshape(len(images), -1).numpy()
    assert np.array_equal(ours.encode(images), expected)


def test_chameleon_preprocessing(images):
    rgba = Image.new("RGBA", (96, 64), (255, 0, 0, 0))  # fully transparent red: white after compositing
    rgba.paste((0, 0, 255, 255), (40, 0, 56, 64))  # an opaque blue bar in the middle
    x = preprocess(rgba, TINY)
    assert x.shape == (3, 64, 64) and x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
    assert np.allclose(x[:, :, 0], 1.0)  # left edge white: alpha went onto white, not black
    centre = x[:, 32, 32]
    assert centre[2] > 0.9 and centre[0] < -0.9  # the bar survived the centre crop (96 -> 64 wide)
    # short side to 64 with LANCZOS, centre crop, x / 255 * 2 - 1
    wide = images[0].resize((128, 96))
    expected = np.asarray(wide.resize((85, 64), Image.Resampling.LANCZOS).crop((10, 0, 74, 64)), np.float64)
    assert np.allclose(preprocess(wide, TINY), (expected / 255 * 2 - 1).transpose(2, 0, 1), atol=1e-6)


class _Marker:
    """Unpickling this touches a file: proof of whether anything in a checkpoint ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_pickle_checkpoint_is_refused_and_nothing_runs(tmp_path, weights):
    root = save_chameleon(tmp_path / "cham", weights)
    marker = tmp_path / "ran"
    torch.save({"state_dict": weights, "callbacks": _Marker(marker)}, root / "tokenizer" / "vqgan.ckpt")
    with pytest.raises(ValueError) as err:
        load_vqgan(str(root))
    message = str(err.value)
    assert "needs arbitrary unpickling" in message and "weights_only=True" in message
    assert "python -m transforms.lib.vqgan convert --trust-pickle" in message and "vqgan.safetensors" in message
    assert not marker.exists()


def test_convert_makes_a_safetensors_that_loads(tmp_path, weights, images):
    root = save_chameleon(tmp_path / "cham", weights)
    ckpt = root / "tokenizer" / "vqgan.ckpt"
    torch.save({"state_dict": weights, "hyper_parameters": argparse.Namespace(lr=1e-4)}, ckpt)  # trusted, not plain
    with pytest.raises(SystemExit, match="--trust-pickle"):
        main(["convert", str(ckpt), str(root / "tokenizer" / "vqgan.safetensors")])
    main(["convert", "--trust-pickle", str(ckpt), str(root / "tokenizer" / "vqgan.safetensors")])
    ckpt.unlink()
    tok = load_vqgan(str(root))
    assert find_layout(str(root))[1].endswith("vqgan.safetensors") and _same_weights(tok, weights)


def test_clear_errors_for_wrong_directories(tmp_path, weights):
    with pytest.raises(ValueError, match="no VQ-GAN in"):
        load_vqgan(str(tmp_path))
    root = save_chameleon(tmp_path / "cham", weights)
    (root / "tokenizer" / "vqgan.ckpt").unlink()
    with pytest.raises(ValueError, match="none of its weights"):
        load_vqgan(str(root))
    bad = {k: v for k, v in weights.items() if not k.startswith("decoder.conv_out")}
    save_chameleon(tmp_path / "short", bad)
    with pytest.raises(ValueError, match="do not fit the config: missing"):
        load_vqgan(str(tmp_path / "short"))


def test_corpus_file_round_trips_and_decodes(tmp_path, weights, images):
    tok = load_vqgan(str(save_chameleon(tmp_path / "cham", weights)))
    tok.save(str(tmp_path / "image_tokenizer.npz"))
    again = load_image_tokenizer(str(tmp_path / "image_tokenizer.npz"))
    assert isinstance(again, VQGANTokenizer) and again.cfg == tok.cfg and _same_weights(again, weights)
    codes = tok.encode(images)
    assert np.array_equal(again.encode(images), codes)
    with np.load(tmp_path / "image_tokenizer.npz", allow_pickle=False) as npz:  # loads with pickling off
        assert str(npz["kind"]) == "vqgan"
    decoded = again.decode(codes)
    assert len(decoded) == 6 and decoded[0].size == (64, 64) and decoded[0].mode == "RGB"
    assert psnr(decoded[0], decoded[1]) < 60  # different codes decode to different pixels
    assert np.array_equal(again.encode(decoded), again.encode(decoded))
    with pytest.raises(ValueError, match="out of range"):
        tok.decode(np.full((1, 64), 64))


def test_half_precision_on_cpu_still_gives_codes(tmp_path, weights, images):
    tok = load_vqgan(str(save_chameleon(tmp_path / "cham", weights)), dtype="bfloat16")
    codes = tok.encode(images)
    assert codes.shape == (6, 64) and codes.min() >= 0 and codes.max() < 64
    assert tok.model.quantize.embedding.weight.dtype == torch.float32  # codes are picked in float32
    with pytest.raises(ValueError, match="dtype"):
        tok.place("cpu", "int8")
