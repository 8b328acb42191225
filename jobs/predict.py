"""Segment images with a checkpoint: overlay PNGs plus raw semantic / panoptic / instance outputs.

    python jobs/predict.py --checkpoint runs/tiny-synthetic --out predictions/ photo.jpg street.png
    python jobs/predict.py --checkpoint s3://bucket/runs/r50 --out s3://bucket/predictions img/*.jpg
    python jobs/predict.py --checkpoint runs/tiny-synthetic photo.jpg --set model.test.object_mask_threshold=0.5
    python jobs/predict.py --onnx model.onnx --out predictions/ photo.jpg          # an exported graph (jobs/export.py)

Per image NAME.ext, under --out: NAME_overlay.png (segments blended in colour with class names
and scores), NAME_sem_seg.png (uint8 label map), NAME_panoptic.png + NAME_panoptic.json (COCO
panoptic format), NAME_instances.json (COCO results with RLE masks). Images and --out may be
local paths or s3:// URIs. The written files are listed on stdout.

Every image is tried: one that is missing (reported before the model loads) or cannot be decoded
gets an error line naming it on stderr, the others are still written, and the exit status is 2
when any image failed.

At scale, on a Ray cluster (or a local Ray) with Ray Data, resumable:

    python jobs/predict.py --checkpoint s3://bucket/runs/r50 --input s3://bucket/photos/ --out s3://bucket/pred \
        --replicas 4 --batch-size 4

--input is a folder or an s3:// prefix (images at any depth), a text file of image paths / URIs (one a
line), or prepared records (jobs/prepare_data.py). --replicas model replicas (each --gpus-per-replica GPUs:
by default 1 when the cluster has GPUs and --device is not cpu, else CPUs only; --cpus-per-replica CPUs)
take batches of --batch-size images. Outputs keep each image's relative path (a/b/x.jpg -> a/b/x_*), then
x_done.json marks the image complete, or x_failed.json records why it failed: a rerun skips both
(--retry-failed tries the failed ones again). At the end --out holds failures.json (every failed image, with
the reason) and instances_results.json (all instances, one COCO results list). Progress (done / total,
images/s, ETA) goes to stderr; the exit status is 2 when any image failed.
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
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint",
                       help="checkpoint .pth file or run directory (its latest checkpoint); local or s3://")
    model.add_argument("--onnx", help="an ONNX file exported by jobs/export.py (local or s3://), run by ONNX Runtime")
    p.add_argument("--out", default="predictions", help="output directory or s3://bucket/prefix (default: %(default)s)")
    add_override_argument(p, of="the checkpoint's config")
    p.add_argument("--score-threshold", type=float, default=0.5,
                   help="overlay: lowest instance score drawn when the model predicts no panoptic output")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1, ...")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="PNG / JPEG files (local or s3://)")
    scale = p.add_argument_group("at scale (Ray Data; instead of IMAGE arguments)")
    scale.add_argument("--input", help="folder, s3:// prefix, text file of image URIs, or prepared records")
    scale.add_argument("--replicas", type=int, default=1, help="model replicas (default: %(default)s)")
    scale.add_argument("--batch-size", type=int, default=4, help="images per replica call (default: %(default)s)")
    scale.add_argument("--gpus-per-replica", type=float, default=None,
                       help="GPUs of each replica (default: 1 when the cluster has GPUs and --device is not cpu, "
                            "else 0)")
    scale.add_argument("--cpus-per-replica", type=float, default=1.0,
                       help="CPUs of each replica (default: %(default)s)")
    scale.add_argument("--retry-failed", action="store_true",
                       help="predict again the images an earlier run recorded as failed (skipped by default)")
    scale.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    args = p.parse_args(argv)
    if bool(args.images) == bool(args.input):
        p.error("give either IMAGE arguments or --input")
    if args.replicas < 1 or args.batch_size < 1 or args.cpus_per_replica <= 0:
        p.error("--replicas and --batch-size must be >= 1, --cpus-per-replica > 0")
    return args


def predict_at_scale(args: argparse.Namespace) -> int:
    """--input: the Ray Data pipeline of ``mpformer_ray.predict_batch``."""
    from mpformer_ray.predict_batch import ModelSpec, Settings, run_batch

    spec = ModelSpec(checkpoint=args.checkpoint, onnx=args.onnx, overrides=list(args.overrides or []),
                     device=args.device, threads=max(1, int(args.cpus_per_replica)))
    settings = Settings(replicas=args.replicas, batch_size=args.batch_size, cpus_per_replica=args.cpus_per_replica,
                        gpus_per_replica=args.gpus_per_replica, score_threshold=args.score_threshold,
                        retry_failed=args.retry_failed)
    summary = run_batch(args.input, args.out, spec, settings, args.address)
    peaks = ", ".join(f"{v / 2**30:.2f}" for v in sorted(summary.peak_rss.values())) or "-"
    print(f"[predict] {summary.predicted} predicted, {summary.skipped} already done, {len(summary.failures)} failed; "
          f"{summary.seconds:.1f} s, {summary.images_per_s:.2f} images/s; replica peak RSS GiB: {peaks}; outputs "
          f"under {args.out}", file=sys.stderr)
    if summary.failures:
        print(f"error: {len(summary.failures)} of {summary.total} images failed, the others were written; see "
              f"{storage.join(args.out, 'failures.json')}", file=sys.stderr)
        return 2
    return 0


@job
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.input:
        return predict_at_scale(args)
    from mpformer_ray.predict import (image_id_for, load_for_inference, load_image, predict, resolve_device,
                                      write_predictions)

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
        if args.onnx:
            from mpformer_ray.export import load_onnx
            model, cfg, classes = load_onnx(args.onnx, args.overrides, device)
        else:
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
