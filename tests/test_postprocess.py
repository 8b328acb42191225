"""compact_inference (prediction and evaluation) against the straightforward post-processing at the output
resolution (resize_masks + semantic / panoptic / instance inference), on seeded random decoder outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from mpformer_ray.model.postprocess import (
    column_bands,
    compact_inference,
    instance_inference,
    panoptic_inference,
    resize_masks,
    semantic_inference,
)

# (queries, classes, mask [h, w], padded input, image region, output size): upsampled, downsampled in one
# side, unchanged, and a photo-like 4x upsampling with COCO's class count
CASES = [
    (16, 6, (32, 32), (128, 128), (128, 96), (300, 451)),
    (20, 133, (16, 24), (64, 96), (60, 90), (517, 389)),
    (8, 6, (25, 20), (100, 80), (100, 80), (100, 80)),
    (12, 19, (20, 30), (80, 120), (77, 120), (60, 333)),
]


def _outputs(num_queries: int, num_classes: int, mask_hw: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder-like outputs: class logits [Q, K+1] that keep most queries, mask logits [Q, h, w] that are
    positive on a noisy blob of each query (so segments overlap and compete) and negative elsewhere."""
    g = torch.Generator().manual_seed(seed)
    mask_cls = torch.randn(num_queries, num_classes + 1, generator=g) * 3
    mask_cls[:, -1] -= 2  # "no object" less likely, so panoptic keeps segments
    h, w = mask_hw
    ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    centre, radius = torch.rand(num_queries, 2, 1, 1, generator=g), 0.1 + 0.3 * torch.rand(num_queries, 1, 1, generator=g)
    distance = ((ys - centre[:, 0]) ** 2 + (xs - centre[:, 1]) ** 2).sqrt() / radius
    mask_pred = 6 * (1 - distance) + torch.randn(num_queries, h, w, generator=g)
    return mask_cls, mask_pred


def _reference_panoptic(mask_cls: torch.Tensor, mask_pred: torch.Tensor, thing_ids: set[int],
                        object_mask_threshold: float, overlap_threshold: float) -> tuple[torch.Tensor, list[dict]]:
    """Mask2Former's panoptic inference written out plainly (the loop the library had before issue 17)."""
    scores, labels = mask_cls.softmax(-1).max(-1)
    keep = labels.ne(mask_cls.shape[-1] - 1) & (scores > object_mask_threshold)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], mask_pred.sigmoid()[keep]
    panoptic = torch.zeros(mask_pred.shape[-2:], dtype=torch.int32)
    segments: list[dict] = []
    if len(cur_masks) == 0:
        return panoptic, segments
    owner = (cur_scores[:, None, None] * cur_masks).argmax(0)
    stuff_ids: dict[int, int] = {}
    for k in range(len(cur_classes)):
        category, isthing = int(cur_classes[k]), int(cur_classes[k]) in thing_ids
        mask = (owner == k) & (cur_masks[k] >= 0.5)
        mask_area, original_area = int(mask.sum()), int((cur_masks[k] >= 0.5).sum())
        if mask_area == 0 or original_area == 0 or mask_area / original_area < overlap_threshold:
            continue
        if not isthing and category in stuff_ids:
            panoptic[mask] = stuff_ids[category]
            continue
        segments.append({"id": len(segments) + 1, "category_id": category, "isthing": isthing,
                         "score": float(cur_scores[k])})
        if not isthing:
            stuff_ids[category] = len(segments)
        panoptic[mask] = len(segments)
    return panoptic, segments


@pytest.mark.parametrize("case", range(len(CASES)))
def test_compact_inference_equals_full_resolution_inference(case):
    num_queries, num_classes, mask_hw, padded, image, out = CASES[case]
    mask_cls, mask_pred = _outputs(num_queries, num_classes, mask_hw, seed=case)
    things = set(range(0, num_classes, 2))
    # small budgets: many groups and bands, so every boundary is crossed
    compact = compact_inference(mask_cls, mask_pred, padded, image, out, things, object_mask_threshold=0.2,
                                overlap_threshold=0.5, max_detections=30, group_bytes=200_000, band_bytes=1)
    full = resize_masks(mask_pred, padded, image, out)

    sem = semantic_inference(mask_cls, full)
    assert compact["sem_seg_labels"].shape == out
    assert torch.equal(compact["sem_seg_labels"], sem.argmax(0).to(torch.int32))

    ids, segments = _reference_panoptic(mask_cls, full, things, 0.2, 0.5)
    assert len(segments) > 1, "the case keeps segments"
    assert torch.equal(compact["panoptic"][0], ids)
    assert compact["panoptic"][1] == segments
    assert torch.equal(panoptic_inference(mask_cls, full, things, 0.2, 0.5)[0], ids)
    assert panoptic_inference(mask_cls, full, things, 0.2, 0.5)[1] == segments

    ref = instance_inference(mask_cls, full, things, 30)
    got = compact["instances"]
    assert torch.equal(got["labels"], ref["labels"]) and len(got["rles"]) == len(ref["labels"]) > 0
    masks = np.stack([mask_util.decode(r) for r in got["rles"]]).astype(bool)
    assert np.array_equal(masks, ref["masks"].numpy())
    # the mean mask probability is summed band by band: equal up to float32 rounding
    torch.testing.assert_close(got["scores"], ref["scores"], rtol=1e-5, atol=1e-7)


