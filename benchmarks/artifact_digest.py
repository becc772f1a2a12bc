"""sha256 of every artifact a build wrote, to show that two builds (two commits, two runners) agree.

    python -m benchmarks.artifact_digest OUTPUT_A [OUTPUT_B]

Prints `sha256  path` per file under OUTPUT (sorted paths). Two files carry the run's wall time and
so differ between any two runs: `stats.json` is digested without its `seconds` and timing counters,
and `report.html` without its `seconds` row. With two folders it prints only the differences and
exits 1 when there are any.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

_SECONDS_ROW = re.compile(r"<tr><td>seconds</td><td class=\"n\">[^<]*</td></tr>")


def _normalised(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name == "stats.json":
        stats = json.loads(data)
        stats.pop("seconds", None)
        stats["counters"] = {k: v for k, v in stats.get("counters", {}).items() if "msec" not in k}
        return json.dumps(stats, sort_keys=True).encode()
    if path.name == "report.html":
        return _SECONDS_ROW.sub("", data.decode("utf-8")).encode()
    return data


def digests(output: str) -> dict[str, str]:
    """Relative path -> sha256 of every file under `output` (stats.json and report.html normalised)."""
    root = Path(output)
    return {
        str(p.relative_to(root)): hashlib.sha256(_normalised(p)).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def main(argv: list[str]) -> int:
    if len(argv) == 1:
        for path, digest in digests(argv[0]).items():
            print(f"{digest}  {path}")
        return 0
    a, b = digests(argv[0]), digests(argv[1])
    differ = sorted(p for p in a.keys() | b.keys() if a.get(p) != b.get(p))
    for p in differ:
        print(f"differs: {p} ({a.get(p, 'missing')[:12]} vs {b.get(p, 'missing')[:12]})")
    print(f"{len(a)} files vs {len(b)} files, {len(differ)} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
