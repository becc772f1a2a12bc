"""The deterministic synthetic demo corpus: drawn shapes with templated captions.

Scenes hold one or two coloured shapes on a plain background. `render` draws them with PIL,
`describe` writes varied captions about them, `sample_pairs` feeds the tiny demo CLIP freshly drawn
batches, and `write_demo_corpus` writes img2dataset's WebDataset output layout (`00000.tar` with
`KEY.jpg`/`KEY.txt`/`KEY.json`, `00000.parquet`, `00000_stats.json`) so the demo exercises the same
reader that real img2dataset output goes through. The corpus also holds the awkward cases the
pipeline must handle: text-only and image-only documents and near-duplicates (docs/design.md: relevance
rule skips candidates scoring above 0.9 against the query).

Same seed ⇒ byte-identical tars and parquet: every draw comes from `rng_for(seed, key, purpose)`
and tar members carry a fixed mtime and owner.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from transforms.lib.io import atomic_open, read_tar, write_bytes, write_tar
from transforms.lib.rng import rng_for

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
# Saturated, well-separated hues; none is close to a background, so an object never vanishes.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "green": (30, 160, 50),
    "blue": (35, 75, 225),
    "yellow": (245, 215, 30),
    "purple": (135, 45, 175),
    "orange": (245, 135, 20),
    "cyan": (30, 200, 215),
    "pink": (245, 120, 185),
}
SIZES: tuple[str, ...] = ("small", "medium", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "grey": (128, 128, 128),
    "black": (20, 20, 20),
    "beige": (225, 210, 180),
}

# Slot centres as fractions of the image side; two-object scenes use opposite slots only, so even two
# large stars with jitter do not overlap (outer radius 0.19 * 1.15 < half the 0.46 gap).
_SLOT_CENTERS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73)}
_SLOT_CENTERS["center"] = (0.5, 0.5)
_PAIRED_SLOTS = (("left", "right"), ("top", "bottom"))
_RADIUS = {"small": 0.09, "medium": 0.14, "large": 0.19}  # of the image side

# img2dataset's per-shard parquet columns (its writer's schema, with compute_hash="sha256").
IMG2DATASET_PARQUET_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("url", pa.string()),
        pa.field("status", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        pa.field("exif", pa.string()),
        pa.field("sha256", pa.string()),
    ]
)

TEXT_ONLY_SHARE = 0.03
IMAGE_ONLY_SHARE = 0.03
NEAR_DUPLICATE_SHARE = 0.05
_SHARD_FILE = re.compile(r"^(\d{5,})(\.tar|\.parquet|_stats\.json)$")


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape: names from SHAPES, COLORS, SIZES and POSITIONS."""

    shape: str
    color: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    """What an image shows: one or two objects (the first is the one captions mention first)."""

    objects: tuple[SceneObject, ...]
    background: str

    def to_attributes(self) -> dict:
        """The JSON-able form stored as `attributes` in each sample's `.json`."""
        return {
            "objects": [
                {"shape": o.shape, "color": o.color, "size": o.size, "position": o.position} for o in self.objects
            ],
            "background": self.background,
        }

    @classmethod
    def from_attributes(cls, attributes: dict) -> Scene:
        """Inverse of `to_attributes`."""
        objects = tuple(SceneObject(o["shape"], o["color"], o["size"], o["position"]) for o in attributes["objects"])
        return cls(objects, attributes["background"])


