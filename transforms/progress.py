"""Progress lines while a build runs, and the run summary from Beam's metrics.

Workers cannot read the runner's metrics while the job runs, so each process keeps its own
running counts and prints a line every few seconds; the final figures in `stats.json` come from
the committed Beam counters once the pipeline has finished.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter

from apache_beam.metrics.metric import MetricsFilter

_lock = threading.Lock()
_counts: Counter = Counter()
_last = [0.0]
INTERVAL_S = 5.0


def note(name: str, n: int = 1) -> None:
    """Count `n` events called `name` in this process, printing a progress line at most every few seconds."""
    with _lock:
        _counts[name] += n
        now = time.monotonic()
        if now - _last[0] < INTERVAL_S:
            return
        _last[0] = now
        line = " · ".join(f"{k} {v:,}" for k, v in sorted(_counts.items()))
    # The pid tells apart the interleaved lines of several worker processes (and shows which process did the work).
    print(f"[cm3corpus progress] pid {os.getpid()} · {line}", file=sys.stderr, flush=True)


def counters(result) -> dict[str, int]:
    """All counters of a finished pipeline as `{"namespace/name": value}`."""
    out: dict[str, int] = {}
    for c in result.metrics().query(MetricsFilter())["counters"]:
        try:
            value = c.committed
        except Exception:  # some runners only report attempted values
            value = None
        if value is None:
            value = c.attempted
        name = f"{c.key.metric.namespace}/{c.key.metric.name}"
        out[name] = out.get(name, 0) + int(value or 0)
    return out
