"""`cm3corpus query` latency on a million-document bank: one text query, in-process and as a one-shot command.

    python benchmarks/bench_query.py                    # 1,000,000 documents (IVF), 30 text queries
    python benchmarks/bench_query.py --quick            # 200,000 documents
    python benchmarks/bench_query.py --workdir /tmp/qbank  # keep the bank for reruns

The bank is made the way `benchmarks/bench_bank_scale.py` makes its million-vector bank (clustered
unit vectors drawn in seeded parts, `choose_index_factory`, train on a sample, `add_part` per part,
`merge_parts`, `write_bank`), but at the demo CLIP's 128 dimensions, so a real text query can be
embedded with the CLIP that bank.json names (`clip_model: demo`). The vectors are not CLIP embeddings
of documents; an IVF search's cost depends on the list sizes and nprobe, not on what the vectors mean.

Measured per query (median over `--queries` demo captions, after one warm-up):
- embed: the demo CLIP's text tower on the query (`Corpus.embed`);
- search: `Corpus.search(k=8)`: faiss search with the build's margin, the build's rescoring and order,
  key and caption lookup;
- rules: `Corpus.retrieve(k=2)`: the build's `retrieve_batch` (candidates, skips, diversity);
- bare: `index.search` of the same vector for k=8, the floor.
And once: opening the corpus (reading index.faiss and ids.parquet) and the whole `cm3corpus query
--text ...` command as a new process (interpreter, imports, bank, CLIP, query, print).

The last line is `RESULT {json}`. Run it under `flock /tmp/cm3-bench.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DIM = 128  # the demo CLIP's embedding width


def build_bank(folder: str, n: int, seed: int, part_size: int = 100_000, train_size: int = 2**17) -> dict:
    """Write `folder/memory_bank` for n clustered vectors, as bench_bank_scale builds its bank."""
    from bench_bank_scale import training_sample, write_parts

    from schemas.records import IMAGE_TEXT
    from transforms.lib.memory_bank import (
        add_part,
        bank_info,
        choose_index_factory,
        default_nprobe,
        deserialize,
        ids_table,
        merge_parts,
        serialize,
        train_index,
        write_bank,
    )

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        parts = write_parts(tmp, "clustered", n, DIM, part_size, seed)
        factory = choose_index_factory(n, DIM, max_train=min(train_size, n))
        trained = serialize(train_index(training_sample(parts, min(train_size, n)), factory, DIM))
        sizes = [(path, start, len(np.load(path, mmap_mode="r"))) for path, start in parts]
        # Each part is filled when the merge asks for it and released after: one part in memory at a time.
        filled = (
            add_part(trained, np.load(path, mmap_mode="r"), np.arange(start, start + m, dtype=np.int64))
            for path, start, m in sizes
        )
        index = merge_parts(deserialize(trained), filled)
        ids = (
            ids_table(np.arange(s, s + m), [f"d{i:09d}" for i in range(s, s + m)], [IMAGE_TEXT] * m)
            for _, s, m in sizes
        )
        write_bank(f"{folder}/memory_bank", index, ids, bank_info(index, "demo", factory, default_nprobe(index)))
    return {"factory": factory, "build_s": round(time.perf_counter() - t0, 1)}


def _median_ms(times: list[float]) -> float:
    return round(1000 * float(np.median(times)), 3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--quick", action="store_true", help="A 200,000-document bank (what run_all --quick runs).")
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--workdir", help="Keep the bank here (reused when it holds n documents).")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.n = 200_000

    from pipelines.demo.data import describe, random_scene
    from transforms.lib.corpus import Corpus
    from transforms.lib.retrieve import RetrievalRules
    from transforms.lib.rng import rng_for

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_query_")
    os.makedirs(workdir, exist_ok=True)
    info_path = Path(workdir, "memory_bank", "bank.json")
    import torch

    result: dict = {"n": args.n, "dim": DIM, "queries": args.queries, "torch_threads": torch.get_num_threads()}
    result["load_average"] = round(os.getloadavg()[0], 1)
    if info_path.exists() and json.loads(info_path.read_text())["count"] == args.n:
        result["factory"] = json.loads(info_path.read_text())["index_factory"]
        result["build_s"] = None  # reused
    else:
        result.update(build_bank(workdir, args.n, args.seed))

    t0 = time.perf_counter()
    corpus = Corpus(workdir)
    result["open_s"] = round(time.perf_counter() - t0, 3)
    result["nprobe"] = corpus.info["nprobe"]
    corpus.embedder  # noqa: B018 - load the CLIP outside the timed queries
    texts = [
        describe(random_scene(rng_for(args.seed, f"q{i}", "scene")), rng_for(args.seed, f"q{i}", "text"))
        for i in range(args.queries)
    ]
    rules = RetrievalRules()
    corpus.search(corpus.embed(texts[0]), 8)  # warm-up
    embed, search, ruled, bare = [], [], [], []
    for text in texts:
        t0 = time.perf_counter()
        q = corpus.embed(text)
        t1 = time.perf_counter()
        hits = corpus.search(q, 8)
        t2 = time.perf_counter()
        corpus.retrieve(q, 2, rules)
        t3 = time.perf_counter()
        corpus.bank.index.search(np.asarray(q.text_emb, np.float32)[None], 8)
        t4 = time.perf_counter()
        assert len(hits) == 8
        embed.append(t1 - t0)
        search.append(t2 - t1)
        ruled.append(t3 - t2)
        bare.append(t4 - t3)
    result.update(
        embed_ms=_median_ms(embed),
        search_ms=_median_ms(search),
        rules_ms=_median_ms(ruled),
        bare_search_ms=_median_ms(bare),
    )
    result["search_over_bare"] = round(result["search_ms"] / result["bare_search_ms"], 2)
    result["query_ms"] = round(result["embed_ms"] + result["search_ms"], 3)

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "pipelines.cli", "query", "--corpus", workdir, "--text", texts[0], "--k", "8"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    result["command_s"] = round(time.perf_counter() - t0, 2)

    print(
        f"bank {args.n:,} x {DIM} `{result['factory']}` nprobe {result['nprobe']}; opened in {result['open_s']} s;"
        f" torch threads {result['torch_threads']}, load average {result['load_average']}"
    )
    print(
        f"one text query: embed {result['embed_ms']} ms + search {result['search_ms']} ms "
        f"(bare faiss {result['bare_search_ms']} ms, {result['search_over_bare']}x) = {result['query_ms']} ms; "
        f"with the build's rules {result['rules_ms']} ms; whole command {result['command_s']} s"
    )
    result["rows"] = [
        {
            "stage": f"query: one text query, {args.n:,}-document bank, embed + search",
            "baseline": "bare index.search of the same vector",
            "figure": f"{result['query_ms']} ms (search {result['search_ms']} ms, command {result['command_s']} s)",
            "ratio": result["search_over_bare"],
            "target": None,
            "pass": None,
        }
    ]
    print("RESULT " + json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