def random_scene(rng: np.random.Generator) -> Scene:
    """A scene of one or two objects with distinct colours, on a random background.

    Args:
        rng: the only source of randomness.
    """
    n = int(rng.integers(1, 3))
    if n == 1:
        positions: tuple[str, ...] = (POSITIONS[int(rng.integers(len(POSITIONS)))],)
    else:
        pair = _PAIRED_SLOTS[int(rng.integers(len(_PAIRED_SLOTS)))]
        positions = pair if rng.random() < 0.5 else pair[::-1]
    color_names = list(COLORS)
    colors = rng.choice(len(color_names), size=n, replace=False)
    objects = tuple(
        SceneObject(
            shape=SHAPES[int(rng.integers(len(SHAPES)))],
            color=color_names[int(c)],
            size=SIZES[int(rng.integers(len(SIZES)))],
            position=pos,
        )
        for c, pos in zip(colors, positions, strict=True)
    )
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    return Scene(objects, background)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of nominal radius r centred on (cx, cy), rotated by `angle` radians."""
    if shape == "square":
        pts = [(1.13 * math.cos(a), 1.13 * math.sin(a)) for a in np.pi / 4 + np.arange(4) * np.pi / 2]
    elif shape == "triangle":
        # Centroid sits low in an upright triangle; shift up so it looks centred in its slot.
        pts = [(1.2 * math.cos(a), 1.2 * math.sin(a) + 0.15) for a in -np.pi / 2 + np.arange(3) * 2 * np.pi / 3]
    elif shape == "star":
        pts = [
            ((1.15 if i % 2 == 0 else 0.5) * math.cos(a), (1.15 if i % 2 == 0 else 0.5) * math.sin(a))
            for i, a in enumerate(-np.pi / 2 + np.arange(10) * np.pi / 5)
        ]
    elif shape == "cross":
        w, e = 0.34, 1.05  # arm half-width, arm reach
        pts = [
            (-w, -e),
            (w, -e),
            (w, -w),
            (e, -w),
            (e, w),
            (w, w),
            (w, e),
            (-w, e),
            (-w, w),
            (-e, w),
            (-e, -w),
            (-w, -w),
        ]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def render(scene: Scene, size: int, rng: np.random.Generator, jitter: float = 1.0) -> Image.Image:
    """Draw `scene` as a size x size RGB image.

    Each object lands near its named slot with a small random offset, scale and rotation, so two
    renders of one scene differ slightly; `jitter=0` draws the canonical layout.

    Args:
        scene: what to draw.
        size: image side in pixels.
        rng: source of the jitter.
        jitter: scale of the random offsets (1.0: about 2% of the side in position, 8% in size).
    """
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        fx, fy = _SLOT_CENTERS[obj.position]
        dx, dy = np.clip(rng.normal(0.0, 0.02, size=2), -0.04, 0.04) * jitter
        cx, cy = (fx + dx) * size, (fy + dy) * size
        r = _RADIUS[obj.size] * size * (1.0 + jitter * rng.uniform(-0.08, 0.08))
        angle = math.radians(jitter * rng.uniform(-10.0, 10.0))
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(obj.shape, cx, cy, r, angle), fill=fill)
    return image


_SIZE_WORDS = {
    "small": ("small", "little", "tiny"),
    "medium": ("medium", "medium-sized", "mid-sized"),
    "large": ("large", "big"),
}
_POSITION_WORDS = {
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "near the top", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part"),
    "center": ("in the center", "in the middle", "in the centre"),
}
_ONE_TEMPLATES = ("{0}", "an image of {0}", "a drawing of {0}", "there is {0}", "a picture showing {0}", "{0} is shown")
_TWO_TEMPLATES = (
    "{0} and {1}",
    "{0}, and {1}",
    "{0} with {1}",
    "an image of {0} and {1}",
    "a drawing of {0} and {1}",
    "{0}; {1}",
    "there is {0} and {1}",
)
_BACKGROUND_WORDS = ("on a {} background", "against a {} background", "over a {} backdrop", "on {}")


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _object_phrase(obj: SceneObject, rng: np.random.Generator) -> str:
    """E.g. 'a large red circle on the left'; size and position are sometimes left out, shape and colour never."""
    words = [obj.color, obj.shape]
    if rng.random() < 0.75:
        words.insert(0, _pick(rng, _SIZE_WORDS[obj.size]))
    phrase = _with_article(" ".join(words))
    if rng.random() < 0.8:
        phrase += " " + _pick(rng, _POSITION_WORDS[obj.position])
    return phrase


def describe(scene: Scene, rng: np.random.Generator) -> str:
    """A varied natural caption of `scene`; `scene.objects[0]` is always mentioned first.

    Shape and colour names are always the canonical ones (tests and retrieval checks look for them);
    sizes, positions, templates and the background mention vary.

    Args:
        scene: what to describe.
        rng: source of the phrasing choices.
    """
    phrases = [_object_phrase(o, rng) for o in scene.objects]
    template = _pick(rng, _ONE_TEMPLATES if len(phrases) == 1 else _TWO_TEMPLATES)
    text = template.format(*phrases)
    if rng.random() < 0.4:
        text += ", " + _pick(rng, _BACKGROUND_WORDS).format(scene.background)
    if rng.random() < 0.3:
        text = text[0].upper() + text[1:] + "."
    return text


def sample_pairs(rng: np.random.Generator, n: int, size: int) -> tuple[list[Image.Image], list[str], list[Scene]]:
    """`n` freshly drawn (image, caption, scene) triples, e.g. one training batch for the demo CLIP.

    Args:
        rng: source of every draw; pass one long-lived generator to get a new batch per call.
        n: how many pairs.
        size: image side in pixels.
    """
    images, captions, scenes = [], [], []
    for _ in range(n):
        scene = random_scene(rng)
        images.append(render(scene, size, rng))
        captions.append(describe(scene, rng))
        scenes.append(scene)
    return images, captions, scenes


def _add_noise(image: Image.Image, rng: np.random.Generator, sigma: float = 4.0) -> Image.Image:
    """Small Gaussian pixel noise, so a near-duplicate is not pixel-identical to its original."""
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, sigma, size=(image.height, image.width, 3))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _plan(num_examples: int, seed: int) -> list[str]:
    """Kind of each example ('both', 'text', 'image', 'near_duplicate'), exact shares at seeded places."""
    kinds = ["both"] * num_examples
    order = rng_for(seed, "corpus", "demo_plan").permutation(num_examples)
    n_text, n_image = round(TEXT_ONLY_SHARE * num_examples), round(IMAGE_ONLY_SHARE * num_examples)
    n_dup = round(NEAR_DUPLICATE_SHARE * num_examples)
    for rank, i in enumerate(order[: n_text + n_image + n_dup]):
        kinds[int(i)] = "text" if rank < n_text else "image" if rank < n_text + n_image else "near_duplicate"
    return kinds


def _key(shard: int, index: int, shard_size: int) -> str:
    """img2dataset's key: 5+ digit shard id then the index in the shard, padded to ceil(log10(shard_size)) digits."""
    sample_digits = max(math.ceil(math.log10(shard_size)), 1)
    return f"{shard:05d}{index:0{sample_digits}d}"


