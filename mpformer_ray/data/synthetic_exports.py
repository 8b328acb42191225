"""The synthetic scenes written in the layouts people bring their own data in, to try and test that path
without data and to measure it (``benchmarks/own_data.py``):

- ``write_instance_export``: a labelling tool's COCO instances export (CVAT / Label Studio / Roboflow style):
  images in nested folders with spaces in their names and mixed extensions, one JSON with sparse category
  ids in no particular order, polygons (split in two parts for squares), compressed and uncompressed RLE,
  crowd regions and images without annotations.
- ``write_panoptic_export``: a COCO panoptic export with arbitrary file names, its PNGs in the folder named
  like the JSON beside it.
- ``write_label_folders``: images beside a folder of label PNGs (class index per pixel, 255 unlabelled)
  and a class-names file.

Every writer takes the scenes of ``synthetic.generate_scenes(num, height, width, seed)``: with the seed of
``write_coco_layout``'s split (``split_seed``) and square images, the same pictures as the COCO 2017 layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from mpformer_ray.data.synthetic import SYNTHETIC_CLASSES, _uncompressed_rle, generate_scenes

# sparse category ids in no particular order, as labelling tools number them
EXPORT_CATEGORY_IDS = [1000, 3, 17, 42, 7, 250]
_FOLDERS = ["site A", "batch_2/sub dir", "batch_2"]
_EXTENSIONS = ("jpg", "PNG", "jpeg")


def _image_name(i: int, extensions: tuple[str, ...]) -> str:
    return f"{_FOLDERS[i % len(_FOLDERS)]}/frame {i:05d}.{extensions[i % len(extensions)]}"


def _save(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    Image.fromarray(image).save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def _two_parts(polygon: list[float]) -> list[list[float]]:
    """A quadrilateral [x0, y0, ..., x3, y3] as two polygons (its halves between edges 1-2 and 3-0)."""
    v = np.asarray(polygon, dtype=np.float64).reshape(4, 2)
    m12, m30 = (v[1] + v[2]) / 2, (v[3] + v[0]) / 2
    return [np.concatenate([v[0], v[1], m12, m30]).tolist(), np.concatenate([m30, m12, v[2], v[3]]).tolist()]


def _segmentation(seg: dict, k: int) -> list[list[float]] | dict:
    """The COCO ``segmentation`` a tool would write for a thing segment (``k``: its running number)."""
    if seg["iscrowd"]:
        return _uncompressed_rle(seg["mask"])  # COCO's own convention for crowd regions
    if seg["polygons"] is not None:
        polygons = seg["polygons"]
        return _two_parts(polygons[0]) if len(polygons) == 1 and len(polygons[0]) == 8 else polygons
    if k % 2:
        return _uncompressed_rle(seg["mask"])
    rle = mask_util.encode(np.asfortranarray(seg["mask"].astype(np.uint8)))
    return {"size": list(seg["mask"].shape), "counts": rle["counts"].decode("ascii")}


def _categories(things_only: bool) -> list[dict]:
    cats = [{"id": sid, "name": c["name"], "supercategory": "thing" if c["isthing"] else "stuff",
             "isthing": int(c["isthing"])} for c, sid in zip(SYNTHETIC_CLASSES, EXPORT_CATEGORY_IDS)]
    cats = [c for c in cats if c["isthing"] or not things_only]
    return list(reversed(cats))  # not in id order either


def write_instance_export(root: str | Path, num: int, height: int, width: int, seed: int,
                          extensions: tuple[str, ...] = _EXTENSIONS) -> dict[str, str]:
    """Write ``num`` scenes as a tool's instances export under ``root``: ``images/...`` and
    ``annotations/instances_default.json`` (CVAT's name). Every 7th image keeps no annotation. Returns
    {"annotations": JSON path, "images": image folder}."""
    root = Path(root)
    images, annotations, ann_id = [], [], 1
    for i, scene in enumerate(generate_scenes(num, height, width, seed)):
        name = _image_name(i, extensions)
        _save(scene["image"], root / "images" / name)
        image_id = 100 + 3 * i  # tools number images as they like
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
        if i % 7 == 6:
            continue
        for seg in scene["segments"]:
            if not SYNTHETIC_CLASSES[seg["class_id"]]["isthing"]:
                continue
            rle = mask_util.encode(np.asfortranarray(seg["mask"].astype(np.uint8)))
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": EXPORT_CATEGORY_IDS[seg["class_id"]],
                                "segmentation": _segmentation(seg, ann_id), "iscrowd": int(seg["iscrowd"]),
                                "area": float(mask_util.area(rle)), "bbox": mask_util.toBbox(rle).tolist()})
            ann_id += 1
    path = root / "annotations" / "instances_default.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"info": {"description": "synthetic tool export"}, "images": images,
                                "annotations": annotations, "categories": _categories(things_only=True)}))
    return {"annotations": str(path), "images": str(root / "images")}


def write_panoptic_export(root: str | Path, num: int, height: int, width: int, seed: int) -> dict[str, str]:
    """Write ``num`` scenes as a COCO panoptic export under ``root`` with arbitrary file names:
    ``pictures/<group>/<name>.jpg``, ``export 1/panoptic labels.json`` and its PNGs in
    ``export 1/panoptic labels/`` (the COCO convention). Returns {"annotations", "images"}."""
    root = Path(root)
    json_path = root / "export 1" / "panoptic labels.json"
    png_dir = json_path.with_suffix("")
    png_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, scene in enumerate(generate_scenes(num, height, width, seed)):
        name = f"group {i % 2}/IMG-{(i * 7919) % 100000:05d}_v{i}.jpg"
        _save(scene["image"], root / "pictures" / name)
        ids = np.zeros((height, width), np.int64)
        info = []
        for k, seg in enumerate(scene["segments"]):
            segment_id = 1 + 37 * k + i  # any ids unique within the image
            ids[seg["mask"]] = segment_id
            info.append({"id": segment_id, "category_id": EXPORT_CATEGORY_IDS[seg["class_id"]],
                         "iscrowd": int(seg["iscrowd"]), "area": int(seg["mask"].sum())})
        png = f"labels_{i:05d}.png"
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
        Image.fromarray(rgb).save(png_dir / png)
        images.append({"id": i + 1, "file_name": name, "height": height, "width": width})
        annotations.append({"image_id": i + 1, "file_name": png, "segments_info": info})
    json_path.write_text(json.dumps({"images": images, "annotations": annotations,
                                     "categories": _categories(things_only=False)}))
    return {"annotations": str(json_path), "images": str(root / "pictures")}


def write_label_folders(root: str | Path, num: int, height: int, width: int, seed: int,
                        extensions: tuple[str, ...] = _EXTENSIONS) -> dict[str, str]:
    """Write ``num`` scenes as ``images/<sub-folders>/<name>.<ext>`` beside ``labels/<same>.png`` (the class
    index per pixel, 255 where no class is: the empty scenes) and ``classes.txt``. Returns {"images",
    "masks", "classes"}."""
    root = Path(root)
    for i, scene in enumerate(generate_scenes(num, height, width, seed)):
        name = _image_name(i, extensions)
        _save(scene["image"], root / "images" / name)
        label = np.full((height, width), 255, np.uint8)
        for seg in scene["segments"]:
            label[seg["mask"]] = seg["class_id"]
        path = (root / "labels" / name).with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(label).save(path)
    (root / "classes.txt").write_text("".join(f"{c['name']}\n" for c in SYNTHETIC_CLASSES))
    return {"images": str(root / "images"), "masks": str(root / "labels"), "classes": str(root / "classes.txt")}
