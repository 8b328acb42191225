"""Overlay pictures of converted records (``jobs/prepare_data.py --preview N``), drawn from the records
themselves, not the source files, so that a wrong conversion (swapped classes, shifted or empty masks,
a wrong ignore value) shows before any GPU hour is spent.

Each picture is the record's image, enlarged to about ``SIDE`` pixels, with:

- every segment blended in its own colour and outlined (one colour per thing instance; per class for
  stuff), its class name written at the point deepest inside it;
- crowd segments hatched with white stripes and named ``name (crowd)``;
- pixels the label map ignores (``sem_seg`` 255: void, unlabelled, ``--ignore-index``) darkened;
- a header with the file name, the counts of segments and crowds and the share of ignored pixels.
"""

from __future__ import annotations

import colorsys
import io
import re

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from mpformer_ray import storage
from mpformer_ray.data.records import read_manifest, read_records

SIDE = 512  # pixels the longer side of a picture is enlarged to (small images would be unreadable)
_GOLDEN = 0.618033988749895  # hue step that keeps consecutive colours far apart
DIRNAME = "preview"


def _colour(index: int) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb((index * _GOLDEN) % 1.0, 0.8, 0.95)
    return np.array([r, g, b]) * 255


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def _deepest(mask: np.ndarray) -> tuple[int, int]:
    """(row, column) of the mask pixel farthest from its edge: inside the mask even for a ring or a C."""
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    return np.unravel_index(int(depth.argmax()), mask.shape)


def _enlarge(array: np.ndarray, scale: int) -> np.ndarray:
    return array if scale == 1 else array.repeat(scale, axis=0).repeat(scale, axis=1)


def render_record(record: dict, classes: list[dict], alpha: float = 0.45) -> Image.Image:
    """One decoded record (``read_records``) as an overlay picture (module docstring)."""
    height, width = record["image"].shape[:2]
    scale = max(1, round(SIDE / max(height, width)))  # whole pixels: every source pixel stays a square
    canvas = _enlarge(record["image"], scale).astype(np.float32)
    if record.get("sem_seg") is not None:
        canvas[_enlarge(record["sem_seg"] == 255, scale)] *= 0.35
    stripes = np.add.outer(np.arange(canvas.shape[0]), np.arange(canvas.shape[1])) % 8 < 2
    labels = []  # (row, column, text), written over every segment's colour
    # stuff under things, crowds last: what is drawn later stays visible where masks overlap
    segments = sorted(record["segments"], key=lambda s: (classes[s["category_id"]]["isthing"], s["iscrowd"]))
    for k, seg in enumerate(segments):
        cls = classes[seg["category_id"]]
        if not seg["mask"].any():
            continue
        mask = _enlarge(seg["mask"], scale)
        colour = _colour(k if cls["isthing"] else 1000 + cls["id"])
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * colour
        if seg["iscrowd"]:
            canvas[mask & stripes] = 255.0
        canvas[_boundary(mask)] = colour
        row, col = _deepest(seg["mask"])
        labels.append(((row + 0.5) * scale, (col + 0.5) * scale,
                       f"{cls['name']} (crowd)" if seg["iscrowd"] else cls["name"]))
    font = ImageFont.load_default(size=13)
    header = 20
    out = Image.new("RGB", (canvas.shape[1], canvas.shape[0] + header), (0, 0, 0))
    out.paste(Image.fromarray(canvas.clip(0, 255).astype(np.uint8)), (0, header))
    draw = ImageDraw.Draw(out)
    crowds = sum(s["iscrowd"] for s in record["segments"])
    ignored = float((record["sem_seg"] == 255).mean()) if record.get("sem_seg") is not None else 0.0
    draw.text((4, 3), f"{record['file_name']}  id {record['image_id']}  {len(record['segments'])} segments"
                      f"{f', {crowds} crowd' if crowds else ''}{f', {ignored:.0%} ignored' if ignored else ''}",
              fill=(255, 255, 255), font=font)
    for row, col, text in labels:
        xy = (col, header + row)
        left, top, right, bottom = draw.textbbox(xy, text, font=font, anchor="mm")
        draw.rectangle((left - 2, top - 1, right + 2, bottom + 1), fill=(0, 0, 0))
        draw.text(xy, text, fill=(255, 255, 255), font=font, anchor="mm")
    return out


def _safe_name(file_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", file_name.replace("/", "__"))[-80:]


def write_previews(splits: list[str], out_uri: str, count: int) -> list[str]:
    """Overlay PNGs of the first ``count`` records of the prepared ``splits`` (in turn) in ``out_uri``
    (local or s3://), named ``NNN_<file name>.png``; returns their URIs."""
    written: list[str] = []
    for split in splits:
        classes = read_manifest(split)["classes"]
        for record in read_records(split):
            if len(written) >= count:
                return written
            buffer = io.BytesIO()
            render_record(record, classes).save(buffer, format="PNG")
            uri = storage.join(out_uri, f"{len(written):03d}_{_safe_name(record['file_name'])}.png")
            storage.write_bytes(uri, buffer.getvalue())
            written.append(uri)
    return written
