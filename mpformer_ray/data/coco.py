"""COCO 2017 -> records: instances (things, from ``instances_{split}2017.json``) or panoptic /
semantic (things + stuff, from ``panoptic_{split}2017.json`` and its PNGs).

Layout under ``root``::

    {split}2017/*.jpg
    annotations/instances_{split}2017.json
    annotations/panoptic_{split}2017.json
    annotations/panoptic_{split}2017/*.png      segment id = R + 256 G + 256^2 B

Category ids become contiguous train ids in category-id order (the manifest keeps each
class's ``source_id`` for evaluation). The semantic label map is derived from the panoptic
segments as Mask2Former does: every segment's pixels get its category's train id, all
else 255. Only the JSON lives in the parent process; workers read one image at a time.
"""

from __future__ import annotations

import functools
import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from mpformer_ray.data.records import MAX_SKIPPED, ConversionReport, DataError, make_row, write_dataset
from mpformer_ray.tasks import check_task



def _load_json(path: Path) -> dict:
    if not path.exists():
        raise DataError(f"{path} does not exist: expected the COCO 2017 layout under {path.parent.parent} "
                        "(annotations/instances_{split}2017.json, annotations/panoptic_{split}2017.json, {split}2017/)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e}); re-download or regenerate it") from None


def _classes(categories: list[dict], things_only: bool) -> tuple[list[dict], dict[int, int]]:
    """COCO categories -> (manifest classes with contiguous ids, source id -> contiguous id)."""
    cats = sorted((c for c in categories if not things_only or c.get("isthing", 1)), key=lambda c: c["id"])
    classes = [{"id": i, "name": c["name"], "isthing": bool(c.get("isthing", 1)), "source_id": int(c["id"])}
               for i, c in enumerate(cats)]
    return classes, {c["source_id"]: c["id"] for c in classes}


def _read_image(root: str, file_name: str, height: int, width: int, report: ConversionReport) -> bytes | None:
    """The image file's bytes after checking it decodes at the size the JSON says; None = skipped."""
    path = Path(root) / file_name
    if not path.is_file():
        report.skip("missing_image", file_name, f"{path} does not exist")
        return None
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # a full decode: truncated files only fail here
            size = im.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        report.skip("unreadable_image", file_name, f"{type(e).__name__}: {e}")
        return None
    if size != (width, height):
        report.skip("image_size_mismatch", file_name, f"file is {size[1]}x{size[0]}, json says {height}x{width}")
        return None
    return data


