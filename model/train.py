"""`cm3corpus train`: train the CM3 decoder on built shards, streaming them with `model.data`.

AdamW with linear warmup and cosine decay (to a tenth of the peak), gradient clipping at 1.0, bf16
autocast on GPUs that support it (fp32 on the CPU). Every `eval_every` steps the loss on held-out
shards is measured; every step appends a line to `OUTPUT/metrics.jsonl`, every `ckpt_every` steps
`OUTPUT/ckpt.pt` is replaced.

Resuming (`--resume`) is exact: the checkpoint holds the model and train configs as plain dicts,
weights, optimizer state, step, RNG states and the data position (batches consumed), and the data
stream is a pure function of (shards, seed, batches consumed), so a resumed run continues with the
same batches and, on the same device, the same losses as an uninterrupted one. Checkpoints load
with `weights_only=True`: nothing in them is unpickled as code.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch

from model.data import expand_shards, find_vocab, shard_loader, split_eval
from model.decoder import CM3Config, CM3Decoder
from schemas.vocab import PAD
from transforms.lib.config import add_flags, flag
from transforms.lib.io import atomic_open, atomic_path

CKPT = "ckpt.pt"
METRICS = "metrics.jsonl"


@dataclass
class TrainConfig:
    """Every field is the `cm3corpus train` flag of its name (`transforms.lib.config.flag`)."""

    shards: str = flag(help="shard pattern (braces, globs, `::`-separated lists)")
    output: str = flag(help="run directory: metrics.jsonl and ckpt.pt")
    # held-out shards; unset: the build's shards/heldout/ if any, else the last shard; "none": no evaluation
    eval_shards: str | None = flag(None)
    vocab: str | None = flag(None, "vocab.json; default: tokenizers/vocab.json beside the shards' folder")
    max_steps: int = flag(1000, "optimizer steps (one batch each)")
    batch_size: int = flag(8, "sequences per step")
    seq_len: int = flag(512, "tokens per sequence")
    pack: bool = flag(True, "concatenate samples (no padding) rather than pad each to seq_len")
    n_layer: int = flag(4, "model depth")
    n_head: int = flag(4, "attention heads")
    n_embd: int = flag(256, "model width")
    lr: float = flag(3e-4, "peak learning rate")
    min_lr_ratio: float = flag(0.1, "cosine decays to lr * min_lr_ratio at max_steps")
    warmup_steps: int = flag(100, "linear warmup from 0")
    weight_decay: float = flag(0.1, "on matrices of the linear layers only (not embeddings)")
    grad_clip: float = flag(1.0, "max global gradient norm; 0 disables")
    eval_every: int = flag(200, "steps between evaluations (and at the last step); 0 disables")
    eval_batches: int = flag(20, "batches per evaluation at most")
    eval_query_loss: bool = flag(False, "also log eval_query_loss: the loss on the query's own tokens only")
    ckpt_every: int = flag(500, "steps between checkpoints (and at the last step); 0 disables")
    log_every: int = flag(10, "steps between progress lines")
    resume: bool = flag(False, "continue from output/ckpt.pt when it exists")
    device: str = flag("auto", "auto, cpu, cuda", choices=("auto", "cpu", "cuda"))
    num_workers: int = flag(0, "DataLoader workers (any count keeps the stream exact)")
    seed: int = flag(0, "model init and shard order")


def cosine_lr(step: int, steps: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to `lr` over `warmup` steps, then cosine decay to `lr * min_ratio` at `steps`.

    The one schedule of the project: the trainer's (`lr_at`) and the demo CLIP's fitting.
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """`cosine_lr` with the trainer's settings: warmup_steps, then decay to lr * min_lr_ratio at max_steps."""
    return cosine_lr(step, cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)


def make_optimizer(model: CM3Decoder, cfg: TrainConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW, decaying only the linear layers' matrices: embeddings and positions are lookups, not maps."""
    decay = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _autocast(device: torch.device):
    # bf16 needs no loss scaling; GPUs without it and the CPU train in fp32.
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # weights_only loads no numpy arrays: the Mersenne state travels as a tensor.
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_STREAM_FIELDS = ("shards", "eval_shards", "batch_size", "seed", "pack")  # what the data position depends on


def _trim_metrics(path: str, step: int) -> None:
    """Keep the metrics lines up to `step`: a fresh run starts empty, a resumed one drops the steps it redoes."""
    lines = []
    if step and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)


