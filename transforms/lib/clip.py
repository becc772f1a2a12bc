"""The CLIP a build embeds with: resolving its weights (a local file, the open_clip cache, or a
download), probing the weights' host before a download, and loading it frozen.

`--clip_model demo` loads the small CLIP shipped in `transforms/lib/demo_clip/`; an open_clip model
name or JSON config takes `--clip_pretrained` (a pretrained tag, a checkpoint file, or `none` for
random weights). Weights that cannot be had here end in `ClipWeightsUnavailable`, one line saying
what to pass instead.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from transforms.lib.demo_clip import CHECKPOINT_PATH, load_demo_clip, model_config
from transforms.lib.validate import describe_error

DEMO = "demo"  # --clip_model value selecting the shipped demo CLIP
NO_WEIGHTS = ("", "none", "random")  # --clip_pretrained values meaning random weights (speed runs only)


class ClipWeightsUnavailable(RuntimeError):
    """The CLIP weights asked for cannot be had here (no network and not cached, or no such file)."""


def _weights_error(what: str) -> ClipWeightsUnavailable:
    return ClipWeightsUnavailable(
        f"{what}. Pass a local checkpoint instead (--clip_pretrained /path/to/open_clip_pytorch_model.bin),"
        " or --clip_model demo for the small CLIP shipped with cm3corpus."
    )


def _cached_pretrained(pcfg: dict) -> str | None:
    """The local file of an open_clip pretrained tag if it is already cached; never touches the network."""
    if pcfg.get("file"):
        return pcfg["file"]
    hub = pcfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache  # lazy: only hf-hub tags need it

        repo, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for name in names:
            found = try_to_load_from_cache(repo, name)
            if isinstance(found, str):
                return found
    url = pcfg.get("url", "")
    if url:
        path = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(path):
            return path
    return None


def _host_unreachable(pcfg: dict) -> str | None:
    """Why the host of a pretrained tag's weights cannot be reached, found in seconds; None when it can.

    Without this, huggingface_hub's retries take about a minute to end in the same error. Where a
    proxy is configured a direct connection says nothing, so the download is left to decide.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    if pcfg.get("hf_hub"):
        url = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    else:
        url = pcfg.get("url") or ""
    parsed = urlparse(url)
    if not parsed.hostname:
        return None
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        socket.create_connection((parsed.hostname, port), timeout=5).close()
    except OSError as e:
        return f"{parsed.hostname}:{port} is unreachable ({describe_error(e)})"
    return None


def _register_json(path: str) -> str:
    import open_clip  # lazy: seconds to import; the CLI needs it only here

    if not Path(path).is_file():
        raise FileNotFoundError(f"CLIP config {path} not found")
    open_clip.add_model_config(path)
    return Path(path).stem


def _weights_source(name: str, clip_pretrained: str | None) -> tuple[str | None, dict[str, Any]]:
    """What to pass open_clip as `pretrained` (a tag to download, a local file, or None) and extra kwargs."""
    import open_clip  # lazy: seconds to import; the CLI needs it only here

    pretrained = (clip_pretrained or "").strip()
    if pretrained.lower() in NO_WEIGHTS:
        logging.warning("CLIP %s with random weights (--clip_pretrained %r): for speed runs only", name, pretrained)
        return None, {}
    if Path(pretrained).is_file():
        return pretrained, {}
    if open_clip.is_pretrained_cfg(name, pretrained):
        pcfg = open_clip.get_pretrained_cfg(name, pretrained)
        local = _cached_pretrained(pcfg)
        if local is None:
            unreachable = _host_unreachable(pcfg)
            if unreachable:
                raise _weights_error(f"cannot get CLIP weights {name}/{pretrained}: not cached, and {unreachable}")
            return pretrained, {}  # open_clip downloads it (workers with network)
        # A cached file loses the tag's preprocessing and activation settings; carry them over.
        return local, {
            "image_mean": pcfg.get("mean"),
            "image_std": pcfg.get("std"),
            "force_quick_gelu": pcfg.get("quick_gelu", False),
        }
    if "/" in pretrained or Path(pretrained).suffix:
        raise _weights_error(f"CLIP checkpoint {pretrained} does not exist")
    tags = open_clip.list_pretrained_tags_by_model(name)
    raise _weights_error(f"{pretrained!r} is not a pretrained tag of {name} (known: {tags})")


def resolve_clip(clip_model: str, clip_pretrained: str | None, device: str = "cpu"):
    """Load a frozen CLIP in eval mode: (model, preprocess, tokenizer).

    Args:
        clip_model: "demo" (the shipped demo CLIP), a path to an open_clip JSON architecture config,
            or an open_clip model name such as "ViT-B-32".
        clip_pretrained: an open_clip pretrained tag (used from the local cache, else downloaded),
            a local checkpoint path, or "none" for random weights (speed measurements only). With
            "demo" it is ignored unless it names a demo checkpoint file.
        device: "cpu" or "cuda"; cuda runs in half precision.

    Raises:
        ClipWeightsUnavailable: the weights cannot be had (no network, not cached, no such file).
    """
    import open_clip  # lazy: open_clip and torch take seconds to import; the CLI needs neither
    import torch

    half = str(device).startswith("cuda")
    if clip_model == DEMO:
        custom = clip_pretrained and Path(clip_pretrained).suffix in (".pt", ".pth") and Path(clip_pretrained).is_file()
        return load_demo_clip(clip_pretrained if custom else CHECKPOINT_PATH, device=device)
    name = _register_json(clip_model) if clip_model.endswith(".json") else clip_model
    if open_clip.get_model_config(name) is None:
        raise ValueError(f"unknown CLIP architecture {clip_model!r}; see open_clip.list_models()")
    pretrained, kwargs = _weights_source(name, clip_pretrained)
    try:
        # Random weights are seeded so that every worker (and a benchmark's baseline) builds the same model.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=device, precision="fp16" if half else "fp32", **kwargs
            )
    except RuntimeError as e:
        if pretrained is None or Path(pretrained).is_file():
            raise
        # open_clip wraps a failed download in RuntimeError.
        raise _weights_error(f"cannot get CLIP weights {name}/{pretrained} (no network and not cached): {e}") from e
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


def clip_embed_dim(clip_model: str) -> int:
    """The embedding width of an architecture, read from its config without loading weights."""
    import open_clip  # lazy: seconds to import; the CLI needs it only here

    if clip_model == DEMO:
        return int(model_config()["embed_dim"])
    name = _register_json(clip_model) if clip_model.endswith(".json") else clip_model
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown CLIP architecture {clip_model!r}")
    return int(cfg["embed_dim"])
