"""One entry point for every converter: ``prepare(dataset, source, out, task=...)``.

``DATASETS`` maps each ``--dataset`` name to the function that lists a ``Source``'s work (``records.Work``)
and the tasks its annotations give. ``prepare`` then writes the records with ``records.write_dataset``,
split into ``OUT/train`` and ``OUT/val`` by ``data.split`` when asked (any dataset), and draws a preview
of what was written (``data.preview``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpformer_ray import storage
from mpformer_ray.data.records import MAX_SKIPPED, ConversionReport, DataError, Work, write_dataset
from mpformer_ray.data.split import split_items
from mpformer_ray.tasks import TASKS, check_task

SYNTHETIC_ROOT = "~/.cache/mpformer-ray/synthetic/prepare"


@dataclass
class Source:
    """Where a dataset's files are: ``jobs/prepare_data.py``'s source flags (local paths or s3:// URIs)."""

    root: str | None = None  # a published layout's root (coco 2017, ade20k, cityscapes; synthetic: where to write it)
    split: str = "train"  # that layout's split; the split name records get without --val-fraction
    annotations: str | None = None  # coco: any COCO-format JSON (instead of --root / --split)
    images: str | None = None  # coco: the folder its file_names are under; folder: the images
    panoptic_masks: str | None = None  # coco panoptic: the PNG folder (default: the JSON's name without .json)
    masks: str | None = None  # folder: the label PNGs, mirroring the images
    classes: str | None = None  # folder: the class names file
    ignore_index: int = 255  # folder: the label value of unlabelled pixels
    # synthetic: the generated scenes (jobs/prepare_data.py --num-images / --image-size / --seed / --variant)
    synthetic: dict[str, Any] = field(default_factory=lambda: dict(num=64, size=128, seed=0, variant="easy"))


def _need(source: Source, dataset: str, *flags: str) -> None:
    missing = [f"--{f.replace('_', '-')}" for f in flags if getattr(source, f) is None]
    if missing:
        raise DataError(f"--dataset {dataset} needs {' '.join(missing)}")


def _coco(source: Source, task: str, report: ConversionReport) -> Work:
    from mpformer_ray.data.coco import coco_items, coco_json_items

    if source.annotations is not None or source.images is not None:
        if source.root is not None:
            raise DataError("--dataset coco takes either --root and --split (the COCO 2017 layout) or --annotations "
                            "and --images (any COCO-format JSON), not both")
        _need(source, "coco", "annotations", "images")
        return coco_json_items(source.annotations, source.images, task, report, panoptic_masks=source.panoptic_masks)
    if source.root is None:
        raise DataError("--dataset coco needs --annotations JSON --images DIR (any COCO-format export), or --root DIR "
                        "--split S for the COCO 2017 layout")
    return coco_items(source.root, source.split, task, report)


def _synthetic(source: Source, task: str, report: ConversionReport) -> Work:
    from mpformer_ray.data.coco import coco_items
    from mpformer_ray.data.synthetic import write_coco_layout

    root = source.root or SYNTHETIC_ROOT
    if not (Path(root).expanduser() / "annotations" / f"panoptic_{source.split}2017.json").exists():
        write_coco_layout(root, source.split, **source.synthetic)
    return coco_items(root, source.split, task, report)


def _ade20k(source: Source, task: str, report: ConversionReport) -> Work:
    from mpformer_ray.data.ade20k import ade20k_classes, ade20k_items, canonical_split, convert_ade20k_item

    _need(source, "ade20k", "root")
    items = ade20k_items(source.root, source.split, report)
    convert = functools.partial(convert_ade20k_item, root=storage.absolute(source.root))
    return Work(items, ade20k_classes(), convert, key="image", split=canonical_split(source.split))


def _cityscapes(source: Source, task: str, report: ConversionReport) -> Work:
    from mpformer_ray.data.cityscapes import cityscapes_classes, cityscapes_items, convert_cityscapes_item

    _need(source, "cityscapes", "root")
    items = cityscapes_items(source.root, source.split, task, report)
    convert = functools.partial(convert_cityscapes_item, root=storage.absolute(source.root), task=task)
    return Work(items, cityscapes_classes(task), convert, key="image")


def _folder(source: Source, task: str, report: ConversionReport) -> Work:
    from mpformer_ray.data.folder import folder_items

    _need(source, "folder", "images", "masks", "classes")
    return folder_items(source.images, source.masks, source.classes, report, ignore_index=source.ignore_index)


@dataclass(frozen=True)
class Dataset:
    """One ``--dataset`` choice: ``items(source, task, report)`` lists its work, ``tasks`` are those its
    annotations give (the first is the default)."""

    items: Callable[[Source, str, ConversionReport], Work]
    tasks: tuple[str, ...] = tuple(TASKS)


# dataset name -> its Dataset; jobs/prepare_data.py --dataset offers these names
DATASETS: dict[str, Dataset] = {
    "coco": Dataset(_coco),
    "ade20k": Dataset(_ade20k, ("semantic",)),
    "cityscapes": Dataset(_cityscapes),
    "folder": Dataset(_folder, ("semantic",)),
    "synthetic": Dataset(_synthetic),
}


def prepare(dataset: str, source: Source, out: str, *, task: str | None = None, val_fraction: float = 0.0,
            seed: int = 0, preview: int = 0, shard_size: int = 500, num_workers: int = 0, strict: bool = False,
            progress: bool = True, max_skipped: float = MAX_SKIPPED) -> dict[str, dict]:
    """Convert ``source`` to records at ``out`` (local or s3://); returns {records URI: manifest}.

    ``task``: one of the dataset's tasks (None: its first). With ``val_fraction`` the images are split
    (``data.split``, by ``seed``) into ``out/train`` and ``out/val``; problems found while listing the
    files, before the split, are counted in the train split's manifest. More than ``max_skipped`` of a split
    skipped is a DataError (``records.write_dataset``). ``preview``: that many overlay PNGs of the written
    records in ``out/preview/`` (``data.preview``)."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {list(DATASETS)}, got {dataset!r}")
    entry = DATASETS[dataset]
    task = check_task(task) if task is not None else entry.tasks[0]
    if task not in entry.tasks:
        raise DataError(f"--dataset {dataset} has annotations for {list(entry.tasks)}, not --task {task}")
    if preview < 0:
        raise DataError(f"--preview {preview}: the number of overlay pictures to draw, >= 0")
    report = ConversionReport(strict)
    work = entry.items(source, task, report)
    if val_fraction:
        train, val = split_items(work.items, work.key, val_fraction, seed)
        splits = [("train", storage.join(out, "train"), train, report), ("val", storage.join(out, "val"), val, None)]
    else:
        splits = [(work.split or source.split, out, work.items, report)]
    manifests = {}
    for name, uri, items, found in splits:
        manifests[uri] = write_dataset(uri, items, work.convert, dataset=dataset, task=task, split=name,
                                       classes=work.classes, shard_size=shard_size, num_workers=num_workers,
                                       strict=strict, progress=progress, report=found, max_skipped=max_skipped)
    if preview:
        from mpformer_ray.data.preview import DIRNAME, write_previews

        write_previews(list(manifests), storage.join(out, DIRNAME), preview)
    return manifests


def format_summary(manifest: dict, out: str) -> str:
    """Human-readable lines: counts, what was skipped / repaired / kept and why, where it went."""
    lines = [
        f"dataset={manifest['dataset']} task={manifest['task']} split={manifest['split']}",
        f"images written: {manifest['num_images']}  segments: {manifest['num_segments']}  "
        f"classes: {len(manifest['classes'])}  shards: {len(manifest['shards'])} "
        f"({manifest.get('reused_shards', 0)} reused from an earlier run)",
    ]
    for title, key in (("skipped (image left out)", "skipped"), ("repaired (bad part dropped)", "repaired"),
                       ("kept as is", "kept")):
        table = manifest.get(key) or {}
        lines.append(f"{title}: " + (", ".join(f"{r}={n}" for r, n in sorted(table.items())) or "none"))
        for reason in sorted(table):
            lines.append(f"  {reason}: e.g. {', '.join(manifest.get('examples', {}).get(reason, []))}")
    lines.append(f"manifest: {out.rstrip('/')}/manifest.json")
    return "\n".join(lines)
