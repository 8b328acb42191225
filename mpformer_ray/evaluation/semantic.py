"""Semantic segmentation metrics from a K x K confusion matrix (detectron2's SemSegEvaluator).

Pixels whose ground truth is 255 are ignored. Prediction = argmax of the class scores.
mIoU averages the per-class IoU over the classes that occur in the ground truth or the
prediction of the evaluated images (a class predicted but never present scores IoU 0);
classes absent from both are left out, as detectron2 does: they are the NaN entries of
``per_class``, whose other entries average to the reported numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mpformer_ray.evaluation.arrays import check_size, to_numpy

IGNORE = 255


def gt_semantic_map(record: dict) -> np.ndarray:
    """Ground-truth label map uint8 [H, W] of a record: ``record["sem_seg"]`` when present, else
    painted from the segments (non-crowd -> category id; crowd and uncovered pixels -> 255)."""
    if record.get("sem_seg") is not None:
        return to_numpy(record["sem_seg"]).astype(np.uint8)
    height, width = record["image"].shape[:2]
    label = np.full((height, width), IGNORE, dtype=np.uint8)
    for seg in record["segments"]:
        if not seg["iscrowd"]:
            label[to_numpy(seg["mask"]).astype(bool)] = seg["category_id"]
    return label


def predicted_labels(scores: Any) -> np.ndarray:
    """Class scores float [K, H, W] (tensor or array) -> int64 [H, W] argmax labels."""
    if isinstance(scores, torch.Tensor):
        # argmax where the scores live: moves H*W ints to the host instead of K*H*W floats
        return scores.argmax(dim=0).cpu().numpy().astype(np.int64)
    return np.asarray(scores).argmax(axis=0).astype(np.int64)


class SemanticEvaluator:
    """Accumulates a confusion matrix ``[K, K]`` (rows = ground truth, columns = prediction)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)

    def process(self, gt: np.ndarray, scores: Any, where: str = "image") -> None:
        """gt: uint8 [H, W] (255 = ignore); scores: float [K, H, W] class scores, or the int [H, W] labels
        (their argmax) as compact_inference gives them."""
        check_size("sem_seg", scores, gt.shape, where)
        if scores.ndim == 2:
            pred = to_numpy(scores).astype(np.int64)
            if pred.size and not 0 <= pred.min() <= pred.max() < self.num_classes:
                raise ValueError(f"{where}: prediction 'sem_seg' has labels outside [0, {self.num_classes}), the "
                                 "dataset's classes; set model.num_classes to match the dataset")
        elif tuple(scores.shape[:1]) != (self.num_classes,):
            raise ValueError(f"{where}: prediction 'sem_seg' has {scores.shape[0]} classes, the dataset "
                             f"has {self.num_classes}; set model.num_classes to match the dataset")
        else:
            pred = predicted_labels(scores)
        gt = gt.astype(np.int64)
        valid = gt != IGNORE
        if (gt[valid] >= self.num_classes).any():
            raise ValueError(f"{where}: ground-truth sem_seg has labels >= {self.num_classes} other than 255; "
                             "the record does not match the dataset's classes")
        index = gt[valid] * self.num_classes + pred[valid]
        self.confusion += np.bincount(index, minlength=self.num_classes ** 2).reshape(self.num_classes, -1)

    def state(self) -> dict:
        return {"confusion": self.confusion.copy()}

    def merge(self, state: dict) -> None:
        self.confusion += np.asarray(state["confusion"], dtype=np.int64)

    def per_class(self) -> dict[str, np.ndarray]:
        """{"IoU", "Acc"}: float [K] in percent. IoU is NaN for a class neither in the ground truth nor
        predicted, Acc (the share of the class's pixels predicted as it) NaN for a class not in the ground
        truth; all NaN when no pixel was evaluated."""
        conf = self.confusion.astype(np.float64)
        tp = np.diag(conf)
        gt_pixels, pred_pixels = conf.sum(axis=1), conf.sum(axis=0)
        union = gt_pixels + pred_pixels - tp
        return {"IoU": np.where(union > 0, 100.0 * tp / np.where(union > 0, union, 1), np.nan),
                "Acc": np.where(gt_pixels > 0, 100.0 * tp / np.where(gt_pixels > 0, gt_pixels, 1), np.nan)}

    def evaluate(self) -> dict[str, float]:
        """{"sem_seg/mIoU", "sem_seg/fwIoU", "sem_seg/mAcc", "sem_seg/pAcc"} in percent (nan when
        no pixel was evaluated); mIoU and mAcc are the means of ``per_class``'s non-NaN entries."""
        conf = self.confusion.astype(np.float64)
        tp = np.diag(conf)
        gt_pixels = conf.sum(axis=1)
        total = gt_pixels.sum()
        if total == 0:
            return {f"sem_seg/{k}": float("nan") for k in ("mIoU", "fwIoU", "mAcc", "pAcc")}
        values = self.per_class()
        present, in_gt = ~np.isnan(values["IoU"]), ~np.isnan(values["Acc"])
        return {
            "sem_seg/mIoU": float(values["IoU"][present].mean()),
            "sem_seg/fwIoU": float((gt_pixels[present] / total * values["IoU"][present]).sum()),
            "sem_seg/mAcc": float(values["Acc"][in_gt].mean()),
            "sem_seg/pAcc": 100.0 * float(tp.sum() / total),
        }
