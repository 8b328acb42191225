r"""Evaluate a checkpoint: panoptic PQ, mask AP, mIoU and per-layer mask consistency, printed as JSON,
and the same per class.

    python jobs/evaluate.py --checkpoint runs/tiny-synthetic            # a run's latest checkpoint
    python jobs/evaluate.py --checkpoint s3://bucket/runs/r50/checkpoints/model_0090000.pth \
        --data s3://bucket/coco/val-panoptic --set data.test_short_side=800 --out s3://bucket/eval/r50
    ray job submit --working-dir . -- python jobs/evaluate.py --checkpoint s3://...

The metrics go to stdout as one JSON object; the per-class table (class name, thing / stuff, PQ / SQ /
RQ, AP, IoU and pixel accuracy as evaluated) and progress go to stderr. ``--out DIR`` (local or s3://)
writes metrics.json, per_class.csv and, with semantic, confusion.csv and confusion.png (rows: ground
truth, normalised; class names on the axes). Each per-class column averages, over its filled cells, to
the metric it belongs to. ``--data`` defaults to the checkpoint config's ``data.val``. ``--set``
overrides the checkpoint's config (e.g. the test resize ``data.test_*`` or post-processing ``model.test.*``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mpformer_ray.cli import job  # noqa: E402
from mpformer_ray.config import add_override_argument  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint .pth file or run directory (its latest checkpoint); local or s3://")
    p.add_argument("--data", default=None, help="prepared split to evaluate on (default: the config's data.val)")
    add_override_argument(p, of="the checkpoint's config")
    p.add_argument("--max-images", type=int, default=0, help="evaluate only the first N images (0 = all)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="also write metrics.json, per_class.csv and (semantic) confusion.csv / .png here "
                        "(local or s3://)")
    return p.parse_args(argv)


@job
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mpformer_ray.evaluation.report import format_table, metrics_json, write_evaluation
    from mpformer_ray.evaluation.runner import evaluate_split
    from mpformer_ray.predict import load_for_inference, resolve_device

    if args.max_images < 0:
        print("error: --max-images must be >= 0", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    model, cfg, classes = load_for_inference(args.checkpoint, args.overrides, device)
    data = args.data or cfg.data.val
    if not data:
        print("error: the checkpoint's config has no data.val; pass --data URI of a prepared split", file=sys.stderr)
        return 2
    evaluation = evaluate_split(model, data, cfg, classes, device=device, max_images=args.max_images)
    print(format_table(evaluation.per_class), file=sys.stderr)
    if args.out:
        for uri in write_evaluation(args.out, evaluation):
            print(f"wrote {uri}", file=sys.stderr)
    print(metrics_json(evaluation.metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
