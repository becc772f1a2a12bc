"""Generation tokens/s with the KV cache (`model/decoder.py` KVCache) against without it.

Both paths run `model.sample.generate` on the same model, prompt, guidance and seed: without the cache
every new token re-runs the whole context (what the sampler did before), with it each token costs one
position. The model is the demo's architecture (`pipelines/demo/command.py`: 2 layers, 4 heads, width 128)
with its learned positions extended so that a 64-token prompt plus 1,024 generated tokens fit (the
demo's own seq_len is 512). Classifier-free guidance is on, so both streams run (and both are cached).
The two paths must produce the same tokens; the script fails if they do not.

    python benchmarks/bench_generate.py            # 1,024 generated tokens (target: cache >= 5x)
    python benchmarks/bench_generate.py --quick    # 256 tokens, reported only

The last line of output is `RESULT {json}` for `benchmarks/run_all.py`.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn as nn

from model.decoder import CM3Config, CM3Decoder
from model.sample import generate

TARGET = 5.0


def _run(model, prompt, uncond, n, use_cache) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    out = generate(
        model,
        prompt,
        n,
        temperature=1.0,
        cfg_scale=3.0,
        uncond_prompt_ids=uncond,
        generator=torch.Generator().manual_seed(0),
        use_cache=use_cache,
    )
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256 generated tokens, ratio reported only")
    ap.add_argument("--tokens", type=int, default=None, help="generated tokens (default 1024, --quick 256)")
    args = ap.parse_args()
    n = args.tokens or (256 if args.quick else 1024)
    if n < 1:
        raise SystemExit("--tokens must be at least 1")
    torch.manual_seed(0)
    prompt_len, vocab = 64, 8192 + 4096
    model = CM3Decoder(CM3Config(vocab_size=vocab, seq_len=prompt_len + n, n_layer=2, n_head=4, n_embd=128)).eval()
    nn.init.normal_(model.lm_head.weight, std=0.02)  # a non-uniform output, so sampling has something to do
    prompt = torch.randint(0, vocab, (1, prompt_len))
    uncond = torch.randint(0, vocab, (1, prompt_len // 2))
    _run(model, prompt, uncond, 8, True)  # warm-up
    cached, t_cache = _run(model, prompt, uncond, n, True)
    bare, t_bare = _run(model, prompt, uncond, n, False)
    same = torch.equal(cached, bare)
    ratio = t_bare / t_cache
    print(f"generated tokens: {n} (prompt {prompt_len}, CFG on: two streams), threads {torch.get_num_threads()}")
    print(f"no cache: {n / t_bare:.1f} tokens/s ({t_bare:.2f} s)")
    print(f"KV cache: {n / t_cache:.1f} tokens/s ({t_cache:.2f} s)")
    print(f"same tokens: {same}")
    target = None if args.quick else TARGET
    print(f"ratio cache/no-cache tokens/s: {ratio:.2f}" + (f" (target >= {TARGET})" if target else " (reported only)"))
    row = {
        "stage": f"generate, KV cache, {n} tokens",
        "baseline": "generate without cache",
        "figure": f"{n / t_cache:.1f} tokens/s",
        "ratio": round(ratio, 2),
        "target": target,
        "pass": bool(same and (target is None or ratio >= target)),
    }
    print("RESULT " + json.dumps({"bench": "generate", "rows": [row]}))
    if not same:
        raise SystemExit("cached and uncached generation disagree")


if __name__ == "__main__":
    main()
