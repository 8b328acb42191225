"""One entry point for every converter: ``prepare(dataset, task, root, split, out)``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mpformer_ray.data.coco import convert_coco
from mpformer_ray.data.records import MAX_SKIPPED
from mpformer_ray.data.synthetic import write_coco_layout
from mpformer_ray.tasks import check_task


def _coco(root: str, split: str, out: str, scenes: dict[str, Any], **options: Any) -> dict:
    return convert_coco(root, split, out, dataset="coco", **options)


def _synthetic(root: str, split: str, out: str, scenes: dict[str, Any], **options: Any) -> dict:
    if not (Path(root).expanduser() / "annotations" / f"panoptic_{split}2017.json").exists():
        write_coco_layout(root, split, **scenes)
    return convert_coco(root, split, out, dataset="synthetic", **options)


def _ade20k(root: str, split: str, out: str, scenes: dict[str, Any], **options: Any) -> dict:
    from mpformer_ray.data.ade20k import convert_ade20k
    return convert_ade20k(root, split, out, **options)


def _cityscapes(root: str, split: str, out: str, scenes: dict[str, Any], **options: Any) -> dict:
    from mpformer_ray.data.cityscapes import convert_cityscapes
    return convert_cityscapes(root, split, out, **options)


# dataset name -> converter(root, split, out, scenes, **options) -> manifest; ``scenes`` are the synthetic
# generator's settings (only "synthetic" reads them), ``options`` the converters' common keywords (task, shard_size,
# num_workers, strict, progress, max_skipped). jobs/prepare_data.py --dataset offers these names.
DATASETS: dict[str, Callable[..., dict]] = {
    "coco": _coco, "ade20k": _ade20k, "cityscapes": _cityscapes, "synthetic": _synthetic}


def prepare(dataset: str, task: str, root: str, split: str, out: str, *, shard_size: int = 500,
            num_workers: int = 0, strict: bool = False,
            num_images: int = 64, image_size: int = 128, seed: int = 0, variant: str = "easy",
            progress: bool = True, max_skipped: float = MAX_SKIPPED) -> dict:
    """Convert one split of a dataset on disk to records at ``out`` (local or s3://); returns the
    manifest. ``synthetic`` first writes ``num_images`` generated scenes (generator ``variant``) in the
    COCO layout under ``root`` (kept if that split is already there), then converts them like COCO.
    More than ``max_skipped`` of the split skipped is a DataError (``records.write_dataset``)."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {list(DATASETS)}, got {dataset!r}")
    check_task(task)
    scenes = dict(num=num_images, size=image_size, seed=seed, variant=variant)
    return DATASETS[dataset](root, split, out, scenes, task=task, shard_size=shard_size, num_workers=num_workers,
                             strict=strict, progress=progress, max_skipped=max_skipped)


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
