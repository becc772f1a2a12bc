"""Meta Chameleon's id space (`--vocab chameleon:DIR`): which token plays which CM3 role, and why.

Everything is read from the release's `text_tokenizer.json` (`DIR/text_tokenizer.json` or
`DIR/tokenizer/text_tokenizer.json`); no id is hard-coded.

- Text: Chameleon's own BPE, its ids used as they are. Special tokens written inside a caption
  (`<racm3:break>`, `<reserved…>`) are encoded as plain text (`encode_special_tokens`), never as
  the special, so a caption cannot forge an image or a sentinel.
- Image codes: code c is the entry named `IMGIMG` + c's decimal digits spelt A–J + `Z` (as
  transformers' `ChameleonImageVocabularyMapping` reads them), found by name in the vocabulary.
  Any image tokenizer with at most as many codes as there are such entries (8,192) fits.
- An image segment is `<racm3:break>` + its IMGIMG ids + `<eoss>`: what Chameleon's
  `TokenManager` writes, and what HF's processor expands `<image>` into (`boi`, `eoi`).
- `<eoss>` therefore means end-of-image here, and CM3's end-of-span marker cannot be `<eoss>`: it
  is a reserved token (the clash is resolved in CM3's side, since Chameleon's weights know
  `<eoss>` as end-of-image).
- CM3's `<eod>` (document separator), `<break>` (modality separator), span end and sentinels are
  the lowest-id `<reserved#####>` tokens, in that order, skipping `<reserved08706>` (HF's
  `sep_token`) and `<reserved08707>` (the converted tokenizer's `<image>` placeholder).
- Padding is `<pad>`.

`vocab.json` records each role with its token and id, the sentinels, and the code → id table.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import fsspec

from schemas.vocab import ChameleonVocab

if TYPE_CHECKING:
    import tokenizers

PREFIX = "chameleon:"
IMAGE_PREFIX = "IMGIMG"
BOI, EOI, PAD = "<racm3:break>", "<eoss>", "<pad>"
# Reserved tokens transformers' Chameleon already gives a meaning to: never chosen.
HF_TAKEN = frozenset({"<reserved08706>", "<reserved08707>"})
_RESERVED = re.compile(r"<reserved\d+>")
_DIGITS = {chr(ord("A") + i): str(i) for i in range(10)}


def image_code_of(name: str) -> int | None:
    """The code an `IMGIMG...Z` entry stands for (`IMGIMGBCZ` → 12), or None for any other name."""
    body = name[len(IMAGE_PREFIX) : -1]
    if not name.startswith(IMAGE_PREFIX) or not name.endswith("Z") or not body or any(c not in _DIGITS for c in body):
        return None
    return int("".join(_DIGITS[c] for c in body))


def image_token_name(code: int) -> str:
    """`image_code_of`'s inverse: 12 → `IMGIMGBCZ`."""
    return IMAGE_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def tokenizer_path(directory: str) -> str:
    """The `text_tokenizer.json` of a Chameleon/Anole directory (DIR itself or DIR/tokenizer)."""
    d = directory.rstrip("/")
    for path in (f"{d}/text_tokenizer.json", f"{d}/tokenizer/text_tokenizer.json"):
        fs, p = fsspec.core.url_to_fs(path)
        if fs.exists(p):
            return path
    raise ValueError(f"--vocab chameleon:{directory}: no text_tokenizer.json there or under tokenizer/")


def chameleon_vocab(text_tok: tokenizers.Tokenizer, num_codes: int, tokens_per_image: int, num_sentinels: int):
    """The `ChameleonVocab` of a Chameleon tokenizer for an image tokenizer of `num_codes` codes.

    Args:
        text_tok: the release's tokenizer (HF tokenizers).
        num_codes: codes of the image tokenizer; each needs its IMGIMG entry.
        tokens_per_image: codes per image.
        num_sentinels: CM3 sentinels wanted.
    """
    names = text_tok.get_vocab(with_added_tokens=True)  # token -> id
    missing = [t for t in (PAD, BOI, EOI) if t not in names]
    if missing:
        raise ValueError(f"not a Chameleon tokenizer: no {', '.join(missing)}")
    by_code = {}
    for name, i in names.items():
        code = image_code_of(name)
        if code is not None:
            by_code[code] = i
    absent = [c for c in range(num_codes) if c not in by_code]
    if absent:
        raise ValueError(
            f"the image tokenizer has {num_codes} codes but the Chameleon vocabulary has IMGIMG entries for"
            f" {len(by_code)} (first missing code {absent[0]}); use an image tokenizer of at most that many codes"
        )
    reserved = sorted((i, n) for n, i in names.items() if _RESERVED.fullmatch(n) and n not in HF_TAKEN)
    need = 3 + num_sentinels
    if len(reserved) < need:
        raise ValueError(f"the Chameleon vocabulary has {len(reserved)} free reserved tokens; CM3 needs {need}")
    (eod, brk, eoss), sentinels = reserved[:3], reserved[3:need]
    roles = (
        ("pad", PAD, names[PAD]),
        ("eod", eod[1], eod[0]),
        ("break", brk[1], brk[0]),
        ("eoss", eoss[1], eoss[0]),
        ("boi", BOI, names[BOI]),
        ("eoi", EOI, names[EOI]),
    )
    return ChameleonVocab(
        size=text_tok.get_vocab_size(with_added_tokens=True),
        tokens_per_image=tokens_per_image,
        roles=roles,
        sentinels=tuple((n, i) for i, n in sentinels),
        image_token_ids=tuple(by_code[c] for c in range(num_codes)),
    )


def text_only(text_tok: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """Make a Chameleon tokenizer read special-token strings in captions as plain text."""
    text_tok.encode_special_tokens = True
    return text_tok
