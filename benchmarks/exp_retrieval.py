"""Does retrieval lower the loss on the query's own tokens? The same tiny CM3 decoder, with and without neighbours.

RA-CM3 claims that retrieved documents in context help the model predict the query. This experiment
measures that on the demo corpus, at a size this CPU can train:

1. One synthetic demo corpus (`write_demo_corpus`, `--examples`, seed 0), built twice with the same
   flags and seed (`demo_build_flags()`, `--cm3_masking none` so the query's tokens stay in place):
   once with `--neighbours_per_sequence 3`, once with `--neighbours_per_sequence 0`. The two
   `tokenizers/` folders must be byte-identical (they are fitted on the same data), and the
   held-out shard (the last one) must hold the same query keys in both builds; both are checked.
2. For each seed, the same decoder config is trained from the same initialisation (`TrainConfig.seed`
   sets init and shard order) on each build's training shards, packed as the trainer does, for
   the same number of steps. A third arm trains without retrieval only for as many steps as it
   takes to see the retrieval arm's count of query tokens ("equal query tokens"): at equal steps the
   no-retrieval model sees several times more query tokens, because each of its sequences is only a
   query.
3. Each final checkpoint is scored on the held-out shard, one sample per row (no packing, so every
   query has its whole sequence, neighbours included, as context; packed evaluation cuts some
   sequences at window starts): the mean next-token loss on the query's text tokens, on its image
   tokens (`query_token_loss_mask` with one kind each), on both, and on every token of the sequence.
   The trainer's own packed `eval_query_loss` at the last step is reported beside it as a cross-check,
   and each checkpoint is also scored on the other build's held-out shard (`ctx_swapped_*`: the same
   queries with neighbours removed, or added), which shows whether a model uses its neighbours.
4. The retrieval build retrieves from a bank built without the held-out queries (see `build_corpora`),
   so no held-out document reaches the retrieval arm's training data as a neighbour.

    python benchmarks/exp_retrieval.py [--examples 2000 --steps 300 --seeds 0,1 --workdir DIR]

`--workdir` keeps the data, builds and finished runs (reused when present: delete a `run-*` folder to
retrain it); by default a temporary folder is used.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import glob
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.data import decode_tokens, find_vocab, query_token_loss_mask, shard_loader  # noqa: E402
from model.train import TrainConfig, load_model, train  # noqa: E402
from schemas.vocab import PAD  # noqa: E402
from transforms.lib.io import read_tar, write_tar  # noqa: E402


@dataclass
class Build:
    """One built corpus: its train and held-out shards."""

    name: str
    root: str
    train_shards: list[str]
    eval_shards: list[str]


def read_shard(path: str) -> list[tuple[str, np.ndarray, dict]]:
    """(key, tokens, meta) of every sample of one shard, in stored order."""
    parts: dict[str, dict[str, bytes]] = {}
    for name, data in read_tar(path):
        key, ext = name.split(".", 1)
        parts.setdefault(key, {})[ext] = data
    return [(k, decode_tokens(p["tokens.npy"]), json.loads(p["json"])) for k, p in sorted(parts.items())]


def _build(root: str, inputs: str, seed: int, extra: list[str]) -> None:
    """One `build_corpus.run` with the demo flags and `--cm3_masking none`, skipped when already built."""
    from pipelines import build_corpus
    from pipelines.demo.command import demo_build_flags

    if os.path.exists(os.path.join(root, "stats.json")):
        return
    t0 = time.perf_counter()
    flags = ["--input", inputs, "--output", root, "--seed", str(seed), *demo_build_flags(), "--cm3_masking", "none"]
    build_corpus.run([*flags, *extra])
    print(f"[exp] built {os.path.basename(root)} in {time.perf_counter() - t0:.0f}s", flush=True)


def _without_keys(src_dir: str, dst_dir: str, drop: set[str]) -> None:
    """Copy the demo data's tars, leaving out every member of the samples whose key is in `drop`."""
    os.makedirs(dst_dir, exist_ok=True)
    for path in sorted(glob.glob(f"{src_dir}/*.tar")):
        with open(os.path.join(dst_dir, os.path.basename(path)), "wb") as dst:
            write_tar(dst, read_tar(path, keep=lambda name: name.split(".", 1)[0] not in drop))


