"""The memory bank: a FAISS inner-product index over document embeddings, plus its id → key table.

Layout of a bank directory (any fsspec URL):

    index.faiss    the FAISS index; vector `i` is the document with faiss id `i`
    ids.parquet    faiss_id → key, modality (schema `MEMORY_BANK_IDS`), in faiss id order
    bank.json      CLIP model and weights, dim, metric, index factory, count, nprobe

The index holds `doc_emb` (RA-CM3: the mean of the normalized image and text embeddings, normalized),
so inner product is cosine similarity. Faiss ids are 0..count-1, assigned from the keys alone
(`part = stable_hash(key) % num_parts`, then key order within a part, parts in order), so reruns and
runners agree on every id and on the index's bytes.

Scale (as autofaiss does it): the index is trained once on a deterministic sample, then each part is
filled independently on whichever worker holds it, written as its own small index, and the parts are
merged in order into the final one. Only the merge step sees the whole bank, once: it holds the growing
index plus one part at a time, never the corpus as Python objects and never the bank twice. The Beam
steps that do so are `transforms/memory_bank.py`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.artifacts import MEMORY_BANK_IDS, SCHEMA_VERSION
from schemas.records import IMAGE_TEXT, MODALITIES
from transforms.lib.io import atomic_open

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
INFO_FILE = "bank.json"
PARTS_DIR = "_parts"
METRIC = "inner_product"

FLAT_MAX = 50_000  # below this an exact search is cheap enough (and needs no training)
IVF_FLAT_MAX_BYTES = 4 * 2**30  # raw float32 vectors up to this size stay uncompressed (IVF,Flat)
HNSW_QUANTIZER_MIN_NLIST = 16_384  # from here a flat coarse quantizer is slow to search; use HNSW
MIN_POINTS_PER_CENTROID = 39  # faiss warns below this many training points per IVF list


def choose_index_factory(n: int, dim: int, max_train: int | None = None) -> str:
    """A FAISS index-factory string for `n` vectors of `dim` dimensions, inner product metric.

    Follows autofaiss's rules of thumb: exact `Flat` for small banks; `IVF{nlist},Flat` with
    nlist ≈ 4·√n while the raw vectors fit in a few GiB; `IVF{nlist},PQ{m}x8` (dim/4 bytes per vector)
    beyond, with an HNSW coarse quantizer once nlist is large.

    Args:
        n: number of documents in the bank.
        dim: embedding dimension.
        max_train: training sample size, when known; caps nlist so each list gets enough points.
    """
    if n < FLAT_MAX:
        return "Flat"
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    cap = min(n, max_train or n) // MIN_POINTS_PER_CENTROID
    nlist = max(1, min(nlist, 2 ** int(math.log2(max(cap, 1))), 65_536))
    if n * dim * 4 <= IVF_FLAT_MAX_BYTES:
        return f"IVF{nlist},Flat"
    m = max(d for d in range(1, max(dim // 4, 1) + 1) if dim % d == 0)  # PQ needs m to divide dim
    quantizer = f"IVF{nlist}_HNSW32" if nlist >= HNSW_QUANTIZER_MIN_NLIST else f"IVF{nlist}"
    return f"{quantizer},PQ{m}x8"


def default_nprobe(index) -> int | None:
    """Lists probed per query for an IVF index (None for others): 1/8 of the lists, within [16, 512].

    Retrieval is a batch job, so recall weighs more than latency here. Clustered data such as CLIP
    embeddings needs far fewer probes than uniform random vectors (the worst case); tune on your data.
    """
    import faiss  # lazy: faiss loads only where an index is touched

    try:
        nlist = faiss.extract_index_ivf(index).nlist
    except RuntimeError:  # not an IVF index
        return None
    return min(nlist, max(16, min(512, nlist // 8)))


def set_nprobe(index, nprobe: int | None) -> None:
    """Set how many IVF lists a search visits; a no-op for non-IVF indexes."""
    import faiss  # lazy: faiss loads only where an index is touched

    if nprobe is None:
        return
    try:
        faiss.extract_index_ivf(index).nprobe = int(nprobe)
    except RuntimeError:
        pass


def _is_ivf(index) -> bool:
    import faiss  # lazy: faiss loads only where an index is touched

    try:
        faiss.extract_index_ivf(index)
    except RuntimeError:
        return False
    return True


def train_index(sample: np.ndarray, factory: str, dim: int):
    """An empty, trained index for `factory` (inner product), trained on `sample` (S, dim) float32.

    Faiss's k-means uses a fixed seed, so the same sample in the same order gives the same index.
    """
    import faiss  # lazy: faiss loads only where an index is touched

    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return index


def serialize(index) -> bytes:
    """The index as bytes (to pass a trained, empty or small index between pipeline stages)."""
    import faiss  # lazy: faiss loads only where an index is touched

    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes):
    import faiss  # lazy: faiss loads only where an index is touched

    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def add_part(trained, vectors: np.ndarray, ids: np.ndarray):
    """Fill a copy of a trained, empty index with one part of the bank.

    Args:
        trained: the trained empty index, or its `serialize`d bytes (what a worker receives); an index
            object is cloned at call time, so do not merge into it while parts are still being filled.
        vectors: (N, dim) float32, unit norm.
        ids: (N,) int64 faiss ids, consecutive (a part is a contiguous id range).

    Returns:
        The filled part index, ready for `merge_parts`.
    """
    index = deserialize(trained) if isinstance(trained, bytes | bytearray) else _clone(trained)
    _add(index, vectors, ids, base=int(ids[0]) if len(ids) else 0)
    return index


def _clone(index):
    import faiss  # lazy: faiss loads only where an index is touched

    return faiss.clone_index(index)


def _add(index, vectors: np.ndarray, ids: np.ndarray, base: int) -> None:
    """Add vectors whose ids are the consecutive range starting at `base`.

    Ids that continue the index (base == ntotal) are what a plain `add` assigns, for every index type
    (and the only way an IVF index with an array direct map accepts more). A part filled apart from
    the others stores its ids in IVF; a Flat part stores positions, which `merge_parts` lines up by
    merging parts in id order.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) and not np.array_equal(ids, np.arange(base, base + len(ids))):
        raise ValueError("faiss ids of a part must be one consecutive range")
    if base != index.ntotal and _is_ivf(index):
        index.add_with_ids(vectors, ids)
    else:
        index.add(vectors)


