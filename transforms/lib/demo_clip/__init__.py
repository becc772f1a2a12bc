"""The demo CLIP: a tiny open_clip architecture trained by `cm3corpus fit-demo-clip` on the demo corpus.

No machine here reaches a model hub, so the demo and the tests retrieve with this model: a small
ModifiedResNet image tower (64 px) and a 2-layer, 32-wide text tower, registered with open_clip from
`demo-clip.json` and stored in float16 next to it (`demo_clip.pt`). Most of its size is the text tower's
49,408-row token embedding, which is why the text tower is narrow.

The checkpoint is an ordinary open_clip checkpoint (`{"state_dict": ...}`), so
`open_clip.create_model_and_transforms("demo-clip", pretrained=CHECKPOINT_PATH)` loads it too, once
`register_demo_clip()` has run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

MODEL_NAME = "demo-clip"  # the name open_clip knows the architecture by (the JSON file's stem)
CONFIG_PATH = Path(__file__).with_name(f"{MODEL_NAME}.json")
CHECKPOINT_PATH = Path(__file__).with_name("demo_clip.pt")


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self._text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self._text not in record.getMessage()


def model_config() -> dict[str, Any]:
    """The architecture config (`embed_dim`, `vision_cfg`, `text_cfg`) as open_clip reads it."""
    return json.loads(CONFIG_PATH.read_text())


def register_demo_clip() -> str:
    """Register the architecture with open_clip (idempotent) and return its model name."""
    import open_clip  # lazy: seconds to import; `--clip_model demo` is known without loading it

    if MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_PATH)
    return MODEL_NAME


def create_demo_clip(device: str = "cpu"):
    """A randomly initialised demo CLIP: (model, preprocess_train, preprocess_val, tokenizer)."""
    import open_clip  # lazy: as in register_demo_clip

    name = register_demo_clip()
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        name, pretrained=None, device=device
    )
    return model, preprocess_train, preprocess_val, open_clip.get_tokenizer(name)


def load_demo_clip(checkpoint: str | Path = CHECKPOINT_PATH, device: str = "cpu"):
    """The trained demo CLIP in eval mode: (model, preprocess, tokenizer).

    Args:
        checkpoint: a checkpoint written by `pipelines.demo.fit_clip` (default: the one shipped with the package).
        device: "cpu" or "cuda"; on cuda the model runs in half precision.

    Raises:
        FileNotFoundError: when the checkpoint is missing (run `cm3corpus fit-demo-clip`).
    """
    import open_clip  # lazy: as in register_demo_clip
    import torch

    if not Path(checkpoint).is_file():
        raise FileNotFoundError(
            f"demo CLIP checkpoint {checkpoint} not found; train one with `cm3corpus fit-demo-clip`"
        )
    name = register_demo_clip()
    # open_clip warns "initialized randomly" before the weights below are loaded: noise in every build.
    quiet = _DropMessage("No pretrained weights loaded")
    logging.getLogger().addFilter(quiet)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    finally:
        logging.getLogger().removeFilter(quiet)
    # weights_only: a checkpoint is data, never code (docs/design.md "Determinism and safety").
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(state["state_dict"])  # float16 storage, copied into the float32 parameters
    model = model.to(device).eval()
    if str(device).startswith("cuda"):
        model = model.half()
    return model, preprocess, open_clip.get_tokenizer(name)
