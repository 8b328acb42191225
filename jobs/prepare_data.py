"""Convert a dataset on disk to sharded Parquet records (local directory or s3:// URI).

    python jobs/prepare_data.py --dataset coco --task panoptic --root /data/coco --split train \
        --out s3://bucket/coco/train-panoptic --workers 16
    python jobs/prepare_data.py            # the synthetic dataset, the default everywhere

Bad input (unreadable images, missing files, unknown categories, ...) is skipped or repaired
and counted in the summary and manifest; ``--strict`` makes it an error naming the file. When
more than ``--max-skipped`` of a split is skipped (default 1 %: most of a split missing is a
mistake, e.g. the panoptic PNG archive not unpacked) the job fails with the counts by reason
and writes no manifest. A rerun reuses shards already written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mpformer_ray.cli import job  # noqa: E402
from mpformer_ray.data.prepare import DATASETS, format_summary, prepare  # noqa: E402
from mpformer_ray.data.records import MAX_SKIPPED  # noqa: E402
from mpformer_ray.data.synthetic import VARIANTS  # noqa: E402
from mpformer_ray.tasks import TASKS  # noqa: E402


@job
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=list(DATASETS), default="synthetic")
    p.add_argument("--task", choices=TASKS, default="panoptic")
    p.add_argument("--root", default="~/.cache/mpformer-ray/synthetic/prepare",
                   help="dataset root on local disk (for synthetic: where the COCO layout is generated)")
    p.add_argument("--split", default="train")
    p.add_argument("--out", default=None,
                   help="output directory or s3://bucket/prefix (default: ROOT/records/SPLIT-TASK)")
    p.add_argument("--shard-size", type=int, default=500, help="images per Parquet shard")
    p.add_argument("--workers", type=int, default=0, help="conversion processes (0 = all cores)")
    p.add_argument("--strict", action="store_true", help="fail on the first bad input instead of counting it")
    p.add_argument("--max-skipped", type=float, default=MAX_SKIPPED, metavar="SHARE",
                   help="largest share of the split that may be skipped before the job fails (default: %(default)s; "
                        "1 writes whatever converts)")
    p.add_argument("--num-images", type=int, default=64, help="synthetic only: images to generate")
    p.add_argument("--image-size", type=int, default=128, help="synthetic only: image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="synthetic only")
    p.add_argument("--variant", choices=VARIANTS, default="easy",
                   help="synthetic only: generator (hard = 20 classes, crowded, occluded, thin and small objects)")
    args = p.parse_args(argv)
    if not 0 <= args.max_skipped <= 1:
        p.error(f"--max-skipped is a share of the split in [0, 1], got {args.max_skipped}")
    out = args.out or str(Path(args.root).expanduser() / "records" / f"{args.split}-{args.task}")
    manifest = prepare(args.dataset, args.task, args.root, args.split, out, shard_size=args.shard_size,
                       num_workers=args.workers, strict=args.strict,
                       num_images=args.num_images, image_size=args.image_size, seed=args.seed,
                       variant=args.variant, max_skipped=args.max_skipped)
    print(format_summary(manifest, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