def merge_parts(trained, parts) -> Any:
    """Merge part indexes into the trained empty index, in the order given (ascending id ranges).

    Args:
        trained: the trained empty index (it is filled in place and returned).
        parts: an iterable of part indexes; each is released after it is merged, so a generator that
            reads them one by one keeps at most one part in memory beside the growing index.
    """
    for part in parts:
        if part.ntotal:
            trained.merge_from(part, 0)  # add_id=0: IVF keeps the part's ids; Flat appends in order
        del part
    if _is_ivf(trained):
        import faiss  # lazy: faiss loads only where an index is touched

        # A direct map (id → list position) lets retrieval reconstruct candidates for the diversity
        # rule; it is saved with the index (8 bytes per document).
        faiss.extract_index_ivf(trained).make_direct_map()
    return trained


# ----------------------------------------------------------------------------------------------------
# Reading and writing a bank directory.


@dataclass
class Bank:
    """A loaded bank. Not slotted: `apache_beam.utils.shared` holds it by weak reference.

    Attributes:
        index: the FAISS index (nprobe already set).
        keys: faiss id → document key.
        modalities: faiss id → modality (one of MODALITIES).
        info: the contents of bank.json.
    """

    index: Any
    keys: list[str]
    modalities: list[str]
    info: dict = field(default_factory=dict)
    _flat: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids), dim) float32 stored vectors (exact for Flat and IVF,Flat; PQ's decoding for PQ)."""
        table, pos = self.vector_table(np.asarray(ids, dtype=np.int64))
        return table[pos]

    @property
    def is_flat(self) -> bool:
        """Whether the index is exhaustive (`IndexFlat`): its search takes batch-size-dependent paths."""
        import faiss  # lazy: faiss loads only where an index is touched

        return self._flat is not None or isinstance(self.index, faiss.IndexFlat)

    def vector_table(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A (U, dim) matrix holding the vectors of `ids` and the row of each id in it (same shape as ids).

        A Flat index hands out a zero-copy view of its own storage; others reconstruct each
        distinct id once. Negative ids (FAISS's padding) map to row 0 and must be masked by the caller.
        """
        import faiss  # lazy: faiss loads only where an index is touched

        ids = np.asarray(ids, dtype=np.int64)
        if self.is_flat:
            if self._flat is None:  # valid while the index lives and is not added to (the Bank owns both)
                n, d = self.count, self.index.d
                self._flat = faiss.rev_swig_ptr(self.index.get_xb(), n * d).reshape(n, d) if n else np.zeros((0, d))
            return self._flat, np.maximum(ids, 0)
        uniq = np.unique(ids[ids >= 0])
        table = self.index.reconstruct_batch(uniq) if len(uniq) else np.zeros((1, self.index.d), np.float32)
        return table, np.minimum(np.searchsorted(uniq, np.maximum(ids, 0)), max(len(uniq) - 1, 0))


def ids_table(ids: np.ndarray, keys: list[str], modalities: list[str]) -> pa.Table:
    """The `ids.parquet` rows for one contiguous id range."""
    return pa.table(
        {"faiss_id": pa.array(ids, pa.int64()), "key": pa.array(keys, pa.string()), "modality": modalities},
        schema=MEMORY_BANK_IDS,
    )


def _fs(path: str):
    return fsspec.core.url_to_fs(path)


def write_index(path: str, index) -> None:
    """Write a FAISS index to `path` (any fsspec URL) under a temporary name, then rename it.

    Streams through a callback writer, so a remote path never needs a second in-memory copy.
    """
    import faiss  # lazy: faiss loads only where an index is touched

    with atomic_open(path) as f:
        faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))


def read_index(path: str):
    """Read a FAISS index from `path` (any fsspec URL)."""
    import faiss  # lazy: faiss loads only where an index is touched

    fs, target = _fs(path)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return faiss.read_index(target)
    with fs.open(target, "rb") as f:
        return faiss.read_index(faiss.PyCallbackIOReader(f.read))


def _write_json(path: str, data: dict) -> None:
    with atomic_open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)


def write_ids(path: str, tables) -> None:
    """Stream `ids.parquet` from an iterable of per-part tables (temporary name, then rename)."""
    with atomic_open(path) as f, pq.ParquetWriter(f, MEMORY_BANK_IDS, compression="zstd") as w:
        for t in tables:
            w.write_table(t)


def bank_info(index, clip_model: str, factory: str, nprobe: int | None, clip_pretrained: str | None = None) -> dict:
    """The contents of bank.json.

    `clip_pretrained` (the weights: an open_clip tag or a checkpoint path) lets `cm3corpus query` and
    `generate` embed a query with the very CLIP the bank was built with. Banks written before it was
    recorded have no such entry; readers then ask for it (`transforms.lib.corpus.Corpus`).
    """
    return {
        "clip_model": clip_model,
        "clip_pretrained": clip_pretrained,
        "dim": int(index.d),
        "metric": METRIC,
        "vector": "doc_emb",
        "index_factory": factory,
        "count": int(index.ntotal),
        "nprobe": nprobe,
        "schema_version": SCHEMA_VERSION,
    }


def write_bank(bank_dir: str, index, ids: pa.Table | list[pa.Table], info: dict) -> None:
    """Write a complete bank: index.faiss, ids.parquet and bank.json (each temporary name, then rename).

    bank.json goes last, so a directory with a bank.json holds a finished bank.

    Args:
        bank_dir: the bank directory (fsspec URL); created when absent.
        index: the filled index; row i of the index is faiss id i.
        ids: the MEMORY_BANK_IDS table, or its parts in id order.
        info: bank.json contents (see `bank_info`); `count` must equal the index's size.
    """
    if info.get("count") != index.ntotal:
        raise ValueError(f"bank.json count {info.get('count')} != index size {index.ntotal}")
    fs, root = _fs(bank_dir)
    fs.makedirs(root, exist_ok=True)
    write_index(f"{bank_dir}/{INDEX_FILE}", index)
    write_ids(f"{bank_dir}/{IDS_FILE}", [ids] if isinstance(ids, pa.Table) else ids)
    _write_json(f"{bank_dir}/{INFO_FILE}", info)


def load_bank(bank_dir: str, nprobe: int | None = None) -> Bank:
    """Load a bank directory written by `write_bank` / `BuildMemoryBank`.

    Args:
        bank_dir: the bank directory (fsspec URL).
        nprobe: IVF lists to probe per query; bank.json's value when None.
    """
    fs, root = _fs(bank_dir)
    with fs.open(f"{root}/{INFO_FILE}", "r") as f:
        info = json.load(f)
    index = read_index(f"{bank_dir}/{INDEX_FILE}")
    with fs.open(f"{root}/{IDS_FILE}", "rb") as f:
        table = pq.read_table(f)
    if not table.schema.equals(MEMORY_BANK_IDS, check_metadata=False):
        raise ValueError(f"{bank_dir}/{IDS_FILE} does not match the memory_bank_ids schema")
    if table.num_rows != index.ntotal or table.num_rows != info["count"]:
        raise ValueError(f"{bank_dir}: ids.parquet, index and bank.json disagree on the count")
    faiss_ids = table.column("faiss_id").to_numpy()
    if not np.array_equal(faiss_ids, np.arange(len(faiss_ids))):
        raise ValueError(f"{bank_dir}/{IDS_FILE} is not in faiss id order 0..count-1")
    if _is_ivf(index):
        import faiss  # lazy: faiss loads only where an index is touched

        ivf = faiss.extract_index_ivf(index)
        if ivf.direct_map.type == faiss.DirectMap.NoMap:  # a bank written by another tool
            ivf.make_direct_map()
    set_nprobe(index, nprobe if nprobe is not None else info.get("nprobe"))
    return Bank(index, table.column("key").to_pylist(), table.column("modality").to_pylist(), info)


def extend_bank(bank_dir: str, vectors: np.ndarray, keys: list[str], modalities: list[str] | None = None) -> Bank:
    """Add documents to an existing bank in place, without retraining or rebuilding it.

    New documents get the next faiss ids, in key order. The IVF coarse quantizer (and PQ codebooks)
    stay as trained: fine for documents like the originals; rebuild when the new data differs a lot.
    Neighbours already written are not refreshed: rerun retrieval to let old queries find new documents.

    Args:
        bank_dir: the bank directory.
        vectors: (N, dim) float32 unit-norm doc embeddings.
        keys: their document keys; none may already be in the bank.
        modalities: their modalities; all "image+text" when None.

    Returns:
        The extended bank, loaded.
    """
    bank = load_bank(bank_dir)
    modalities = list(modalities) if modalities is not None else [IMAGE_TEXT] * len(keys)
    if len(keys) != len(vectors) or len(modalities) != len(keys):
        raise ValueError("extend_bank: vectors, keys and modalities differ in length")
    if bad := set(modalities) - set(MODALITIES):
        raise ValueError(f"extend_bank: unknown modalities {sorted(bad)}")
    clash = set(keys) & set(bank.keys)
    if clash or len(set(keys)) != len(keys):
        raise ValueError(f"extend_bank: keys already in the bank or repeated: {sorted(clash)[:5]}")
    order = sorted(range(len(keys)), key=keys.__getitem__)
    ids = np.arange(bank.count, bank.count + len(keys), dtype=np.int64)
    _add(bank.index, np.asarray(vectors, dtype=np.float32)[order], ids, base=bank.count)
    bank._flat = None  # the add may have moved a Flat index's storage
    new_keys, new_mods = [keys[i] for i in order], [modalities[i] for i in order]
    old = ids_table(np.arange(len(bank.keys), dtype=np.int64), bank.keys, bank.modalities)
    info = {**bank.info, "count": int(bank.index.ntotal)}
    write_bank(bank_dir, bank.index, [old, ids_table(ids, new_keys, new_mods)], info)
    # The bank in hand is the written one: reloading it would hold the index twice.
    return Bank(bank.index, bank.keys + new_keys, bank.modalities + new_mods, info)
