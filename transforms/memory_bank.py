"""The memory bank's Beam build: train on a sample, fill parts where they lie, merge them in order.

The bank itself (layout, faiss ids, index factory, train/add/merge, reading and writing a bank
directory) is `transforms/lib/memory_bank.py`; this module holds the two PTransforms that build or grow
one inside a pipeline, and their per-element steps.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from schemas.artifacts import MEMORY_BANK_IDS
from schemas.records import EmbeddedExample
from transforms.common import KeyHashBuckets
from transforms.lib.memory_bank import (
    IDS_FILE,
    INDEX_FILE,
    INFO_FILE,
    PARTS_DIR,
    _fs,
    add_part,
    bank_info,
    choose_index_factory,
    default_nprobe,
    deserialize,
    extend_bank,
    ids_table,
    merge_parts,
    read_index,
    serialize,
    set_nprobe,
    train_index,
    write_bank,
    write_ids,
    write_index,
)
from transforms.lib.rng import stable_hash


@dataclass(frozen=True)
class _Trained:
    """The trained empty index travelling from the train step to the fill and merge steps."""

    factory: str
    index: bytes
    nprobe: int | None


PART_DOCS = 100_000  # documents per filled part when the part count is derived from the corpus size


def _entry(e: EmbeddedExample):
    return e.key, e.modality, np.asarray(e.doc_emb, dtype=np.float32)


def _document(e: EmbeddedExample) -> EmbeddedExample:
    """What the bank reads of an example: key, modality and document vector."""
    return EmbeddedExample(e.key, None, e.modality, doc_emb=e.doc_emb)


def _sample_entry(e: EmbeddedExample, seed: int):
    # The lowest hashes form the sample: deterministic and order-free, unlike Sample.FixedSizeGlobally.
    return -stable_hash(f"{seed}\x00{e.key}"), np.asarray(e.doc_emb, dtype=np.float32)


def _train(sample: list, counts: dict, factory: str | None, dim: int | None, nprobe: int | None) -> _Trained:
    n = sum(counts.values())
    vectors = [v for _, v in sorted(sample, key=lambda hv: hv[0], reverse=True)]
    dim = int(vectors[0].shape[0]) if vectors else dim
    if dim is None:
        raise ValueError("BuildMemoryBank: no documents to index (pass dim= to write an empty bank)")
    factory = factory or choose_index_factory(n, dim, max_train=len(vectors))
    index = train_index(np.stack(vectors) if vectors else np.zeros((0, dim), np.float32), factory, dim)
    return _Trained(factory, serialize(index), nprobe if nprobe is not None else default_nprobe(index))


def _fill_part(group: tuple, trained: _Trained, counts: dict, bank_dir: str) -> tuple[int, int]:
    part, entries = group
    entries = sorted(entries, key=lambda e: e[0])
    start = sum(n for p, n in counts.items() if p < part)
    ids = np.arange(start, start + len(entries), dtype=np.int64)
    index = add_part(trained.index, np.stack([v for _, _, v in entries]), ids)
    stem = f"{bank_dir}/{PARTS_DIR}/part-{part:05d}"
    write_index(f"{stem}.faiss", index)
    write_ids(f"{stem}.ids.parquet", [ids_table(ids, [k for k, _, _ in entries], [m for _, m, _ in entries])])
    return part, len(entries)


def _merge(parts: list, trained: _Trained, bank_dir: str, clip_model: str, clip_pretrained: str | None = None) -> str:
    order = [p for p, _ in sorted(parts)]
    stems = [f"{bank_dir}/{PARTS_DIR}/part-{p:05d}" for p in order]
    index = merge_parts(deserialize(trained.index), (read_index(f"{s}.faiss") for s in stems))
    fs, root = _fs(bank_dir)

    def id_tables():
        for s in stems:
            with fs.open(f"{root}/{PARTS_DIR}/{s.rsplit('/', 1)[1]}.ids.parquet", "rb") as f:
                yield pq.read_table(f, schema=MEMORY_BANK_IDS)

    set_nprobe(index, trained.nprobe)
    info = bank_info(index, clip_model, trained.factory, trained.nprobe, clip_pretrained)
    write_bank(bank_dir, index, id_tables(), info)
    if fs.exists(f"{root}/{PARTS_DIR}"):
        fs.rm(f"{root}/{PARTS_DIR}", recursive=True)
    return bank_dir


class BuildMemoryBank(beam.PTransform):
    """PCollection[EmbeddedExample] → PCollection[str]: the one bank directory, once written.

    Train on a deterministic sample, fill parts where they lie, merge in order (module docstring).
    Use the output as a side input (`beam.pvalue.AsSingleton`) of `transforms.retrieve.Retrieve`.

    Args:
        bank_dir: the bank directory to write (fsspec URL), e.g. `OUTPUT/_staging/memory_bank`.
        clip_model: the CLIP model name recorded in bank.json.
        clip_pretrained: the CLIP weights recorded in bank.json (tag or checkpoint path).
        index_factory: FAISS factory string; `choose_index_factory` from the bank size when None.
        num_parts: parts the bank is filled in; None derives it from the corpus size (PART_DOCS
            documents a part), so no worker ever holds more than one part's vectors. Either way it
            follows from the input alone, as it decides the faiss ids.
        train_size: largest training sample (the lowest key hashes).
        nprobe: IVF lists probed per query; `default_nprobe` when None.
        dim: embedding dimension, needed only to write an empty bank from an empty input.
        seed: the run's seed (picks the training sample).
    """

    def __init__(
        self,
        bank_dir: str,
        clip_model: str,
        index_factory: str | None = None,
        num_parts: int | None = None,
        train_size: int = 2**17,
        nprobe: int | None = None,
        dim: int | None = None,
        seed: int = 0,
        clip_pretrained: str | None = None,
    ):
        super().__init__()
        self._dir, self._clip, self._factory = bank_dir, clip_model, index_factory
        self._clip_pretrained = clip_pretrained
        self._parts, self._train_size, self._nprobe, self._dim, self._seed = num_parts, train_size, nprobe, dim, seed

    def expand(self, examples):
        side = beam.pvalue
        examples = examples | "Documents" >> beam.Map(_document)  # held until the part count is known
        fixed = self._parts
        entries, _ = examples | "ToParts" >> KeyHashBuckets(lambda n: fixed or max(1, -(-n // PART_DOCS)), value=_entry)
        counts = entries | "PartSizes" >> beam.combiners.Count.PerKey()
        trained = (
            examples
            | "SampleKeys" >> beam.Map(_sample_entry, self._seed)
            | "Sample" >> beam.combiners.Top.Of(self._train_size, key=lambda hv: hv[0])
            | "Train" >> beam.Map(_train, side.AsDict(counts), self._factory, self._dim, self._nprobe)
        )
        return (
            entries
            | "GroupParts" >> beam.GroupByKey()
            | "FillParts" >> beam.Map(_fill_part, side.AsSingleton(trained), side.AsDict(counts), self._dir)
            | "PartList" >> beam.combiners.ToList()
            | "Merge" >> beam.Map(_merge, side.AsSingleton(trained), self._dir, self._clip, self._clip_pretrained)
        )


# ----------------------------------------------------------------------------------------------------
# Growing a bank: new documents added to a copy of an existing one, without retraining.


def _bank_keys(bank_dir: str) -> list[str]:
    fs, root = _fs(bank_dir)
    with fs.open(f"{root}/{IDS_FILE}", "rb") as f:
        return pq.read_table(f, columns=["key"]).column("key").to_pylist()


def _extend_copy(entries: list, source_dir: str, bank_dir: str) -> str:
    """Copy the bank at `source_dir` to `bank_dir` and add the entries whose keys it lacks."""
    src_fs, src = _fs(source_dir)
    dst_fs, dst = _fs(bank_dir)
    dst_fs.makedirs(dst, exist_ok=True)
    for name in (INDEX_FILE, IDS_FILE, INFO_FILE):  # bank.json last: it marks a finished bank
        with src_fs.open(f"{src}/{name}", "rb") as f, dst_fs.open(f"{dst}/{name}", "wb") as g:
            shutil.copyfileobj(f, g, 16 * 2**20)  # in pieces: never the index file in memory
    known = set(_bank_keys(bank_dir))  # from ids.parquet alone; extend_bank loads the index once
    new = sorted((key, vec, mod) for key, vec, mod in entries if key not in known)
    Metrics.counter("memory_bank", "documents_already_in_bank").inc(len(entries) - len(new))
    Metrics.counter("memory_bank", "documents_added").inc(len(new))
    if new:
        vectors = np.stack([np.asarray(v, dtype=np.float32) for _, v, _ in new])
        extend_bank(bank_dir, vectors, [k for k, _, _ in new], [m for _, _, m in new])
    return bank_dir


class ExtendMemoryBank(beam.PTransform):
    """PCollection[EmbeddedExample] → one-element PCollection holding `bank_dir`: the bank at
    `source_dir` plus this run's documents (those whose keys it does not already hold).

    Nothing is retrained: IVF lists and PQ codebooks stay as they were (rebuild when the new data
    differs a lot from the old). The source bank is left untouched. Neighbours written by earlier
    runs are not refreshed: rerun their build against the grown bank for old queries to see new
    documents. The new documents' vectors meet on one worker, as in the bank's own build.
    """

    def __init__(self, source_dir: str, bank_dir: str):
        super().__init__()
        self._source, self._bank_dir = source_dir, bank_dir

    def expand(self, examples):
        return (
            examples
            | "Entries" >> beam.Map(lambda e: (e.key, e.doc_emb, e.modality))
            | "Collect" >> beam.combiners.ToList()
            | "Extend" >> beam.Map(_extend_copy, self._source, self._bank_dir)
        )
