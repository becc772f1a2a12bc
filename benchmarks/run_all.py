"""Run every `benchmarks/bench_*.py` and print one table: stage, baseline, figure, ratio, target, pass/fail.

    python benchmarks/run_all.py            # full sizes (tens of minutes on a 2-core machine)
    python benchmarks/run_all.py --quick    # small sizes, a few minutes: what CI or a reviewer runs
    python benchmarks/run_all.py --only bank_scale,scale --out -   # a subset, table to stdout only

Each script runs as a subprocess, one after another (they all want every core). With --quick a script
gets `--quick` when its `--help` lists it, else the arguments in QUICK_ARGS. A script's figures come
from its last `RESULT {json}` line (`{"rows": [{"stage", "baseline", "figure", "ratio", "target",
"pass"}, ...]}`); a script without one (for example a colleague's new benchmark) is parsed from its
text: a `ratio ... : X  (target >= Y)` line or a `speed-up Xx` line, else it gets a row saying so.

The table goes to stdout and to `benchmarks/results/YYYY-MM-DD.md` (today's date, replaced when run
again on the same day), followed by each script's own tables and output tail.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Small sizes for scripts that have no --quick flag of their own. bench_retrieve runs at its default size
# (about 10 s): at 10k documents the bare search is so fast that the fixed rule overhead fails the target.
QUICK_ARGS = {
    "bench_embed": ["--clip_model", "demo", "--examples", "256", "--repeats", "2"],
    "bench_train": ["--steps", "10", "--repeats", "2", "--shards", "2", "--samples_per_shard", "128"],
}


def help_text(script: Path) -> str:
    """The script's --help output ("" when it has none or fails)."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", f"benchmarks.{script.stem}", "--help"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        return ""
    return done.stdout if done.returncode == 0 else ""


def arguments(script: Path, quick: bool) -> list[str]:
    if not quick:
        return []
    text = help_text(script)
    if re.search(r"(^|\s)--quick\b", text):
        return ["--quick"]
    # Flag/value pairs, kept only where the script's --help still lists the flag (scripts change).
    pairs = QUICK_ARGS.get(script.stem, [])
    return [
        a
        for flag, value in zip(pairs[::2], pairs[1::2], strict=True)
        if re.search(rf"{flag}\b", text)
        for a in (flag, value)
    ]


def parse(name: str, output: str) -> tuple[list[dict], dict]:
    """Rows (and any extra payload) from a script's output: its RESULT line, else its text."""
    for line in reversed(output.splitlines()):
        if line.startswith("RESULT "):
            try:
                payload = json.loads(line[len("RESULT ") :])
            except json.JSONDecodeError:
                break
            return [{**r, "bench": name} for r in payload.get("rows", [])], payload
    rows = []
    for m in re.finditer(
        r"^(?P<what>.*?ratio[^:\n]*):\s*(?P<x>[\d.]+)\s*\(target\s*(?P<t>[<>=]+)\s*(?P<y>[\d.]+)\)", output, re.M
    ):
        x, y, op = float(m["x"]), float(m["y"]), m["t"]
        rows.append(_row(name, m["what"].strip(), "", f"{x}", x, f"{op} {y}", x >= y if ">" in op else x <= y))
    if not rows and (m := re.search(r"speed-up\s*([\d.]+)x", output)):
        rows.append(_row(name, name, "", f"{m[1]}x", float(m[1]), "", None))
    return rows, {}


def _row(bench: str, stage: str, baseline: str, figure: str, ratio, target: str, ok) -> dict:
    return {
        "bench": bench,
        "stage": stage,
        "baseline": baseline,
        "figure": figure,
        "ratio": ratio,
        "target": target,
        "pass": ok,
    }


def run_one(script: Path, quick: bool, timeout: int) -> dict:
    """Run one benchmark script; returns its rows, output, exit code and wall time."""
    # As a module from the repository root: scripts written for `python -m benchmarks.x` and for
    # `python benchmarks/x.py` both import the project that way.
    argv = [sys.executable, "-m", f"benchmarks.{script.stem}", *arguments(script, quick)]
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        output, rc = done.stdout + ("\n" + done.stderr if done.returncode else ""), done.returncode
    except subprocess.TimeoutExpired as e:
        output, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
    wall = time.perf_counter() - start
    name = script.stem.removeprefix("bench_")
    rows, payload = parse(name, done.stdout if rc == 0 else output)
    if rc != 0:
        rows = [_row(name, name, "", f"failed ({rc})", None, "", False)]
    elif not rows:
        rows = [_row(name, name, "", "no machine-readable figure in its output", None, "", None)]
    return {
        "name": name,
        "argv": argv[1:],
        "rc": rc,
        "wall_s": wall,
        "rows": rows,
        "output": output,
        "payload": payload,
    }


def _cell(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v).replace("|", "\\|")


def table(runs: list[dict]) -> str:
    lines = ["| bench | stage | baseline | stage figure | ratio | target | result |", "| --- " * 7 + "|"]
    for run in runs:
        for r in run["rows"]:
            verdict = {True: "pass", False: "FAIL", None: "report"}[r.get("pass")]
            cells = [r["bench"], r["stage"], r["baseline"], r["figure"], r["ratio"], r["target"], verdict]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def report(runs: list[dict], quick: bool, started: str) -> str:
    """The dated markdown file: the summary table, then each script's own tables and output tail."""
    import platform

    import numpy as np

    try:
        import faiss

        faiss_version = faiss.__version__
    except ImportError:
        faiss_version = "absent"
    import os

    head = [
        f"# Benchmarks, {started}{' (--quick)' if quick else ''}",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"numpy {np.__version__}, faiss {faiss_version}. Run with `python benchmarks/run_all.py"
        f"{' --quick' if quick else ''}`.",
        "",
        table(runs),
        "",
    ]
    for run in runs:
        head += [
            f"## {run['name']}",
            "",
            f"`python {' '.join(run['argv'])}` — exit {run['rc']}, {run['wall_s']:.0f} s",
            "",
            "```",
            *[ln for ln in run["output"].strip().splitlines() if not ln.startswith("RESULT ")][-60:],
            "```",
            "",
        ]
    return "\n".join(head)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: --quick or QUICK_ARGS per script")
    ap.add_argument("--only", default=None, help="comma-separated names (bank_scale, embed, ...) to run")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per script before it is stopped")
    ap.add_argument("--out", default=None, help="markdown file to write ('-' for none; default results/DATE.md)")
    args = ap.parse_args()

    started = dt.date.today().isoformat()
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        wanted = set(args.only.split(","))
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in wanted]
    runs = []
    for script in scripts:
        print(f"running {script.name} {' '.join(arguments(script, args.quick))} ...", file=sys.stderr, flush=True)
        run = run_one(script, args.quick, args.timeout)
        print(f"  {script.name}: exit {run['rc']}, {run['wall_s']:.0f} s", file=sys.stderr, flush=True)
        runs.append(run)
    print(table(runs))
    if args.out != "-":
        out = Path(args.out) if args.out else HERE / "results" / f"{started}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report(runs, args.quick, started))
        print(f"written {out}", file=sys.stderr)
    return 1 if any(r.get("pass") is False for run in runs for r in run["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