def _instance_rle(ann: dict, height: int, width: int, file_name: str, report: ConversionReport) -> dict | None:
    """One annotation's segmentation (polygons, compressed or uncompressed RLE) -> compressed RLE."""
    seg, where = ann.get("segmentation"), f"annotation {ann.get('id')}"
    if isinstance(seg, list):
        polygons = [p for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        if len(polygons) < len(seg):
            report.repair("degenerate_polygon", file_name, f"{where}: polygon with fewer than 3 points dropped")
        if not polygons:
            return None
        return mask_util.merge(mask_util.frPyObjects(polygons, height, width))
    if isinstance(seg, dict) and "size" in seg and "counts" in seg:
        if list(seg["size"]) != [height, width]:
            report.repair("mask_size_mismatch", file_name, f"{where}: RLE size {seg['size']}, image {height}x{width}")
            return None
        if isinstance(seg["counts"], list):
            return mask_util.frPyObjects(seg, height, width)
        counts = seg["counts"].encode("ascii") if isinstance(seg["counts"], str) else seg["counts"]
        return {"size": [height, width], "counts": counts}
    report.repair("bad_segmentation", file_name, f"{where}: segmentation is neither polygons nor RLE")
    return None


def convert_instance_item(item: dict, report: ConversionReport, *, root: str, cat_map: dict[int, int]) -> dict | None:
    """One image of instances_*.json -> a record row (things only, crowds kept as iscrowd)."""
    file_name, height, width = item["file_name"], item["height"], item["width"]
    image = _read_image(root, file_name, height, width, report)
    if image is None:
        return None
    segments = []
    for ann in item["anns"]:
        if ann.get("category_id") not in cat_map:
            report.repair("unknown_category", file_name,
                          f"annotation {ann.get('id')}: category {ann.get('category_id')}")
            continue
        rle = _instance_rle(ann, height, width, file_name, report)
        if rle is None:
            continue
        if mask_util.area(rle) == 0:
            report.repair("empty_mask", file_name, f"annotation {ann.get('id')} covers no pixel")
            continue
        segments.append({"id": ann["id"], "category_id": cat_map[ann["category_id"]],
                         "iscrowd": bool(ann.get("iscrowd", 0)), "rle": rle})
    if not item["anns"]:
        report.keep("no_annotations", file_name)
    return make_row(image_id=item["image_id"], file_name=file_name, image_bytes=image, height=height, width=width,
                    segments=segments, sem_seg=None)


def convert_panoptic_item(item: dict, report: ConversionReport, *, root: str, cat_map: dict[int, int]) -> dict | None:
    """One image of panoptic_*.json + its PNG -> a record row with segments and sem_seg."""
    file_name, height, width = item["file_name"], item["height"], item["width"]
    image = _read_image(root, file_name, height, width, report)
    if image is None:
        return None
    sem = np.full((height, width), 255, np.uint8)
    segments = []
    if item["segments_info"]:
        png_path = Path(root) / item["png"]
        if not png_path.is_file():
            report.skip("missing_annotation_file", file_name, f"{png_path} does not exist")
            return None
        try:
            rgb = np.asarray(Image.open(png_path).convert("RGB"), dtype=np.int64)
        except (OSError, SyntaxError, ValueError) as e:
            report.skip("unreadable_annotation_file", file_name, f"{item['png']}: {type(e).__name__}: {e}")
            return None
        if rgb.shape[:2] != (height, width):
            report.skip("mask_size_mismatch", file_name, f"{item['png']} is {rgb.shape[0]}x{rgb.shape[1]}, "
                                                         f"image {height}x{width}")
            return None
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        for info in item["segments_info"]:
            if info.get("category_id") not in cat_map:
                report.repair("unknown_category", file_name,
                              f"segment {info.get('id')}: category {info.get('category_id')}")
                continue
            mask = ids == info["id"]
            if not mask.any():
                report.repair("empty_mask", file_name, f"segment {info['id']} has no pixel in {item['png']}")
                continue
            label = cat_map[info["category_id"]]
            sem[mask] = label
            segments.append({"id": info["id"], "category_id": label, "iscrowd": bool(info.get("iscrowd", 0)),
                             "mask": mask})
    else:
        report.keep("no_annotations", file_name)
    return make_row(image_id=item["image_id"], file_name=file_name, image_bytes=image, height=height, width=width,
                    segments=segments, sem_seg=sem)


def _group_annotations(anns: list[dict], images: dict[int, dict], json_name: str,
                       report: ConversionReport) -> dict[int, list[dict]]:
    by_image: dict[int, list[dict]] = defaultdict(list)
    for ann in anns:
        if ann.get("image_id") not in images:
            report.skip("annotation_without_image", json_name, f"annotation for unknown image_id {ann.get('image_id')}")
            continue
        by_image[ann["image_id"]].append(ann)
    return by_image


def coco_items(root: str, split: str, task: str,
               report: ConversionReport) -> tuple[list[dict], list[dict], functools.partial]:
    """Parse the split's JSON once: (work items, manifest classes, picklable convert function).
    Each item holds file paths and only its own image's annotations."""
    check_task(task)
    root = str(Path(root).expanduser().resolve())
    kind = "instances" if task == "instance" else "panoptic"
    json_name = f"annotations/{kind}_{split}2017.json"
    data = _load_json(Path(root) / json_name)
    images = {im["id"]: im for im in data.get("images", [])}
    classes, cat_map = _classes(data.get("categories", []), things_only=task == "instance")
    if not classes:
        raise DataError(f"{Path(root) / json_name}: no categories; expected the COCO 'categories' list")
    by_image = _group_annotations(data.get("annotations", []), images, json_name, report)
    del data
    items = []
    for image_id in sorted(images):
        im = images[image_id]
        item = {"image_id": image_id, "file_name": f"{split}2017/{im['file_name']}",
                "height": int(im["height"]), "width": int(im["width"])}
        if task == "instance":
            item["anns"] = by_image.get(image_id, [])
        else:
            anns = by_image.get(image_id, [])
            item["png"] = f"annotations/panoptic_{split}2017/{anns[0]['file_name']}" if anns else None
            item["segments_info"] = anns[0]["segments_info"] if anns else []
        items.append(item)
    fn = convert_instance_item if task == "instance" else convert_panoptic_item
    return items, classes, functools.partial(fn, root=root, cat_map=cat_map)


def convert_coco(root: str, split: str, out: str, *, task: str = "panoptic", shard_size: int = 500,
                 num_workers: int = 0, strict: bool = False,
                 progress: bool = True, dataset: str = "coco", max_skipped: float = MAX_SKIPPED) -> dict:
    """Convert COCO ``split`` under ``root`` to records at ``out``; returns the manifest
    (``dataset`` is the name it records, e.g. "synthetic" for the generated COCO layout)."""
    report = ConversionReport(strict)
    items, classes, convert = coco_items(root, split, task, report)
    return write_dataset(out, items, convert, dataset=dataset, task=task, split=split, classes=classes,
                         shard_size=shard_size, num_workers=num_workers, strict=strict, progress=progress, report=report, max_skipped=max_skipped)
