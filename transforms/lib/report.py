"""`report.html`: one self-contained page to judge the neighbours before spending GPU time.

The renderer is a pure function of plain data (the pipeline gathers a small sample of queries and
the run's counts); thumbnails are embedded as base64 JPEG data URIs and the CSS is inline, so the
file opens anywhere with no network. Captions come from untrusted inputs: every text is escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
from PIL import Image

from transforms.lib.io import atomic_open

THUMB_SIDE = 128  # px, longest side of an embedded thumbnail
DATA_URI = "data:image/jpeg;base64,"
REPORT_SAMPLE = "report_sample.json"  # staged by the pipeline, rendered with the run's counts by finalize
FILTER_REPORT = "filter_report.json"  # staged by FilterCorpus: CLIP-score histogram and duplicate groups

CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 10px}
.sub{color:#666;margin-bottom:16px}
table.stats{border-collapse:collapse;margin-bottom:8px}
table.stats td{padding:3px 12px 3px 0;border-bottom:1px solid #e4e4e4;vertical-align:top}
table.stats td.n{text-align:right;font-variant-numeric:tabular-nums}
.query{display:flex;gap:18px;background:#fff;border:1px solid #ddd;border-radius:8px;padding:12px;margin:12px 0}
.q{flex:0 0 170px;border-right:2px solid #4a7bd0;padding-right:14px}
.nbrs{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.card{width:150px}
.img{width:128px;height:128px;display:flex;align-items:center;justify-content:center;background:#eee;
border-radius:4px;overflow:hidden;color:#999;font-size:12px}
.img img{max-width:128px;max-height:128px}
.cap{margin-top:4px;font-size:12.5px;overflow-wrap:anywhere;max-height:5.6em;overflow:hidden}
.key{font:11px ui-monospace,Menlo,monospace;color:#888;overflow-wrap:anywhere}
.meta{font-size:12px;color:#444;margin-top:2px}
.tag{display:inline-block;padding:0 5px;border-radius:3px;font-size:11px;margin-right:3px}
.via-image{background:#e3ecfb;color:#234}.via-text{background:#fbeee3;color:#432}
.mod{background:#eee;color:#444}
.none{color:#999;font-style:italic;align-self:center}
"""


def thumbnail_jpeg(image: bytes | None, side: int = THUMB_SIDE) -> bytes | None:
    """The JPEG thumbnail of encoded image bytes that the report embeds; None when absent or undecodable."""
    if not image:
        return None
    try:
        with Image.open(io.BytesIO(image)) as im:
            im.draft(
                "RGB", (side, side)
            )  # JPEG: decode at 1/2..1/8 scale, still at least side; every example pays this
            im = im.convert("RGB")
            im.thumbnail((side, side))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
    except Exception:  # the report must not fail on one odd image
        return None
    return buf.getvalue()


def report_doc(e) -> tuple:
    """(key, caption, report thumbnail JPEG or None, modality): what a report shows of an example.

    Report samples take this early, before they wait on a side input, so a runner holds thumbnails
    of every example meanwhile, never whole images.
    """
    return e.key, e.caption, thumbnail_jpeg(e.image), e.modality


def report_doc_json(doc: tuple | None, key: str) -> dict:
    """A `report_doc` as the staged JSON holds it (thumbnail base64); an unknown key has no caption or image."""
    _, caption, thumb, modality = doc or (key, None, None, "")
    image = base64.b64encode(thumb).decode() if thumb is not None else None
    return {"key": key, "caption": caption, "image": image, "modality": modality}


def thumbnail_uri(image: bytes | None, side: int = THUMB_SIDE) -> str | None:
    """A `data:image/jpeg;base64,...` thumbnail of encoded image bytes; None when absent or undecodable."""
    jpeg = thumbnail_jpeg(image, side)
    return None if jpeg is None else DATA_URI + base64.b64encode(jpeg).decode("ascii")


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _image(image: bytes | str | None) -> str:
    # A str is a thumbnail made earlier (the build's sample carries thumbnails, not whole images).
    uri = image if isinstance(image, str) and image.startswith(DATA_URI) else thumbnail_uri(image)
    return f'<div class="img"><img src="{uri}" alt=""></div>' if uri else '<div class="img">no image</div>'


def _caption(caption: str | None) -> str:
    return f'<div class="cap">{_e(caption)}</div>' if caption else '<div class="cap none">no caption</div>'