def _write_tar(path: str, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with atomic_open(path) as f:
        write_tar(f, ((f"{key}.{ext}", parts[ext]) for key, parts in samples for ext in sorted(parts)))


def _write_parquet(path: str, table: pa.Table) -> None:
    with atomic_open(path) as f:
        pq.write_table(table, f)


def _remove_stale_shards(output: str, num_shards: int) -> None:
    """A rerun with fewer examples must not leave an earlier run's higher-numbered shards behind."""
    for name in os.listdir(output):
        m = _SHARD_FILE.match(name)
        if m and int(m.group(1)) >= num_shards:
            os.remove(os.path.join(output, name))


def write_demo_corpus(
    output: str, num_examples: int = 512, seed: int = 0, image_size: int = 64, shard_size: int = 10000
) -> dict:
    """Write the demo corpus into `output/` in img2dataset's WebDataset output layout.

    Per shard: `NNNNN.tar` (per sample `KEY.jpg`, `KEY.txt`, `KEY.json`, members sorted), `NNNNN.parquet`
    (img2dataset's columns) and `NNNNN_stats.json`. About 3% of documents are text-only, 3% image-only
    and 5% near-duplicates of an earlier image (same scene re-rendered with jitter and pixel noise, under
    the original's caption, as a re-upload would be;
    `"near_duplicate_of": KEY` in its JSON). Tars and parquet are byte-identical for the same
    arguments; the stats file carries wall-clock times, as img2dataset's does.

    Args:
        output: local directory (created if missing; this run's shard files are replaced).
        num_examples: documents to write.
        seed: the corpus seed.
        image_size: image side in pixels.
        shard_size: samples per shard (img2dataset's `number_sample_per_shard`).

    Returns:
        Counts: examples, image_text, text_only, image_only, near_duplicates, shards.
    """
    if num_examples < 0 or shard_size < 1:
        raise ValueError("num_examples must be >= 0 and shard_size >= 1")
    os.makedirs(output, exist_ok=True)
    kinds = _plan(num_examples, seed)
    dup_rng = rng_for(seed, "corpus", "demo_near_duplicate_targets")
    scenes: list[Scene] = []
    keys: list[str] = []
    originals: list[int] = []  # earlier image+text examples, candidates for near-duplicates
    captions: list[str | None] = []  # caption of every example so far (a near-duplicate reuses its original's)
    num_shards = math.ceil(num_examples / shard_size)
    counts = {"image_text": 0, "text_only": 0, "image_only": 0, "near_duplicates": 0}
    for shard in range(num_shards):
        start = time.time()
        samples: list[tuple[str, dict[str, bytes]]] = []
        rows: list[dict] = []
        for index in range(min(shard_size, num_examples - shard * shard_size)):
            i = shard * shard_size + index
            key = _key(shard, index, shard_size)
            rng = rng_for(seed, key, "demo_example")
            kind = kinds[i] if kinds[i] != "near_duplicate" or originals else "both"
            duplicate_of = None
            if kind == "near_duplicate":
                target = originals[int(dup_rng.integers(len(originals)))]
                scene, duplicate_of = scenes[target], keys[target]
            else:
                scene = random_scene(rng)
            scenes.append(scene)
            keys.append(key)
            if duplicate_of is not None:  # a re-upload: the same scene re-rendered, under the original's caption
                caption = captions[target]
            else:
                caption = describe(scene, rng) if kind != "image" else None
            captions.append(caption)
            jpg = None
            if kind != "text":
                image = render(scene, image_size, rng)
                jpg = _jpeg(_add_noise(image, rng) if duplicate_of else image)
                if not duplicate_of and caption is not None:
                    originals.append(i)
            counts[{"both": "image_text", "text": "text_only", "image": "image_only"}.get(kind, "near_duplicates")] += 1
            side = image_size if jpg is not None else None
            row = {
                "key": key,
                "caption": caption,
                "url": f"demo://scene/{key}",
                "status": "success",
                "error_message": None,
                "width": side,
                "height": side,
                "original_width": side,
                "original_height": side,
                "exif": None,
                "sha256": hashlib.sha256(jpg).hexdigest() if jpg is not None else None,
            }
            rows.append(row)
            meta = {
                "url": row["url"],
                "caption": caption,
                **{k: v for k, v in row.items() if k not in ("url", "caption")},
            }
            meta["attributes"] = scene.to_attributes()
            if duplicate_of:
                meta["near_duplicate_of"] = duplicate_of
            parts = {"json": json.dumps(meta, indent=4).encode()}
            if jpg is not None:
                parts["jpg"] = jpg
            if caption is not None:
                parts["txt"] = caption.encode()
            samples.append((key, parts))
        base = os.path.join(output, f"{shard:05d}")
        _write_tar(base + ".tar", samples)
        table = pa.Table.from_pylist(rows, schema=IMG2DATASET_PARQUET_SCHEMA)
        _write_parquet(base + ".parquet", table)
        end = time.time()
        stats = {
            "count": len(rows),
            "successes": len(rows),
            "failed_to_download": 0,
            "failed_to_resize": 0,
            "duration": end - start,
            "start_time": start,
            "end_time": end,
            "status_dict": {"success": len(rows)},
        }
        write_bytes(base + "_stats.json", json.dumps(stats, indent=4).encode("utf-8"))
    _remove_stale_shards(output, num_shards)
    return {"examples": num_examples, **counts, "shards": num_shards}


def _read_tar(path: str) -> list[tuple[str, dict[str, bytes]]]:
    samples: dict[str, dict[str, bytes]] = {}
    for name, data in read_tar(path):
        key, ext = name.split(".", 1)
        samples.setdefault(key, {})[ext] = data
    return list(samples.items())


def sample_meta(data) -> dict:
    """Per key, the sample JSON of a demo corpus's tars under `data`: the ground truth the demo records
    (`near_duplicate_of`, and after `add_filter_cases` `caption_swapped_with`, `exact_duplicate_of`)."""
    meta = {}
    for path in sorted(glob.glob(f"{data}/*.tar")):
        for name, member in read_tar(path, keep=lambda name: name.endswith(".json")):
            meta[name[: -len(".json")]] = json.loads(member)
    return meta


def add_filter_cases(output: str, seed: int = 0, swapped_share: float = 0.05, exact_share: float = 0.02) -> dict:
    """Give a demo corpus known cases for the corpus filters, recorded in each sample's JSON.

    Among image+text examples outside any near-duplicate pair, chosen by (seed, key):
    - caption swaps: pairs whose first objects differ in shape and colour exchange captions
      (`"caption_swapped_with": KEY`), so neither caption describes its image any more (what
      `--min_clip_score` should catch);
    - exact re-uploads: an example takes another's image bytes and caption (`"exact_duplicate_of": KEY`).
    Tars and parquet are rewritten in place, byte-identical for the same arguments.

    Args:
        output: a folder written by `write_demo_corpus`.
        seed: picks the examples.
        swapped_share: share of examples whose caption is swapped (rounded down to pairs).
        exact_share: share of examples turned into exact re-uploads of another.

    Returns:
        {"swapped": {key: other}, "exact": {copy: original}}.
    """
    tars = sorted(os.path.join(output, n) for n in os.listdir(output) if _SHARD_FILE.match(n) and n.endswith(".tar"))
    shards = {path: _read_tar(path) for path in tars}
    parts = {key: p for samples in shards.values() for key, p in samples}
    meta = {key: json.loads(p["json"]) for key, p in parts.items()}
    in_pairs = {k for k, m in meta.items() if m.get("near_duplicate_of")}
    in_pairs |= {m["near_duplicate_of"] for m in meta.values() if m.get("near_duplicate_of")}
    free = [k for k in sorted(parts) if "jpg" in parts[k] and "txt" in parts[k] and k not in in_pairs]
    free.sort(key=lambda k: rng_for(seed, k, "demo_filter_cases").random())
    n_swap = 2 * int(swapped_share * len(parts) / 2)
    n_exact = int(exact_share * len(parts))
    swapped, exact = {}, {}

    def first_object(key: str) -> tuple[str, str]:
        o = meta[key]["attributes"]["objects"][0]
        return o["shape"], o["color"]

    for a in free:  # each pair differs in the first object's shape and colour: a real mismatch
        if len(swapped) >= n_swap:
            break
        if a in swapped:
            continue
        shape, color = first_object(a)
        b = next((k for k in free if k != a and k not in swapped and not {shape, color} & set(first_object(k))), None)
        if b is not None:
            parts[a]["txt"], parts[b]["txt"] = parts[b]["txt"], parts[a]["txt"]
            swapped[a], swapped[b] = b, a
    rest = [k for k in free if k not in swapped]
    for copy, original in zip(rest[0 : 2 * n_exact : 2], rest[1 : 2 * n_exact : 2], strict=True):
        parts[copy]["jpg"], parts[copy]["txt"] = parts[original]["jpg"], parts[original]["txt"]
        exact[copy] = original
    for key in (*swapped, *exact):
        m = meta[key]
        m["caption"] = parts[key]["txt"].decode()
        m["sha256"] = hashlib.sha256(parts[key]["jpg"]).hexdigest()
        if key in swapped:
            m["caption_swapped_with"] = swapped[key]
        else:
            m["exact_duplicate_of"] = exact[key]
        parts[key]["json"] = json.dumps(m, indent=4).encode()
    for path, samples in shards.items():
        _write_tar(path, [(key, parts[key]) for key, _ in samples])
        table = pq.read_table(path[: -len(".tar")] + ".parquet").to_pylist()
        for row in table:
            if row["key"] in meta:
                row["caption"], row["sha256"] = meta[row["key"]]["caption"], meta[row["key"]]["sha256"]
        rows = pa.Table.from_pylist(table, schema=IMG2DATASET_PARQUET_SCHEMA)
        _write_parquet(path[: -len(".tar")] + ".parquet", rows)
    return {"swapped": swapped, "exact": exact}


def main(argv: Sequence[str] | None = None) -> int:
    """`cm3corpus demo-data`: write the demo corpus and print its summary as JSON."""
    parser = argparse.ArgumentParser(prog="cm3corpus demo-data", description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="Directory for the img2dataset-style shards.")
    parser.add_argument("--num_examples", type=int, default=512, help="Documents to write.")
    parser.add_argument("--seed", type=int, default=0, help="Corpus seed (same seed, same bytes).")
    parser.add_argument("--image_size", type=int, default=64, help="Image side in pixels.")
    parser.add_argument("--shard_size", type=int, default=10000, help="Samples per shard.")
    args = parser.parse_args(argv)
    summary = write_demo_corpus(args.output, args.num_examples, args.seed, args.image_size, args.shard_size)
    print(json.dumps(summary), file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
