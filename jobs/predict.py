"""Segment images with a checkpoint: overlay PNGs plus raw semantic / panoptic / instance outputs.

    python jobs/predict.py --checkpoint runs/tiny-synthetic --out predictions/ photo.jpg street.png
    python jobs/predict.py --checkpoint s3://bucket/runs/r50 --out s3://bucket/predictions img/*.jpg
    python jobs/predict.py --checkpoint runs/tiny-synthetic photo.jpg --set model.test.object_mask_threshold=0.5

Per image NAME.ext, under --out: NAME_overlay.png (segments blended in colour with class names
and scores), NAME_sem_seg.png (uint8 label map), NAME_panoptic.png + NAME_panoptic.json (COCO
panoptic format), NAME_instances.json (COCO results with RLE masks). Images and --out may be
local paths or s3:// URIs. The written files are listed on stdout.

Every image is tried: one that is missing (reported before the model loads) or cannot be decoded
gets an error line naming it on stderr, the others are still written, and the exit status is 2
when any image failed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mpformer_ray import storage  # noqa: E402
from mpformer_ray.cli import job  # noqa: E402
from mpformer_ray.config import add_override_argument  # noqa: E402
from mpformer_ray.log import format_eta  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint .pth file or run directory (its latest checkpoint); local or s3://")
    p.add_argument("--out", default="predictions", help="output directory or s3://bucket/prefix (default: %(default)s)")
    add_override_argument(p, of="the checkpoint's config")
    p.add_argument("--score-threshold", type=float, default=0.5,
                   help="overlay: lowest instance score drawn when the model predicts no panoptic output")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1, ...")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG / JPEG files (local or s3://)")
    return p.parse_args(argv)


@job
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mpformer_ray.predict import image_id_for, load_for_inference, load_image, predict, resolve_device, write_predictions

    failed: list[str] = []
    # a mistyped path shows before the model loads, not after every image before it
    todo = []
    for index, uri in enumerate(args.images, start=1):
        if storage.exists(uri):
            todo.append((index, uri))
        else:
            print(f"error: {uri} does not exist", file=sys.stderr)
            failed.append(uri)
    if todo:
        device = resolve_device(args.device)
        model, cfg, classes = load_for_inference(args.checkpoint, args.overrides, device)
        storage.check_writable(args.out)
    start = time.perf_counter()
    for done, (index, uri) in enumerate(todo):
        if done:  # a line per image after the first: how far, how fast, how long still
            per_image = (time.perf_counter() - start) / done
            print(f"[predict] {done}/{len(todo)} images, {per_image:.1f} s an image, eta "
                  f"{format_eta(per_image * (len(todo) - done))}", file=sys.stderr, flush=True)
        try:
            image = load_image(uri)
        except (storage.StorageError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            failed.append(uri)
            continue
        prediction = predict(model, image, cfg, device)
        written = write_predictions(args.out, uri, image, prediction, classes, image_id_for(uri, index),
                                    score_threshold=args.score_threshold)
        for path in written.values():
            print(path)
    if failed:
        print(f"error: {len(failed)} of {len(args.images)} images failed, the others were written: "
              f"{', '.join(failed)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
