"""report.html: self-contained (embedded thumbnails, no network), escaped, showing queries, neighbours and counts."""

from __future__ import annotations

import base64
import io
import re

from PIL import Image

from transforms.lib.report import render_report, thumbnail_uri, write_report


def png(color=(200, 30, 30), size=(300, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def sample():
    neighbours = [
        {
            "key": "n1",
            "caption": "a red square",
            "image": png(),
            "score": 0.81,
            "via": "image",
            "modality": "image+text",
            "rank": 0,
        },
        {
            "key": "n2",
            "caption": "only words",
            "image": None,
            "score": 0.7,
            "via": "text",
            "modality": "text",
            "rank": 1,
        },
    ]
    return [
        {
            "key": "q1",
            "caption": "red <b>box</b> & co",
            "image": png(),
            "modality": "image+text",
            "neighbours": neighbours,
        },
        {"key": "q2", "caption": None, "image": b"not an image", "modality": "image", "neighbours": []},
    ]


def test_page_is_self_contained_and_escaped():
    page = render_report(sample(), {"examples_read": 1234, "rejects_by_reason": {"image_undecodable": 2}, "s": 1.5})
    assert page.count("data:image/jpeg;base64,") == 2  # query q1 and neighbour n1; the bad image degrades
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # nothing fetched from the network
    assert "<b>box</b>" not in page and "red &lt;b&gt;box&lt;/b&gt; &amp; co" in page
    assert "1,234" in page and "rejects_by_reason / image_undecodable" in page and ">1.5<" in page
    assert "score 0.810" in page and "via text" in page and "nothing retrieved" in page


def test_thumbnails_are_small():
    uri = thumbnail_uri(png(size=(1000, 600)))
    data = base64.b64decode(uri.split(",", 1)[1])
    assert Image.open(io.BytesIO(data)).size == (128, 77)
    assert thumbnail_uri(None) is None and thumbnail_uri(b"junk") is None


def test_write_report_renames_into_place(tmp_path):
    path = tmp_path / "report.html"
    write_report(str(path), sample(), {"examples_read": 2})
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_training_section_is_appended_inside_the_body(tmp_path):
    from transforms.lib.report import append_section, loss_curve_svg, training_section, write_report

    path = tmp_path / "report.html"
    write_report(str(path), [], {"examples_read": 3})
    png = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(png, format="PNG")
    section = training_section(
        [(1, 5.0), (2, 3.0), (3, 2.5)],
        [(3, 2.7)],
        [("a red square", png.getvalue())],
        [(png.getvalue(), "x")],
        {"steps": 3},
    )
    append_section(str(path), section)
    page = path.read_text()
    assert page.index("Training run") < page.index("</body>") and page.count("<svg") == 1
    assert page.count("data:image/jpeg") == 2 and "a red square" in page and "http" not in page
    assert "<polyline" in loss_curve_svg([(1, 1.0), (2, 0.5)]) and "no training" in loss_curve_svg([])
