"""The embedded default dataset: textured shapes on sky/grass, written in the real COCO layout.

Scenes are deterministic functions of a seed. Each thing class has its own colour family
and texture, so a small model learns them within minutes on a CPU at 128x128; shapes
overlap (later shapes cover earlier ones), a few images hold a crowd region, and a few
hold nothing at all (plain textured background, all void).

Every thing shape is a polygon (a ring is a polygon with a polygonal hole) rasterised
with pycocotools, so the masks written to ``instances_*.json`` (polygons for unoccluded
shapes, compressed RLE for occluded shapes and rings, uncompressed RLE for crowds) decode
back to exactly the masks in the panoptic PNGs.
"""

from __future__ import annotations

import fcntl
import functools
import json
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from mpformer_ray.data.polygons import rasterize
from mpformer_ray.data.synthetic_hard import HARD_CLASSES, HARD_SOURCE_IDS, generate_hard_scenes

if TYPE_CHECKING:
    from mpformer_ray.config import SyntheticConfig

SYNTHETIC_CLASSES: list[dict] = [
    {"id": 0, "name": "square", "isthing": True},
    {"id": 1, "name": "disk", "isthing": True},
    {"id": 2, "name": "triangle", "isthing": True},
    {"id": 3, "name": "ring", "isthing": True},
    {"id": 4, "name": "sky", "isthing": False},
    {"id": 5, "name": "grass", "isthing": False},
]
# COCO-style category ids in the written json files: sparse on purpose, so converters
# must remap them to the contiguous ids above (things sort before stuff, as in COCO).
COCO_SOURCE_IDS: list[int] = [1, 3, 7, 12, 101, 120]

_THING_COLOURS = np.array([[205, 45, 40], [225, 205, 40], [175, 50, 195], [245, 135, 25]], dtype=np.float32)
_SKY, _GRASS, _VOID = (110, 160, 235), (55, 145, 60), (128, 128, 128)
_MIN_VISIBLE = 0.4  # a shape may not hide more than 60% of an earlier shape (stays learnable)


def _regular_polygon(cx: float, cy: float, radius: float, sides: int, angle: float) -> list[float]:
    t = angle + np.arange(sides) * 2 * np.pi / sides
    pts = np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], axis=1)
    return [round(float(v), 2) for v in pts.reshape(-1)]


def _thing_shape(rng: np.random.Generator, cls: int, height: int, width: int, scale: tuple[float, float]) -> dict:
    """One thing's full (unoccluded) extent: {"mask": bool [H, W], "polygons": [...] or None}."""
    side = min(height, width)
    radius = rng.uniform(*scale) * side
    cx, cy = rng.uniform(radius * 0.6, width - radius * 0.6), rng.uniform(radius * 0.6, height - radius * 0.6)
    angle = rng.uniform(0, 2 * np.pi)
    if cls == 0:
        polys = [_regular_polygon(cx, cy, radius, 4, angle)]
    elif cls == 1:
        polys = [_regular_polygon(cx, cy, radius, 32, 0.0)]
    elif cls == 2:
        polys = [_regular_polygon(cx, cy, radius * 1.15, 3, angle)]
    else:
        outer = rasterize([_regular_polygon(cx, cy, radius, 32, 0.0)], height, width)
        inner = rasterize([_regular_polygon(cx, cy, radius * 0.5, 32, 0.0)], height, width)
        return {"mask": outer & ~inner, "polygons": None}
    return {"mask": rasterize(polys, height, width), "polygons": polys}


