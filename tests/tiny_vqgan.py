"""Tiny random-weight VQ-GANs saved in the real on-disk layouts, and a Chameleon-shaped tokenizer.

Nothing here is downloaded: the tests make each release layout themselves, with taming's key
names, so the loaders are exercised on the files users have (only smaller).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from transforms.lib.chameleon import image_token_name
from transforms.lib.vqgan import VQGANConfig, build_model

# ch 32 (GroupNorm needs 32 | channels), three halvings of 64 px: an 8 x 8 grid, 64 tokens an image.
TINY = VQGANConfig(
    n_embed=64,
    embed_dim=8,
    z_channels=8,
    resolution=64,
    ch=32,
    ch_mult=(1, 1, 2, 2),
    num_res_blocks=1,
    attn_resolutions=(16,),
)


def tiny_weights(cfg: VQGANConfig = TINY, seed: int = 0) -> dict:
    """A random VQ-GAN whose codebook is drawn from its own encoder's outputs, so codes vary."""
    import torch

    torch.manual_seed(seed)
    model = build_model(cfg)
    x = torch.rand(4, 3, cfg.resolution, cfg.resolution, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    with torch.no_grad():
        z = model.quant_conv(model.encoder(x)).permute(0, 2, 3, 1).reshape(-1, cfg.embed_dim)
        pick = torch.randperm(len(z), generator=torch.Generator().manual_seed(seed + 1))[: cfg.n_embed]
        model.quantize.embedding.weight.copy_(z[pick] + 0.01 * torch.randn_like(z[pick]))
    return {k: v.clone() for k, v in model.state_dict().items()}


def _yaml(cfg: VQGANConfig, target: str) -> str:
    import yaml

    doc = {
        "model": {
            "base_learning_rate": 4.5e-06,
            "target": target,
            "params": {
                "embed_dim": cfg.embed_dim,
                "n_embed": cfg.n_embed,
                "ddconfig": {
                    "double_z": False,
                    "z_channels": cfg.z_channels,
                    "resolution": cfg.resolution,
                    "in_channels": 3,
                    "out_ch": 3,
                    "ch": cfg.ch,
                    "ch_mult": list(cfg.ch_mult),
                    "num_res_blocks": cfg.num_res_blocks,
                    "attn_resolutions": list(cfg.attn_resolutions),
                    "dropout": 0.0,
                },
                "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator", "params": {}},
            },
        }
    }
    return yaml.safe_dump(doc, sort_keys=False)


def _with_loss(weights: dict) -> dict:
    import torch

    # Released checkpoints carry the discriminator under loss.*; the loader must leave it out.
    return {**weights, "loss.discriminator.main.0.weight": torch.zeros(4, 3, 4, 4)}


def save_chameleon(root: Path, weights: dict, cfg: VQGANConfig = TINY) -> Path:
    """Meta's layout: root/tokenizer/vqgan.yaml + vqgan.ckpt with the weights under `state_dict`."""
    import torch

    (root / "tokenizer").mkdir(parents=True, exist_ok=True)
    (root / "tokenizer" / "vqgan.yaml").write_text(_yaml(cfg, "chameleon.inference.vqgan.VQModel"))
    torch.save({"state_dict": _with_loss(weights)}, root / "tokenizer" / "vqgan.ckpt")
    return root


def save_taming(root: Path, weights: dict, cfg: VQGANConfig = TINY) -> Path:
    """taming's layout: configs/model.yaml + checkpoints/last.ckpt, with Lightning's plain extras."""
    import torch

    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "checkpoints").mkdir(parents=True, exist_ok=True)
    (root / "configs" / "model.yaml").write_text(_yaml(cfg, "taming.models.vqgan.VQModel"))
    ckpt = {
        "epoch": 3,
        "global_step": 1200,
        "pytorch-lightning_version": "1.0.8",
        "state_dict": _with_loss(weights),
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4.5e-6, "params": [0, 1]}]}],
        "lr_schedulers": [],
    }
    torch.save(ckpt, root / "checkpoints" / "last.ckpt")
    return root


def save_safetensors(root: Path, weights: dict, cfg: VQGANConfig = TINY) -> Path:
    """Chameleon's yaml with the weights as tokenizer/vqgan.safetensors (same keys, no pickle)."""
    from safetensors.torch import save_file

    (root / "tokenizer").mkdir(parents=True, exist_ok=True)
    (root / "tokenizer" / "vqgan.yaml").write_text(_yaml(cfg, "chameleon.inference.vqgan.VQModel"))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(root / "tokenizer" / "vqgan.safetensors"))
    return root


# ------------------------------------------------------------------------- Chameleon tokenizer

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
IMAGE_ENTRIES = 100  # more IMGIMG entries than TINY's 64 codes: "at most", not "exactly"


def chameleon_tokenizer_json(captions: list[str], image_entries: int = IMAGE_ENTRIES) -> str:
    """A `text_tokenizer.json` shaped like Chameleon's: specials first, then IMGIMG entries whose ids
    follow their names' sort order (so code -> id is not an offset), `<eoss>`, `<racm3:break>`, the
    reserved tokens (HF's two first), then a byte-level BPE fitted on `captions`."""
    from transforms.lib.tokenize import fit_text_tokenizer

    bpe = json.loads(fit_text_tokenizer(captions, 400).to_str())
    vocab: dict[str, int] = {}
    added = []

    def add(name: str, special: bool) -> None:
        vocab[name] = len(vocab)
        if special:
            added.append(
                {
                    "id": vocab[name],
                    "content": name,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": True,
                }
            )

    for name in SPECIALS:
        add(name, True)
    for name in sorted(image_token_name(c) for c in range(image_entries)):
        add(name, False)
    add("<eoss>", True)
    add("<racm3:break>", True)
    for name in ["<reserved08706>", "<reserved08707>"] + [f"<reserved{n:05d}>" for n in range(8000, 8014)]:
        add(name, True)
    for token, _ in sorted(bpe["model"]["vocab"].items(), key=lambda kv: kv[1]):
        add(token, False)
    bpe["model"]["vocab"] = vocab
    bpe["added_tokens"] = added
    return json.dumps(bpe)


def save_chameleon_tokenizer(root: Path, captions: list[str]) -> Path:
    (root / "tokenizer").mkdir(parents=True, exist_ok=True)
    (root / "tokenizer" / "text_tokenizer.json").write_text(chameleon_tokenizer_json(captions))
    return root


def pictures(n: int, seed: int, size: int = 64):
    """Smooth random colour fields (varied codes), as PIL images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        out.append(Image.fromarray(small, "RGB").resize((size, size), Image.Resampling.BILINEAR))
    return out
