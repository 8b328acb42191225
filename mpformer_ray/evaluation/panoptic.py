"""Panoptic quality (PQ, SQ, RQ), following panopticapi's ``pq_compute_single_core``.

Per image: a predicted and a ground-truth segment of the same category match when their
IoU > 0.5, where the union leaves out the predicted pixels on ground-truth void. Unmatched
non-crowd ground truth is a false negative; an unmatched prediction is a false positive
unless more than half of it lies on void or on crowd regions of its own category. Crowd
ground truth never matches. Per class PQ = sum IoU / (TP + FP/2 + FN/2) = SQ * RQ; the
reported numbers average over the classes that have any TP, FP or FN (all / things / stuff),
which are the classes whose ``per_class`` values are not NaN. Only the per-class sums are kept,
so worker states are [K] arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpformer_ray.evaluation.arrays import check_size, to_numpy

VOID = 0


def gt_panoptic(segments: list[dict], size: tuple[int, int]) -> tuple[np.ndarray, dict[int, dict]]:
    """Record segments -> (int64 [H, W] id map with 0 = void, {id: {"category_id", "iscrowd"}}).
    Ids are renumbered 1..n in segment order (record ids may be 0 or repeat across tasks)."""
    id_map = np.zeros(size, dtype=np.int64)
    info = {}
    for new_id, seg in enumerate(segments, start=1):
        id_map[to_numpy(seg["mask"]).astype(bool)] = new_id
        info[new_id] = {"category_id": int(seg["category_id"]), "iscrowd": bool(seg["iscrowd"])}
    return id_map, info


class PanopticEvaluator:
    """Accumulates per-class TP / FP / FN counts and summed TP IoU."""

    def __init__(self, num_classes: int, thing_ids: list[int]):
        self.num_classes = num_classes
        self.isthing = np.zeros(num_classes, dtype=bool)
        self.isthing[list(thing_ids)] = True
        self.stats = {k: np.zeros(num_classes, dtype=np.float64) for k in ("iou", "tp", "fp", "fn")}

    def process(self, segments: list[dict], size: tuple[int, int], panoptic: Any, where: str = "image") -> None:
        """segments: the record's ground truth; panoptic: (int32 [H, W] id map with 0 = void,
        [{"id", "category_id", ...}]) as the model's eval output gives it."""
        try:
            pred_map, pred_segments = panoptic
        except (TypeError, ValueError):
            raise ValueError(f"{where}: prediction 'panoptic' must be (id map int32 [H, W], list of segment dicts)") from None
        pred_map = to_numpy(pred_map).astype(np.int64)
        check_size("panoptic", pred_map, size, where)
        gt_map, gt_info = gt_panoptic(segments, size)
        pred_info = {int(s["id"]): int(s["category_id"]) for s in pred_segments}
        if VOID in pred_info:
            raise ValueError(f"{where}: predicted panoptic segment uses id 0, which means void; use ids >= 1")
        bad = [c for c in pred_info.values() if not 0 <= c < self.num_classes]
        if bad:
            raise ValueError(f"{where}: predicted panoptic category ids {bad} outside [0, {self.num_classes})")
        pred_ids, pred_areas = np.unique(pred_map, return_counts=True)
        unknown = [int(i) for i in pred_ids if i != VOID and i not in pred_info]
        if unknown:
            raise ValueError(f"{where}: panoptic id map has segment ids {unknown} with no entry in its segment list")
        pred_area = dict(zip(pred_ids.tolist(), pred_areas.tolist()))
        gt_ids, gt_areas = np.unique(gt_map, return_counts=True)
        gt_area = dict(zip(gt_ids.tolist(), gt_areas.tolist()))

        # joint histogram of (gt id, pred id) over all pixels
        offset = int(pred_map.max()) + 1
        pairs, counts = np.unique(gt_map * offset + pred_map, return_counts=True)
        inter = {(int(p) // offset, int(p) % offset): int(c) for p, c in zip(pairs, counts)}

        gt_matched, pred_matched = set(), set()
        for (g, p), area in inter.items():
            if g == VOID or p == VOID:
                continue
            gt = gt_info[g]
            if gt["iscrowd"] or gt["category_id"] != pred_info[p]:
                continue
            union = pred_area[p] + gt_area[g] - area - inter.get((VOID, p), 0)
            iou = area / union
            if iou > 0.5:
                cat = gt["category_id"]
                self.stats["tp"][cat] += 1
                self.stats["iou"][cat] += iou
                gt_matched.add(g)
                pred_matched.add(p)

        for g, gt in gt_info.items():
            if g in gt_area and g not in gt_matched and not gt["iscrowd"]:
                self.stats["fn"][gt["category_id"]] += 1

        crowd_of = {}
        for g, gt in gt_info.items():
            if gt["iscrowd"]:
                crowd_of.setdefault(gt["category_id"], []).append(g)
        for p, cat in pred_info.items():
            if p in pred_matched or pred_area.get(p, 0) == 0:
                continue
            ignored = inter.get((VOID, p), 0) + sum(inter.get((g, p), 0) for g in crowd_of.get(cat, []))
            if ignored / pred_area[p] > 0.5:
                continue
            self.stats["fp"][cat] += 1

    def state(self) -> dict:
        return {k: v.copy() for k, v in self.stats.items()}

    def merge(self, state: dict) -> None:
        for k in self.stats:
            self.stats[k] += np.asarray(state[k], dtype=np.float64)

    def per_class(self) -> dict[str, np.ndarray]:
        """{"PQ", "SQ", "RQ"}: float [K] in percent; NaN for a class with no TP, FP or FN (left out of every
        average), SQ 0 for a class with FP or FN but no TP (panopticapi's rule, counted in the averages)."""
        s = self.stats
        denom = s["tp"] + 0.5 * s["fp"] + 0.5 * s["fn"]
        seen = denom > 0
        safe = np.where(seen, denom, 1)
        return {
            "PQ": np.where(seen, 100.0 * s["iou"] / safe, np.nan),
            "SQ": np.where(seen, np.where(s["tp"] > 0, 100.0 * s["iou"] / np.maximum(s["tp"], 1), 0.0), np.nan),
            "RQ": np.where(seen, 100.0 * s["tp"] / safe, np.nan),
        }

    def evaluate(self) -> dict[str, float]:
        """{"panoptic/PQ", "panoptic/SQ", "panoptic/RQ"} and the same with suffixes _th (things) and
        _st (stuff), in percent: the means of ``per_class`` over its non-NaN entries (of the things, the
        stuff); nan for a split with no class that has a TP, FP or FN."""
        values = self.per_class()
        seen = ~np.isnan(values["PQ"])
        out = {}
        for suffix, select in (("", seen), ("_th", seen & self.isthing), ("_st", seen & ~self.isthing)):
            for name in ("PQ", "SQ", "RQ"):
                out[f"panoptic/{name}{suffix}"] = float(values[name][select].mean()) if select.any() else float("nan")
        return out
