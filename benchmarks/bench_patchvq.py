"""Patch-VQ encode rate at the defaults (256 px, 8 px patches, 8,192 codes) against its floor.

Prints images/s for `PatchVQTokenizer.nearest` (the exact float32 pass), for the float64 formula it
replaced (`nearest_reference`), and for the bare float32 matrix product alone (the arithmetic floor:
patches x codebook), all measured in this run on the same patches; checks that the codes are equal.

    python benchmarks/bench_patchvq.py [--images 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from transforms.tokenize import PatchVQTokenizer


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--codes", type=int, default=8192)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    tok = PatchVQTokenizer(rng.integers(0, 256, (args.codes, 192), dtype=np.uint8), image_size=256, patch_size=8)
    patches = rng.integers(0, 256, (args.images * tok.tokens_per_image, 192), dtype=np.uint8)
    x32 = patches.astype(np.float32)
    c32 = np.ascontiguousarray(tok.codebook.astype(np.float32).T)

    floor = _best(lambda: [x32[i : i + 1024] @ c32 for i in range(0, len(x32), 1024)], args.repeats)
    fast = _best(lambda: tok.nearest(patches), args.repeats)
    ref = _best(lambda: tok.nearest_reference(patches), args.repeats)
    same = bool(np.array_equal(tok.nearest(patches), tok.nearest_reference(patches)))
    n = args.images
    print(f"{n} images x {tok.tokens_per_image} patches x {args.codes} codes of 192 values")
    print(f"float32 product alone (floor): {n / floor:8.1f} images/s")
    print(f"nearest (exact float32):       {n / fast:8.1f} images/s  ({fast / floor:.2f}x the floor's time)")
    print(f"float64 formula (before):      {n / ref:8.1f} images/s")
    print(f"codes equal: {same}")
    print(f"ratio nearest/before: {ref / fast:.2f} (target >= 1.5)")
    if not same:
        raise SystemExit("bench_patchvq: codes differ from the float64 formula")


if __name__ == "__main__":
    main()
