r"""Convert a dataset on disk or S3 to sharded Parquet records (local directory or s3:// URI).

    python jobs/prepare_data.py --dataset coco --task panoptic --root /data/coco --split train \
        --out s3://bucket/coco/train-panoptic --workers 16
    python jobs/prepare_data.py --dataset coco --task instance --annotations export/annotations.json \
        --images export/images --out s3://bucket/mine --val-fraction 0.1 --seed 0 --preview 8
    python jobs/prepare_data.py --dataset folder --images data/images --masks data/labels \
        --classes data/classes.txt --out data/records --val-fraction 0.2
    python jobs/prepare_data.py            # the synthetic dataset, the default everywhere

Your own data: any COCO-format JSON (--annotations / --images, and --panoptic-masks for a panoptic JSON
whose PNG folder is not named like it), or a folder of images beside a folder of label PNGs (--dataset
folder). --val-fraction F --seed S splits one export into OUT/train and OUT/val, the same on every machine.
--preview N draws N converted records as overlay PNGs in OUT/preview/.

Bad input (unreadable images, missing files, unknown categories, ...) is skipped or repaired
and counted in the summary and manifest; --strict makes it an error naming the file. When
more than --max-skipped of a split is skipped (default 1 %: most of a split missing is a
mistake, e.g. the panoptic PNG archive not unpacked) the job fails with the counts by reason
and writes no manifest. A rerun reuses shards already written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mpformer_ray import storage  # noqa: E402
from mpformer_ray.cli import job  # noqa: E402
from mpformer_ray.data.prepare import DATASETS, SYNTHETIC_ROOT, Source, format_summary, prepare  # noqa: E402
from mpformer_ray.data.records import MAX_SKIPPED  # noqa: E402
from mpformer_ray.data.synthetic import VARIANTS  # noqa: E402
from mpformer_ray.tasks import TASKS  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=list(DATASETS), default="synthetic")
    p.add_argument("--task", choices=list(TASKS), default=None,
                   help="annotations to convert (default: the dataset's first; panoptic, and semantic for ade20k "
                        "and folder)")
    source = p.add_argument_group("source (local paths or s3:// URIs)")
    source.add_argument("--root", default=None,
                        help="a published layout's root: coco (COCO 2017), ade20k, cityscapes; synthetic: where the "
                             f"COCO layout is generated (default {SYNTHETIC_ROOT})")
    source.add_argument("--split", default="train", help="that layout's split (default: %(default)s)")
    source.add_argument("--annotations", default=None, metavar="JSON",
                        help="coco: any COCO-format JSON (instances, or panoptic with segments_info)")
    source.add_argument("--images", default=None, metavar="DIR",
                        help="coco: the folder the JSON's file_names are under; folder: the images")
    source.add_argument("--panoptic-masks", default=None, metavar="DIR",
                        help="coco panoptic: the PNG folder (default: the JSON's path without .json)")
    source.add_argument("--masks", default=None, metavar="DIR",
                        help="folder: the label PNGs, sub-folders mirroring --images, one class index per pixel")
    source.add_argument("--classes", default=None, metavar="FILE",
                        help="folder: class names, one per line (label value 0 first), or a YAML / JSON list")
    source.add_argument("--ignore-index", type=int, default=255,
                        help="folder: the label value of unlabelled pixels (default: %(default)s)")
    p.add_argument("--out", default=None,
                   help="output directory or s3://bucket/prefix (default with --root: ROOT/records/SPLIT-TASK)")
    p.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                   help="split the images into OUT/train and OUT/val, F of them to val (seeded by --seed)")
    p.add_argument("--preview", type=int, default=0, metavar="N",
                   help="draw N converted records as overlay PNGs in OUT/preview/ (classes named, crowds hatched)")
    p.add_argument("--shard-size", type=int, default=500, help="images per Parquet shard")
    p.add_argument("--workers", type=int, default=0, help="conversion processes (0 = all cores)")
    p.add_argument("--strict", action="store_true", help="fail on the first bad input instead of counting it")
    p.add_argument("--max-skipped", type=float, default=MAX_SKIPPED, metavar="SHARE",
                   help="largest share of a split that may be skipped before the job fails (default: %(default)s; "
                        "1 writes whatever converts)")
    p.add_argument("--seed", type=int, default=0,
                   help="the --val-fraction split's seed, and the synthetic generator's")
    p.add_argument("--num-images", type=int, default=64, help="synthetic only: images to generate")
    p.add_argument("--image-size", type=int, default=128, help="synthetic only: image side in pixels")
    p.add_argument("--variant", choices=VARIANTS, default="easy",
                   help="synthetic only: generator (hard = 20 classes, crowded, occluded, thin and small objects)")
    args = p.parse_args(argv)
    if not 0 <= args.max_skipped <= 1:
        p.error(f"--max-skipped is a share of the split in [0, 1], got {args.max_skipped}")
    if args.val_fraction and not 0 < args.val_fraction < 1:
        p.error(f"--val-fraction is the share of images for val, in (0, 1), got {args.val_fraction}")
    if args.preview < 0:
        p.error(f"--preview is a number of pictures, >= 0, got {args.preview}")
    if args.out is None:
        if args.root is None and args.dataset != "synthetic":
            p.error("--out is needed: where to write the records (a directory or s3://bucket/prefix)")
        root = args.root or SYNTHETIC_ROOT
        task = args.task or DATASETS[args.dataset].tasks[0]
        args.out = str(Path(root).expanduser() / "records" / f"{args.split}-{task}")
    return args


@job
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source = Source(root=args.root, split=args.split, annotations=args.annotations, images=args.images,
                    panoptic_masks=args.panoptic_masks, masks=args.masks, classes=args.classes,
                    ignore_index=args.ignore_index,
                    synthetic=dict(num=args.num_images, size=args.image_size, seed=args.seed, variant=args.variant))
    manifests = prepare(args.dataset, source, args.out, task=args.task, val_fraction=args.val_fraction,
                        seed=args.seed, preview=args.preview, shard_size=args.shard_size, num_workers=args.workers,
                        strict=args.strict, max_skipped=args.max_skipped)
    print("\n\n".join(format_summary(manifest, uri) for uri, manifest in manifests.items()))
    if args.preview:
        print(f"preview: {storage.join(args.out, 'preview')}/ (overlays of the first {args.preview} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