def build_corpora(workdir: str, examples: int, seed: int) -> dict[str, Build]:
    """Write the demo data once, then build the no-retrieval corpus, a training-only memory bank and the
    retrieval corpus (each skipped when its stats.json exists).

    The retrieval build retrieves from a bank built without the held-out queries: with the default
    bank (every document) held-out query documents are retrieved as neighbours of training queries, so
    the retrieval arm would train on the very documents it is evaluated on, a leak the other arm lacks.
    """
    from pipelines.demo.data import write_demo_corpus

    data = os.path.join(workdir, "data")
    if not glob.glob(f"{data}/*.tar"):
        write_demo_corpus(data, num_examples=examples, seed=seed, image_size=64, shard_size=250)
    builds = {}
    none_root = os.path.join(workdir, "corpus-none")
    _build(none_root, f"{data}/*.tar", seed, ["--neighbours_per_sequence", "0"])
    shards = sorted(glob.glob(f"{none_root}/shards/cm3-*.tar"))
    # The last shard in sorted order is held out, as the trainer does by default; named explicitly below.
    builds["none"] = Build("none", none_root, shards[:-1], shards[-1:])
    held = {k for p in builds["none"].eval_shards for k, _, _ in read_shard(p)}
    bank_data, bank_root = os.path.join(workdir, "data-train-only"), os.path.join(workdir, "bank-train-only")
    if not os.path.exists(os.path.join(bank_root, "stats.json")):
        _without_keys(data, bank_data, held)
    _build(bank_root, f"{bank_data}/*.tar", seed, ["--neighbours_per_sequence", "0"])
    ret_root = os.path.join(workdir, "corpus-retrieval")
    _build(
        ret_root, f"{data}/*.tar", seed, ["--neighbours_per_sequence", "3", "--memory_bank", f"{bank_root}/memory_bank"]
    )
    shards = sorted(glob.glob(f"{ret_root}/shards/cm3-*.tar"))
    builds["retrieval"] = Build("retrieval", ret_root, shards[:-1], shards[-1:])
    return builds


def check_builds(builds: dict[str, Build]) -> dict:
    """The fairness checks: identical tokenizers, identical held-out keys, and held-out query leakage."""
    a, b = builds["retrieval"], builds["none"]
    tok_a, tok_b = f"{a.root}/tokenizers", f"{b.root}/tokenizers"
    names = sorted(os.listdir(tok_a))
    _, mismatch, errors = filecmp.cmpfiles(tok_a, tok_b, names, shallow=False)
    if mismatch or errors or sorted(os.listdir(tok_b)) != names:
        raise RuntimeError(f"tokenizers differ between builds: {mismatch + errors}")
    if [os.path.basename(p) for p in a.eval_shards] != [os.path.basename(p) for p in b.eval_shards]:
        raise RuntimeError("the held-out shard has different names in the two builds")
    eval_keys = {n: {k for p in builds[n].eval_shards for k, _, _ in read_shard(p)} for n in builds}
    if eval_keys["retrieval"] != eval_keys["none"]:
        raise RuntimeError("the held-out shards hold different keys in the two builds")
    held = eval_keys["retrieval"]
    # Held-out query documents that the retrieval arm trains on as someone else's neighbour: a leak
    # the no-retrieval arm does not have (the memory bank holds every document, held-out ones too).
    leaked, train_samples, neighbour_slots, slots_leaked = set(), 0, 0, 0
    for path in a.train_shards:
        for _, _, meta in read_shard(path):
            train_samples += 1
            neighbour_slots += len(meta["neighbour_keys"])
            hits = held.intersection(meta["neighbour_keys"])
            slots_leaked += len(hits)
            leaked |= hits
    eval_neighbours = [len(meta["neighbour_keys"]) for p in a.eval_shards for _, _, meta in read_shard(p)]
    return {
        "tokenizers_identical": True,
        "eval_mean_neighbours": float(np.mean(eval_neighbours)),
        "tokenizer_files": names,
        "eval_shard": os.path.basename(a.eval_shards[0]),
        "eval_queries": len(held),
        "train_samples": train_samples,
        "heldout_queries_seen_as_train_neighbours": len(leaked),
        "train_neighbour_slots": neighbour_slots,
        "train_neighbour_slots_holding_heldout_docs": slots_leaked,
    }


