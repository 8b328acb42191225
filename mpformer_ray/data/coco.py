"""COCO-format JSON -> records: instances (things, from an instances JSON) or panoptic / semantic
(things + stuff, from a panoptic JSON and its PNGs). Any COCO-format export works, local or ``s3://``:

    coco_json_items(annotations=".../export.json", images=".../images", task="instance")
    coco_json_items(annotations=".../panoptic.json", images=".../images", task="panoptic",
                    panoptic_masks=".../panoptic")   # default: the folder named like the JSON beside it

- ``file_name``s are paths under ``images`` and may hold sub-folders (and spaces); images are matched
  through the JSON's image ids, never by name.
- Category ids may be sparse and in any order (3, 17, 1000): they become contiguous train ids in
  category-id order, and the manifest keeps each class's ``source_id`` for evaluation. Names and
  thing / stuff come from the JSON's ``categories`` (an instances JSON: all things).
- Instances: polygons (several per object), uncompressed and compressed RLE, ``iscrowd``, images without
  annotations. ``height`` / ``width`` missing from an image entry are taken from the image file.
- The semantic label map is derived from the panoptic segments as Mask2Former does: every segment's
  pixels get its category's train id, all else 255.

COCO 2017 (``--root R --split S``) is the shorthand ``coco_items``: ``R/annotations/{instances,
panoptic}_S2017.json``, images under ``R`` with file names prefixed ``S2017/`` (so records name
``S2017/xxx.jpg`` relative to the dataset root) and ``R/annotations/panoptic_S2017/`` for the PNGs
(segment id = R + 256 G + 256^2 B).

Only the JSON lives in the parent process; conversion workers read one image at a time.
"""

from __future__ import annotations

import functools
import io
import json
import posixpath
from collections import Counter, defaultdict

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from mpformer_ray import storage
from mpformer_ray.data.records import MAX_SKIPPED, ConversionReport, DataError, Work, make_row, write_dataset
from mpformer_ray.tasks import check_task

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def read_json(uri: str, what: str) -> dict:
    """A JSON object from ``uri`` (local or s3://); a DataError naming the file and ``what`` it should be."""
    if not storage.exists(uri):
        raise DataError(f"{uri} does not exist: expected {what}")
    try:
        data = json.loads(storage.read_bytes(uri))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise DataError(f"{uri}: not valid JSON ({e}); re-export or regenerate it") from None
    if not isinstance(data, dict):
        raise DataError(f"{uri}: a JSON {type(data).__name__}, expected a COCO object with 'images', "
                        "'annotations' and 'categories'")
    return data


def _classes(categories: list[dict], things_only: bool, label: str) -> tuple[list[dict], dict[int, int]]:
    """COCO categories -> (manifest classes with contiguous ids in category-id order, source id -> contiguous id)."""
    bad = [c for c in categories if not isinstance(c, dict) or not isinstance(c.get("id"), int) or "name" not in c]
    if bad:
        raise DataError(f"{label}: categories {bad[:3]} lack an integer 'id' or a 'name'; every COCO category "
                        "needs both")
    repeated = sorted(i for i, n in Counter(c["id"] for c in categories).items() if n > 1)
    if repeated:
        raise DataError(f"{label}: category ids {repeated} appear more than once in 'categories'; give each "
                        "category its own id")
    cats = sorted((c for c in categories if not things_only or c.get("isthing", 1)), key=lambda c: c["id"])
    classes = [{"id": i, "name": str(c["name"]), "isthing": bool(c.get("isthing", 1)), "source_id": int(c["id"])}
               for i, c in enumerate(cats)]
    return classes, {c["source_id"]: c["id"] for c in classes}


def _read_file(uri: str) -> bytes | None:
    """The file's bytes; None when it does not exist (any other storage failure is raised)."""
    try:
        return storage.read_bytes(uri)
    except storage.StorageError:
        if not storage.exists(uri):
            return None
        raise


