"""Convert released Mask2Former / MP-Former weights into this project's checkpoint format.

    python jobs/convert_checkpoint.py --from hf --src ./mask2former-swin-small-coco-panoptic \
        --config r50 --out checkpoints/m2f-swin-s-coco.pth
    python jobs/convert_checkpoint.py --from detectron2 --src s3://bucket/weights/model_final_94dc52.pkl \
        --config r50 --out s3://bucket/weights/m2f-r50-coco.pth

--from hf: a directory written by transformers' Mask2FormerForUniversalSegmentation.save_pretrained
(config.json + model.safetensors or pytorch_model.bin). --from detectron2: a facebookresearch/Mask2Former
or IDEA-Research/MP-Former .pkl / .pth. Sources and --out are local paths or s3:// URIs; nothing is
downloaded. The architecture (classes, queries, layers, widths, backbone) comes from the source; --config
and --set give the rest (attention heads for detectron2 files, training and data settings); --classes URI
(a split prepared from the dataset the source was trained on) gives the class names and thing / stuff flags
that evaluation and prediction use.

The output loads in jobs/evaluate.py / jobs/predict.py (--checkpoint) and starts a training run or sweep
as initial weights (--set model.weights=OUT). Printed: the fields taken from the source, every skipped
source tensor with the reason, the tensors initialised without a source, time and size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mpformer_ray.cli import job  # noqa: E402
from mpformer_ray.config import add_config_arguments, load_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="kind", required=True, choices=["hf", "detectron2"], help="source format")
    p.add_argument("--src", required=True, help="HF save_pretrained directory or detectron2 .pkl / .pth "
                                                "(local or s3://)")
    p.add_argument("--out", required=True, help="the converted .pth (local or s3://)")
    p.add_argument("--classes", default=None, metavar="URI",
                   help="a prepared split of the dataset the source was trained on (jobs/prepare_data.py --out): "
                        "its class names and thing / stuff flags go into the checkpoint (default: the source's "
                        "id2label, or class_<i>)")
    add_config_arguments(p)
    return p.parse_args(argv)


@job
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mpformer_ray.convert import convert, save
    from mpformer_ray.data.records import read_manifest

    cfg = load_config(args.config, args.overrides)
    classes = read_manifest(args.classes)["classes"] if args.classes else None
    conversion = convert(args.kind, args.src, cfg, classes=classes)
    size = save(conversion, args.out)
    for line in conversion.derived:
        print(f"from the source: {line}")
    for name, reason in conversion.skipped.items():
        print(f"skipped: {name}: {reason}")
    for name, how in conversion.initialised.items():
        print(f"initialised: {name}: {how}")
    used = len(conversion.checkpoint.model) - len(conversion.initialised)
    print(f"wrote {args.out}: {used} tensors from the source, {len(conversion.skipped)} skipped, "
          f"{len(conversion.initialised)} initialised; {size / 2**20:.1f} MiB in {conversion.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
