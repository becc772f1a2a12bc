"""A VQ-GAN image tokenizer (encoder, quantizer, decoder) in taming-transformers' module layout.

The modules are written here, with taming's parameter names (`encoder.down.0.block.1.norm1.weight`,
`quantize.embedding.weight`, `post_quant_conv.weight`, ...), so the checkpoints users have load
as they are, strictly, with no key renaming:

- Meta's Chameleon / Anole release: `tokenizer/vqgan.yaml` + `tokenizer/vqgan.ckpt` (the weights
  under `state_dict`; 8192 codes, 512 px, 32 x 32 = 1024 tokens an image);
- a taming-transformers VQGAN: `configs/model.yaml` + `checkpoints/last.ckpt` (or `last.ckpt`);
- either with the weights in a `.safetensors` file of the same key names instead of the `.ckpt`.

Why our own modules over a library: transformers' `ChameleonVQVAE` has no decoder (decode is needed
for round trips and the report), diffusers' `VQModel` renames every key (a conversion step per
checkpoint and a heavy dependency), and taming itself is not packaged for current torch. The
encoder's arithmetic follows taming's (and so transformers') op for op, which is what lets the tests
compare codes with `ChameleonVQVAE` exactly.

Loading never unpickles: `.ckpt` files go through `torch.load(weights_only=True)`, which only
rebuilds tensors and plain containers; one that needs more (a Lightning checkpoint carrying
arbitrary objects) is refused with the command that converts it once, on a machine that trusts it.
The yaml is read with `yaml.safe_load`, and its `target:` class names are never imported.

Inside a corpus the tokenizer is stored as `image_tokenizer.npz` (kind `vqgan`: its config as
JSON and each weight as an array; no pickle), so `tokenizers/` stays self-contained.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import pickle
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from transforms.lib.io import write_bytes
from transforms.lib.tokenize import _save_npz

KIND = "vqgan"
CHAMELEON, TAMING = "chameleon", "taming"  # preprocessing conventions
DTYPES = ("float32", "bfloat16", "float16")
_WEIGHT_PREFIX = "w:"  # npz member names of the weights
# Only these parts of a checkpoint are the tokenizer; `loss.*` (the discriminator, LPIPS) is training state.
_MODEL_PARTS = ("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv.")


@dataclass(frozen=True)
class VQGANConfig:
    """taming's `model.params` (+ `ddconfig`), and the preprocessing convention of the checkpoint."""

    n_embed: int = 8192  # codes
    embed_dim: int = 256  # code vector width
    z_channels: int = 256  # encoder output channels
    resolution: int = 512  # square side images are brought to
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128  # base width
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # width multipliers; len - 1 halvings of the side
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()  # feature-map sides that get an attention block
    double_z: bool = False
    preprocess: str = CHAMELEON  # chameleon: LANCZOS, x/255*2-1; taming: BICUBIC, x/127.5-1

    @property
    def grid(self) -> int:
        return self.resolution // 2 ** (len(self.ch_mult) - 1)

    @property
    def tokens_per_image(self) -> int:
        return self.grid * self.grid

    @classmethod
    def from_yaml(cls, text: str, preprocess: str) -> VQGANConfig:
        """Parse a taming / Chameleon `model.yaml` (safe_load; `target:` is never imported)."""
        import yaml  # lazy: pyyaml is the `chameleon` extra's; only a VQ-GAN directory's config needs it

        doc = yaml.safe_load(text)
        try:
            params = doc["model"]["params"]
            dd = params["ddconfig"]
            cfg = cls(
                n_embed=int(params["n_embed"]),
                embed_dim=int(params["embed_dim"]),
                z_channels=int(dd["z_channels"]),
                resolution=int(dd["resolution"]),
                in_channels=int(dd.get("in_channels", 3)),
                out_ch=int(dd.get("out_ch", 3)),
                ch=int(dd["ch"]),
                ch_mult=tuple(int(m) for m in dd["ch_mult"]),
                num_res_blocks=int(dd["num_res_blocks"]),
                attn_resolutions=tuple(int(r) for r in dd.get("attn_resolutions") or ()),
                double_z=bool(dd.get("double_z", False)),
                preprocess=preprocess,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a taming VQGAN config (model.params.ddconfig): {e!r}") from None
        if cfg.double_z:
            raise ValueError("double_z: true is a KL autoencoder's config, not a VQ-GAN's")
        return cfg

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VQGANConfig:
        d = json.loads(text)
        d["ch_mult"] = tuple(d["ch_mult"])
        d["attn_resolutions"] = tuple(d["attn_resolutions"])
        return cls(**d)


# ------------------------------------------------------------------------------------- modules


def _modules():
    """The torch modules, built on first use (`build_model`)."""

    def normalize(c: int) -> nn.GroupNorm:
        return nn.GroupNorm(num_groups=32, num_channels=c, eps=1e-6, affine=True)

    def swish(x):
        return x * torch.sigmoid(x)

    class ResnetBlock(nn.Module):
        def __init__(self, cin: int, cout: int):
            super().__init__()
            self.norm1 = normalize(cin)
            self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
            self.norm2 = normalize(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
            self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

        def forward(self, x):  # (B, Cin, H, W) -> (B, Cout, H, W)
            h = self.conv1(swish(self.norm1(x)))
            h = self.conv2(swish(self.norm2(h)))  # dropout is 0 in every released VQ-GAN, and we only infer
            return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h

    class AttnBlock(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.norm = normalize(c)
            self.q, self.k, self.v = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
            self.proj_out = nn.Conv2d(c, c, 1)

        def forward(self, x):
            h = self.norm(x)
            b, c, hh, ww = x.shape
            q = self.q(h).reshape(b, c, hh * ww).permute(0, 2, 1)  # (B, HW, C)
            k = self.k(h).reshape(b, c, hh * ww)  # (B, C, HW)
            w = F.softmax(torch.bmm(q, k) * (int(c) ** (-0.5)), dim=2)  # (B, HW, HW), taming's op order
            v = self.v(h).reshape(b, c, hh * ww)
            out = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
            return x + self.proj_out(out)

    class Downsample(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, 2, 0)

        def forward(self, x):
            return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming's asymmetric padding

    class Upsample(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, 1, 1)

        def forward(self, x):
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

    class Encoder(nn.Module):
        def __init__(self, cfg: VQGANConfig):
            super().__init__()
            mult = (1, *cfg.ch_mult)
            self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, 1, 1)
            self.down = nn.ModuleList()
            res = cfg.resolution
            for level, m in enumerate(cfg.ch_mult):
                down = nn.Module()
                cin, cout = cfg.ch * mult[level], cfg.ch * m
                down.block = nn.ModuleList()
                down.attn = nn.ModuleList()
                for _ in range(cfg.num_res_blocks):
                    down.block.append(ResnetBlock(cin, cout))
                    cin = cout
                    if res in cfg.attn_resolutions:
                        down.attn.append(AttnBlock(cout))
                if level != len(cfg.ch_mult) - 1:
                    down.downsample = Downsample(cout)
                    res //= 2
                self.down.append(down)
            c = cfg.ch * cfg.ch_mult[-1]
            self.mid = nn.Module()
            self.mid.block_1, self.mid.attn_1, self.mid.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)
            self.norm_out = normalize(c)
            self.conv_out = nn.Conv2d(c, cfg.z_channels, 3, 1, 1)
            self._levels = len(cfg.ch_mult)

        def forward(self, x):  # (B, 3, R, R) -> (B, z, R/f, R/f)
            h = self.conv_in(x)
            for level, down in enumerate(self.down):
                for i, block in enumerate(down.block):
                    h = block(h)
                    if len(down.attn):
                        h = down.attn[i](h)
                if level != self._levels - 1:
                    h = down.downsample(h)
            h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
            return self.conv_out(swish(self.norm_out(h)))

    class Decoder(nn.Module):
        def __init__(self, cfg: VQGANConfig):
            super().__init__()
            c = cfg.ch * cfg.ch_mult[-1]
            res = cfg.grid
            self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, 1, 1)
            self.mid = nn.Module()
            self.mid.block_1, self.mid.attn_1, self.mid.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)
            ups = []
            for level in reversed(range(len(cfg.ch_mult))):
                up = nn.Module()
                cout = cfg.ch * cfg.ch_mult[level]
                up.block = nn.ModuleList()
                up.attn = nn.ModuleList()
                for _ in range(cfg.num_res_blocks + 1):
                    up.block.append(ResnetBlock(c, cout))
                    c = cout
                    if res in cfg.attn_resolutions:
                        up.attn.append(AttnBlock(c))
                if level != 0:
                    up.upsample = Upsample(c)
                    res *= 2
                ups.insert(0, up)  # taming keeps up[0] at full resolution
            self.up = nn.ModuleList(ups)
            self.norm_out = normalize(c)
            self.conv_out = nn.Conv2d(c, cfg.out_ch, 3, 1, 1)

        def forward(self, z):  # (B, z, g, g) -> (B, 3, R, R)
            h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
            for level in reversed(range(len(self.up))):
                up = self.up[level]
                for i, block in enumerate(up.block):
                    h = block(h)
                    if len(up.attn):
                        h = up.attn[i](h)
                if level != 0:
                    h = up.upsample(h)
            return self.conv_out(swish(self.norm_out(h)))

    class VectorQuantizer(nn.Module):
        def __init__(self, n: int, d: int):
            super().__init__()
            self.embedding = nn.Embedding(n, d)

        def nearest(self, z):  # (B, d, g, g) -> (B, g*g) codes
            zf = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B*g*g, d)
            e = self.embedding.weight.float()
            # taming's |z|^2 + |e|^2 - 2 z.e, in float32 whatever the model's dtype: the argmin is the token
            dist = (
                torch.sum(zf**2, dim=1, keepdim=True)
                + torch.sum(e**2, dim=1)
                - 2 * torch.einsum("bd,dn->bn", zf, e.t())
            )
            return torch.argmin(dist, dim=1).reshape(z.shape[0], -1)

    class VQModel(nn.Module):
        def __init__(self, cfg: VQGANConfig):
            super().__init__()
            self.encoder = Encoder(cfg)
            self.decoder = Decoder(cfg)
            self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
            self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
            self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
            self.grid = cfg.grid

        def encode(self, x):  # (B, 3, R, R) in [-1, 1] -> (B, g*g) int64 codes
            return self.quantize.nearest(self.quant_conv(self.encoder(x)))

        def decode(self, codes):  # (B, g*g) -> (B, 3, R, R) in about [-1, 1]
            q = self.quantize.embedding(codes).to(self.post_quant_conv.weight.dtype)  # (B, g*g, d)
            q = q.reshape(codes.shape[0], self.grid, self.grid, -1).permute(0, 3, 1, 2)
            return self.decoder(self.post_quant_conv(q))

    return VQModel


