"""Peak memory (RSS) and wall time of ``jobs/predict.py`` against the photo's size.

Each measurement is one real run of the job in its own process (``os.wait4`` gives that child's peak
RSS): random-initialised weights of the preset saved as a checkpoint, one synthetic JPEG of the given
size, ``--device cpu``, every output written. By default the post-processing keeps every query
(``model.test.object_mask_threshold=0`` and ``overlap_threshold=0``): an untrained model's scores
would otherwise keep no panoptic segment, and the worst case is the one to bound. The table gives,
per preset and size, megapixels, peak RSS and seconds; per preset the slope between the smallest and
largest photo (GB per megapixel) and the intercept (the interpreter, torch and the model).

    python benchmarks/predict_memory.py                                  # tiny and r50, 3 MP and 12 MP
    python benchmarks/predict_memory.py --presets tiny --sizes 2000x1500 4000x3000 --json out.json
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

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mpformer_ray.config import load_config, with_classes  # noqa: E402
from mpformer_ray.model import build_model  # noqa: E402
from mpformer_ray.train.checkpoint import Checkpoint, save_checkpoint  # noqa: E402

KEEP_ALL = ["model.test.object_mask_threshold=0.0", "model.test.overlap_threshold=0.0"]
# presets take their classes from the data: those each preset was measured with (the synthetic set's, COCO's)
NUM_CLASSES = {"tiny": 6, "r50": 133}


def photo(path: Path, width: int, height: int, seed: int = 0) -> None:
    """A smooth synthetic photo (blurred colour noise: JPEG-compressible like a real one)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (height // 50 + 2, width // 50 + 2, 3), dtype=np.uint8))
    image = np.asarray(small.resize((width, height), Image.BICUBIC)).astype(np.int16)
    image += rng.integers(-8, 9, image.shape, dtype=np.int16)  # sensor-like grain
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(path, format="JPEG", quality=90)


def checkpoint(preset: str, run_dir: Path) -> str:
    """Random-initialised weights of ``preset`` (seed 0) saved as a training checkpoint."""
    k = NUM_CLASSES.get(preset, 133)
    classes = [{"id": i, "name": f"class{i}", "isthing": i < max(1, k * 3 // 5), "source_id": i + 1} for i in range(k)]
    cfg = with_classes(load_config(preset), classes)
    torch.manual_seed(0)
    model = build_model(cfg)
    return save_checkpoint(Checkpoint(iteration=0, model=model.state_dict(), config=cfg.to_dict(), classes=classes),
                           str(run_dir))


def measure(ckpt: str, image: Path, out: Path, overrides: list[str], threads: int) -> tuple[float, float]:
    """(peak RSS in GB, seconds) of one ``jobs/predict.py`` run."""
    args = [sys.executable, str(ROOT / "jobs" / "predict.py"), "--checkpoint", ckpt, "--out", str(out),
            "--device", "cpu", str(image)]
    for setting in overrides:
        args += ["--set", setting]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    stderr = proc.stderr.read()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"jobs/predict.py failed on {image.name}:\n{stderr[-2000:]}")
    return usage.ru_maxrss / 2**20, seconds  # ru_maxrss is in KiB on Linux


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "r50"])
    p.add_argument("--sizes", nargs="+", default=["2000x1500", "4000x3000"], help="WIDTHxHEIGHT photos")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the job (default: %(default)s)")
    p.add_argument("--defaults", action="store_true", help="the checkpoint's thresholds instead of keeping every query")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    sizes = sorted((tuple(int(v) for v in s.split("x")) for s in args.sizes), key=lambda wh: wh[0] * wh[1])
    rows = []
    with tempfile.TemporaryDirectory(prefix="predict-memory-") as tmp:
        work = Path(tmp)
        images = []
        for width, height in sizes:
            images.append(work / f"photo_{width}x{height}.jpg")
            photo(images[-1], width, height)
        print(f"{'preset':<6} {'size':>10} {'MP':>6} {'peak RSS GB':>12} {'seconds':>8}", flush=True)
        for preset in args.presets:
            ckpt = checkpoint(preset, work / f"run-{preset}")
            for (width, height), image in zip(sizes, images):
                gb, seconds = measure(ckpt, image, work / "out", [] if args.defaults else KEEP_ALL, args.threads)
                rows.append({"preset": preset, "width": width, "height": height, "megapixels": width * height / 1e6,
                             "peak_rss_gb": gb, "seconds": seconds})
                print(f"{preset:<6} {f'{width}x{height}':>10} {width * height / 1e6:6.1f} {gb:12.2f} {seconds:8.1f}",
                      flush=True)
    for preset in args.presets:
        mine = [r for r in rows if r["preset"] == preset]
        if len(mine) > 1:
            small, large = mine[0], mine[-1]
            slope = (large["peak_rss_gb"] - small["peak_rss_gb"]) / (large["megapixels"] - small["megapixels"])
            print(f"{preset}: {slope:.3f} GB per megapixel, intercept {small['peak_rss_gb'] - slope * small['megapixels']:.2f} GB")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
