"""Checkpoint conversion figures: equivalence with Hugging Face's Mask2Former, conversion time and size.

    python benchmarks/convert_checkpoint.py                      # r50, swin_t, swin_b (all in the r50 head shape)
    python benchmarks/convert_checkpoint.py --backbones resnet50

For each backbone: an HF Mask2FormerForUniversalSegmentation with seeded random weights (133 classes, 100
queries, 6 encoder / 9 decoder layers; mpformer_ray.convert.reference) is saved with save_pretrained, then
converted with ``jobs/convert_checkpoint.py``'s library call (timed: reading, renaming, building and loading
our model; the write is timed separately), and both models run on the same normalised input in fp32: the
maximum absolute difference of every compared output is printed, with the .pth size. Needs transformers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mpformer_ray.config import config_from_dict, load_config  # noqa: E402
from mpformer_ray.convert import convert, save  # noqa: E402
from mpformer_ray.convert.reference import compare, hf_model  # noqa: E402
from mpformer_ray.model import build_model  # noqa: E402

# Swin: every stage's map larger than the window (see SwinBackbone's docstring)
SIZES = {"resnet50": (64, 96), "swin_t": (256, 256), "swin_s": (256, 256), "swin_b": (256, 256)}


def run(backbone: str, workdir: Path) -> dict:
    model = hf_model(backbone, seed=0)
    src = workdir / backbone
    model.save_pretrained(src)
    conversion = convert("hf", str(src), load_config("r50"))
    start = time.perf_counter()
    size = save(conversion, str(workdir / f"{backbone}.pth"))
    write_s = time.perf_counter() - start
    ours = build_model(config_from_dict(conversion.checkpoint.config))
    ours.load_state_dict(torch.load(workdir / f"{backbone}.pth", weights_only=True)["model"])
    images = torch.randn(1, 3, *SIZES[backbone], generator=torch.Generator().manual_seed(1))
    diffs = compare(model, ours.eval(), images)
    return {"backbone": backbone, "input": "x".join(map(str, SIZES[backbone])),
            "convert_s": round(conversion.seconds, 2), "write_s": round(write_s, 2),
            "size_mib": round(size / 2**20, 1), "tensors": len(conversion.checkpoint.model),
            "skipped": len(conversion.skipped), "initialised": len(conversion.initialised),
            **{f"maxdiff_{k}": float(f"{v:.2e}") for k, v in diffs.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["resnet50", "swin_t", "swin_b"])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in args.backbones:
            print(json.dumps(run(backbone, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