def query_token_share(build: Build, cfg: TrainConfig, steps: int) -> tuple[int, int]:
    """(tokens, query tokens) among the targets of the first `steps` training batches: the trainer's exact stream."""
    loader = shard_loader(
        build.train_shards,
        cfg.seq_len,
        cfg.batch_size,
        shuffle_shards=True,
        seed=cfg.seed,
        pack=cfg.pack,
        query_mask=True,
    )
    tokens = query = 0
    for batch in iter(loader):
        if tokens // (cfg.batch_size * cfg.seq_len) >= steps:
            break
        tokens += batch["y"].numel()
        query += int(batch["loss_mask"].sum())
    return tokens, query


@torch.no_grad()
def score(model, build: Build, vocab_size: int, batch_size: int = 16) -> dict[str, float]:
    """Mean next-token loss on the held-out shard, one sample per row, split by which tokens are scored."""
    model.eval()
    samples = [s for p in build.eval_shards for s in read_shard(p)]
    sums = {"query_text": 0.0, "query_image": 0.0, "query": 0.0, "all": 0.0}
    counts = dict.fromkeys(sums, 0)
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        n = max(len(t) for _, t, _ in chunk)
        rows = np.full((len(chunk), n), PAD, np.int64)
        masks = {"query_text": np.zeros_like(rows, bool), "query_image": np.zeros_like(rows, bool)}
        for r, (_, tokens, meta) in enumerate(chunk):
            rows[r, : len(tokens)] = tokens
            masks["query_text"][r, : len(tokens)] = query_token_loss_mask(tokens, meta, ("text",))
            masks["query_image"][r, : len(tokens)] = query_token_loss_mask(tokens, meta, ("image",))
        x, y = torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:])  # (B, T) each
        logits, _ = model(x, y)
        nll = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # (B, T)
        valid = y != PAD
        scored = {
            "query_text": torch.from_numpy(masks["query_text"][:, 1:]),  # aligned with y, as the loader does
            "query_image": torch.from_numpy(masks["query_image"][:, 1:]),
        }
        scored["query"] = scored["query_text"] | scored["query_image"]
        scored["all"] = valid
        for name, m in scored.items():
            m = m & valid
            sums[name] += float(nll[m].sum())
            counts[name] += int(m.sum())
    assert vocab_size == model.config.vocab_size
    out = {name: sums[name] / max(counts[name], 1) for name in sums}
    out.update({f"n_{name}": counts[name] for name in counts})
    return out


