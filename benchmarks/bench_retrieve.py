"""Retrieval stage vs a bare `index.search`: is the selection-rule overhead small?

Random unit vectors form the bank and the queries (each example has an image query and a text
query). The stage is timed as the DoFn runs it — `retrieve_batch`: one batched search, exact float64
rescoring of the candidates, then the selection rules — called directly, without a pipeline, so
runner overhead and query embedding are excluded. The baseline is `index.search` with the same
queries, batches and top-k. Both run in this one process, alternating, best of `--repeats`.

    python benchmarks/bench_retrieve.py [--n 20000 --dim 64 --examples 4000 --batch 256 --topk 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas.records import IMAGE_ONLY, IMAGE_TEXT, TEXT_ONLY, EmbeddedExample  # noqa: E402
from transforms.lib.memory_bank import (  # noqa: E402
    add_part,
    bank_info,
    choose_index_factory,
    default_nprobe,
    deserialize,
    ids_table,
    load_bank,
    merge_parts,
    serialize,
    train_index,
    write_bank,
)
from transforms.lib.retrieve import RetrievalRules, retrieve_batch  # noqa: E402


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_bank(path: str, n: int, dim: int, factory: str | None, rng: np.random.Generator) -> str:
    vectors = unit(rng, n, dim)
    factory = factory or choose_index_factory(n, dim)
    trained = train_index(vectors[: min(n, 100_000)], factory, dim)
    index = merge_parts(deserialize(serialize(trained)), [add_part(serialize(trained), vectors, np.arange(n))])
    mods = [(IMAGE_TEXT, IMAGE_TEXT, IMAGE_ONLY, TEXT_ONLY)[i % 4] for i in range(n)]
    write_bank(
        path,
        index,
        ids_table(np.arange(n), [f"d{i:08d}" for i in range(n)], mods),
        bank_info(index, "random", factory, default_nprobe(index)),
    )
    return factory


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000, help="documents in the bank")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--examples", type=int, default=4_000, help="examples, each with an image and a text query")
    ap.add_argument("--batch", type=int, default=256, help="examples per search call")
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--factory", default=None, help="FAISS factory (chosen from the bank size when absent)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        factory = make_bank(f"{tmp}/memory_bank", args.n, args.dim, args.factory, rng)
        bank = load_bank(f"{tmp}/memory_bank")
    img, txt = unit(rng, args.examples, args.dim), unit(rng, args.examples, args.dim)
    examples = [
        EmbeddedExample(f"d{i:08d}", None, IMAGE_TEXT, img[i], None, None, txt[i]) for i in range(args.examples)
    ]
    batches = [examples[s : s + args.batch] for s in range(0, len(examples), args.batch)]
    query_batches = [
        np.concatenate([img[s : s + args.batch], txt[s : s + args.batch]]) for s in range(0, len(examples), args.batch)
    ]
    rules = RetrievalRules(num_retrieved=2, max_similarity=0.9, diversity_threshold=0.95, topk=args.topk)
    n_queries = 2 * args.examples

    def stage() -> int:
        return sum(len(retrieve_batch(bank, b, rules)[0]) for b in batches)

    def bare() -> int:
        return sum(bank.index.search(q, args.topk)[1].shape[0] for q in query_batches)

    stage(), bare()  # warm up caches and thread pools
    t_stage, t_bare = [], []
    for _ in range(args.repeats):
        for fn, times in ((bare, t_bare), (stage, t_stage)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    selected = stage()
    qps_stage, qps_bare = n_queries / min(t_stage), n_queries / min(t_bare)
    print(
        f"bank: {args.n:,} x {args.dim} {factory}; {n_queries:,} queries ({args.examples:,} examples x image+text), "
        f"batch {args.batch} examples, top-{args.topk}; {selected:,} neighbours selected"
    )
    print(f"bare index.search         : {qps_bare:12,.0f} queries/s")
    print(f"retrieval stage (search + rescore + rules, direct call): {qps_stage:12,.0f} queries/s")
    print(f"ratio stage / bare        : {qps_stage / qps_bare:.2f}   (target >= 0.80)")
    row = {  # the machine-readable line benchmarks/run_all.py reads
        "stage": f"retrieve ({args.n:,}x{args.dim} {factory})",
        "baseline": f"index.search {qps_bare:,.0f} q/s",
        "figure": f"{qps_stage:,.0f} q/s",
        "ratio": round(qps_stage / qps_bare, 3),
        "target": ">= 0.8",
        "pass": qps_stage / qps_bare >= 0.8,
    }
    print("RESULT " + json.dumps({"bench": "retrieve", "rows": [row]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
