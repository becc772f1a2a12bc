"""The `cm3corpus` command. Thin: each subcommand imports its module only when it runs."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS = {
    "demo": ("pipelines.demo.command", "Make the demo corpus and build it end to end (the README's first command)."),
    "demo-data": ("pipelines.demo.data", "Write the synthetic demo corpus in img2dataset's WebDataset layout."),
    "build": ("pipelines.build_corpus", "Run the corpus pipeline: --input PATTERN --output DIR [Beam options]."),
    "fit-demo-clip": ("pipelines.demo.fit_clip", "Train the tiny demo CLIP on freshly drawn demo scenes."),
    "train": ("model.train", "Train the CM3 decoder on built shards."),
    "query": ("pipelines.query", "Search a built corpus's memory bank with a text or an image."),
    "generate": ("model.generate", "Sample images (or captions) from a trained decoder, retrieving from a corpus."),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = argparse.ArgumentParser(prog="cm3corpus", description="Retrieval-augmented CM3 corpora with Beam.")
        sub = parser.add_subparsers(dest="command", metavar="COMMAND")
        for name, (_, help_text) in COMMANDS.items():
            sub.add_parser(name, help=help_text, add_help=False)
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}")
        parser.print_help()
        return 0 if argv else 2
    # lazy: only the chosen command's module, so `cm3corpus --help` starts without Beam, torch or faiss
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
