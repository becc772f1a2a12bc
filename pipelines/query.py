"""`cm3corpus query`: search a built corpus's memory bank with a text, an image or both.

The reading and searching are `transforms/lib/corpus.py` (`Corpus`, `query`); this module parses the
flags and prints the hits.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from transforms.lib.clip import ClipWeightsUnavailable
from transforms.lib.corpus import (
    DEFAULT_K,
    RULE_CHECKS,
    Corpus,
    Hit,
    check_flags,
    query,
    read_image_file,
    write_thumbnails,
)
from transforms.lib.retrieve import RetrievalRules


def _parser() -> argparse.ArgumentParser:
    d = RetrievalRules()
    p = argparse.ArgumentParser(prog="cm3corpus query", description="Search a built corpus's memory bank.")
    p.add_argument("--corpus", required=True, help="The build's output folder.")
    what = p.add_argument_group("query (one or both)")
    what.add_argument("--text", help="Query text.")
    what.add_argument("--image", help="Query image file.")
    p.add_argument("--k", type=int, default=DEFAULT_K, help="Documents to return at most.")
    p.add_argument("--json", action="store_true", help="One JSON object per line instead of a table.")
    p.add_argument("--rules", action="store_true", help="Pick as the build does (skip near-duplicates, diversity).")
    p.add_argument("--max_similarity", type=float, default=d.max_similarity, help="With --rules: relevance cap.")
    p.add_argument("--diversity_threshold", type=float, default=d.diversity_threshold, help="With --rules.")
    p.add_argument("--topk", type=int, default=d.topk, help="With --rules: candidates fetched per query.")
    p.add_argument("--thumbnails", help="Folder to write each hit's image into (decoded from its tokens).")
    p.add_argument("--clip_pretrained", help="CLIP weights, when bank.json does not record them.")
    p.add_argument("--memory_bank", help="The bank folder, when not CORPUS/memory_bank.")
    p.add_argument("--nprobe", type=int, help="IVF lists to probe (bank.json's by default).")
    p.add_argument("--device", default="cpu")
    return p


def rules_from_args(args: argparse.Namespace):
    """RetrievalRules from the --max_similarity / --diversity_threshold / --topk flags (ranges checked)."""
    check_flags(args, RULE_CHECKS, "query")
    d = RetrievalRules()
    return RetrievalRules(d.num_retrieved, args.max_similarity, args.diversity_threshold, args.topk)


def format_table(hits: Sequence[Hit]) -> str:
    """The hits as an aligned text table for a person."""
    rows = [("rank", "score", "modality", "via", "key", "caption", "image")]
    for h in hits:
        caption = (h.caption or "").replace("\n", " ")
        caption = caption if len(caption) <= 60 else caption[:57] + "..."
        rows.append((str(h.rank), f"{h.score:.4f}", h.modality, h.via, h.key, caption, h.image or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.text and not args.image:
        raise SystemExit("cm3corpus query: give --text, --image or both")
    if args.k < 1:
        raise SystemExit(f"--k must be at least 1, got {args.k}")
    rules = rules_from_args(args) if args.rules else None
    image = read_image_file(args.image) if args.image else None

    try:  # the CLIP loads lazily, at the first query: its errors are the user's to fix, in one line
        corpus = Corpus(args.corpus, args.device, args.clip_pretrained, args.nprobe, args.memory_bank)
        hits = query(corpus, args.text, image, args.k, rules)
        if args.thumbnails:
            write_thumbnails(corpus, hits, args.thumbnails)
    except (FileNotFoundError, ValueError, ClipWeightsUnavailable) as e:
        raise SystemExit(f"cm3corpus query: {e}") from None
    if args.json:
        for h in hits:
            print(json.dumps(h.row(), ensure_ascii=False, sort_keys=True))
    else:
        print(format_table(hits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
