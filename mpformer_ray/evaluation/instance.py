"""Instance segmentation AP with pycocotools' COCOeval (iouType="segm"), built in memory.

Per image only COCO RLEs are kept (ground truth: thing segments, crowd flag kept so COCOeval
ignores detections matched to crowd regions; detections: mask RLE, score, label), so worker
states stay small and merge by concatenation. Categories are the thing classes only, by
contiguous id; detections labelled with a stuff class are dropped (a panoptic model's
"instances" output should not contain them, and COCO evaluates things only).

Per-class AP is the mean of COCOeval's precision array (IoU thresholds x recall points, all areas,
100 detections) for that class; a class without non-crowd ground truth has none (NaN). Every other
class has the same number of entries, so the reported AP, the mean of all entries, is the mean of
the per-class APs; it is computed as that mean, so the two agree exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pycocotools.coco
import pycocotools.cocoeval
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mpformer_ray.evaluation.arrays import check_size, to_numpy

# COCOeval.stats indices of the six numbers detectron2 reports as segm/AP*
_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def encode(mask: np.ndarray) -> dict:
    """bool [H, W] -> compressed COCO RLE {"size", "counts": bytes}."""
    return mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))


def encode_many(masks: np.ndarray) -> list[dict]:
    """bool [Q, H, W] -> Q compressed RLEs (one pycocotools call for all of them)."""
    if len(masks) == 0:
        return []
    return mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


@contextlib.contextmanager
def quiet_pycocotools() -> Iterator[None]:
    """Silence pycocotools' progress prints. Shadowing ``print`` in its modules (rather than
    redirecting stdout) also works inside Ray Train workers, whose patched ``print`` copies
    every call into the log even while stdout is redirected."""
    modules = (pycocotools.coco, pycocotools.cocoeval)
    for module in modules:
        module.print = lambda *args, **kwargs: None
    try:
        yield
    finally:
        for module in modules:
            del module.print


class InstanceEvaluator:
    """Per-image RLEs of ground truth and detections; ``evaluate`` runs COCOeval over all images."""

    def __init__(self, thing_ids: list[int]):
        self.thing_ids = sorted(int(c) for c in thing_ids)
        self.images: dict[int, dict] = {}
        self._result: tuple[dict[str, float], np.ndarray] | None = None  # COCOeval's, until more images come

    def process(self, image_id: int, size: tuple[int, int], segments: list[dict], instances: dict,
                where: str = "image") -> None:
        """segments: the record's [{"category_id", "iscrowd", "mask": bool [H, W]}];
        instances: {"masks": bool [Q, H, W], "scores": float [Q], "labels": int64 [Q]}, or with "rles"
        (Q COCO RLEs, as compact_inference gives them) in place of "masks"."""
        form = "rles" if "rles" in instances else "masks"
        missing = {form, "scores", "labels"} - set(instances)
        if missing:
            raise ValueError(f"{where}: prediction 'instances' lacks {sorted(missing)}; expected "
                             "{'masks': bool [Q, H, W], 'scores': float [Q], 'labels': int64 [Q]}")
        scores = to_numpy(instances["scores"]).astype(np.float64).reshape(-1)
        labels = to_numpy(instances["labels"]).astype(np.int64).reshape(-1)
        things = set(self.thing_ids)
        keep = np.array([int(c) in things for c in labels], dtype=bool)
        if form == "rles":
            rles = list(instances["rles"])
            sizes = sorted({tuple(r["size"]) for r in rles} - {tuple(size)})
            if sizes:
                raise ValueError(f"{where}: prediction 'instances.rles' has spatial sizes {sizes} but the ground truth "
                                 f"is {tuple(size)}; resize predictions to the original image resolution before "
                                 "evaluating")
            shape: tuple = (len(rles), *size)
        else:
            masks = to_numpy(instances["masks"]).astype(bool)
            shape = masks.shape
        if len(shape) != 3 or not shape[0] == len(scores) == len(labels):
            raise ValueError(f"{where}: prediction 'instances' has masks {shape}, scores {scores.shape}, "
                             f"labels {labels.shape}; expected [Q, H, W], [Q], [Q]")
        if form == "masks":
            check_size("instances.masks", masks, size, where)
            rles = encode_many(masks[keep])
        else:
            rles = [r for r, k in zip(rles, keep) if k]
        gts = [{"category_id": int(s["category_id"]), "iscrowd": int(bool(s["iscrowd"])), "rle": encode(to_numpy(s["mask"]))}
               for s in segments if int(s["category_id"]) in things]
        dts = [{"category_id": int(c), "score": float(s), "rle": r}
               for c, s, r in zip(labels[keep], scores[keep], rles)]
        self.images[int(image_id)] = {"size": [int(size[0]), int(size[1])], "gt": gts, "dt": dts}
        self._result = None

    def state(self) -> dict:
        return {"images": dict(self.images)}

    def merge(self, state: dict) -> None:
        self.images.update(state["images"])
        self._result = None

    def _coco(self, kind: str) -> COCO:
        images, anns = [], []
        for image_id, im in sorted(self.images.items()):
            images.append({"id": image_id, "height": im["size"][0], "width": im["size"][1]})
            for a in im[kind]:
                ann = {"id": len(anns) + 1,  # COCOeval treats id 0 as "unmatched": ids start at 1
                       "image_id": image_id, "category_id": a["category_id"], "segmentation": a["rle"],
                       "area": float(mask_util.area(a["rle"])), "bbox": list(mask_util.toBbox(a["rle"])),
                       "iscrowd": a.get("iscrowd", 0)}
                if kind == "dt":
                    ann["score"] = a["score"]
                anns.append(ann)
        coco = COCO()
        coco.dataset = {"images": images, "annotations": anns,
                        "categories": [{"id": c, "name": str(c)} for c in self.thing_ids]}
        with quiet_pycocotools():
            coco.createIndex()
        return coco

    def _run(self) -> tuple[dict[str, float], np.ndarray]:
        """(the metrics, per-class AP float [len(thing_ids)] in percent), from one COCOeval run per state."""
        if self._result is not None:
            return self._result
        has_gt = any(not a["iscrowd"] for im in self.images.values() for a in im["gt"])
        if not has_gt:
            self._result = ({f"segm/{k}": float("nan") for k in _STAT_NAMES}, np.full(len(self.thing_ids), np.nan))
            return self._result
        gt, dt = self._coco("gt"), self._coco("dt")
        evaluator = COCOeval(gt, dt, iouType="segm")
        with quiet_pycocotools():
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        # precision [IoU thresholds, recall points, classes (thing_ids order), areas, max detections]: the
        # entries of stats[0] are area "all" (index 0) at 100 detections (the last); -1 marks a class without
        # ground truth, which has no entry at all
        precision = evaluator.eval["precision"][:, :, :, 0, -1]
        per_class = np.array([100.0 * float(p[p > -1].mean()) if (p > -1).any() else np.nan
                              for p in precision.transpose(2, 0, 1)])
        metrics = {f"segm/{k}": (100.0 * float(v) if v >= 0 else float("nan"))
                   for k, v in zip(_STAT_NAMES, evaluator.stats[:6])}
        metrics["segm/AP"] = float(per_class[~np.isnan(per_class)].mean())  # = stats[0] (module docstring)
        self._result = (metrics, per_class)
        return self._result

    def per_class(self) -> dict[str, np.ndarray]:
        """{"AP": float [len(thing_ids)] in percent, in ``thing_ids`` order}; NaN for a class without
        non-crowd ground truth (left out of the mean, ``segm/AP``)."""
        return {"AP": self._run()[1]}

    def evaluate(self) -> dict[str, float]:
        """{"segm/AP", "segm/AP50", "segm/AP75", "segm/APs", "segm/APm", "segm/APl"} in percent;
        nan where COCOeval has nothing to average (no non-crowd thing instance, or none in a size range)."""
        return dict(self._run()[0])