def _read_image(images: str, file_name: str, height: int | None, width: int | None,
                report: ConversionReport) -> tuple[bytes, int, int] | None:
    """(the image file's bytes, height, width) after checking it decodes at the size the JSON says (when it
    says one); None = skipped and counted."""
    uri = storage.join(images, file_name)
    data = _read_file(uri)
    if data is None:
        report.skip("missing_image", file_name, f"{uri} does not exist")
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # a full decode: truncated files only fail here
            size = im.size
    except _DECODE_ERRORS as e:
        report.skip("unreadable_image", file_name, f"{type(e).__name__}: {e}")
        return None
    if height is not None and size != (width, height):
        report.skip("image_size_mismatch", file_name, f"file is {size[1]}x{size[0]}, json says {height}x{width}")
        return None
    return data, size[1], size[0]


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


def convert_instance_item(item: dict, report: ConversionReport, *, images: str,
                          cat_map: dict[int, int]) -> dict | None:
    """One image of an instances JSON -> a record row (things only, crowds kept as iscrowd)."""
    file_name = item["file_name"]
    loaded = _read_image(images, file_name, item["height"], item["width"], report)
    if loaded is None:
        return None
    image, height, width = loaded
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


def convert_panoptic_item(item: dict, report: ConversionReport, *, images: str, masks: str,
                          cat_map: dict[int, int]) -> dict | None:
    """One image of a panoptic JSON + its PNG -> a record row with segments and sem_seg."""
    file_name = item["file_name"]
    loaded = _read_image(images, file_name, item["height"], item["width"], report)
    if loaded is None:
        return None
    image, height, width = loaded
    sem = np.full((height, width), 255, np.uint8)
    segments = []
    if item["segments_info"]:
        png_uri = storage.join(masks, item["png"])
        png = _read_file(png_uri)
        if png is None:
            report.skip("missing_annotation_file", file_name, f"{png_uri} does not exist")
            return None
        try:
            rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int64)
        except _DECODE_ERRORS as e:
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


def _images_by_id(entries: list, prefix: str, label: str, report: ConversionReport) -> dict[int, dict]:
    """The JSON's image entries by id; every image of an id that several entries claim is left out (its
    annotations could belong to any of them), counted as ``duplicate_image_id``."""
    by_id: dict[int, list[dict]] = defaultdict(list)
    for im in entries:
        if not isinstance(im, dict) or not isinstance(im.get("id"), int) or not im.get("file_name"):
            raise DataError(f"{label}: image entry {im!r} lacks an integer 'id' or a 'file_name', which every "
                            "COCO image entry has")
        by_id[im["id"]].append(im)
    images = {}
    for image_id, ims in by_id.items():
        if len(ims) > 1:
            for im in ims:
                report.skip("duplicate_image_id", posixpath.join(prefix, im["file_name"]),
                            f"{label}: image id {image_id} also names {[i['file_name'] for i in ims if i is not im]}")
            continue
        images[image_id] = ims[0]
    return images