def test_column_bands_are_resize_masks_bit_for_bit():
    mask_cls, mask_pred = _outputs(10, 6, (24, 40), seed=7)
    full = resize_masks(mask_pred, (96, 160), (90, 150), (211, 377))
    seen = 0
    for x0, x1, logits in column_bands(mask_pred, (96, 160), (90, 150), (211, 377), band=16, group_bytes=100_000):
        assert x0 == seen and logits.shape == (10, x1 - x0, 211)
        assert torch.equal(logits, full[:, :, x0:x1].transpose(1, 2))
        seen = x1
    assert seen == 377


def test_compact_inference_without_kept_queries_or_tasks():
    mask_cls, mask_pred = _outputs(6, 4, (16, 16), seed=3)
    out = compact_inference(mask_cls, mask_pred, (64, 64), (64, 64), (40, 50), {0, 1}, object_mask_threshold=1.0,
                            semantic=False, instance=False)
    assert set(out) == {"panoptic"}
    ids, segments = out["panoptic"]
    assert segments == [] and ids.shape == (40, 50) and ids.dtype == torch.int32 and not ids.any()


def test_evaluation_metrics_equal_with_compact_predictions(synthetic_coco, tmp_path):
    from mpformer_ray.config import load_config, with_classes
    from mpformer_ray.data.coco import convert_coco
    from mpformer_ray.data.records import read_manifest, read_records
    from mpformer_ray.data.transforms import eval_transform, normalize
    from mpformer_ray.evaluation.evaluator import Evaluator
    from mpformer_ray.model import build_model

    val = str(tmp_path / "val")
    convert_coco(str(synthetic_coco), "val", val, task="panoptic", shard_size=4, num_workers=1, progress=False)
    classes = read_manifest(val)["classes"]
    cfg = with_classes(load_config("tiny", ["model.test.object_mask_threshold=0.1",
                                            "model.test.overlap_threshold=0.3"]), classes)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    evaluators = {form: Evaluator(classes, {"panoptic"}) for form in ("full", "compact")}
    for record in read_records(val):
        image, original_hw = eval_transform(record, cfg.data)
        images = normalize(torch.tensor(image)[None])
        with torch.no_grad():
            raw = model.forward_raw(images)
        padded = tuple(model.pad(images)[0].shape[-2:])
        for form, evaluator in evaluators.items():
            prediction = model.postprocess(raw, image.shape[:2], padded, [image.shape[:2]], [original_hw],
                                           compact=form == "compact")[0]
            evaluator.process(record, prediction)
    full, compact = (evaluators[f].evaluate() for f in ("full", "compact"))
    assert full.keys() == compact.keys() and {"panoptic/PQ", "segm/AP", "sem_seg/mIoU"} <= full.keys()
    for key, value in full.items():
        assert compact[key] == pytest.approx(value, abs=1e-9, nan_ok=True), key


PEAK_RSS = """
import resource, sys, numpy as np, torch
from mpformer_ray.config import load_config, with_classes
from mpformer_ray.data.synthetic import SYNTHETIC_CLASSES
from mpformer_ray.model import build_model
from mpformer_ray.predict import predict
torch.manual_seed(0)
cfg = with_classes(load_config("tiny", ["model.num_queries=100", "data.test_short_side=256", "data.test_max_size=400"]),
                   SYNTHETIC_CLASSES)
model = build_model(cfg).eval()
image = np.random.default_rng(0).integers(0, 256, (1500, 2000, 3), dtype=np.uint8)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = predict(model, image, cfg)
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_predict_memory_grows_by_a_few_bytes_per_pixel():
    """3 MP through a 100-query model: holding every query's float mask at full resolution raised the
    peak by 6.3 GB (issue 17); the compact post-processing's bands and groups by about 0.5 GB."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS], cwd=root, capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    before_kb, peak_kb = map(int, proc.stdout.split())
    assert (peak_kb - before_kb) / 2**20 < 1.0, f"predict raised peak RSS by {(peak_kb - before_kb) / 2**20:.2f} GB"
