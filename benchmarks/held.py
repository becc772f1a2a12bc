"""What the in-process DirectRunner (Beam's FnApiRunner) holds between fused stages, by PCollection.

The FnApiRunner keeps every PCollection that crosses a fusion break in memory until the stage that
reads it has run: a `ListBuffer` of encoded bytes, or for a GroupByKey a `GroupingBuffer` of decoded
values keyed by encoded key. Side inputs are also copied into its in-memory state service, where they
stay to the end of the run. `watch()` wraps the runner's bundle loop and records, after every bundle:

- per materialised PCollection, the most encoded bytes it was seen holding (its whole size);
- the total held at that moment (buffers shared between consumers counted once), and the largest total
  with what made it up.

The sizes are encoded sizes (what the runner stores for a ListBuffer); a GroupingBuffer's decoded
values are re-encoded with the PCollection's coder to size them, so Python object overhead is not in
these figures, only in RSS. Use it on small builds: sizing costs a pass over the held data per bundle.

    from benchmarks.held import watch
    with watch() as held:
        build_corpus.run([...])
    print(held.table(num_examples))

`python -m benchmarks.held [PAYLOAD_BYTES]` measures the runner's own cost with no pipeline code: the
peak RSS growth per element of PAYLOAD_BYTES (default 2,000) that it streams, holds for a side input,
or groups (`runner_cost`). Set MALLOC_MMAP_THRESHOLD_=1048576 to see it with the build's setting.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Held:
    """What `watch` saw: per-PCollection sizes, the peak of the total, RSS per stage."""

    sizes: dict[str, int] = field(default_factory=dict)  # PCollection label -> most encoded bytes held
    peak_total: int = 0
    peak_after: str = ""  # the stage after whose bundle the total peaked
    peak_parts: dict[str, int] = field(default_factory=dict)
    state_bytes: int = 0  # side inputs in the runner's state service at the end
    rss_by_stage: dict[str, int] = field(default_factory=dict)  # most RSS seen while each stage ran
    rss_growth: dict[str, int] = field(default_factory=dict)  # RSS the stage's bundles added over their start
    peak_rss: int = 0
    peak_rss_stage: str = ""

    def table(self, num_examples: int, top: int = 25) -> str:
        """Markdown: the largest PCollections, bytes per example, and what was held at the peak."""
        n = max(1, num_examples)
        lines = ["| PCollection (fusion break) | encoded bytes per example | held at the peak |", "| --- | --- | --- |"]
        for name, size in sorted(self.sizes.items(), key=lambda kv: -kv[1])[:top]:
            at_peak = self.peak_parts.get(name, 0)
            lines.append(f"| {name} | {size / n:,.0f} | {at_peak / n:,.0f} |")
        lines.append("")
        lines.append(
            f"Held at once at most {self.peak_total / n:,.0f} bytes per example (after stage {self.peak_after}); "
            f"side inputs in the state service {self.state_bytes / n:,.0f} bytes per example; "
            f"peak RSS {self.peak_rss / 2**20:,.1f} MiB while {self.peak_rss_stage} ran."
        )
        return "\n".join(lines)


def short_stage_name(stage: str) -> str:
    """`((ref_AppliedPTransform_Embed-Split_54)+(Embed/AllFailed/Write/0))...` -> `Embed/Split+Embed/AllFailed`."""
    import re

    names = []
    for part in re.findall(r"\(([^()+]+)\)", stage) or [stage]:
        part = re.sub(r"^ref_AppliedPTransform_", "", part)
        part = re.sub(r"_\d+$", "", part).replace("-", "/")
        name = "/".join(part.split("/")[:2])
        if name not in names:
            names.append(name)
    return "+".join(names[:4]) + ("+..." if len(names) > 4 else "")


def _label(ctx, transform_id: str) -> str:
    """A data input's transform id, with the runner's `ref_PCollection_*` ids named by the PCollection."""
    pcoll_id = transform_id.removesuffix("/Read")
    pcolls = ctx.pipeline_components.pcollections
    if pcoll_id != transform_id and pcoll_id in pcolls:
        return f"{pcolls[pcoll_id].unique_name} (materialised)"
    return transform_id


class _Sizer:
    def __init__(self):
        self._grouping_cache: dict[int, tuple[int, int]] = {}

    def list_parts(self, buffer) -> list:
        return list(getattr(buffer, "_inputs", []) or [])

    def grouping_size(self, buffer) -> int:
        from apache_beam.utils.windowed_value import WindowedValue

        grouped = getattr(buffer, "_grouped_output", None)
        if grouped:
            return sum(len(b) for part in grouped for b in part)
        table = buffer._table
        count = sum(len(v) for v in table.values())
        cached = self._grouping_cache.get(id(buffer))
        if cached and cached[0] == count:
            return cached[1]
        value_coder = buffer._pre_grouped_coder.wrapped_value_coder.value_coder().get_impl()

        def encoded(v) -> int:  # a non-default windowing keeps each value windowed
            return len(value_coder.encode(v.value if isinstance(v, WindowedValue) else v))

        size = sum(len(k) + sum(encoded(v) for v in vs) for k, vs in table.items())
        self._grouping_cache[id(buffer)] = (count, size)
        return size


def _snapshot(ctx, labels, sizer) -> tuple[dict[str, int], int]:
    """Encoded bytes held per PCollection label now, and the total with shared bytes counted once."""
    from apache_beam.runners.portability.fn_api_runner.execution import GroupingBuffer

    per: dict[str, int] = {}
    seen_bytes: set[int] = set()
    seen_buffers: set[int] = set()
    total = 0
    queues = ctx.queues
    pending = [*queues.ready_inputs._q, *queues.watermark_pending_inputs._q, *queues.time_pending_inputs._q]
    for _, data_input in pending:
        for transform_id, buffer in data_input.data.items():
            label = labels.setdefault(transform_id, _label(ctx, transform_id))
            if isinstance(buffer, GroupingBuffer):
                size = sizer.grouping_size(buffer)
                if id(buffer) not in seen_buffers:
                    total += size
                seen_buffers.add(id(buffer))
            else:
                parts = sizer.list_parts(buffer)
                size = sum(len(b) for b in parts)
                total += sum(len(b) for b in parts if id(b) not in seen_bytes)
                seen_bytes.update(id(b) for b in parts)
            per[label] = max(per.get(label, 0), size)
    return per, total


def _state_bytes(ctx) -> int:
    servicer = ctx.worker_handler_manager.state_servicer
    state = getattr(servicer, "_state", {})
    return sum(len(b) for values in state.values() for b in values if isinstance(b, bytes | bytearray))


@contextlib.contextmanager
def watch(rss_every_s: float = 0.05):
    """Record what the FnApiRunner holds while the block runs (see the module docstring)."""
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    held = Held()
    sizer = _Sizer()
    original = fn_runner.FnApiRunner._execute_bundle
    current = {"stage": "(start)", "ctx": None}
    labels: dict = {}
    stop = threading.Event()

    def sample_rss():
        while not stop.is_set():
            rss, stage = _rss_bytes(), current["stage"]
            held.rss_by_stage[stage] = max(held.rss_by_stage.get(stage, 0), rss)
            if rss > held.peak_rss:
                held.peak_rss, held.peak_rss_stage = rss, stage
            stop.wait(rss_every_s)

    def execute_bundle(self, ctx, bundle_context_manager, bundle_input):
        if current["ctx"] is not ctx:
            current["ctx"] = ctx
            labels.clear()
        current["stage"] = short_stage_name(bundle_context_manager.stage.name)
        before = _rss_bytes()
        result = original(self, ctx, bundle_context_manager, bundle_input)
        grown = max(0, held.rss_by_stage.get(current["stage"], before) - before)
        held.rss_growth[current["stage"]] = held.rss_growth.get(current["stage"], 0) + grown
        per, total = _snapshot(ctx, labels, sizer)
        for label, size in per.items():
            held.sizes[label] = max(held.sizes.get(label, 0), size)
        if total > held.peak_total:
            held.peak_total, held.peak_after, held.peak_parts = total, current["stage"], per
        held.state_bytes = _state_bytes(ctx)
        current["stage"] = "(between stages)"
        return result

    sampler = threading.Thread(target=sample_rss, name="held-rss", daemon=True)
    fn_runner.FnApiRunner._execute_bundle = execute_bundle
    sampler.start()
    try:
        yield held
    finally:
        stop.set()
        sampler.join()
        fn_runner.FnApiRunner._execute_bundle = original


# ---------------------------------------------------------------------------------------------------------
# The runner's own cost: RSS per element that the in-process DirectRunner holds, with no pipeline code.

_RUNNER_COST = """
import os, resource, sys
import apache_beam as beam
n, size, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
with beam.Pipeline() as p:
    xs = p | beam.Create(range(n)) | "Payload" >> beam.Map(lambda i: (f"k{i:08d}", os.urandom(size)))
    if mode == "side_input_wait":  # held whole until a count over it is known, as KeyedBatches does
        count = xs | "Count" >> beam.combiners.Count.Globally()
        out = xs | "Use" >> beam.Map(lambda kv, c: len(kv[1]) + c, beam.pvalue.AsSingleton(count))
    elif mode == "group_by_key":
        grouped = xs | "Key" >> beam.Map(lambda kv: (hash(kv[0]) % 64, kv)) | "Group" >> beam.GroupByKey()
        out = grouped | "Use" >> beam.Map(lambda kv: sum(len(v[1]) for v in kv[1]))
    else:  # streamed through one fused stage: nothing held
        out = xs | "Use" >> beam.Map(lambda kv: len(kv[1]))
    out | "Total" >> beam.combiners.Count.Globally()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def runner_cost(sizes=(10_000, 40_000), payload: int = 2000) -> dict[str, float]:
    """Peak RSS growth per element (bytes) of `payload`-byte elements the runner holds, by how it holds them."""
    import subprocess
    import sys

    out = {}
    for mode in ("streamed", "side_input_wait", "group_by_key"):
        rss = []
        for n in sizes:
            run = subprocess.run(
                [sys.executable, "-c", _RUNNER_COST, str(n), str(payload), mode], capture_output=True, text=True
            )
            rss.append(int(run.stdout.split()[-1]))
        out[mode] = (rss[-1] - rss[0]) / (sizes[-1] - sizes[0])
    return out


if __name__ == "__main__":
    import sys

    payload = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    for mode, per in runner_cost(payload=payload).items():
        print(f"{mode}: peak RSS grows {per:,.0f} bytes per {payload:,}-byte element ({per / payload:.1f}x)")