def coco_json_items(annotations: str, images: str, task: str, report: ConversionReport, *,
                    panoptic_masks: str | None = None, image_prefix: str = "", label: str | None = None) -> Work:
    """Parse a COCO-format JSON once (module docstring): the work items, the manifest classes and the
    picklable convert function. Each item holds file paths and only its own image's annotations.

    ``annotations``: an instances JSON (``task`` instance) or a panoptic JSON (panoptic, semantic);
    ``images``: the folder the ``file_name``s are relative to (a record's ``file_name`` is
    ``image_prefix/file_name``, relative to ``images``); ``panoptic_masks``: the panoptic PNGs' folder
    (default: ``annotations`` without ``.json``). ``label`` names the JSON in counted problems."""
    check_task(task)
    images, annotations = storage.absolute(images), storage.absolute(annotations)
    label = label or annotations
    kind = "an instances JSON" if task == "instance" else "a panoptic JSON (segments_info per image)"
    data = read_json(annotations, f"{kind} in COCO format")
    entries = data.get("images")
    if not isinstance(entries, list) or not isinstance(data.get("annotations", []), list):
        raise DataError(f"{annotations}: no 'images' list (or 'annotations' is not a list); expected {kind} in "
                        "COCO format")
    panoptic = [isinstance(a, dict) and "segments_info" in a for a in data.get("annotations", [])]
    if task != "instance" and not all(panoptic):
        raise DataError(f"{annotations}: annotations without 'segments_info' are not panoptic; for an instances "
                        "JSON use --task instance")
    if task == "instance" and any(panoptic):
        raise DataError(f"{annotations}: a panoptic JSON (annotations with 'segments_info'); convert it with "
                        "--task panoptic or --task semantic, or give the instances JSON")
    classes, cat_map = _classes(data.get("categories", []), things_only=task == "instance", label=label)
    if not classes:
        raise DataError(f"{annotations}: no categories; expected the COCO 'categories' list")
    by_id = _images_by_id(entries, image_prefix, label, report)
    by_image: dict[int, list[dict]] = defaultdict(list)
    duplicated = {im["id"] for im in entries} - set(by_id)
    for ann in data.get("annotations", []):
        if ann.get("image_id") in duplicated:
            continue  # left out with its image (duplicate_image_id)
        if ann.get("image_id") not in by_id:
            report.skip("annotation_without_image", label, f"annotation for unknown image_id {ann.get('image_id')}")
            continue
        by_image[ann["image_id"]].append(ann)
    del data
    items = []
    for image_id in sorted(by_id):
        im = by_id[image_id]
        size = (int(im["height"]), int(im["width"])) if im.get("height") and im.get("width") else (None, None)
        item = {"image_id": image_id, "file_name": posixpath.join(image_prefix, im["file_name"]),
                "height": size[0], "width": size[1]}
        anns = by_image.get(image_id, [])
        if task == "instance":
            item["anns"] = anns
        else:
            item["png"] = anns[0]["file_name"] if anns else None
            item["segments_info"] = anns[0]["segments_info"] if anns else []
        items.append(item)
    if task == "instance":
        convert = functools.partial(convert_instance_item, images=images, cat_map=cat_map)
    else:
        masks = storage.absolute(panoptic_masks) if panoptic_masks else annotations.removesuffix(".json")
        convert = functools.partial(convert_panoptic_item, images=images, masks=masks, cat_map=cat_map)
    return Work(items, classes, convert, key="file_name")


def coco2017_paths(root: str, split: str, task: str) -> dict[str, str]:
    """The COCO 2017 layout under ``root`` as ``coco_json_items`` keywords (module docstring)."""
    kind = "instances" if task == "instance" else "panoptic"
    root = storage.absolute(root)
    return {"annotations": storage.join(root, "annotations", f"{kind}_{split}2017.json"), "images": root,
            "panoptic_masks": storage.join(root, "annotations", f"panoptic_{split}2017"),
            "image_prefix": f"{split}2017", "label": f"annotations/{kind}_{split}2017.json"}


def coco_items(root: str, split: str, task: str, report: ConversionReport) -> Work:
    """The COCO 2017 ``split`` under ``root`` (``--root --split``): ``coco_json_items`` on its paths."""
    check_task(task)
    paths = coco2017_paths(root, split, task)
    if not storage.exists(paths["annotations"]):
        raise DataError(f"{paths['annotations']} does not exist: expected the COCO 2017 layout under {root} "
                        "(annotations/instances_{split}2017.json, annotations/panoptic_{split}2017.json, "
                        "{split}2017/); for another layout give --annotations JSON --images DIR")
    return coco_json_items(task=task, report=report, **paths)


def convert_coco(root: str, split: str, out: str, *, task: str = "panoptic", shard_size: int = 500,
                 num_workers: int = 0, strict: bool = False,
                 progress: bool = True, dataset: str = "coco", max_skipped: float = MAX_SKIPPED) -> dict:
    """Convert COCO 2017 ``split`` under ``root`` to records at ``out``; returns the manifest
    (``dataset`` is the name it records, e.g. "synthetic" for the generated COCO layout)."""
    report = ConversionReport(strict)
    work = coco_items(root, split, task, report)
    return write_dataset(out, work.items, work.convert, dataset=dataset, task=task, split=split,
                         classes=work.classes, shard_size=shard_size, num_workers=num_workers, strict=strict,
                         progress=progress, report=report, max_skipped=max_skipped)