def run_arm(build: Build, other: Build, workdir: str, label: str, steps: int, seed: int, base: dict) -> dict:
    """Train one arm (or reuse a finished run in `workdir`), then score its final checkpoint on its own
    held-out shard and, as a context ablation, on `other`'s: the same queries with the other context
    (neighbours removed for the retrieval model, added for the no-retrieval one)."""
    run_dir = os.path.join(workdir, f"run-{label}-seed{seed}")
    cfg = TrainConfig(
        shards="::".join(build.train_shards + build.eval_shards),
        eval_shards=build.eval_shards[0],
        output=run_dir,
        max_steps=steps,
        warmup_steps=max(1, steps // 10),
        eval_every=steps,  # one packed evaluation, at the last step (the trainer's own cross-check)
        eval_query_loss=True,
        ckpt_every=steps,
        log_every=max(1, steps // 5),
        seed=seed,
        **base,
    )
    done = os.path.join(run_dir, "summary.json")
    if os.path.exists(done):
        with open(done, encoding="utf-8") as f:
            summary = json.load(f)
    else:
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # the trainer's progress lines; the summary is kept
            summary = train(cfg)
        summary["wall_s"] = time.perf_counter() - t0
        with open(done, "w", encoding="utf-8") as f:
            json.dump(summary, f)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8")]
    last = rows[-1]
    tokens, query_tokens = query_token_share(build, cfg, steps)
    model = load_model(os.path.join(run_dir, "ckpt.pt"))
    vocab_size = find_vocab(build.train_shards).size
    scores = score(model, build, vocab_size)
    swapped = {f"ctx_swapped_{k}": v for k, v in score(model, other, vocab_size).items() if not k.startswith("n_")}
    return {
        "arm": label,
        "seed": seed,
        "steps": steps,
        "tokens_seen": tokens,
        "query_tokens_seen": query_tokens,
        "train_loss_last10": float(np.mean(summary["losses"][-10:])),
        "packed_eval_loss": last.get("eval_loss"),
        "packed_eval_query_loss": last.get("eval_query_loss"),
        "wall_s": summary["wall_s"],
        **scores,
        **swapped,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", default="0,1", help="Training seeds (init and shard order); the corpus seed is 0.")
    parser.add_argument("--corpus_seed", type=int, default=0)
    parser.add_argument(
        "--workdir", default=None, help="Keep data, builds and runs here (reused); default: a temp dir."
    )
    parser.add_argument("--no_matched", action="store_true", help="Skip the equal-query-tokens no-retrieval arm.")
    parser.add_argument("--json", default=None, help="Also write every figure to this JSON file.")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))  # a shared 2-core machine

    with contextlib.ExitStack() as stack:
        workdir = args.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="exp_retrieval-"))
        os.makedirs(workdir, exist_ok=True)
        builds = build_corpora(workdir, args.examples, args.corpus_seed)
        checks = check_builds(builds)
        print(f"[exp] checks: {json.dumps(checks)}", flush=True)
        # pipelines/demo/command.py: train_and_sample's settings, which train well on a CPU.
        base = {"batch_size": 8, "seq_len": 512, "n_layer": 2, "n_head": 4, "n_embd": 128, "lr": 2e-3, "device": "cpu"}
        results = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            ret = run_arm(builds["retrieval"], builds["none"], workdir, "retrieval", args.steps, seed, base)
            results.append(ret)
            none = run_arm(builds["none"], builds["retrieval"], workdir, "none", args.steps, seed, base)
            results.append(none)
            if not args.no_matched:
                # Steps that give the no-retrieval arm the retrieval arm's count of query tokens.
                per_step = none["query_tokens_seen"] / none["steps"]
                matched = max(1, round(ret["query_tokens_seen"] / per_step))
                results.append(run_arm(builds["none"], builds["retrieval"], workdir, "none-eqQ", matched, seed, base))
            for r in results[-3:]:
                print(f"[exp] {json.dumps(r)}", flush=True)

    cols = [
        ("arm", "{}"),
        ("seed", "{}"),
        ("steps", "{}"),
        ("tokens_seen", "{:,}"),
        ("query_tokens_seen", "{:,}"),
        ("query", "{:.4f}"),
        ("query_text", "{:.4f}"),
        ("query_image", "{:.4f}"),
        ("all", "{:.4f}"),
        ("packed_eval_query_loss", "{:.4f}"),
        ("ctx_swapped_query", "{:.4f}"),
        ("ctx_swapped_query_text", "{:.4f}"),
        ("ctx_swapped_query_image", "{:.4f}"),
        ("wall_s", "{:.0f}"),
    ]
    print("| " + " | ".join(c for c, _ in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(f.format(r[c]) for c, f in cols) + " |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "checks": checks, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
