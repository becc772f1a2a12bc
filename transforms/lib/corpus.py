"""Reading a built corpus: the `Corpus` that `cm3corpus query` (`pipelines/query.py`) and `generate` run on.

A query (a text, an image, or both) is embedded with the CLIP that `memory_bank/bank.json` names,
exactly as the build embeds a document (unit-norm image and text embeddings, `doc_emb` their
normalized mean), and the bank is searched:

- plain (`Corpus.search`): the top k documents by inner product with the query's own vector
  (its text embedding, its image embedding, or its `doc_emb` when it has both), rescored and
  ordered the way the build orders candidates (`transforms.lib.retrieve`: score desc, faiss id asc);
- with the build's rules (`Corpus.retrieve`, `--rules`): the query runs through the build's own
  `retrieve_batch` (image via, text via, skip above `max_similarity`, image+text first, diversity),
  so a user sees what the build would have picked for such an example. No query dropout: that is a
  training-time augmentation, and here the query is what the user typed.

What the corpus knows of a document: its caption and modality (`embeddings/*.parquet`) and its
tokens (`shards/`, where it stands as the query of its own sequence; `Corpus.documents`). Images are
shown by decoding their tokens with the corpus's image tokenizer, i.e. as the model sees them.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from schemas.records import IMAGE_TEXT, QUERY, EmbeddedExample, Example, RawSample, Reject, TokenizedDoc
from transforms.lib.clip import DEMO, resolve_clip
from transforms.lib.embed import ClipEmbedder, embedded_example
from transforms.lib.io import read_tar
from transforms.lib.layout import unmask
from transforms.lib.memory_bank import INFO_FILE, load_bank
from transforms.lib.retrieve import SEARCH_MARGIN, RetrievalRules, rescore, retrieve_batch
from transforms.lib.tokenize import decode_image, encode_caption, load_tokenizers
from transforms.lib.validate import IMAGE_PARTS, Budgets, validate

# The key of a typed query. It is no document of the corpus, so the rules' "self" skip must never
# fire for it: None equals no key, where any string could be some corpus's key.
QUERY_KEY = None
DEFAULT_K = 8
THUMB_SIDE = 128


@dataclass(slots=True)
class Hit:
    """One retrieved document, as `cm3corpus query` prints it (one JSON line with --json)."""

    rank: int  # 0-based: plain search by score; with the rules, the order the build lays them out
    key: str
    score: float  # inner product with the query vector that found it
    modality: str
    caption: str | None
    via: str  # "text", "image" (which query found it) or "doc" (a text+image query's own doc_emb)
    image: str | None = None  # the thumbnail written for it (--thumbnails), else None

    def row(self) -> dict:
        return dataclasses.asdict(self)


class Corpus:
    """A built corpus opened for querying and generation.

    Args:
        root: the build's output directory (holds memory_bank/, embeddings/, tokenizers/, shards/).
        device: where the CLIP runs.
        clip_pretrained: the CLIP weights; bank.json's `clip_pretrained` when None (banks written
            before it was recorded need it for any CLIP but the demo one).
        nprobe: IVF lists probed per search; bank.json's when None.
        bank_dir: the memory bank, when not `root/memory_bank` (a build run with --memory_bank).
    """

    def __init__(
        self,
        root: str,
        device: str = "cpu",
        clip_pretrained: str | None = None,
        nprobe: int | None = None,
        bank_dir: str | None = None,
    ) -> None:
        self.root = str(root).rstrip("/")
        self.bank_dir = bank_dir or f"{self.root}/memory_bank"
        if not os.path.exists(f"{self.bank_dir}/{INFO_FILE}"):
            raise FileNotFoundError(f"{self.bank_dir}/{INFO_FILE} not found: --corpus must be a build's output folder")
        self.bank = load_bank(self.bank_dir, nprobe)
        self.info = self.bank.info
        self.device = device
        self._clip_pretrained = clip_pretrained
        self._embedder = None
        self._captions: dict[str, str | None] | None = None
        self._tokenizers: tuple | None = None
        self._docs: dict[str, TokenizedDoc] = {}

    # -- embedding -------------------------------------------------------------------------------

    @property
    def embedder(self):
        """The bank's CLIP (`transforms.lib.embed.ClipEmbedder`), loaded on first use."""
        if self._embedder is None:
            name = self.info["clip_model"]
            pretrained = self._clip_pretrained or self.info.get("clip_pretrained")
            if pretrained is None and name != DEMO:
                raise ValueError(
                    f"{self.bank_dir}/bank.json names CLIP {name!r} but not its weights (a bank written before"
                    " bank.json recorded clip_pretrained): pass --clip_pretrained"
                )
            model, preprocess, tokenizer = resolve_clip(name, pretrained, self.device)
            self._embedder = ClipEmbedder(model, preprocess, tokenizer, self.device)
            if self._embedder.encode_texts(["probe"]).shape[1] != self.info["dim"]:
                raise ValueError(f"CLIP {name!r} does not give the bank's {self.info['dim']}-d vectors")
        return self._embedder

    def embed(self, text: str | None = None, image: bytes | None = None) -> EmbeddedExample:
        """The query as the build would embed an example with this caption and image (no dropout)."""
        if not text and image is None:
            raise ValueError("a query needs a text or an image")

        text_emb = self.embedder.encode_texts([text])[0] if text else None
        image_emb = self.embedder.encode_images([image])[0] if image is not None else None
        # The build's own assembly (doc_emb and modality exactly as a document's); the text query is
        # the text itself, without the build's query dropout.
        return embedded_example(Example(QUERY_KEY, "query", text or None, image), image_emb, text_emb, text_emb)

    # -- searching -------------------------------------------------------------------------------

    def search(self, query: EmbeddedExample, k: int = DEFAULT_K) -> list[Hit]:
        """The k nearest documents to the query's vector, no rules (what a direct faiss search returns)."""
        via, vec = _query_vector(query)
        k = min(int(k), self.bank.count)
        if k <= 0:
            return []
        q = np.ascontiguousarray(vec[None, :], dtype=np.float32)  # (1, D)
        found_scores, found = self.bank.index.search(q, min(k + SEARCH_MARGIN, self.bank.count))
        ids, scores, _ = rescore(q, found, self.bank, found_scores)  # the build's scores and order
        pairs = [(int(i), float(s)) for i, s in zip(ids[0][:k], scores[0][:k], strict=True) if i >= 0]
        return self._hits([(self.bank.keys[i], s, self.bank.modalities[i], via) for i, s in pairs])

    def retrieve(self, query: EmbeddedExample, k: int, rules=None) -> list[Hit]:
        """Up to k documents chosen by the build's retrieval rules (`transforms.lib.retrieve.retrieve_batch`)."""
        rules = rules or RetrievalRules()
        if k <= 0:
            return []
        if rules.topk < k:  # the rules can only pick from the candidates fetched
            rules = dataclasses.replace(rules, topk=k)
        neighbours, _ = retrieve_batch(self.bank, [query], rules, total=k)
        return self._hits([(n.doc_key, float(n.score), n.doc_modality, n.via) for n in neighbours])

    def _hits(self, rows: list[tuple[str, float, str, str]]) -> list[Hit]:
        captions = self.captions_of([key for key, _, _, _ in rows])
        return [Hit(r, key, score, mod, captions.get(key), via) for r, (key, score, mod, via) in enumerate(rows)]

    # -- what the corpus holds of a document ---------------------------------------------------------

    def _embedding_files(self) -> list[str]:
        return [str(f) for f in sorted(Path(self.root, "embeddings").glob("*.parquet"))]

    def captions(self) -> dict[str, str | None]:
        """key → caption of every document, from embeddings/*.parquet (read once)."""
        if self._captions is None:
            self._captions = {}
            for f in self._embedding_files():
                t = pq.read_table(f, columns=["key", "caption"])
                self._captions.update(zip(t.column("key").to_pylist(), t.column("caption").to_pylist(), strict=True))
        return self._captions

    def captions_of(self, keys: Sequence[str]) -> dict[str, str | None]:
        """key → caption (None when unknown) of these documents only: a filtered read, not the whole table."""
        if self._captions is not None:
            return {k: self._captions.get(k) for k in keys}
        files = self._embedding_files()
        if not files or not keys:
            return dict.fromkeys(keys)
        t = ds.dataset(files, format="parquet").to_table(
            columns=["key", "caption"], filter=ds.field("key").isin(list(keys))
        )
        found = dict(zip(t.column("key").to_pylist(), t.column("caption").to_pylist(), strict=True))
        return {k: found.get(k) for k in keys}

    @property
    def tokenizers(self) -> tuple:
        """(text tokenizer, image tokenizer, vocab) of the corpus."""
        if self._tokenizers is None:
            self._tokenizers = load_tokenizers(f"{self.root}/tokenizers")
        return self._tokenizers

    def documents(self, keys: Iterable[str]) -> dict[str, TokenizedDoc]:
        """The tokens of these documents, as laid out in their own sequences in shards/.

        Each document is the query (last document) of its own training sequence; the sequence is
        unmasked and its query segments read back. A caption the layout cut short is encoded again
        from embeddings/; an image cut short is left out (a partial image cannot be decoded). A key
        with no sequence (rejected while tokenizing, or from another corpus's bank) is absent.
        Reads every shard once per call for the keys not yet read: fine for the handful a query
        retrieves, not an index for bulk lookups.
        """
        wanted = {k for k in keys if k not in self._docs}
        if wanted:
            self._read_docs(wanted)
        return {k: self._docs[k] for k in keys if k in self._docs}

    def _read_docs(self, wanted: set[str]) -> None:
        text_tok, _, vocab = self.tokenizers
        shards = sorted(Path(self.root, "shards").glob("*.tar")) + sorted(Path(self.root, "shards").glob("*/*.tar"))
        for path in shards:
            for key, members in _tar_samples(path, wanted):
                meta = json.loads(members["json"])
                tokens = unmask(np.load(io.BytesIO(members["tokens.npy"]), allow_pickle=False), vocab)
                text = image = None
                for start, stop, kind, doc_index in meta["segments"]:
                    if int(doc_index) == QUERY:
                        ids = tokens[int(start) : int(stop)].tolist()
                        text, image = (ids, image) if kind == "text" else (text, ids)
                caption = self.captions_of([key])[key] if meta.get("query_text_cut") else None
                if caption:
                    text = encode_caption(text_tok, vocab, caption)
                if meta.get("query_image_cut"):
                    image = None
                modality = meta.get("query_modality", IMAGE_TEXT)
                self._docs[key] = TokenizedDoc(key, modality, text, image)
                wanted.discard(key)
            if not wanted:
                return

    def thumbnail(self, doc: TokenizedDoc, side: int = THUMB_SIDE):
        """The document's image decoded from its tokens (a PIL image), or None when it has none."""
        if not doc.image_ids:
            return None
        _, image_tok, vocab = self.tokenizers
        image = decode_image(image_tok, vocab, doc.image_ids)
        return image.resize((side, side)) if side and image.size[0] < side else image


