"""Images/s of the Ray Data input pipeline against a plain PyTorch DataLoader doing the same work.

Both read the same Parquet shards and run the same decode (JPEG + COCO RLE masks) + LSJ
augmentation + collate + normalise (``mpformer_ray.data.pipeline``): Ray Data as
``read_parquet -> map_batches`` tasks on a local Ray with ``--cpus`` CPUs, the DataLoader with
``num_workers=--cpus`` processes. The consumer (this process) pulls batches as fast as it can, so
the figure is the pipeline's ceiling. "images/s" is the steady rate after the first batch
(start-up shown separately), "e2e img/s" counts the start-up too; "ray/dl" compares steady rates.

Input: ``--images`` synthetic scenes of ``--size`` (default 640x480, COCO-like), written once
with the records writer into ``--workdir`` (a temp dir by default).

From the per-core rate it also prints how many CPU cores one GPU needs to be fed at a training
step rate of ``--step-images-per-s`` images/s (take it from benchmarks/train_step.py).

    python benchmarks/data_pipeline.py                                  # 256 images, crops 512 and 1024
    python benchmarks/data_pipeline.py --images 64 --crops 512 --json out.json --step-images-per-s 12
"""

from __future__ import annotations

import argparse
import atexit
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mpformer_ray.config import load_config  # noqa: E402
from mpformer_ray.data.records import ConversionReport, make_row, write_dataset  # noqa: E402
from mpformer_ray.data.synthetic import SYNTHETIC_CLASSES, generate_scene  # noqa: E402


def synthetic_row(item: tuple[int, int, int], report: ConversionReport) -> dict:
    """Work item (index, height, width) -> one record row with a JPEG image (COCO-like)."""
    index, height, width = item
    scene = generate_scene(np.random.default_rng([1234, index]), height, width)
    buf = io.BytesIO()
    Image.fromarray(scene["image"]).save(buf, format="JPEG", quality=90)
    segments = [{"id": i + 1, "category_id": s["class_id"], "iscrowd": bool(s.get("iscrowd", False)),
                 "mask": s["mask"]} for i, s in enumerate(scene["segments"])]
    return make_row(image_id=index, file_name=f"{index:06d}.jpg", image_bytes=buf.getvalue(), height=height,
                    width=width, segments=segments, sem_seg=None)


def make_records(workdir: Path, num: int, height: int, width: int, cpus: int) -> str:
    out = workdir / f"records-{num}-{height}x{width}"
    if not (out / "manifest.json").exists():
        t = time.time()
        write_dataset(str(out), [(i, height, width) for i in range(num)], synthetic_row, dataset="synthetic",
                      task="panoptic", split="bench", classes=SYNTHETIC_CLASSES, shard_size=32,
                      num_workers=cpus, progress=False)
        print(f"wrote {num} records of {width}x{height} in {time.time() - t:.1f} s to {out}", flush=True)
    return str(out)


def timed(batches) -> dict:
    """Pull every batch. ``images_per_s``: from the end of the first batch on (steady state);
    ``end_to_end_images_per_s``: all images over the whole time, start-up included."""
    start, first, images, first_images = time.perf_counter(), None, 0, 0
    for x, _ in batches:
        images += len(x)
        if first is None:
            first, first_images = time.perf_counter(), len(x)
    end = time.perf_counter()
    return {"images": images, "seconds": end - start, "startup_s": first - start,
            "images_per_s": (images - first_images) / (end - first), "end_to_end_images_per_s": images / (end - start)}


def epochs(make_iter, n: int):
    for epoch in range(n):
        yield from make_iter(epoch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of the synthetic images")
    ap.add_argument("--crops", type=int, nargs="+", default=[512, 1024], help="LSJ crop sizes")
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="Ray CPUs = DataLoader workers")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=1,
                    help="passes over the images per measurement (each pass restarts the Ray execution / "
                         "the DataLoader workers, as a training epoch does)")
    ap.add_argument("--cpus-per-task", type=float, default=1.0, help="Ray Data decode task CPU request")
    ap.add_argument("--step-images-per-s", type=float, default=0.0,
                    help="training throughput of one GPU (images/s) to size the CPU feed for")
    ap.add_argument("--workdir", default=None, help="where the records go (default: a temp dir removed at exit)")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    if args.images * args.epochs < 2 * args.batch_size:
        ap.error(f"--images x --epochs ({args.images} x {args.epochs}) must give at least two batches of "
                 f"--batch-size {args.batch_size}: the steady rate is timed from the second batch on")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import ray
    import torch

    from mpformer_ray.data.pipeline import local_batches, stream_batches
    from mpformer_ray.data.stream import build_train_stream

    torch.set_num_threads(1)
    width, height = (int(v) for v in args.size.lower().split("x"))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mpformer-data-bench-"))
    if not args.workdir:
        atexit.register(shutil.rmtree, workdir, True)
    uri = make_records(workdir, args.images, height, width, args.cpus)

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = []
    for crop in args.crops:
        cfg = load_config("r50", ["data.augmentation=lsj", f"data.crop_size=[{crop},{crop}]", "data.min_scale=0.1",
                                  "data.max_scale=2.0", f"data.cpus_per_task={args.cpus_per_task}"])
        # all --epochs in one stream (it covers images [0, stop) and one epoch more), as training reads it
        ds = build_train_stream(uri, cfg, start=0, stop=(args.epochs - 1) * args.images)
        ray_run = timed(batch for _, batch in stream_batches(ds, args.batch_size))
        torch_run = timed(epochs(lambda e: local_batches(uri, cfg, args.batch_size, seed=0, epoch=e,
                                                         num_workers=args.cpus), args.epochs))
        for name, run in (("ray_data", ray_run), ("dataloader", torch_run)):
            run.update(pipeline=name, crop=crop, cpus=args.cpus, images_per_s_per_core=run["images_per_s"] / args.cpus)
            if args.step_images_per_s > 0:
                run["cores_per_gpu"] = args.step_images_per_s / run["images_per_s_per_core"]
            results.append(run)
    ray.shutdown()

    print(f"\n{args.images} images {width}x{height}, LSJ (scale 0.1-2.0), batch {args.batch_size}, {args.cpus} CPUs")
    head = f"{'crop':>6} {'pipeline':>11} {'images/s':>9} {'per core':>9} {'start s':>8} {'e2e img/s':>10} {'ray/dl':>7}"
    if args.step_images_per_s > 0:
        head += f" {'cores/GPU @ ' + format(args.step_images_per_s, 'g') + ' img/s':>22}"
    print(head)
    for run in results:
        peer = next(r for r in results if r["crop"] == run["crop"] and r["pipeline"] == "dataloader")
        ratio = run["images_per_s"] / peer["images_per_s"]
        run["ratio_to_dataloader"] = ratio
        line = (f"{run['crop']:>6} {run['pipeline']:>11} {run['images_per_s']:>9.1f} "
                f"{run['images_per_s_per_core']:>9.2f} {run['startup_s']:>8.1f} {run['end_to_end_images_per_s']:>10.1f}"
                f" {ratio:>7.2f}")
        if "cores_per_gpu" in run:
            line += f" {run['cores_per_gpu']:>22.1f}"
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "images": args.images, "size": [height, width], "batch_size": args.batch_size, "cpus": args.cpus,
            "cpus_per_task": args.cpus_per_task, "step_images_per_s": args.step_images_per_s, "results": results,
        }, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
