"""Training throughput streaming from shards vs from tensors already in memory: does the loader keep up?

Writes a synthetic corpus (`model.data.write_synthetic_corpus`) to a temporary folder, then trains
the same decoder, from the same initial weights, on the same batches two ways in this one process:
streamed through `shard_loader` (WebDataset → decode → pack → batch, in `--workers` DataLoader
workers), and from a list of the batches materialised beforehand. The two trainers step in
turn, so on a shared machine both see the same load; after `--warmup` steps each step is timed
and the median step time gives tokens/s. The target is a ratio of at least 0.9.

    python benchmarks/bench_train.py [--steps 40 --batch 16 --seq_len 128 --n_layer 2 --n_embd 128 --workers 1
                                   --tokens_per_image 48]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.data import SYNTHETIC_VOCAB, shard_loader, synthetic_sample, write_synthetic_corpus  # noqa: E402
from model.decoder import CM3Config, CM3Decoder  # noqa: E402
from model.train import TrainConfig, make_optimizer  # noqa: E402


def _trainer(config: CM3Config):
    """A fresh model (seed 0) and a function that runs one optimizer step on a batch."""
    torch.manual_seed(0)
    model = CM3Decoder(config)
    optimizer = make_optimizer(model, TrainConfig(shards="", output="", lr=1e-3))

    def step(batch: dict) -> float:
        _, loss = model(batch["x"], batch["y"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.item()

    return step


def lockstep(config: CM3Config, streamed: Iterable[dict], in_memory: list[dict], warmup: int) -> tuple[list, list]:
    """Step times of two identical trainers fed alternately, one from the stream, one from memory.

    Alternating step by step exposes both to the same load on a shared machine; the streamed time
    includes fetching its batch from the loader.
    """
    step_streamed, step_memory = _trainer(config), _trainer(config)
    stream = iter(streamed)
    times_streamed, times_memory = [], []
    for i, batch in enumerate(in_memory):
        t0 = time.perf_counter()
        step_streamed(next(stream))
        t1 = time.perf_counter()
        step_memory(batch)
        t2 = time.perf_counter()
        if i >= warmup:
            times_streamed.append(t1 - t0)
            times_memory.append(t2 - t1)
    return times_streamed, times_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--n_layer", type=int, default=2)
    parser.add_argument("--n_embd", type=int, default=128)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--samples_per_shard", type=int, default=512)
    # The pipeline writes samples of up to seq_len tokens (a layout fills its budget); 48 image tokens
    # make a synthetic sample of about 110, so a 128-token window holds about one, as in a real corpus.
    # Lower it to stress the loader's per-sample cost (8 gives ~30-token samples, ~65 per batch).
    parser.add_argument("--tokens_per_image", type=int, default=48)
    args = parser.parse_args()

    vocab = dataclasses.replace(SYNTHETIC_VOCAB, tokens_per_image=args.tokens_per_image)
    config = CM3Config(vocab.size, args.seq_len, args.n_layer, max(1, args.n_embd // 32), args.n_embd)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        paths = write_synthetic_corpus(tmp, args.shards, args.samples_per_shard, vocab=vocab)
        mean_len = sum(len(synthetic_sample(np.random.default_rng(i), vocab, i % 2)[0]) for i in range(100)) / 100
        print(
            f"wrote {len(paths)} shards x {args.samples_per_shard} samples of ~{mean_len:.0f} tokens"
            f" in {time.perf_counter() - t0:.1f}s"
        )

        def stream():
            return shard_loader(paths, args.seq_len, args.batch, seed=0, num_workers=args.workers)

        in_memory = list(itertools.islice(stream(), args.warmup + args.steps))  # the batches the stream will give
        times_streamed, times_memory = lockstep(config, stream(), in_memory, args.warmup)
    params = sum(p.numel() for p in CM3Decoder(config).parameters())
    print(
        f"model {params:,} params, batch {args.batch} x {args.seq_len}, {args.workers} loader workers,"
        f" torch threads {torch.get_num_threads()}"
    )
    tokens = args.batch * args.seq_len
    rates = {}
    for name, times in (("streamed from shards", times_streamed), ("in-memory tensors", times_memory)):
        rates[name] = tokens / statistics.median(times)
        print(f"{name:21s} {rates[name]:10,.0f} tokens/s (median step; mean {tokens / statistics.mean(times):,.0f})")
    ratio = rates["streamed from shards"] / rates["in-memory tensors"]
    print(f"ratio streamed / in-memory: {ratio:.3f} (target >= 0.9)")


if __name__ == "__main__":
    main()