def save_checkpoint(path: str, model: CM3Decoder, optimizer, cfg: TrainConfig, step: int) -> None:
    """Write the checkpoint to a temporary name and rename it, so a crash never leaves half a file."""
    ckpt = {
        "model": model.state_dict(),
        "model_config": asdict(model.config),
        "train_config": asdict(cfg),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "data": {"batches": step},  # one batch per step; the stream is a function of this count
        "rng": _rng_state(),
    }
    with atomic_path(path) as tmp:  # `{path}.tmp-{hex}`: torch names the zip's folder after `path`, as before
        torch.save(ckpt, tmp)


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint safely (`weights_only=True`)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def load_model(path: str, device: str | torch.device = "cpu") -> CM3Decoder:
    """A trained decoder from a checkpoint, in eval mode."""
    ckpt = load_checkpoint(path, device)
    model = CM3Decoder(CM3Config(**ckpt["model_config"])).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval()


@torch.no_grad()
def evaluate(model: CM3Decoder, loader, device: torch.device, max_batches: int) -> float:
    """Mean next-token loss over the scored tokens of up to `max_batches` batches."""
    model.eval()
    total, count = 0.0, 0
    for batch in itertools.islice(loader, max_batches):
        x, y = batch["x"].to(device), batch["y"].to(device)  # (B, T)
        scored = y != PAD  # (B, T)
        mask = batch.get("loss_mask")
        if mask is not None:
            mask = mask.to(device)
            scored &= mask
        with _autocast(device):
            _, loss = model(x, y, mask)
        n = int(scored.sum())
        total, count = total + float(loss) * n, count + n
    model.train()
    return total / max(count, 1)