_model_class = None
_model_lock = threading.Lock()


def build_model(cfg: VQGANConfig):
    """A randomly initialised `VQModel` of `cfg` (taming's parameter names), in eval mode."""
    global _model_class
    with _model_lock:
        if _model_class is None:
            _model_class = _modules()
    return _model_class(cfg).eval()


# ------------------------------------------------------------------------------- preprocessing


def whiten_transparency(image: Image.Image) -> Image.Image:
    """RGB with any alpha composited onto white (Chameleon's `_whiten_transparency`)."""
    if image.mode == "RGB":
        return image
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)
    alpha = rgba[:, :, 3:] / 255.0
    if (alpha == 1.0).all():
        return image.convert("RGB")
    rgb = (1 - alpha) * 255 + alpha * rgba[:, :, :3]
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def preprocess(image: Image.Image, cfg: VQGANConfig) -> np.ndarray:
    """One image → (3, R, R) float32 in [-1, 1], by the checkpoint's convention.

    Both: alpha on white, the short side resized to `resolution`, centre crop. Chameleon resizes with
    LANCZOS and scales `x / 255 * 2 - 1`; taming's data code with bicubic and `x / 127.5 - 1`.
    """
    image = whiten_transparency(image)
    size = cfg.resolution
    scale = size / min(image.size)
    resample = Image.Resampling.LANCZOS if cfg.preprocess == CHAMELEON else Image.Resampling.BICUBIC
    new = (max(size, round(scale * image.size[0])), max(size, round(scale * image.size[1])))
    if new != image.size:
        image = image.resize(new, resample)
    x0, y0 = (image.width - size) // 2, (image.height - size) // 2
    pixels = np.asarray(image.crop((x0, y0, x0 + size, y0 + size)), dtype=np.float64)
    x = pixels / 255.0 * 2 - 1 if cfg.preprocess == CHAMELEON else pixels / 127.5 - 1.0
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def to_images(x: np.ndarray) -> list[Image.Image]:
    """(N, 3, R, R) floats in [-1, 1] → N RGB images."""
    pixels = np.rint((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)
    return [Image.fromarray(np.ascontiguousarray(p), "RGB") for p in pixels]


# -------------------------------------------------------------------------------- the tokenizer


class VQGANTokenizer:
    """An `ImageTokenizer` over a VQ-GAN: images → (N, grid * grid) codes and back.

    Args:
        cfg: the architecture and preprocessing.
        weights: taming key → array (encoder, decoder, quantize, quant_conv, post_quant_conv).
        device: where `encode` / `decode` run (`place` moves it later).
        dtype: float32, bfloat16 or float16 for the convolutions (the code search stays float32).
    """

    kind = KIND

    def __init__(self, cfg: VQGANConfig, weights: dict[str, Any], device: str = "cpu", dtype: str = "float32"):
        self.cfg = cfg
        model = build_model(cfg)
        state = {
            k: torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for k, v in weights.items()
        }
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"VQ-GAN weights do not fit the config: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        self._model = model.float()
        self._device, self._dtype = "cpu", "float32"
        self._lock = threading.Lock()
        self.place(device, dtype)

    @property
    def model(self):
        return self._model

    @property
    def tokens_per_image(self) -> int:
        return self.cfg.tokens_per_image

    @property
    def num_codes(self) -> int:
        return self.cfg.n_embed

    def place(self, device: str, dtype: str = "float32") -> None:
        """Move the model to `device` in `dtype` (a no-op when already there)."""
        if dtype not in DTYPES:
            raise ValueError(f"VQ-GAN dtype {dtype!r}; expected one of {DTYPES}")
        if (device, dtype) == (self._device, self._dtype):
            return
        with self._lock:
            self._model.to(device=torch.device(device), dtype=getattr(torch, dtype))
            self._model.quantize.float()  # codes are chosen in float32 (see VectorQuantizer.nearest)
            self._device, self._dtype = device, dtype

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        return np.stack([preprocess(im, self.cfg) for im in images])

    def encode_pixels(self, x: np.ndarray) -> np.ndarray:
        """(N, 3, R, R) float32 in [-1, 1] → (N, tokens_per_image) int32 codes, as one batch."""
        with torch.inference_mode():
            t = torch.from_numpy(x).to(self._device, getattr(torch, self._dtype))
            return self._model.encode(t).cpu().numpy().astype(np.int32)

    def encode(self, images: list[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.tokens_per_image), dtype=np.int32)
        return self.encode_pixels(self.preprocess(images))

    def decode(self, codes: np.ndarray) -> list[Image.Image]:
        codes = np.asarray(codes, dtype=np.int64).reshape(-1, self.tokens_per_image)
        if codes.size and (codes.min() < 0 or codes.max() >= self.num_codes):
            raise ValueError("image codes out of range")
        with torch.inference_mode():
            x = self._model.decode(torch.from_numpy(codes).to(self._device))
        return to_images(x.float().cpu().numpy())

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"kind": np.array(KIND), "config": np.array(self.cfg.to_json())}
        for name, value in self._model.state_dict().items():
            arrays[_WEIGHT_PREFIX + name] = value.detach().float().cpu().numpy()
        return arrays

    def save(self, path: str) -> None:
        write_bytes(path, _save_npz(self.to_arrays()))

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> VQGANTokenizer:
        cfg = VQGANConfig.from_json(str(arrays["config"]))
        weights = {k[len(_WEIGHT_PREFIX) :]: v for k, v in arrays.items() if k.startswith(_WEIGHT_PREFIX)}
        return cls(cfg, weights)