def _query_vector(query: EmbeddedExample) -> tuple[str, np.ndarray]:
    if query.text_emb is not None and query.image_emb is not None:
        return "doc", np.asarray(query.doc_emb, np.float32)
    if query.text_emb is not None:
        return "text", np.asarray(query.text_emb, np.float32)
    return "image", np.asarray(query.image_emb, np.float32)


def _tar_samples(path: Path, wanted: set[str]) -> Iterable[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of the wanted keys of one of the build's own shards, in order.

    Member names are split into key and extension only; they never become paths.
    """
    current, parts = None, {}
    for name, data in read_tar(str(path), keep=lambda name: name.split(".", 1)[0] in wanted):
        if "." not in name:
            continue
        key, ext = name.split(".", 1)
        if key != current:
            if current in wanted and {"json", "tokens.npy"} <= parts.keys():
                yield current, parts
            current, parts = key, {}
        parts[ext] = data
    if current in wanted and {"json", "tokens.npy"} <= parts.keys():
        yield current, parts


def safe_name(key: str, rank: int) -> str:
    """A file name for a document's thumbnail: the rank and a hash, never the key itself (keys are input)."""
    return f"{rank:02d}-{hashlib.sha256(key.encode('utf-8', 'surrogatepass')).hexdigest()[:12]}.png"


def write_thumbnails(corpus: Corpus, hits: Sequence[Hit], directory: str) -> None:
    """Decode each hit's image into `directory` and set `hit.image` to its path (None when it has none)."""
    os.makedirs(directory, exist_ok=True)
    docs = corpus.documents([h.key for h in hits])
    for h in hits:
        doc = docs.get(h.key)
        image = corpus.thumbnail(doc) if doc is not None else None
        if image is not None:
            h.image = os.path.join(directory, safe_name(h.key, h.rank))
            image.save(h.image, format="PNG")


def query(
    corpus: Corpus | str,
    text: str | None = None,
    image: bytes | None = None,
    k: int = DEFAULT_K,
    rules: Any = None,
) -> list[Hit]:
    """Search a built corpus's memory bank: the package form of `cm3corpus query`.

    Args:
        corpus: a `Corpus` or the build's output directory.
        text: the query text.
        image: the query image, encoded (PNG, JPEG, ...).
        k: documents to return at most.
        rules: a `transforms.lib.retrieve.RetrievalRules` to pick as the build does; None for a plain search.
    """
    c = corpus if isinstance(corpus, Corpus) else Corpus(corpus)
    q = c.embed(text, image)
    return c.search(q, k) if rules is None else c.retrieve(q, k, rules)


def read_image_file(path: str, flag: str = "--image") -> bytes:
    """An image file prepared exactly as the build prepares a document's image, or a one-line error.

    The build's own `validate` (allowed formats, byte and pixel budgets, EXIF orientation, RGB with alpha
    flattened onto white), so a query or prompt image is embedded and tokenized as the bank's were.
    """
    budgets = Budgets()
    try:
        with open(path, "rb") as f:
            data = f.read(budgets.max_image_bytes + 1)  # validate refuses more; never read an unbounded file
    except OSError as e:
        raise SystemExit(f"{flag}: cannot read image {path}: {e}") from None
    checked = validate(RawSample("query", path, (path, 0), parts={IMAGE_PARTS[0]: data}), budgets)
    if isinstance(checked, Reject) or checked.image is None:
        why = f"{checked.reason} ({checked.detail})" if isinstance(checked, Reject) else "no image"
        raise SystemExit(f"{flag}: cannot use image {path}: {why}")
    return checked.image


# The retrieval-rule flags `query --rules` and `generate` share: (flag, check, what it must be). NaN fails.
RULE_CHECKS = (
    ("--max_similarity", lambda a: -1 <= a.max_similarity <= 1, "in [-1, 1]"),
    ("--diversity_threshold", lambda a: -1 <= a.diversity_threshold <= 1, "in [-1, 1]"),
    ("--topk", lambda a: a.topk >= 1, "at least 1"),
)


def check_flags(args: argparse.Namespace, checks, command: str) -> None:
    """Refuse the first flag whose check fails, in one line naming it."""
    for flag, ok, what in checks:
        if not ok(args):
            raise SystemExit(f"cm3corpus {command}: {flag} must be {what}, got {getattr(args, flag[2:])}")
