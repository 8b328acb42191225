"""Conversion throughput of your own data's formats against the COCO 2017 layout (issue 26).

The same ``--num`` synthetic scenes (square, ``--size`` px, JPEG quality 95, one seed) are written three
times: in the COCO 2017 layout (``synthetic.write_coco_layout``), as a labelling tool's instances export
(``synthetic_exports.write_instance_export``: nested folders, spaces in names, sparse category ids, polygons
in two parts, both RLE forms, crowds) and as folders of label PNGs (``write_label_folders``). Then
``mpformer_ray.data.prepare.prepare`` (what ``jobs/prepare_data.py`` runs) converts:

    instance   --annotations / --images on the export        vs  --root / --split on the COCO layout
    semantic   --dataset folder --images / --masks / --classes  vs  --root / --split, task semantic (panoptic PNGs)

from local disk to local disk, and from a moto S3 server (started here on 127.0.0.1, stopped by its pid) to
it. Each conversion runs ``--repeats`` times into a fresh output (deleted after it), the two paths in the order
A B, B A, A B, ... (a drift of the machine's speed hits both alike), after one
untimed conversion of each path on 4 images (imports); the figure is the median images/s (listing, JSON
parsing and the worker pool's start included) and the generic path's ratio to COCO's.

    python benchmarks/own_data.py --num 2000 --size 256 --workers 2 --json own_data.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mpformer_ray import storage  # noqa: E402
from mpformer_ray.data.prepare import Source, prepare  # noqa: E402
from mpformer_ray.data.synthetic import split_seed, write_coco_layout  # noqa: E402
from mpformer_ray.data.synthetic_exports import write_instance_export, write_label_folders  # noqa: E402


def sources(work: Path, num: int, size: int, seed: int) -> dict[str, dict]:
    """The three layouts of the same scenes, as ``prepare`` arguments per (task, path)."""
    write_coco_layout(work / "coco", "train", num, size, seed)
    scenes = split_seed(seed, "train")  # the COCO layout's generator seed: the same pictures
    export = write_instance_export(work / "export", num, size, size, scenes, extensions=("jpg",))
    folder = write_label_folders(work / "folder", num, size, size, scenes, extensions=("jpg",))
    return {
        ("instance", "generic"): dict(dataset="coco", task="instance", source=Source(**export)),
        ("instance", "coco2017"): dict(dataset="coco", task="instance", source=Source(root=str(work / "coco"))),
        ("semantic", "generic"): dict(dataset="folder", task="semantic", source=Source(**folder)),
        ("semantic", "coco2017"): dict(dataset="coco", task="semantic", source=Source(root=str(work / "coco"))),
    }


def on_s3(local: dict, work: Path, bucket: str) -> dict:
    """The same sources uploaded under ``s3://bucket/`` (paths relative to ``work`` kept)."""
    files = [p for p in sorted(work.rglob("*")) if p.is_file()]
    with ThreadPoolExecutor(8) as pool:  # one PUT at a time would take most of the run
        list(pool.map(lambda p: storage.write_bytes(f"s3://{bucket}/{p.relative_to(work).as_posix()}",
                                                    p.read_bytes()), files))

    def remote(value: str | None) -> str | None:
        return value and f"s3://{bucket}/{Path(value).relative_to(work).as_posix()}"

    out = {}
    for key, spec in local.items():
        s = spec["source"]
        out[key] = dict(spec, source=Source(root=remote(s.root), annotations=remote(s.annotations),
                                            images=remote(s.images), masks=remote(s.masks),
                                            classes=remote(s.classes)))
    return out


def convert(spec: dict, out: str, workers: int) -> tuple[float, int]:
    """(seconds, images written) of one conversion into the fresh ``out``."""
    start = time.perf_counter()
    manifests = prepare(spec["dataset"], spec["source"], out, task=spec["task"], num_workers=workers,
                        progress=False)
    seconds = time.perf_counter() - start
    return seconds, sum(m["num_images"] for m in manifests.values())


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            return proc, endpoint
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"moto server did not start on {endpoint}") from None
            time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=2000, help="images per layout")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--workers", type=int, default=2, help="conversion processes (prepare_data.py --workers)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="conversions per path and store, in the order A B, B A, A B, ... (even: balanced)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--s3-num", type=int, default=None,
                    help="images per layout on S3 (default: --num; the moto server takes about 10 ms a request)")
    ap.add_argument("--no-s3", action="store_true", help="local disk only")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="own-data-bench-"))
    moto = None
    try:
        start = time.perf_counter()
        stores = {"local": sources(work / "src", args.num, args.size, args.seed)}
        print(f"generated {args.num} scenes in 3 layouts in {time.perf_counter() - start:.0f} s", flush=True)
        if not args.no_s3:
            import boto3

            moto, endpoint = start_moto()
            os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                              AWS_REGION="us-east-1")
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
            start = time.perf_counter()
            s3_num = args.s3_num or args.num
            local = stores["local"] if s3_num == args.num else sources(work / "s3-src", s3_num, args.size, args.seed)
            stores["s3"] = on_s3(local, work / ("src" if s3_num == args.num else "s3-src"), "bench")
            print(f"uploaded to moto in {time.perf_counter() - start:.0f} s", flush=True)
        # imports and first-use costs of each path, paid once here rather than in the first timed run
        for spec in sources(work / "warmup", 4, 32, args.seed).values():
            convert(spec, str(work / "warmup-out" / f"{spec['dataset']}-{spec['task']}"), 1)
        rows = []
        for store, specs in stores.items():
            for task in ("instance", "semantic"):
                rates: dict[str, list[float]] = {"generic": [], "coco2017": []}
                for repeat in range(args.repeats):
                    for path in ("generic", "coco2017") if repeat % 2 == 0 else ("coco2017", "generic"):
                        out = (f"s3://bench/out/{task}-{path}-{repeat}" if store == "s3"
                               else str(work / "out" / f"{task}-{path}-{repeat}"))
                        seconds, images = convert(specs[(task, path)], out, args.workers)
                        assert images == (args.num if store == "local" else s3_num), (task, path, images)
                        storage.delete(out)  # moto keeps objects in memory: let it not grow over the runs
                        rates[path].append(images / seconds)
                        print(f"{store} {task} {path} #{repeat}: {images / seconds:.1f} images/s", flush=True)
                generic, coco = (statistics.median(rates[p]) for p in ("generic", "coco2017"))
                rows.append({"store": store, "task": task, "images": images, "generic_images_per_s": generic,
                             "coco2017_images_per_s": coco, "ratio": generic / coco,
                             "runs": {p: [round(r, 1) for r in v] for p, v in rates.items()}})
        print(f"\n{'store':<6} {'task':<9} {'images':>6} {'generic':>9} {'coco2017':>9} {'ratio':>6}   (images/s, "
              f"median of {args.repeats}; {args.size}^2 images, {args.workers} workers)")
        for r in rows:
            print(f"{r['store']:<6} {r['task']:<9} {r['images']:6d} {r['generic_images_per_s']:9.1f} "
                  f"{r['coco2017_images_per_s']:9.1f} {r['ratio']:6.2f}")
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