# ------------------------------------------------------------------------------------- loading


def _read(path: str) -> bytes:
    with fsspec.open(path, "rb") as f:
        return f.read()


def _exists(path: str) -> bool:
    fs, p = fsspec.core.url_to_fs(path)
    return fs.exists(p)


CONVERT_HINT = (
    "cm3corpus loads checkpoints with torch.load(weights_only=True) and never unpickles one. If you trust "
    "the file, convert it once to safetensors (same keys) and point at that instead:\n"
    "  python -m transforms.lib.vqgan convert --trust-pickle {path} {dst}"
)


def load_state_dict(data: bytes, name: str) -> dict[str, torch.Tensor]:
    """Weights of a `.safetensors` or `.ckpt` (the tensors under `state_dict` when there is one).

    Raises ValueError, with the command that converts it, for a checkpoint `weights_only` refuses.
    """
    if name.endswith(".safetensors"):
        try:
            from safetensors.torch import load as load_safetensors  # lazy: the `chameleon` extra's
        except ImportError:
            raise ValueError(f"{name}: reading safetensors needs `pip install -e '.[chameleon]'`") from None
        state = load_safetensors(data)
    else:
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            dst = name.rsplit(".", 1)[0] + ".safetensors"
            raise ValueError(
                f"{name} needs arbitrary unpickling ({first}).\n" + CONVERT_HINT.format(path=name, dst=dst)
            ) from None
        state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(state, dict):
            raise ValueError(f"{name} holds no state_dict of tensors")
    weights = {k: v for k, v in state.items() if k.startswith(_MODEL_PARTS) and isinstance(v, torch.Tensor)}
    if not weights:
        raise ValueError(f"{name} has no VQ-GAN weights (no encoder./decoder./quantize. keys)")
    return weights


