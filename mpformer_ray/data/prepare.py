"""One entry point for every converter: ``prepare(dataset, task, root, split, out)``."""

from __future__ import annotations

from pathlib import Path

from mpformer_ray.data.coco import convert_coco
from mpformer_ray.data.records import MAX_SKIPPED
from mpformer_ray.data.synthetic import write_coco_layout
from mpformer_ray.tasks import check_task

DATASETS = ("coco", "ade20k", "cityscapes", "synthetic")


def prepare(dataset: str, task: str, root: str, split: str, out: str, *, shard_size: int = 500,
            num_workers: int = 0, strict: bool = False, endpoint_url: str | None = None,
            num_images: int = 64, image_size: int = 128, seed: int = 0, variant: str = "easy",
            progress: bool = True, max_skipped: float = MAX_SKIPPED) -> dict:
    """Convert one split of a dataset on disk to records at ``out`` (local or s3://); returns the
    manifest. ``synthetic`` first writes ``num_images`` generated scenes (generator ``variant``) in the
    COCO layout under ``root`` (kept if that split is already there), then converts them like COCO.
    More than ``max_skipped`` of the split skipped is a DataError (``records.write_dataset``)."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    check_task(task)
    kw = dict(task=task, shard_size=shard_size, num_workers=num_workers, strict=strict, endpoint_url=endpoint_url,
              max_skipped=max_skipped)
    if dataset in ("coco", "synthetic"):
        layout_done = (Path(root).expanduser() / "annotations" / f"panoptic_{split}2017.json").exists()
        if dataset == "synthetic" and not layout_done:
            write_coco_layout(root, split, num_images, image_size, seed, variant)
        return convert_coco(root, split, out, dataset=dataset, progress=progress, **kw)
    if dataset == "ade20k":
        from mpformer_ray.data.ade20k import convert_ade20k
        return convert_ade20k(root, split, out, **kw)
    from mpformer_ray.data.cityscapes import convert_cityscapes
    return convert_cityscapes(root, split, out, **kw)


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