def _texture(rng: np.random.Generator, cls: int, height: int, width: int) -> np.ndarray:
    """Per-class texture, float [H, W] roughly in [-1, 1]: stripes, speckle, checks, rings."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    if cls == 0:
        return np.sign(np.sin(xx * 0.9 + phase))
    if cls == 1:
        return rng.standard_normal((height, width)).astype(np.float32)
    if cls == 2:
        return np.sign(np.sin(xx * 0.7 + phase) * np.sin(yy * 0.7 + phase))
    return np.sin((xx + yy) * 0.5 + phase)


def generate_scene(
    rng: np.random.Generator, height: int, width: int, *, empty: bool | None = None, crowd: bool | None = None
) -> dict:
    """One scene.

    Returns {"image": uint8 [H, W, 3], "segments": [{"class_id": int, "mask": bool [H, W],
    "iscrowd": bool, "polygons": list of flat [x, y, ...] lists or None}]}. Masks are disjoint
    (later shapes cover earlier ones); "polygons" is set only when the polygons decode to the
    visible mask exactly (an unoccluded square, disk or triangle). ``empty``/``crowd`` force
    the rare cases (None: ~5% empty, ~10% with a crowd region).
    """
    empty = rng.random() < 0.05 if empty is None else empty
    crowd = rng.random() < 0.1 if crowd is None else crowd
    noise = rng.normal(0.0, 9.0, (height, width, 3)).astype(np.float32)
    if empty:
        image = np.full((height, width, 3), _VOID, dtype=np.float32) + noise * 2
        return {"image": np.clip(image, 0, 255).astype(np.uint8), "segments": []}

    # Stuff: sky above a wavy horizon, grass below.
    yy, xx = np.mgrid[0:height, 0:width]
    horizon = height * rng.uniform(0.3, 0.7) + height * 0.08 * np.sin(xx * rng.uniform(0.03, 0.12) + rng.uniform(0, 6))
    sky = yy < horizon
    image = np.where(sky[..., None], np.array(_SKY, np.float32) - yy[..., None] * 0.3, np.array(_GRASS, np.float32))
    image = image + noise * np.where(sky, 0.5, 1.5)[..., None]

    things: list[dict] = []  # {"class_id", "mask" (visible), "full", "polygons", "iscrowd"}
    groups = [("single", int(c)) for c in rng.integers(0, 4, int(rng.integers(1, 5)))]
    if crowd:
        groups.append(("crowd", int(rng.integers(0, 2))))
    for kind, cls in groups:
        for _ in range(10):
            if kind == "single":
                shape = _thing_shape(rng, cls, height, width, (0.12, 0.28))
                full, polygons = shape["mask"], shape["polygons"]
            else:  # a crowd: several small touching shapes of one class annotated as one region
                members = [_thing_shape(rng, cls, height, width, (0.05, 0.08)) for _ in range(4)]
                anchor = rng.uniform(0.2, 0.8, 2) * (width, height)
                full = np.zeros((height, width), bool)
                for m in members:
                    ys, xs = np.nonzero(m["mask"])
                    dy = int(anchor[1] + rng.uniform(-0.1, 0.1) * height - ys.mean())
                    dx = int(anchor[0] + rng.uniform(-0.1, 0.1) * width - xs.mean())
                    ys, xs = ys + dy, xs + dx
                    keep = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
                    full[ys[keep], xs[keep]] = True
                polygons = None
            if full.sum() < 16:
                continue
            if all((t["mask"] & ~full).sum() >= max(_MIN_VISIBLE * t["full"].sum(), 16) for t in things):
                break
        else:
            continue
        for t in things:
            if (t["mask"] & full).any():
                t["mask"] = t["mask"] & ~full
                t["polygons"] = None  # occluded: only an RLE describes the visible part exactly
        colour = _THING_COLOURS[cls] + rng.uniform(-25, 25, 3)
        paint = colour + _texture(rng, cls, height, width)[..., None] * 22 + noise
        image[full] = paint[full]
        things.append({"class_id": cls, "mask": full.copy(), "full": full, "polygons": polygons,
                       "iscrowd": kind == "crowd"})

    covered = np.zeros((height, width), bool)
    for t in things:
        covered |= t["mask"]
    segments = [{"class_id": t["class_id"], "mask": t["mask"], "iscrowd": t["iscrowd"], "polygons": t["polygons"]}
                for t in things]
    for cls, region in ((4, sky), (5, ~sky)):
        stuff = region & ~covered
        if stuff.any():
            segments.append({"class_id": cls, "mask": stuff, "iscrowd": False, "polygons": None})
    return {"image": np.clip(image, 0, 255).astype(np.uint8), "segments": segments}


def generate_scenes(num: int, height: int, width: int, seed: int) -> Iterator[dict]:
    """``num`` deterministic scenes; every 16th (from the 6th) is empty, every 6th (from the
    3rd) has a crowd, so even a dozen images cover the rare cases."""
    for i in range(num):
        rng = np.random.default_rng([seed, i])
        yield generate_scene(rng, height, width, empty=(i % 16 == 5), crowd=(i % 6 == 2) or None)


def split_seed(seed: int, split: str) -> int:
    """The generator seed ``write_coco_layout`` uses for ``split``: train and val differ."""
    return seed * 1_000_003 + zlib.crc32(split.encode())


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """bool [H, W] -> COCO uncompressed RLE (column-major run lengths, starting with zeros)."""
    flat = mask.reshape(-1, order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def _bbox(mask: np.ndarray) -> list[float]:
    return [float(v) for v in mask_util.toBbox(mask_util.encode(np.asfortranarray(mask.astype(np.uint8))))]


VARIANTS = ("easy", "medium", "hard")


def synthetic_variant(variant: str) -> tuple[list[dict], list[int], Callable[..., Iterator[dict]]]:
    """Generator ``variant``'s (classes, their COCO category ids, ``generate_scenes``-like function):
    "easy" is this module's, "hard" is ``synthetic_hard``'s and "medium" is the same with its colour cue."""
    if variant == "easy":
        return SYNTHETIC_CLASSES, COCO_SOURCE_IDS, generate_scenes
    if variant in ("medium", "hard"):
        return HARD_CLASSES, HARD_SOURCE_IDS, functools.partial(generate_hard_scenes, colour_cue=variant == "medium")
    raise ValueError(f"unknown synthetic variant {variant!r}: choose one of {list(VARIANTS)} "
                     "(data.synthetic.variant, or prepare_data.py --variant)")


def write_coco_layout(root: str | Path, split: str, num: int, size: int, seed: int, variant: str = "easy") -> None:
    """Write ``num`` scenes of ``size`` x ``size`` from generator ``variant`` (see ``synthetic_variant``)
    as COCO 2017 files under ``root``: ``{split}2017/*.jpg``, ``annotations/instances_{split}2017.json``
    and ``annotations/panoptic_{split}2017.json`` + ``annotations/panoptic_{split}2017/*.png``."""
    classes, source_ids, scenes = synthetic_variant(variant)
    root = Path(root).expanduser()
    img_dir, pan_dir = root / f"{split}2017", root / "annotations" / f"panoptic_{split}2017"
    img_dir.mkdir(parents=True, exist_ok=True)
    pan_dir.mkdir(parents=True, exist_ok=True)
    images, instances, panoptic = [], [], []
    ann_id = 1
    for i, scene in enumerate(scenes(num, size, size, split_seed(seed, split))):
        image_id = i + 1
        name = f"{image_id:012d}"
        Image.fromarray(scene["image"]).save(img_dir / f"{name}.jpg", quality=95)
        images.append({"id": image_id, "file_name": f"{name}.jpg", "height": size, "width": size})
        rng = np.random.default_rng([split_seed(seed, split), image_id])
        # ids 1 .. 2^24-1 (0 is void); drawn by count, not from an arange of 16M ids (same ids, no 128 MB array)
        seg_ids = rng.choice((1 << 24) - 1, size=len(scene["segments"]), replace=False) + 1
        id_map = np.zeros((size, size), np.int64)
        segments_info = []
        for seg, seg_id in zip(scene["segments"], seg_ids.tolist()):
            cat = source_ids[seg["class_id"]]
            id_map[seg["mask"]] = seg_id
            area, bbox = int(seg["mask"].sum()), _bbox(seg["mask"])
            segments_info.append({"id": seg_id, "category_id": cat, "iscrowd": int(seg["iscrowd"]),
                                  "bbox": bbox, "area": area})
            if not classes[seg["class_id"]]["isthing"]:
                continue
            if seg["iscrowd"]:
                segmentation = _uncompressed_rle(seg["mask"])
            elif seg["polygons"] is not None:
                segmentation = seg["polygons"]
            else:
                rle = mask_util.encode(np.asfortranarray(seg["mask"].astype(np.uint8)))
                segmentation = {"size": [size, size], "counts": rle["counts"].decode("ascii")}
            instances.append({"id": ann_id, "image_id": image_id, "category_id": cat, "segmentation": segmentation,
                              "area": area, "bbox": bbox, "iscrowd": int(seg["iscrowd"])})
            ann_id += 1
        rgb = np.stack([id_map % 256, id_map // 256 % 256, id_map // 65536], axis=-1).astype(np.uint8)
        Image.fromarray(rgb).save(pan_dir / f"{name}.png")
        panoptic.append({"image_id": image_id, "file_name": f"{name}.png", "segments_info": segments_info})

    categories = [{"id": sid, "name": c["name"], "supercategory": "shape" if c["isthing"] else "scene",
                   "isthing": int(c["isthing"])} for c, sid in zip(classes, source_ids)]
    info = {"description": "mpformer-ray synthetic shapes" + ("" if variant == "easy" else f" ({variant})"),
            "version": "1"}
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(
        {"info": info, "images": images, "annotations": instances,
         "categories": [{k: v for k, v in c.items() if k != "isthing"} for c in categories if c["isthing"]]}))
    (root / "annotations" / f"panoptic_{split}2017.json").write_text(json.dumps(
        {"info": info, "images": images, "annotations": panoptic, "categories": categories}))


def ensure_synthetic(cfg: SyntheticConfig) -> tuple[str, str]:
    """Generate (once) the synthetic COCO layout under ``cfg.root`` and convert it to panoptic
    records; returns (train_records_uri, val_records_uri). Safe to call from many processes at
    once (a file lock serialises them; later callers reuse the finished records)."""
    from mpformer_ray.data.coco import convert_coco
    from mpformer_ray.data.records import MANIFEST

    base = (Path(cfg.root).expanduser()
            / f"{cfg.variant}_n{cfg.num_train}-{cfg.num_val}_s{cfg.image_size}_seed{cfg.seed}")
    base.mkdir(parents=True, exist_ok=True)
    outs = {split: str(base / "records" / f"{split}-panoptic") for split in ("train", "val")}
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for split, num in (("train", cfg.num_train), ("val", cfg.num_val)):
            if (Path(outs[split]) / MANIFEST).exists():
                continue
            if not (base / f".layout-{split}-done").exists():
                write_coco_layout(base / "coco", split, num, cfg.image_size, cfg.seed, cfg.variant)
                (base / f".layout-{split}-done").write_text("ok")
            convert_coco(str(base / "coco"), split, outs[split], task="panoptic", shard_size=128,
                         num_workers=1, progress=False)
    return outs["train"], outs["val"]

