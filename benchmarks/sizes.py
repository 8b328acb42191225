"""Sizes the scaling plan (docs/scaling.md) works from: a preset's parameters, the gradient bytes DDP
all-reduces every step, the checkpoint the training loop saves (model + AdamW + schedule state), and the
bytes per image of prepared records (a split's URI, or synthetic COCO-like 640x480 scenes).

    python benchmarks/sizes.py --config r50 --records 64                   # synthetic records
    python benchmarks/sizes.py --config r50 --data s3://bucket/coco/panoptic-train

No Ray and no GPU: the model is built on the CPU and one optimizer step (zero gradients) creates
AdamW's state, as after the first training step.
"""

from __future__ import annotations

import argparse
import io
import json
import posixpath
import shutil
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mpformer_ray import storage  # noqa: E402
from mpformer_ray.config import load_config  # noqa: E402
from mpformer_ray.data.records import read_manifest  # noqa: E402
from mpformer_ray.model import build_model  # noqa: E402
from mpformer_ray.train.optim import build_optimizer, build_scheduler  # noqa: E402


def model_sizes(preset: str, num_classes: int) -> dict:
    cfg = load_config(preset, [f"model.num_classes={num_classes}"])  # presets take their classes from the data
    torch.manual_seed(0)
    model = build_model(cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    scheduler.step()
    checkpoint, weights = io.BytesIO(), io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, checkpoint)
    torch.save(model.state_dict(), weights)
    return {
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "trainable_params_m": sum(p.numel() for p in trainable) / 1e6,
        # DDP all-reduces every trainable parameter's gradient, in the parameter's dtype
        "grad_mib_per_step": sum(p.numel() * p.element_size() for p in trainable) / 2**20,
        "checkpoint_mib": checkpoint.tell() / 2**20,
        "weights_mib": weights.tell() / 2**20,
    }


def record_sizes(uri: str) -> dict:
    """Bytes per image over all shards; image bytes, segments per image and RLE bytes per segment
    from the first shard."""
    manifest = read_manifest(uri)
    fs, root = storage.resolve(uri)
    shards = [s for s in manifest["shards"] if s["num_images"] > 0]
    paths = [posixpath.join(root, s["file"]) for s in shards]
    total = sum(info.size for info in fs.get_file_info(paths))
    first = pq.read_table(paths[0], filesystem=fs, columns=["image", "segments"])
    segments = first.column("segments").to_pylist()
    num_segments = sum(len(s) for s in segments)
    return {
        "images": sum(s["num_images"] for s in shards),
        "record_kib_per_image": total / sum(s["num_images"] for s in shards) / 1024,
        "image_kib_per_image": sum(len(b) for b in first.column("image").to_pylist()) / first.num_rows / 1024,
        "segments_per_image": num_segments / first.num_rows,
        "rle_bytes_per_segment": sum(len(x["rle"]) for s in segments for x in s) / max(num_segments, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="r50", help="preset or YAML whose model is measured")
    ap.add_argument("--num-classes", type=int, default=133, help="the dataset's classes (default: COCO panoptic's)")
    ap.add_argument("--data", default=None, help="prepared split (local or s3://) whose records are measured")
    ap.add_argument("--records", type=int, default=64, help="else: this many synthetic 640x480 records")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()

    out = {"model": model_sizes(args.config, args.num_classes)}
    if args.data:
        out["records"] = record_sizes(args.data)
    else:
        from data_pipeline import make_records  # the input-pipeline benchmark's records

        workdir = Path(tempfile.mkdtemp(prefix="sizes-"))
        try:
            out["records"] = {"source": "synthetic 640x480 JPEG (quality 90)",
                              **record_sizes(make_records(workdir, args.records, 480, 640, 1))}
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
