"""Images/s of batch prediction (Ray Data, 1 and 2 replicas) against the one-process loop, on the same images.

One run of each, in turn, on one set of synthetic photos and one checkpoint (random weights of the preset,
seed 0): ``jobs/predict.py IMAGES...`` (today's loop, in one process), then ``jobs/predict.py --input DIR
--replicas N`` for each N, each in a fresh process with its own local Ray and output folder. Reported per
run: wall seconds of the whole command (interpreter, Ray and replica start included), images/s over that,
images/s from the first image's result to the last (the batch runs' steady rate), peak RSS of the loop's
process and of each replica (``ru_maxrss``). On a GPU machine the replicas take one GPU each.

    python benchmarks/predict_batch.py                                    # tiny, 200 photos of 640x480
    python benchmarks/predict_batch.py --images 50 --replicas 1 2 --cpus-per-replica 0.5 --json out.json
    python benchmarks/predict_batch.py --images 4 --size 4000x3000 --replicas 1 --batch-size 2 --keep-all  # 12 MP
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from predict_memory import KEEP_ALL, photo  # noqa: E402

from mpformer_ray.config import load_config  # noqa: E402


def checkpoint(preset: str, run_dir: Path, overrides: list[str]) -> str:
    """Random-initialised weights of ``preset`` (seed 0; 6 synthetic classes) with ``overrides`` saved as a
    checkpoint."""
    import torch

    from mpformer_ray.model import build_model
    from mpformer_ray.train.checkpoint import Checkpoint, save_checkpoint

    cfg = load_config(preset, ["model.num_classes=6", "model.thing_classes=[0,1,2,3]", *overrides])
    torch.manual_seed(0)
    classes = [{"id": i, "name": f"class{i}", "isthing": i < 4, "source_id": i + 1} for i in range(6)]
    return save_checkpoint(Checkpoint(iteration=0, model=build_model(cfg).state_dict(), config=cfg.to_dict(),
                                      classes=classes), str(run_dir))


def loop(ckpt: str, images: list[Path], out: Path, threads: int) -> dict:
    """Today's path: one process, one image after another."""
    args = [sys.executable, str(ROOT / "jobs" / "predict.py"), "--checkpoint", ckpt, "--out", str(out), "--device",
            "cpu", *map(str, images)]
    start = time.perf_counter()
    proc = subprocess.Popen(args, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    stderr = proc.stderr.read()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"jobs/predict.py failed:\n{stderr[-2000:]}")
    return {"mode": "loop (1 process)", "seconds": seconds, "images_per_s": len(images) / seconds,
            "steady_images_per_s": None, "peak_rss_gib": [usage.ru_maxrss / 2**20]}


def batch(ckpt: str, folder: Path, out: Path, replicas: int, batch_size: int, cpus: float) -> dict:
    """``run_batch`` in a fresh process (``--child``), timed from outside."""
    args = [sys.executable, __file__, "--child", ckpt, str(folder), str(out), str(replicas), str(batch_size), str(cpus)]
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"batch prediction failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"mode": f"Ray Data, {replicas} replica(s)", "seconds": seconds,
            "images_per_s": summary["predicted"] / seconds, "steady_images_per_s": summary["steady_images_per_s"],
            "peak_rss_gib": sorted(v / 2**30 for v in summary["peak_rss"].values()),
            "gpus_per_replica": summary["gpus_per_replica"]}


def child(ckpt: str, folder: str, out: str, replicas: str, batch_size: str, cpus: str) -> None:
    from mpformer_ray.predict_batch import ModelSpec, Settings, run_batch

    summary = run_batch(folder, out, ModelSpec(checkpoint=ckpt, device="auto", threads=max(1, int(float(cpus)))),
                        Settings(replicas=int(replicas), batch_size=int(batch_size), cpus_per_replica=float(cpus)))
    if summary.failures:
        raise SystemExit(f"{len(summary.failures)} images failed: {summary.failures[:3]}")
    print(json.dumps({"predicted": summary.predicted, "steady_images_per_s": summary.steady_images_per_s,
                      "peak_rss": summary.peak_rss, "gpus_per_replica": summary.gpus_per_replica}))


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of the photos (default: %(default)s)")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the loop (default: %(default)s)")
    p.add_argument("--keep-all", action="store_true",
                   help="post-processing keeps every query (the worst case for memory, as predict_memory.py)")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="predict-batch-") as tmp:
        work = Path(tmp)
        folder = work / "photos"
        folder.mkdir()
        images = []
        for i in range(args.images):
            images.append(folder / f"photo_{i:04d}.jpg")
            photo(images[-1], width, height, seed=i)
        ckpt = checkpoint(args.preset, work / "run", KEEP_ALL if args.keep_all else [])
        print(f"{args.images} photos of {width}x{height}, preset {args.preset}"
              f"{', every query kept' if args.keep_all else ''}", flush=True)
        print(f"{'mode':<26} {'seconds':>8} {'images/s':>9} {'steady':>8}  peak RSS GiB", flush=True)
        runs = [("loop", None)] + [("batch", n) for n in args.replicas]
        for kind, n in runs:
            out = work / f"out-{kind}-{n}"
            row = (loop(ckpt, images, out, args.threads) if kind == "loop"
                   else batch(ckpt, folder, out, n, args.batch_size, args.cpus_per_replica))
            rows.append(row)
            steady = "-" if row["steady_images_per_s"] is None else f"{row['steady_images_per_s']:.2f}"
            print(f"{row['mode']:<26} {row['seconds']:8.1f} {row['images_per_s']:9.2f} {steady:>8}  "
                  f"{', '.join(f'{v:.2f}' for v in row['peak_rss_gib'])}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
