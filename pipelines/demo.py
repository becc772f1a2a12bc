"""`cm3corpus demo`: the whole job on the built-in demo corpus, in one command.

Writes a synthetic img2dataset-style corpus, then builds it with the demo CLIP into
`OUTPUT/corpus/`. Extra flags pass through to `cm3corpus build` (for example
`--direct_running_mode=multi_processing --direct_num_workers=2`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cm3corpus demo", description=__doc__)
    parser.add_argument("--output", default="demo_out", help="Folder for the demo data and the built corpus.")
    parser.add_argument("--num_examples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--shard_size", type=int, default=250, help="Examples per input tar.")
    args, build_flags = parser.parse_known_args(argv)

    from pipelines import build_corpus
    from pipelines.demo_data import write_demo_corpus

    data, corpus = f"{args.output}/data", f"{args.output}/corpus"
    summary = write_demo_corpus(
        data, num_examples=args.num_examples, seed=args.seed, image_size=args.image_size, shard_size=args.shard_size
    )
    print(f"demo data: {summary} → {data}", file=sys.stderr)
    build_corpus.run(
        ["--input", f"{data}/*.tar", "--output", corpus, "--seed", str(args.seed), *demo_build_flags(), *build_flags]
    )
    print(f"demo corpus built in {corpus}/ (stats.json, rejects/)", file=sys.stderr)
    return 0


def demo_build_flags() -> list[str]:
    """Build settings sized for the demo corpus (the defaults are CM3Leon's full-size ones)."""
    return [
        "--clip_model=demo",
        "--embed_batch_size=128",
        "--text_vocab_size=1024",
        "--image_size=64",
        "--image_patch_size=8",
        "--image_codebook_size=256",
        "--tokenizer_fit_images=512",
        "--seq_len=512",
        "--shard_max_samples=200",
    ]


if __name__ == "__main__":
    sys.exit(main())