def find_layout(directory: str) -> tuple[str, str, str]:
    """(config path, weights path, preprocessing convention) of a VQ-GAN release directory.

    Looks for, in order: Chameleon/Anole's `tokenizer/vqgan.yaml` (or `vqgan.yaml` in DIR itself) with
    `vqgan.safetensors` or `vqgan.ckpt` beside it; taming's `configs/model.yaml` with
    `checkpoints/last.{safetensors,ckpt}` or `last.{safetensors,ckpt}`.
    """
    d = directory.rstrip("/")
    layouts = [
        (f"{d}/tokenizer/vqgan.yaml", [f"{d}/tokenizer/vqgan.safetensors", f"{d}/tokenizer/vqgan.ckpt"], CHAMELEON),
        (f"{d}/vqgan.yaml", [f"{d}/vqgan.safetensors", f"{d}/vqgan.ckpt"], CHAMELEON),
        (
            f"{d}/configs/model.yaml",
            [
                f"{d}/checkpoints/last.safetensors",
                f"{d}/checkpoints/last.ckpt",
                f"{d}/last.safetensors",
                f"{d}/last.ckpt",
            ],
            TAMING,
        ),
    ]
    for config, weights, convention in layouts:
        if _exists(config):
            for w in weights:
                if _exists(w):
                    return config, w, convention
            raise ValueError(f"{config} found but none of its weights: {', '.join(weights)}")
    raise ValueError(
        f"no VQ-GAN in {directory}: expected tokenizer/vqgan.yaml + vqgan.ckpt (Chameleon/Anole) or"
        " configs/model.yaml + checkpoints/last.ckpt (taming), or .safetensors in place of the .ckpt"
    )


