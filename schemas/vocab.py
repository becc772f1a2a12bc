"""The one token id space of a CM3 corpus: specials, then text tokens, then image codes.

`tokenizers/vocab.json` is `Vocab.to_json()`; the trainer and the decoders read it back with
`Vocab.from_json()`. Ranges are half-open `[start, stop)`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

PAD, EOD, BREAK, EOSS = 0, 1, 2, 3  # fixed ids of the specials
SENTINEL_START = 4  # <sentinel:0> .. <sentinel:N-1> follow the four specials


@dataclass(frozen=True)
class Vocab:
    """Id ranges of a corpus. Text id t maps to `text_start + t`; image code c to `image_start + c`."""

    num_sentinels: int  # masking spans per document at most
    text_size: int  # entries of the text tokenizer
    image_codes: int  # codes of the image tokenizer
    tokens_per_image: int  # image tokens per image (e.g. 1024 for 256px with 8px patches)

    @property
    def sentinel_start(self) -> int:
        return SENTINEL_START

    @property
    def text_start(self) -> int:
        return SENTINEL_START + self.num_sentinels

    @property
    def image_start(self) -> int:
        return self.text_start + self.text_size

    @property
    def size(self) -> int:
        return self.image_start + self.image_codes

    def sentinel(self, i: int) -> int:
        if not 0 <= i < self.num_sentinels:
            raise ValueError(f"sentinel {i} out of range (have {self.num_sentinels})")
        return SENTINEL_START + i

    def to_json(self) -> str:
        ranges = {
            "pad": [PAD, PAD + 1],
            "eod": [EOD, EOD + 1],
            "break": [BREAK, BREAK + 1],
            "eoss": [EOSS, EOSS + 1],
            "sentinel": [SENTINEL_START, self.text_start],
            "text": [self.text_start, self.image_start],
            "image": [self.image_start, self.size],
        }
        return json.dumps({"params": asdict(self), "ranges": ranges, "size": self.size}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Vocab:
        return cls(**json.loads(text)["params"])