def _neighbour(n: Mapping[str, Any]) -> str:
    via = _e(n.get("via"))
    return (
        '<div class="card">'
        f"{_image(n.get('image'))}{_caption(n.get('caption'))}"
        f'<div class="meta">#{_e(n.get("rank"))} · score {float(n.get("score", 0.0)):.3f}</div>'
        f'<div class="meta"><span class="tag via-{via}">via {via}</span>'
        f'<span class="tag mod">{_e(n.get("modality"))}</span></div>'
        f'<div class="key">{_e(n.get("key"))}</div></div>'
    )


def _query(q: Mapping[str, Any]) -> str:
    neighbours = q.get("neighbours") or []
    body = "".join(_neighbour(n) for n in neighbours) or '<div class="none">nothing retrieved</div>'
    return (
        '<div class="query"><div class="q">'
        f"{_image(q.get('image'))}{_caption(q.get('caption'))}"
        f'<div class="meta"><span class="tag mod">{_e(q.get("modality"))}</span> query</div>'
        f'<div class="key">{_e(q.get("key"))}</div></div>'
        f'<div class="nbrs">{body}</div></div>'
    )


def _number(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return _e(v)
    return f"{v:,}" if isinstance(v, int) else f"{v:,.3f}".rstrip("0").rstrip(".")


def _stats(counts: Mapping[str, Any], prefix: str = "") -> str:
    rows = []
    for name, value in counts.items():
        if isinstance(value, Mapping):
            rows.append(_stats(value, f"{prefix}{name} / "))
        else:
            rows.append(f'<tr><td>{_e(prefix + str(name))}</td><td class="n">{_number(value)}</td></tr>')
    return "".join(rows)


def render_report(
    queries: Sequence[Mapping[str, Any]],
    counts: Mapping[str, Any],
    title: str = "cm3corpus",
    filters: Mapping[str, Any] | None = None,
) -> str:
    """The report page as an HTML string.

    Args:
        queries: sample queries, each `{"key", "caption", "image" (encoded bytes, a `thumbnail_uri`, or None), "modality",
            "neighbours": [{"key", "caption", "image", "score", "via", "modality", "rank"}, ...]}`,
            neighbours in rank order.
        counts: run counts to show (e.g. stats.json); nested dicts become "outer / inner" rows.
        title: page heading.
        filters: the corpus filters' staged sample (see `filters_section`), or None.
    """
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)} report</title><style>{CSS}</style></head><body>"
        f"<h1>{_e(title)} report</h1>"
        f'<div class="sub">{len(queries)} sample queries with their retrieved neighbours, in training-sequence'
        " order (retrieved documents come before the query).</div>"
        f'<h2>Run counts</h2><table class="stats">{_stats(counts)}</table>'
        f"{filters_section(filters) if filters else ''}"
        f"<h2>Sample queries</h2>{''.join(_query(q) for q in queries)}"
        "</body></html>\n"
    )


def write_report(
    path: str,
    queries: Sequence[Mapping[str, Any]],
    counts: Mapping[str, Any],
    title: str = "cm3corpus",
    filters: Mapping[str, Any] | None = None,
) -> None:
    """Render the report and write it to `path` (any fsspec URL) under a temporary name, then rename.

    Args:
        path: where report.html goes.
        queries: see `render_report`.
        counts: see `render_report`.
        title: page heading.
        filters: see `render_report`.
    """
    page = render_report(queries, counts, title, filters)
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(page)


# ----------------------------------------------------------------------------------------------------
# The corpus filters' section: where the CLIP scores lie, and what the dedup threshold catches.


def render_staged_report(fs, staging: str, path: str, stats: dict) -> None:
    """Render the sample `ReportSample` staged (and the filters' report, when staged) with the run's counts."""
    sample = f"{staging}/{REPORT_SAMPLE}"
    if not fs.exists(sample):
        return
    with fs.open(sample, "r") as f:
        queries = json.load(f)
    for q in queries:
        for d in (q, *q["neighbours"]):
            d["image"] = DATA_URI + d["image"] if d["image"] else None  # the sample holds report thumbnails
    summary = {k: v for k, v in stats.items() if k != "counters"}
    filters, filters_path = None, f"{staging}/{FILTER_REPORT}"
    if fs.exists(filters_path):
        with fs.open(filters_path, "r") as f:
            filters = json.load(f)
    write_report(path, queries, summary, filters=filters)