def load_vqgan(directory: str, device: str = "cpu", dtype: str = "float32") -> VQGANTokenizer:
    """Load the VQ-GAN of a Chameleon/Anole or taming directory (see `find_layout`)."""
    config, weights, convention = find_layout(directory)
    cfg = VQGANConfig.from_yaml(_read(config).decode("utf-8"), convention)
    return VQGANTokenizer(cfg, load_state_dict(_read(weights), weights), device, dtype)


def convert(src: str, dst: str) -> None:
    """Rewrite a trusted pickle checkpoint's VQ-GAN weights as safetensors (the only unpickling path).

    Runs `torch.load(weights_only=False)`, which executes whatever the file's pickle asks for: only
    for files you trust, and only when asked with `--trust-pickle`.
    """
    from safetensors.torch import save_file  # lazy: the `chameleon` extra's; only converting needs it

    obj = torch.load(src, map_location="cpu", weights_only=False)
    state = obj.get("state_dict", obj)
    weights = {k: v.contiguous() for k, v in state.items() if k.startswith(_MODEL_PARTS)}
    save_file(weights, dst)
    print(f"wrote {len(weights)} tensors to {dst}")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m transforms.lib.vqgan")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="a trusted pickle .ckpt -> .safetensors with the same keys")
    c.add_argument("--trust-pickle", action="store_true", help="required: the source is unpickled")
    c.add_argument("src")
    c.add_argument("dst")
    args = p.parse_args(argv)
    if not args.trust_pickle:
        raise SystemExit("convert unpickles SRC (it may run code): pass --trust-pickle if you trust the file")
    convert(args.src, args.dst)


if __name__ == "__main__":
    main()
