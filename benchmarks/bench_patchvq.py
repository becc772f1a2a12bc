"""Patch-VQ encode rate at the defaults (256 px, 8 px patches, 8,192 codes) against its floor.

Prints images/s, all measured in this run on the same patches, for:
- the floor: the bare float32 matrix product patches x codebook (1.6 GFLOP an image) into a preallocated
  result, chunk by chunk as `nearest` cuts them: what no exact search can beat on this BLAS;
- `PatchVQTokenizer.nearest`: one product giving |c|^2 - 2x.c directly, then the argmin;
- the stop-18 pass it replaced (float32 product into a fresh array, subtract from |c|^2/2, argmin);
- the float64 formula before that (`nearest_reference`);
- `nearest_distinct`, what `encode` runs: each distinct patch searched once. On these random patches
  nothing repeats, so it shows the sort's cost over `nearest`; then on the patches of `--demo_images`
  demo images (flat backgrounds: most patches repeat) against `nearest` on the same patches, with the
  share of distinct patches.
Checks that all give the same codes.

    python benchmarks/bench_patchvq.py [--images 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from transforms.lib.tokenize import PatchVQTokenizer, unique_rows


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def stop18_nearest(tok: PatchVQTokenizer, patches: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """The exact float32 pass of stop 18: product, subtract from |c|^2 / 2, argmin, 1,024 rows at a time."""
    centred = tok.codebook.astype(np.float32) - 128.0
    half_norms = 0.5 * np.sum(centred.astype(np.float64) ** 2, axis=1).astype(np.float32)
    codes_t = np.ascontiguousarray(centred.T)
    out = np.empty(len(patches), dtype=np.int32)
    for start in range(0, len(patches), chunk):
        x = patches[start : start + chunk].astype(np.float32) - np.float32(128.0)
        out[start : start + chunk] = np.argmin(half_norms[None, :] - x @ codes_t, axis=1)
    return out


def demo_patches(tok: PatchVQTokenizer, count: int) -> np.ndarray:
    """The patches of `count` 256 px demo images (drawn and JPEG-coded as `pipelines.demo.data` writes them)."""
    import io

    from PIL import Image

    from pipelines.demo.data import _jpeg, sample_pairs

    images, _, _ = sample_pairs(np.random.default_rng(0), count, 256)
    return np.concatenate([tok.patches(Image.open(io.BytesIO(_jpeg(im)))) for im in images])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--codes", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=512, help="rows per product (nearest's default)")
    ap.add_argument("--demo_images", type=int, default=16, help="demo images for the repeated-patch pass (0: skip)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    tok = PatchVQTokenizer(rng.integers(0, 256, (args.codes, 192), dtype=np.uint8), image_size=256, patch_size=8)
    patches = rng.integers(0, 256, (args.images * tok.tokens_per_image, 192), dtype=np.uint8)
    x32 = patches.astype(np.float32)
    c32 = np.ascontiguousarray(tok.codebook.astype(np.float32).T)
    buf = np.empty((args.chunk, args.codes), np.float32)

    def floor_pass():
        for i in range(0, len(x32), args.chunk):
            np.matmul(x32[i : i + args.chunk], c32, out=buf[: len(x32[i : i + args.chunk])])

    passes = {
        "floor": floor_pass,
        "nearest": lambda: tok.nearest(patches, chunk=args.chunk),
        "stop18": lambda: stop18_nearest(tok, patches),
        "float64": lambda: tok.nearest_reference(patches),
        "distinct": lambda: tok.nearest_distinct(patches),
    }
    best = {name: float("inf") for name in passes}
    for _ in range(args.repeats):  # interleaved, so a busy spell on a shared machine hits every pass alike
        for name, fn in passes.items():
            best[name] = min(best[name], _best(fn, 1))
    want = tok.nearest_reference(patches)
    same = bool(np.array_equal(tok.nearest(patches), want) and np.array_equal(stop18_nearest(tok, patches), want))
    n = args.images
    print(f"{n} images x {tok.tokens_per_image} patches x {args.codes} codes of 192 values, chunk {args.chunk}")
    print(f"float32 product alone (floor):    {n / best['floor']:8.1f} images/s")
    print(
        f"nearest (one exact product+argmin): {n / best['nearest']:6.1f} images/s"
        f"  ({best['nearest'] / best['floor']:.2f}x the floor's time)"
    )
    print(f"stop-18 pass (product, subtract):  {n / best['stop18']:7.1f} images/s")
    print(f"float64 formula:                   {n / best['float64']:7.1f} images/s")
    print(
        f"nearest_distinct, nothing repeats:  {n / best['distinct']:6.1f} images/s"
        f"  ({best['distinct'] / best['nearest']:.3f}x nearest's time)"
    )
    if args.demo_images:
        demo = demo_patches(tok, args.demo_images)
        t_all = _best(lambda: tok.nearest(demo), args.repeats)
        t_distinct = _best(lambda: tok.nearest_distinct(demo), args.repeats)
        share = len(unique_rows(demo)[0]) / len(demo)
        same = same and bool(np.array_equal(tok.nearest_distinct(demo), tok.nearest(demo)))
        k = args.demo_images
        print(
            f"{k} demo images ({share:.1%} of their patches distinct): nearest {k / t_all:.1f} images/s,"
            f" nearest_distinct {k / t_distinct:.1f} images/s ({t_all / t_distinct:.2f}x)"
        )
    same = same and bool(np.array_equal(tok.nearest_distinct(patches), want))
    print(f"codes equal: {same}")
    print(
        f"ratio nearest/stop-18: {best['stop18'] / best['nearest']:.2f}; nearest/float64: {best['float64'] / best['nearest']:.2f}"
    )
    if not same:
        raise SystemExit("bench_patchvq: codes differ from the float64 formula")


if __name__ == "__main__":
    main()
