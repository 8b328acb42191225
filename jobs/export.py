"""Export a checkpoint's inference graph to ONNX, checked against PyTorch before it is written.

    python jobs/export.py --checkpoint runs/tiny-synthetic --format onnx --out model.onnx
    python jobs/export.py --checkpoint s3://bucket/runs/r50 --out s3://bucket/models/r50.onnx --size 800x1216
    python jobs/predict.py --onnx model.onnx --out predictions/ photo.jpg    # the same post-processing

The graph takes normalised images float32 [B, 3, H, W] padded to multiples of model.size_divisibility (32)
and gives the final decoder layer's class logits [B, Q, K+1] and mask logits [B, Q, H/4, W/4]; B, H and W
are dynamic (--size is only the size it is traced at). ONNX opset 17. Resizing, normalisation, padding and
the post-processing stay in Python (jobs/predict.py --onnx), and the file's metadata holds the checkpoint's
config and classes. Before writing, ONNX Runtime runs the file at --size and at another size (batch 2);
the largest difference from PyTorch per output is printed as JSON on stdout, and more than 1e-3 fails.
Needs the optional packages: pip install -e '.[export]'.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mpformer_ray.cli import job  # noqa: E402
from mpformer_ray.config import add_override_argument  # noqa: E402


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH, e.g. 256x320; got {text!r}") from None
    return h, w


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint .pth file or run directory (its latest checkpoint); local or s3://")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default: %(default)s)")
    p.add_argument("--out", required=True, help="the file to write, local or s3://")
    p.add_argument("--size", type=_size, default=(256, 320),
                   help="HEIGHTxWIDTH the graph is traced at, multiples of 32 (default: 256x320); any size runs")
    add_override_argument(p, of="the checkpoint's config (model.test.* and data.test_* travel in the file)")
    return p.parse_args(argv)


@job
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mpformer_ray.export import OPSET, export_onnx
    from mpformer_ray.predict import load_for_inference

    model, cfg, classes = load_for_inference(args.checkpoint, args.overrides, "cpu")
    report = export_onnx(model, cfg, classes, args.out, size=args.size)
    print(json.dumps(dataclasses.asdict(report), indent=1))
    print(f"wrote {report.uri} ({report.bytes / 2**20:.1f} MiB, opset {OPSET}, dynamic batch / height / width)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
