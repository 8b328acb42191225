"""ADE20K (SceneParsing, 150 classes) -> semantic records, and a synthetic writer in its layout.

Layout under ``root`` (``root`` may be the ``ADEChallengeData2016`` folder or its parent)::

    ADEChallengeData2016/images/{training,validation}/ADE_train_00000001.jpg
    ADEChallengeData2016/annotations/{training,validation}/ADE_train_00000001.png

A label PNG holds 0 for "other / unlabelled" and v in 1..150 for class v - 1; 0 becomes
ignore (255), as in Mask2Former's ADE20K semantic setup. Each record gets ``sem_seg`` plus
one segment per class present, so every task's records share one format. All 150 classes
are marked ``isthing: False``: the semantic task has no instances (Mask2Former's ADE20K
*panoptic* split, a different annotation set, marks 100 of them as things).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

from mpformer_ray.data.label_files import class_segments, lookup, read_image, read_label
from mpformer_ray.data.records import MAX_SKIPPED, ConversionReport, DataError, make_row, write_dataset
from mpformer_ray.data.synthetic import generate_scenes, split_seed

# The official objectInfo150 order: pixel value v <-> ADE20K_CLASSES[v - 1].
ADE20K_CLASSES: list[str] = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair",
    "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
    "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket",
    "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
]
ADE20K_DIR = "ADEChallengeData2016"
SPLITS = {"training": "training", "validation": "validation", "train": "training", "val": "validation"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# pixel value -> train id: 0 (unlabelled) -> 255, v -> v - 1; values above 150 lie outside: unknown
_LABEL_TABLE = np.array([255] + list(range(len(ADE20K_CLASSES))), dtype=np.int64)
_SOURCE_IDS = list(range(1, len(ADE20K_CLASSES) + 1))  # train id i <-> pixel value i + 1
# which real class each synthetic class is written as (synthetic id -> ADE20K train id)
SYNTHETIC_TO_ADE20K: list[int] = [ADE20K_CLASSES.index(n) for n in ("box", "ball", "tent", "plate", "sky", "grass")]


def ade20k_classes() -> list[dict]:
    """Manifest classes: train id i <-> pixel value (``source_id``) i + 1, none a thing."""
    return [{"id": i, "name": n, "isthing": False, "source_id": i + 1} for i, n in enumerate(ADE20K_CLASSES)]


def canonical_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"ADE20K split must be one of {sorted(SPLITS)}, got {split!r}")
    return SPLITS[split]


def _base(root: Path) -> Path:
    """The ``ADEChallengeData2016`` folder: ``root`` itself or the folder of that name inside it."""
    return root / ADE20K_DIR if (root / ADE20K_DIR).is_dir() else root


def convert_ade20k_item(item: dict, report: ConversionReport, *, root: str) -> dict | None:
    """One image + its label PNG -> a record row (``sem_seg`` and one segment per class)."""
    loaded = read_image(root, item["image"], report)
    if loaded is None:
        return None
    data, height, width = loaded
    values = read_label(root, item["label"], item["image"], (height, width), report)
    if values is None:
        return None
    sem = lookup(values, _LABEL_TABLE, "pixel values not in the official table", item["label"], item["image"],
                 report)
    segments = class_segments(sem, _SOURCE_IDS)
    if not segments:
        report.keep("no_annotations", item["image"])
    return make_row(image_id=item["image_id"], file_name=item["image"], image_bytes=data, height=height,
                    width=width, segments=segments, sem_seg=sem)


def ade20k_items(root: str | Path, split: str, report: ConversionReport) -> list[dict]:
    """Pair ``images/{split}/X.jpg`` with ``annotations/{split}/X.png`` by name; an image
    without a label (``missing_label``) or a label without an image (``missing_image``) is
    counted and left out. Items hold paths relative to ``root`` only."""
    root = Path(root).expanduser().resolve()
    split = canonical_split(split)
    base = _base(root)
    image_dir, label_dir = base / "images" / split, base / "annotations" / split
    if not image_dir.is_dir():
        raise DataError(f"{image_dir} does not exist: expected the ADE20K layout {ADE20K_DIR}/images/{split}/*.jpg "
                        f"and {ADE20K_DIR}/annotations/{split}/*.png under {root}")
    images = {p.stem: p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    labels = {p.stem: p for p in label_dir.glob("*.png")} if label_dir.is_dir() else {}
    for stem in sorted(set(labels) - set(images)):
        report.skip("missing_image", str(labels[stem].relative_to(root)), f"no image {stem}.jpg in {image_dir}")
    items = []
    for image_id, stem in enumerate(sorted(images), start=1):
        rel = str(images[stem].relative_to(root))
        if stem not in labels:
            report.skip("missing_label", rel, f"{label_dir / (stem + '.png')} does not exist")
            continue
        items.append({"image_id": image_id, "image": rel, "label": str(labels[stem].relative_to(root))})
    return items


def convert_ade20k(root: str, split: str, out: str, *, task: str = "semantic", shard_size: int = 500,
                   num_workers: int = 0, strict: bool = False,
                   progress: bool = True, max_skipped: float = MAX_SKIPPED) -> dict:
    """Convert ADE20K ``split`` ("training"/"validation", or "train"/"val") under ``root`` to
    semantic records at ``out`` (local or s3://); returns the manifest."""
    if task != "semantic":
        raise DataError(f"ADE20K SceneParsing ({ADE20K_DIR}) has semantic labels only; use --task semantic "
                        f"(got {task!r})")
    report = ConversionReport(strict)
    items = ade20k_items(root, split, report)
    convert = functools.partial(convert_ade20k_item, root=str(Path(root).expanduser().resolve()))
    return write_dataset(out, items, convert, dataset="ade20k", task=task, split=canonical_split(split),
                         classes=ade20k_classes(), shard_size=shard_size, num_workers=num_workers, strict=strict, progress=progress, report=report, max_skipped=max_skipped)


def write_ade20k_layout(root: str | Path, split: str, num: int, size: int | tuple[int, int], seed: int) -> None:
    """Write ``num`` synthetic scenes (``size`` = side or (height, width)) as ADE20K files under
    ``root/ADEChallengeData2016``: JPEG images and label PNGs named ``ADE_{train,val}_%08d``.
    The six synthetic classes are written as the real classes ``SYNTHETIC_TO_ADE20K``; pixels no
    segment covers (the empty scenes) are 0, "unlabelled"."""
    split = canonical_split(split)
    height, width = (size, size) if isinstance(size, int) else size
    base = Path(root).expanduser() / ADE20K_DIR
    image_dir, label_dir = base / "images" / split, base / "annotations" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    prefix = "ADE_train" if split == "training" else "ADE_val"
    for i, scene in enumerate(generate_scenes(num, height, width, split_seed(seed, split))):
        label = np.zeros((height, width), np.uint8)
        for seg in scene["segments"]:
            label[seg["mask"]] = SYNTHETIC_TO_ADE20K[seg["class_id"]] + 1
        name = f"{prefix}_{i + 1:08d}"
        Image.fromarray(scene["image"]).save(image_dir / f"{name}.jpg", quality=95)
        Image.fromarray(label).save(label_dir / f"{name}.png")