def histogram_svg(
    counts: Sequence[int], lo: float, width: float, threshold: float | None, w: int = 640, h: int = 230
) -> str:
    """An inline SVG bar chart of binned scores, the threshold as a red line (bars below it shaded).

    Args:
        counts: examples per bin; bin i covers [lo + i*width, lo + (i+1)*width).
        lo: left edge of bin 0.
        width: bin width.
        threshold: the score marked, or None.
    """
    used = [i for i, c in enumerate(counts) if c]
    if not used:
        return "<p>no image+text examples were scored</p>"
    first, last = used[0], used[-1]
    if threshold is not None:  # keep the threshold in view even where no score lies
        t_bin = int((threshold - lo) // width)
        first, last = max(0, min(first, t_bin - 1)), min(len(counts) - 1, max(last, t_bin + 1))
    x0, x1 = lo + first * width, lo + (last + 1) * width
    top = max(counts[first : last + 1])
    left, right, up, down = 44, 12, 28, 40
    pw, ph = w - left - right, h - up - down

    def x(v: float) -> float:
        return round(left + (v - x0) / (x1 - x0) * pw, 1)

    bars = []
    for i in range(first, last + 1):
        if not counts[i]:
            continue
        a, b = lo + i * width, lo + (i + 1) * width
        bh = round(counts[i] / top * ph, 1)
        below = threshold is not None and b <= threshold + 1e-12
        colour = "#d9a0a0" if below else "#4a7bd0"
        bars.append(
            f'<rect x="{x(a)}" y="{round(up + ph - bh, 1)}" width="{max(round(x(b) - x(a) - 1, 1), 0.5)}"'
            f' height="{bh}" fill="{colour}"><title>{a:.2f} to {b:.2f}: {counts[i]:,}</title></rect>'
        )
    ticks = []
    step = 0.1 if x1 - x0 <= 1.2 else 0.2
    t = round(math.ceil(x0 / step - 1e-9) * step, 2)
    while t <= x1 + 1e-9:
        ticks.append(
            f'<line x1="{x(t)}" y1="{up + ph}" x2="{x(t)}" y2="{up + ph + 4}" stroke="#666"/>'
            f'<text x="{x(t)}" y="{up + ph + 16}" font-size="11" text-anchor="middle">{t:.1f}</text>'
        )
        t = round(t + step, 2)
    mark = ""
    if threshold is not None:
        kept = sum(c for i, c in enumerate(counts) if lo + i * width >= threshold - 1e-12)
        mark = (
            f'<line x1="{x(threshold)}" y1="{up - 6}" x2="{x(threshold)}" y2="{up + ph}" stroke="#c0392b"'
            f' stroke-width="2"/><text x="{x(threshold) + 4}" y="{up - 10}" font-size="11" fill="#c0392b">'
            f"--min_clip_score {threshold:g} (bins left of it are left out; ~{kept:,} at or above)</text>"
        )
    return (
        f'<svg width="{w}" height="{h}" role="img" aria-label="CLIP score histogram">'
        f'<rect width="{w}" height="{h}" fill="#fff" stroke="#ddd"/>{"".join(bars)}'
        f'<line x1="{left}" y1="{up + ph}" x2="{w - right}" y2="{up + ph}" stroke="#666"/>{"".join(ticks)}'
        f'<text x="{left - 6}" y="{up + 4}" font-size="11" text-anchor="end">{top:,}</text>'
        f'<text x="{left - 6}" y="{up + ph}" font-size="11" text-anchor="end">0</text>'
        f'<text x="{left + pw / 2}" y="{h - 6}" font-size="11" text-anchor="middle">image–caption cosine'
        f" (bins of {width:g})</text>{mark}</svg>"
    )


def _filtered_card(d: Mapping[str, Any], label: str) -> str:
    thumb = DATA_URI + d["image"] if d.get("image") else None  # the staged sample holds report thumbnails
    return (
        f'<div class="card">{_image(thumb)}{_caption(d.get("caption"))}'
        f'<div class="meta">{_e(label)}</div><div class="key">{_e(d.get("key"))}</div></div>'
    )


def filters_section(data: Mapping[str, Any]) -> str:
    """HTML for the corpus filters: the CLIP-score histogram and a few duplicate groups.

    Args:
        data: `transforms.filters`' staged sample: `min_clip_score`, `dedup_threshold`, `histogram`
            (`lo`, `width`, `counts`), `groups` (`kept` and `dropped` documents, images as base64),
            `low_clip` (left-out documents with their `score`).
    """
    s, t, hist = data.get("min_clip_score"), data.get("dedup_threshold"), data.get("histogram") or {}
    how = (
        f"Examples left of the red line are left out (<code>--min_clip_score {s:g}</code>)."
        if s is not None
        else "No <code>--min_clip_score</code> is set: pick it where the low tail (mismatched captions)"
        " separates from the main body."
    )
    parts = [
        f'<h2>Corpus filters</h2><div class="sub">Image–caption CLIP cosine of every image+text example. {how}</div>',
        histogram_svg(hist.get("counts") or [], hist.get("lo", -1.0), hist.get("width", 0.02), s),
    ]
    low = data.get("low_clip") or []
    if low:
        cards = "".join(_filtered_card(d, f"score {d['score']:.3f}, left out") for d in low)
        parts.append(f'<h3>Left out, closest below the threshold</h3><div class="nbrs">{cards}</div>')
    if t is not None:
        groups = data.get("groups") or []
        parts.append(
            f'<h3>Duplicate groups (<code>--dedup_threshold {t:g}</code>)</h3><div class="sub">The kept document'
            " (blue) and the ones left out as its duplicates, with their cosine to it; the groups closest to"
            " the threshold come with a key-hash sample.</div>"
        )
        for g in groups:
            dropped = "".join(
                _filtered_card(
                    d, f"{d['reason']}" + (f", cosine {d['score']:.3f}" if d.get("score") is not None else "")
                )
                for d in g["dropped"]
            )
            parts.append(
                f'<div class="query"><div class="q">{_filtered_card(g["kept"], "kept")}</div>'
                f'<div class="nbrs">{dropped}</div></div>'
            )
        if not groups:
            parts.append('<div class="none">no duplicates found</div>')
    return "".join(parts)


# ----------------------------------------------------------------------------------------------------
# The training section `cm3corpus demo` adds after its short training run.


def loss_curve_svg(
    points: Sequence[tuple[int, float]], eval_points: Sequence[tuple[int, float]] = (), w: int = 560, h: int = 220
) -> str:
    """An inline SVG line chart of (step, loss), with eval losses as dots; no scripts, no network."""
    if not points:
        return "<p>no training steps recorded</p>"
    steps = [s for s, _ in [*points, *eval_points]]
    losses = [v for _, v in [*points, *eval_points]]
    x0, x1, y0, y1 = min(steps), max(steps), min(losses), max(losses)
    pad = 36

    def xy(step: float, loss: float) -> tuple[float, float]:
        x = pad + (step - x0) / max(x1 - x0, 1) * (w - 2 * pad)
        y = h - pad - (loss - y0) / max(y1 - y0, 1e-9) * (h - 2 * pad)
        return round(x, 1), round(y, 1)

    line = " ".join(f"{x},{y}" for x, y in (xy(s, v) for s, v in points))
    dots = "".join(f'<circle cx="{x}" cy="{y}" r="3" fill="#c0392b"/>' for x, y in (xy(s, v) for s, v in eval_points))
    return (
        f'<svg width="{w}" height="{h}" role="img" aria-label="loss curve">'
        f'<rect width="{w}" height="{h}" fill="#fff" stroke="#ddd"/>'
        f'<polyline fill="none" stroke="#2c6fbb" stroke-width="1.5" points="{line}"/>{dots}'
        f'<text x="{pad}" y="{pad - 10}" font-size="11">loss {y1:.2f}</text>'
        f'<text x="{pad}" y="{h - 10}" font-size="11">loss {y0:.2f} · steps {x0}–{x1}'
        " (line: train, dots: held-out)</text></svg>"
    )


def training_section(
    points: Sequence[tuple[int, float]],
    eval_points: Sequence[tuple[int, float]],
    text_to_image: Sequence[tuple[str, bytes | None]],
    image_to_text: Sequence[tuple[bytes | None, str]],
    summary: Mapping[str, Any],
) -> str:
    """HTML for a short training run: its loss curve and a few generations.

    Args:
        points: (step, train loss).
        eval_points: (step, held-out loss).
        text_to_image: (prompt caption, generated image as PNG bytes).
        image_to_text: (input image bytes, generated caption).
        summary: figures to list (steps, parameters, tokens/s, ...).
    """
    t2i = "".join(f'<div class="card">{_image(img)}{_caption(cap)}</div>' for cap, img in text_to_image)
    i2t = "".join(f'<div class="card">{_image(img)}{_caption(cap)}</div>' for img, cap in image_to_text)
    return (
        '<h2>Training run</h2><div class="sub">A short CPU run: generations show what the model has learned so'
        " far (backgrounds and colours come before shapes).</div>"
        f'<table class="stats">{_stats(summary)}</table>{loss_curve_svg(points, eval_points)}'
        f'<h3>Text → image (classifier-free guidance)</h3><div class="nbrs">{t2i}</div>'
        f'<h3>Image → caption (infilling)</h3><div class="nbrs">{i2t}</div>'
    )


def append_section(path: str, html: str) -> None:
    """Insert `html` at the end of an existing report's body (temporary name, then rename)."""
    fs, target = fsspec.core.url_to_fs(path)
    with fs.open(target, "r", encoding="utf-8") as f:
        page = f.read()
    head, sep, tail = page.rpartition("</body>")
    if not sep:
        raise ValueError(f"{path} is not a report page")
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(head + html + sep + tail)
