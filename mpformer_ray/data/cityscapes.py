"""Cityscapes (gtFine) -> semantic, instance or panoptic records, and a synthetic writer in its layout.

Layout under ``root``::

    leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
    gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png      8-bit labelId per pixel
    gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_instanceIds.png   16-bit: labelId * 1000 + k for
        an instance of a class with instances, else the labelId (for such a class: a "group"
        region, e.g. "car group", which becomes a crowd segment)

Classes follow the official table (cityscapesscripts ``labels.py``): the 19 trainIds, every
other labelId is ignore (255). Tasks:

- semantic: ``sem_seg`` = trainIds of labelIds; one segment per class present.
- instance: the 8 thing classes (person .. bicycle, contiguous ids 0..7) from instanceIds;
  instances are ``iscrowd False``, group regions one crowd segment per class.
- panoptic: trainIds from labelIds; stuff = one segment per class (id = labelId), things =
  the instances of instanceIds (id = labelId * 1000 + k) plus the group regions as crowd
  (id = labelId). Pixels where the two PNGs disagree on the class are set to ignore.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

from mpformer_ray.data.label_files import class_segments, lookup, read_image, read_label
from mpformer_ray.data.records import MAX_SKIPPED, ConversionReport, DataError, make_row, write_dataset
from mpformer_ray.data.synthetic import generate_scenes, split_seed
from mpformer_ray.tasks import check_task

# (name, labelId, trainId, hasInstances) for every labelId that appears in the PNGs
LABELS: list[tuple[str, int, int, bool]] = [
    ("unlabeled", 0, 255, False), ("ego vehicle", 1, 255, False), ("rectification border", 2, 255, False),
    ("out of roi", 3, 255, False), ("static", 4, 255, False), ("dynamic", 5, 255, False),
    ("ground", 6, 255, False), ("road", 7, 0, False), ("sidewalk", 8, 1, False), ("parking", 9, 255, False),
    ("rail track", 10, 255, False), ("building", 11, 2, False), ("wall", 12, 3, False), ("fence", 13, 4, False),
    ("guard rail", 14, 255, False), ("bridge", 15, 255, False), ("tunnel", 16, 255, False),
    ("pole", 17, 5, False), ("polegroup", 18, 255, False), ("traffic light", 19, 6, False),
    ("traffic sign", 20, 7, False), ("vegetation", 21, 8, False), ("terrain", 22, 9, False),
    ("sky", 23, 10, False), ("person", 24, 11, True), ("rider", 25, 12, True), ("car", 26, 13, True),
    ("truck", 27, 14, True), ("bus", 28, 15, True), ("caravan", 29, 255, True), ("trailer", 30, 255, True),
    ("train", 31, 16, True), ("motorcycle", 32, 17, True), ("bicycle", 33, 18, True),
]
NUM_LABEL_IDS = len(LABELS)
LABEL_TO_TRAIN = np.array([t for _, _, t, _ in LABELS], dtype=np.int64)  # labelId -> trainId (255 = ignore)
HAS_INSTANCES = np.array([h for _, _, _, h in LABELS], dtype=bool)
# trainId -> (name, labelId); things are the trainable classes with instances
TRAIN_CLASSES: list[tuple[str, int, bool]] = sorted(((n, lid, h) for n, lid, t, h in LABELS if t != 255),
                                                    key=lambda c: LABEL_TO_TRAIN[c[1]])
THING_TRAIN_IDS: list[int] = [i for i, (_, _, h) in enumerate(TRAIN_CLASSES) if h]
CITIES = {"train": ["aachen", "bochum", "bremen"], "val": ["frankfurt", "lindau", "munster"],
          "test": ["berlin", "bielefeld", "bonn"]}
IMAGE_SUFFIX, LABEL_SUFFIX, INSTANCE_SUFFIX = "_leftImg8bit.png", "_gtFine_labelIds.png", "_gtFine_instanceIds.png"
# which real labelId each synthetic class is written as: square car, disk person, triangle bicycle,
# ring truck, sky sky, grass terrain
SYNTHETIC_TO_LABEL_ID: list[int] = [26, 24, 33, 27, 23, 22]
EGO_VEHICLE = 1  # the void labelId the synthetic writer paints along the bottom edge


def cityscapes_classes(task: str) -> list[dict]:
    """Manifest classes: the 19 trainIds, or for ``instance`` the 8 things renumbered 0..7;
    ``source_id`` is the labelId."""
    classes = [{"name": n, "isthing": h, "source_id": lid} for n, lid, h in TRAIN_CLASSES]
    if task == "instance":
        classes = [c for c in classes if c["isthing"]]
    return [{"id": i, **c} for i, c in enumerate(classes)]


def _instance_labels(inst: np.ndarray, rel: str, image_rel: str, report: ConversionReport) -> np.ndarray:
    """instanceIds int32 [H, W] -> labelId per pixel, -1 where the value is not a valid id
    (counted as ``unknown_label``): ids >= 1000 must belong to a class with instances."""
    label = np.where(inst >= 1000, inst // 1000, inst)
    valid = (label >= 0) & (label < NUM_LABEL_IDS)
    valid &= (inst < 1000) | HAS_INSTANCES[np.clip(label, 0, NUM_LABEL_IDS - 1)]
    if not valid.all():
        bad = np.unique(inst[~valid]).tolist()
        report.repair("unknown_label", image_rel, f"{rel}: instance ids {bad[:8]} are neither a labelId nor "
                      "labelId * 1000 + k of a class with instances, set to ignore (255)")
    return np.where(valid, label, -1)


def _thing_segments(inst: np.ndarray, train: np.ndarray, category: dict[int, int]) -> list[dict]:
    """Instances (ids >= 1000) and group regions (ids < 1000, one crowd segment per class) of
    the thing trainIds in ``category`` (trainId -> category id); ``train`` uint8 [H, W] is the
    per-pixel trainId, 255 where the pixel is ignored."""
    segments = []
    thing = np.isin(train, list(category))
    for v in np.unique(inst[thing]).tolist():
        mask = thing & (inst == v)
        t = int(train[mask][0])
        segments.append({"id": v, "category_id": category[t], "iscrowd": v < 1000, "mask": mask})
    return segments


def convert_cityscapes_item(item: dict, report: ConversionReport, *, root: str, task: str) -> dict | None:
    """One image + its gtFine PNGs -> a record row for ``task``."""
    loaded = read_image(root, item["image"], report)
    if loaded is None:
        return None
    data, height, width = loaded
    labels = {}
    for key in ("label_ids", "instance_ids"):
        if item.get(key):
            labels[key] = read_label(root, item[key], item["image"], (height, width), report)
            if labels[key] is None:
                return None
    sem, segments = None, []
    if task == "semantic":
        sem = lookup(labels["label_ids"], LABEL_TO_TRAIN, "labelIds not in the official table", item["label_ids"],
                     item["image"], report)
        segments = class_segments(sem, [lid for _, lid, _ in TRAIN_CLASSES])
    elif task == "instance":
        inst = labels["instance_ids"]
        label = _instance_labels(inst, item["instance_ids"], item["image"], report)
        train = np.where(label >= 0, LABEL_TO_TRAIN[np.clip(label, 0, None)], 255).astype(np.uint8)
        segments = _thing_segments(inst, train, {t: i for i, t in enumerate(THING_TRAIN_IDS)})
    else:
        inst = labels["instance_ids"]
        sem = lookup(labels["label_ids"], LABEL_TO_TRAIN, "labelIds not in the official table", item["label_ids"],
                     item["image"], report)
        label = _instance_labels(inst, item["instance_ids"], item["image"], report)
        known = (label >= 0) & (labels["label_ids"] < NUM_LABEL_IDS)
        disagree = known & (label != labels["label_ids"])
        if disagree.any():
            report.repair("instance_label_mismatch", item["image"],
                          f"{item['instance_ids']} and {item['label_ids']} disagree on {int(disagree.sum())} "
                          "pixels, set to ignore (255)")
        sem[disagree | (label < 0)] = 255
        stuff = np.where(np.isin(sem, THING_TRAIN_IDS), 255, sem).astype(np.uint8)
        segments = class_segments(stuff, [lid for _, lid, _ in TRAIN_CLASSES])
        segments += _thing_segments(inst, sem, {t: t for t in THING_TRAIN_IDS})
    if not segments:
        report.keep("no_annotations", item["image"])
    return make_row(image_id=item["image_id"], file_name=item["image"], image_bytes=data, height=height,
                    width=width, segments=segments, sem_seg=sem)


def cityscapes_items(root: str | Path, split: str, task: str, report: ConversionReport) -> list[dict]:
    """Pair each ``leftImg8bit`` image with the gtFine PNGs ``task`` needs (labelIds for
    semantic, instanceIds for instance, both for panoptic) by name; an image lacking one
    (``missing_label``) or a label without its image (``missing_image``) is counted and left
    out. Items hold paths relative to ``root`` only."""
    root = Path(root).expanduser().resolve()
    image_dir, gt_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    if not image_dir.is_dir():
        raise DataError(f"{image_dir} does not exist: expected the Cityscapes layout "
                        f"leftImg8bit/{split}/CITY/*{IMAGE_SUFFIX} and gtFine/{split}/CITY/*{LABEL_SUFFIX} "
                        f"under {root}")
    suffixes = {"label_ids": LABEL_SUFFIX, "instance_ids": INSTANCE_SUFFIX}
    needed = {"semantic": ["label_ids"], "instance": ["instance_ids"], "panoptic": ["label_ids", "instance_ids"]}[task]

    def by_stem(folder: Path, suffix: str) -> dict[str, str]:
        # stem = "city/city_seq_frame": the key the image and its labels share
        return {f"{p.parent.name}/{p.name[:-len(suffix)]}": str(p.relative_to(root))
                for p in folder.glob(f"*/*{suffix}")} if folder.is_dir() else {}

    images = by_stem(image_dir, IMAGE_SUFFIX)
    labels = {key: by_stem(gt_dir, suffixes[key]) for key in needed}
    for stem in sorted(set().union(*labels.values()) - set(images)):
        first = next(labels[k][stem] for k in needed if stem in labels[k])
        report.skip("missing_image", first, f"no {stem}{IMAGE_SUFFIX} in {image_dir}")
    items = []
    for image_id, stem in enumerate(sorted(images), start=1):
        missing = [k for k in needed if stem not in labels[k]]
        if missing:
            names = ", ".join(f"gtFine/{split}/{stem}{suffixes[k]}" for k in missing)
            report.skip("missing_label", images[stem], f"{names} does not exist")
            continue
        items.append({"image_id": image_id, "image": images[stem], **{k: labels[k][stem] for k in needed}})
    return items


def convert_cityscapes(root: str, split: str, out: str, *, task: str, shard_size: int = 500,
                       num_workers: int = 0, strict: bool = False,
                       progress: bool = True, max_skipped: float = MAX_SKIPPED) -> dict:
    """Convert Cityscapes ``split`` under ``root`` to ``task`` records at ``out`` (local or s3://);
    returns the manifest."""
    check_task(task)
    report = ConversionReport(strict)
    items = cityscapes_items(root, split, task, report)
    convert = functools.partial(convert_cityscapes_item, root=str(Path(root).expanduser().resolve()), task=task)
    return write_dataset(out, items, convert, dataset="cityscapes", task=task, split=split,
                         classes=cityscapes_classes(task), shard_size=shard_size, num_workers=num_workers,
                         strict=strict, progress=progress, report=report, max_skipped=max_skipped)


def write_cityscapes_layout(root: str | Path, split: str, num: int, size: int | tuple[int, int], seed: int) -> None:
    """Write ``num`` synthetic scenes as Cityscapes files under ``root`` (``size`` = height, the
    width twice that as in Cityscapes, or (height, width)), spread over real city folders:
    ``leftImg8bit/{split}/frankfurt/frankfurt_000000_000019_leftImg8bit.png`` and its gtFine
    ``_labelIds.png`` / ``_instanceIds.png``. Synthetic classes become ``SYNTHETIC_TO_LABEL_ID``;
    thing instances get ids labelId * 1000 + k, crowd regions (a "group") the bare labelId; the
    bottom rows are "ego vehicle" (a void labelId), pixels no segment covers "unlabeled"."""
    height, width = (size, 2 * size) if isinstance(size, int) else size
    root = Path(root).expanduser()
    cities = CITIES.get(split, CITIES["train"])
    for i, scene in enumerate(generate_scenes(num, height, width, split_seed(seed, split))):
        label = np.zeros((height, width), np.uint8)
        inst = np.zeros((height, width), np.uint16)
        counts: dict[int, int] = {}
        for seg in scene["segments"]:
            lid = SYNTHETIC_TO_LABEL_ID[seg["class_id"]]
            label[seg["mask"]] = lid
            if HAS_INSTANCES[lid] and not seg["iscrowd"]:
                inst[seg["mask"]] = lid * 1000 + counts.get(lid, 0)
                counts[lid] = counts.get(lid, 0) + 1
            else:
                inst[seg["mask"]] = lid
        image = scene["image"].copy()
        band = slice(height - max(1, height // 8), height)
        label[band], inst[band], image[band] = EGO_VEHICLE, EGO_VEHICLE, 40
        city = cities[i % len(cities)]
        stem = f"{city}_{i // len(cities):06d}_{19:06d}"
        image_dir, gt_dir = root / "leftImg8bit" / split / city, root / "gtFine" / split / city
        image_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(image_dir / f"{stem}{IMAGE_SUFFIX}")
        Image.fromarray(label).save(gt_dir / f"{stem}{LABEL_SUFFIX}")
        Image.fromarray(inst).save(gt_dir / f"{stem}{INSTANCE_SUFFIX}")
