"""The token id space of a CM3 corpus.

`Vocab` (the default, "native"): specials, then text tokens, then image codes, in ranges.
`ChameleonVocab`: Meta Chameleon's 65,536-entry space, every id read from its `text_tokenizer.json`
(see `transforms/lib/chameleon.py` for how each CM3 role was chosen).

`tokenizers/vocab.json` is `to_json()` of either; `load_vocab` reads both back (`Vocab.from_json`
only the native one, which is what the trainer here can train on). Ranges are half-open `[start, stop)`.

Both offer the same small interface the layout and masking code use: `pad_id`, `eod_id`,
`break_id`, `eoss_id`, `sentinel(i)`, `is_sentinel(t)`, `num_sentinels`, `text_ids(local ids)`,
`image_ids(codes)` (the ids of one image segment) and `codes_of_image(ids)` (back to codes).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property

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

    kind = "native"
    # The role interface shared with ChameleonVocab.
    pad_id, eod_id, break_id, eoss_id = PAD, EOD, BREAK, EOSS

    def is_sentinel(self, t: int) -> bool:
        return SENTINEL_START <= t < self.text_start

    def text_ids(self, local: Sequence[int]) -> list[int]:
        """Text tokenizer ids → global ids."""
        return [self.text_start + int(t) for t in local]

    def image_ids(self, codes: Sequence[int]) -> list[int]:
        """One image's codes → its segment's global ids (the codes shifted into the image range)."""
        return [self.image_start + int(c) for c in codes]

    def codes_of_image(self, ids: Sequence[int]) -> list[int]:
        """An image segment's ids → its codes; raises ValueError on a bad length or id."""
        codes = [int(i) - self.image_start for i in ids]
        if len(codes) != self.tokens_per_image:
            raise ValueError(f"expected {self.tokens_per_image} image ids, got {len(codes)}")
        if codes and (min(codes) < 0 or max(codes) >= self.image_codes):
            raise ValueError("image ids outside the image range")
        return codes

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
        doc = json.loads(text)
        if doc.get("kind", "native") != "native":
            raise ValueError(
                f"this vocab.json is in the {doc['kind']!r} id space; cm3corpus's own trainer and sampler read only"
                " native corpora (train Chameleon-space shards with Hugging Face's Chameleon, see the README)"
            )
        return cls(**doc["params"])


@dataclass(frozen=True)
class ChameleonVocab:
    """Chameleon's id space: every role is an id of the release's `text_tokenizer.json`.

    An image is written as Chameleon writes it: `boi` (`<racm3:break>`), its codes mapped to their
    `IMGIMG...Z` entries, `eoi` (`<eoss>`). CM3's own markers (`<eod>`, `<break>`, the span end
    and the sentinels) are reserved tokens, chosen by `transforms.lib.chameleon.chameleon_vocab`.
    """

    size: int  # entries of the tokenizer (65,536 in the release)
    tokens_per_image: int  # codes per image (1024 for the release's 512 px VQ-GAN)
    roles: tuple[tuple[str, str, int], ...]  # (role, token, id): pad, eod, break, eoss, boi, eoi
    sentinels: tuple[tuple[str, int], ...]  # (token, id) of <sentinel:0>, <sentinel:1>, ...
    image_token_ids: tuple[int, ...] = field(repr=False)  # image code c -> the id of its IMGIMG entry

    kind = "chameleon"

    @cached_property
    def _ids(self) -> dict[str, int]:
        return {r: i for r, _, i in self.roles}

    @property
    def pad_id(self) -> int:
        return self._ids["pad"]

    @property
    def eod_id(self) -> int:
        return self._ids["eod"]

    @property
    def break_id(self) -> int:
        return self._ids["break"]

    @property
    def eoss_id(self) -> int:
        return self._ids["eoss"]

    @property
    def boi_id(self) -> int:
        return self._ids["boi"]

    @property
    def eoi_id(self) -> int:
        return self._ids["eoi"]

    @property
    def num_sentinels(self) -> int:
        return len(self.sentinels)

    @property
    def image_codes(self) -> int:
        return len(self.image_token_ids)

    @cached_property
    def _sentinel_set(self) -> frozenset[int]:
        return frozenset(i for _, i in self.sentinels)

    @cached_property
    def _code_of(self) -> dict[int, int]:
        return {t: c for c, t in enumerate(self.image_token_ids)}

    @cached_property
    def _not_text(self) -> frozenset[int]:
        return frozenset(self.image_token_ids) | self._sentinel_set | {i for _, _, i in self.roles}

    def sentinel(self, i: int) -> int:
        if not 0 <= i < self.num_sentinels:
            raise ValueError(f"sentinel {i} out of range (have {self.num_sentinels})")
        return self.sentinels[i][1]

    def is_sentinel(self, t: int) -> bool:
        return t in self._sentinel_set

    def text_ids(self, local: Sequence[int]) -> list[int]:
        """Chameleon's BPE ids are already global; one that is an image or CM3 role id is refused."""
        ids = [int(t) for t in local]
        bad = [t for t in ids if t in self._not_text]
        if bad:
            raise ValueError(f"caption tokenized to image/special ids {bad[:4]}")
        return ids

    def image_ids(self, codes: Sequence[int]) -> list[int]:
        """One image's codes → `<racm3:break>`, the codes' IMGIMG ids, `<eoss>` (Chameleon's own layout)."""
        table = self.image_token_ids
        return [self.boi_id, *(table[int(c)] for c in codes), self.eoi_id]

    def codes_of_image(self, ids: Sequence[int]) -> list[int]:
        """An image segment (boi, IMGIMG ids, eoi) → its codes; raises ValueError when malformed."""
        ids = [int(i) for i in ids]
        if len(ids) != self.tokens_per_image + 2 or ids[0] != self.boi_id or ids[-1] != self.eoi_id:
            raise ValueError(f"expected <racm3:break> + {self.tokens_per_image} image ids + <eoss>")
        try:
            return [self._code_of[i] for i in ids[1:-1]]
        except KeyError as e:
            raise ValueError(f"id {e.args[0]} is not an image token") from None

    def to_json(self) -> str:
        doc = {
            "kind": self.kind,
            "size": self.size,
            "tokens_per_image": self.tokens_per_image,
            "roles": {r: {"token": t, "id": i} for r, t, i in self.roles},
            "sentinels": [{"token": t, "id": i} for t, i in self.sentinels],
            "image_codes": len(self.image_token_ids),
            "image_token_ids": list(self.image_token_ids),
            "image_segment": "boi, image_token_ids[code] for each code, eoi",
        }
        return json.dumps(doc, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ChameleonVocab:
        doc = json.loads(text)
        order = ("pad", "eod", "break", "eoss", "boi", "eoi")
        return cls(
            size=int(doc["size"]),
            tokens_per_image=int(doc["tokens_per_image"]),
            roles=tuple((r, doc["roles"][r]["token"], int(doc["roles"][r]["id"])) for r in order),
            sentinels=tuple((s["token"], int(s["id"])) for s in doc["sentinels"]),
            image_token_ids=tuple(int(i) for i in doc["image_token_ids"]),
        )


def load_vocab(text: str) -> Vocab | ChameleonVocab:
    """Either id space from its `vocab.json` text (dispatching on `kind`; native when absent)."""
    kind = json.loads(text).get("kind", "native")
    if kind == "chameleon":
        return ChameleonVocab.from_json(text)
    return Vocab.from_json(text)