def train(cfg: TrainConfig, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train (or resume) a CM3 decoder on cfg.shards; return a summary.

    Args:
        cfg: the run's configuration.
        on_step: called as on_step(step, metrics) after each step (and its checkpoint); an
            exception raised there stops the run as a crash would.

    Returns:
        dict with `step`, `losses` (this invocation's per-step train losses), `eval_loss` (last,
        or None), `tokens_per_s` and `params`.
    """
    device = _device(cfg.device)
    os.makedirs(cfg.output, exist_ok=True)
    ckpt_path = os.path.join(cfg.output, CKPT)
    urls = expand_shards(cfg.shards)
    vocab = find_vocab(urls, cfg.vocab)
    train_urls, eval_urls = split_eval(urls, cfg.eval_shards)
    if not train_urls:
        raise ValueError("no training shards left after holding out the evaluation shards")

    # Loaded on the CPU: RNG states must stay there; weights and optimizer state move to the model's device.
    ckpt = load_checkpoint(ckpt_path) if cfg.resume and os.path.exists(ckpt_path) else None
    if ckpt is not None:
        mcfg = CM3Config(**ckpt["model_config"])  # the checkpoint's architecture wins over the flags
    else:
        mcfg = CM3Config(vocab.size, cfg.seq_len, cfg.n_layer, cfg.n_head, cfg.n_embd)
    if mcfg.vocab_size != vocab.size:
        raise ValueError(f"model vocab {mcfg.vocab_size} != corpus vocab {vocab.size}")
    torch.manual_seed(cfg.seed)
    model = CM3Decoder(mcfg).to(device)
    optimizer = make_optimizer(model, cfg, fused=device.type == "cuda")
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = int(ckpt["step"])
        _set_rng_state(ckpt["rng"])
        changed = [k for k in _STREAM_FIELDS if ckpt["train_config"].get(k) != getattr(cfg, k)]
        if changed:
            print(f"[train] warning: {changed} differ from the checkpoint; the data stream will not continue it")
        print(f"[train] resumed from {ckpt_path} at step {step}", flush=True)
    _trim_metrics(os.path.join(cfg.output, METRICS), step)

    loader = shard_loader(
        train_urls,
        mcfg.seq_len,
        cfg.batch_size,
        shuffle_shards=True,
        seed=cfg.seed,
        pack=cfg.pack,
        num_workers=cfg.num_workers,
        skip_batches=step,
        vocab_size=vocab.size,
        pin_memory=device.type == "cuda",
    )

    def eval_loader(query_mask: bool = False):
        return shard_loader(
            eval_urls,
            mcfg.seq_len,
            cfg.batch_size,
            False,
            cfg.seed,
            cfg.pack,
            loop=False,
            vocab_size=vocab.size,
            query_mask=query_mask,
        )

    print(
        f"[train] {model.num_params():,} params, vocab {vocab.size}, {len(train_urls)} train / {len(eval_urls)} eval"
        f" shards, device {device}",
        flush=True,
    )
    tokens_per_step = cfg.batch_size * mcfg.seq_len
    losses: list[float] = []
    eval_loss = None
    start_step, train_s = step, 0.0  # train_s: seconds spent in training steps, evaluation excluded
    last_t = time.perf_counter()
    model.train()
    batches = iter(loader)
    with open(os.path.join(cfg.output, METRICS), "a", encoding="utf-8") as metrics_file:
        while step < cfg.max_steps:
            batch = next(batches)
            x = batch["x"].to(device, non_blocking=True)  # (B, T)
            y = batch["y"].to(device, non_blocking=True)  # (B, T)
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with _autocast(device):
                _, loss = model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1

            loss_value = loss.detach().item()  # syncs the device, so the timing below is honest
            now = time.perf_counter()
            train_s += now - last_t
            losses.append(loss_value)
            metrics = {"step": step, "loss": loss_value, "lr": lr, "tokens_per_s": tokens_per_step / (now - last_t)}
            last_t = now
            last = step == cfg.max_steps
            if eval_urls and cfg.eval_every and (step % cfg.eval_every == 0 or last):
                eval_loss = evaluate(model, eval_loader(), device, cfg.eval_batches)
                metrics["eval_loss"] = eval_loss
                if cfg.eval_query_loss:
                    metrics["eval_query_loss"] = evaluate(model, eval_loader(True), device, cfg.eval_batches)
                last_t = time.perf_counter()  # evaluation time is not training throughput
            metrics_file.write(json.dumps(metrics) + "\n")
            metrics_file.flush()
            if cfg.ckpt_every and (step % cfg.ckpt_every == 0 or last):
                save_checkpoint(ckpt_path, model, optimizer, cfg, step)
            if step % cfg.log_every == 0 or last or "eval_loss" in metrics:
                rate = (step - start_step) * tokens_per_step / max(train_s, 1e-9)
                eta = (cfg.max_steps - step) * tokens_per_step / max(rate, 1e-9)
                ev = f" eval {eval_loss:.4f}" if "eval_loss" in metrics else ""
                print(
                    f"[train] step {step}/{cfg.max_steps} loss {loss_value:.4f}{ev} lr {lr:.2e}"
                    f" {rate:,.0f} tok/s eta {eta:.0f}s",
                    flush=True,
                )
            if on_step is not None:
                on_step(step, metrics)
    return {
        "step": step,
        "losses": losses,
        "eval_loss": eval_loss,
        "tokens_per_s": (step - start_step) * tokens_per_step / max(train_s, 1e-9),
        "params": model.num_params(),
    }


def _parser() -> argparse.ArgumentParser:
    """One flag per TrainConfig field (`transforms.lib.config.add_flags`)."""
    parser = argparse.ArgumentParser(prog="cm3corpus train", description="Train the CM3 decoder on built shards.")
    add_flags(parser, TrainConfig)
    return parser


def scaled_warmup(cfg: TrainConfig) -> tuple[TrainConfig, str | None]:
    """A run whose warmup does not end before max_steps never reaches its peak learning rate: warm up
    over a tenth of the run instead. Returns the config to train with and the warning (or None)."""
    if cfg.warmup_steps < cfg.max_steps:
        return cfg, None
    warmup = max(1, cfg.max_steps // 10)
    note = (
        f"[train] --warmup_steps {cfg.warmup_steps} is not below --max_steps {cfg.max_steps}: "
        f"the run would never leave warmup; warming up over {warmup} steps instead"
    )
    return dataclasses.replace(cfg, warmup_steps=warmup), note


def main(argv: Sequence[str] | None = None) -> int:
    """`cm3corpus train --shards PATTERN --output DIR [...]`; every TrainConfig field is a flag."""
    parser = _parser()
    args = parser.parse_args(argv)
    for name in ("max_steps", "batch_size"):
        if (value := getattr(args, name)) <= 0:
            parser.error(f"--{name} must be a positive integer, got {value}")
    cfg, note = scaled_warmup(TrainConfig(**vars(args)))
    if note:
        print(note, file=sys.stderr, flush=True)
    summary = train(cfg)
    final = summary["losses"][-1] if summary["losses"] else float("nan")
    print(f"[train] done: step {summary['step']}, loss {final:.4f}, eval {summary['eval_loss']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
