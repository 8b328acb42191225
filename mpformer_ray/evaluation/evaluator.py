"""One evaluator for every task: feeds each image's ground truth and prediction to the
semantic / instance / panoptic metrics, and merges per-worker states for distributed evaluation.

Mask2Former reports AP and mIoU for its panoptic models too, computed from the same model's
"instances" and "sem_seg" outputs; so with the panoptic task those metrics are added whenever
the predictions carry them. A task named in ``tasks`` requires its prediction key.

Distributed use: every worker evaluates a disjoint subset of the images, sends ``state()``
(confusion matrix, per-image RLEs, PQ sums; no full masks) to rank 0, which calls
``merge`` and ``evaluate``.
"""

from __future__ import annotations

import numpy as np

from mpformer_ray.evaluation.instance import InstanceEvaluator
from mpformer_ray.evaluation.panoptic import PanopticEvaluator
from mpformer_ray.evaluation.semantic import SemanticEvaluator, gt_semantic_map
from mpformer_ray.tasks import TASKS

# task -> the key of the model's eval output it is computed from
PREDICTION_KEY = {"semantic": "sem_seg", "instance": "instances", "panoptic": "panoptic"}
# keys of postprocess.compact_inference's form that stand in for them
COMPACT_KEY = {"sem_seg": "sem_seg_labels"}


def _check_classes(classes: list[dict]) -> None:
    if not classes:
        raise ValueError("Evaluator: classes is empty; pass the dataset manifest's 'classes' list")
    ids = [c.get("id") for c in classes]
    if ids != list(range(len(classes))):
        raise ValueError(f"Evaluator: class ids must be contiguous 0..K-1 in order (the manifest's 'classes'); got {ids}")
    if any("isthing" not in c for c in classes):
        raise ValueError("Evaluator: every class needs 'isthing' (the manifest's 'classes' entries have it)")


class Evaluator:
    """Semantic mIoU, instance AP (COCOeval) and panoptic PQ over a set of images."""

    def __init__(self, classes: list[dict], tasks: set[str]):
        _check_classes(classes)
        tasks = set(tasks)
        if not tasks or not tasks <= set(TASKS):
            raise ValueError(f"Evaluator: tasks must be a non-empty subset of {list(TASKS)}; got {sorted(tasks)}")
        self.classes = classes
        self.tasks = tasks
        thing_ids = [c["id"] for c in classes if c["isthing"]]
        if "instance" in tasks and not thing_ids:
            raise ValueError("Evaluator: the instance task needs thing classes, and no class has isthing=true")
        enabled = set(tasks)
        if "panoptic" in tasks:
            enabled.add("semantic")
            if thing_ids:
                enabled.add("instance")
        self.metrics = {}
        if "semantic" in enabled:
            self.metrics["semantic"] = SemanticEvaluator(len(classes))
        if "instance" in enabled:
            self.metrics["instance"] = InstanceEvaluator(thing_ids)
        if "panoptic" in enabled:
            self.metrics["panoptic"] = PanopticEvaluator(len(classes), thing_ids)
        self.image_ids: set[int] = set()
        self.counts = {task: 0 for task in self.metrics}  # images each metric has seen

    def process(self, record: dict, prediction: dict) -> None:
        """record: one ground-truth record (``read_records``); prediction: the model's eval output for
        it at the original resolution ({"sem_seg", "panoptic", "instances"}, tensors or arrays), or the
        same in ``compact_inference``'s form ("sem_seg_labels", instances with "rles")."""
        image_id = int(record["image_id"])
        where = f"image {image_id} ({record.get('file_name', '?')})"
        if image_id in self.image_ids:
            raise ValueError(f"{where} was already evaluated; give each image to exactly one evaluator once")
        prediction = {k: prediction[c] for k, c in COMPACT_KEY.items() if c in prediction} | prediction
        missing = [PREDICTION_KEY[t] for t in sorted(self.tasks) if PREDICTION_KEY[t] not in prediction]
        if missing:
            raise ValueError(f"{where}: prediction lacks {missing} needed for tasks {sorted(self.tasks)}; "
                             f"it has {sorted(prediction)}")
        size = tuple(record["image"].shape[:2])
        for task, metric in self.metrics.items():
            key = PREDICTION_KEY[task]
            if key not in prediction:
                continue
            if task == "semantic":
                metric.process(gt_semantic_map(record), prediction[key], where)
            elif task == "instance":
                metric.process(image_id, size, record["segments"], prediction[key], where)
            else:
                metric.process(record["segments"], size, prediction[key], where)
            self.counts[task] += 1
        self.image_ids.add(image_id)

    def state(self) -> dict:
        """Picklable summary of everything processed so far (no full-resolution masks)."""
        return {"tasks": sorted(self.tasks), "num_classes": len(self.classes), "image_ids": sorted(self.image_ids),
                "counts": dict(self.counts), "metrics": {t: m.state() for t, m in self.metrics.items()}}

    def merge(self, states: list[dict]) -> None:
        """Add other evaluators' ``state()``s (over disjoint images) into this one."""
        for s in states:
            if s["tasks"] != sorted(self.tasks) or s["num_classes"] != len(self.classes):
                raise ValueError(f"Evaluator.merge: state for tasks {s['tasks']} / {s['num_classes']} classes does "
                                 f"not match this evaluator's {sorted(self.tasks)} / {len(self.classes)}")
            overlap = self.image_ids & set(s["image_ids"])
            if overlap:
                raise ValueError(f"Evaluator.merge: images {sorted(overlap)[:10]} were evaluated twice; shard the "
                                 "images so each worker evaluates a disjoint subset")
            for task, metric in self.metrics.items():
                metric.merge(s["metrics"][task])
                self.counts[task] += s["counts"][task]
            self.image_ids |= set(s["image_ids"])

    def _reported(self) -> list[str]:
        """The metrics' tasks that report: those asked for, and those the predictions fed anyway."""
        return [task for task, _ in sorted(self.metrics.items(), key=lambda kv: list(TASKS).index(kv[0]))
                if task in self.tasks or self.counts[task] > 0]

    def evaluate(self) -> dict[str, float]:
        """Flat metrics in percent, e.g. "sem_seg/mIoU", "segm/AP", "panoptic/PQ" (nan when undefined)."""
        out: dict[str, float] = {}
        for task in self._reported():
            out.update(self.metrics[task].evaluate())
        out["num_images"] = float(len(self.image_ids))
        return out

    def per_class(self) -> list[dict]:
        """One row per class: {"class_id", "name", "type" ("thing" / "stuff"), then "PQ", "SQ", "RQ" (panoptic),
        "AP" (instance, things only), "IoU", "Acc" (semantic)} for the tasks ``evaluate`` reports, in percent.
        NaN marks what a metric's mean leaves out (a class never seen, without ground truth, or stuff for AP),
        so each column's non-NaN values average to the aggregate metric (``panoptic/PQ``, ``segm/AP``,
        ``sem_seg/mIoU``, ``sem_seg/mAcc``; ``_th`` / ``_st``: the things' / stuff's rows)."""
        columns: dict[str, np.ndarray] = {}
        for task in self._reported():
            values = self.metrics[task].per_class()
            if task == "instance":  # over the thing classes only: spread to all classes, NaN for stuff
                values = {name: _spread(v, self.metrics[task].thing_ids, len(self.classes))
                          for name, v in values.items()}
            columns.update(values)
        return [{"class_id": int(c["id"]), "name": c["name"], "type": "thing" if c["isthing"] else "stuff",
                 **{name: float(v[i]) for name, v in columns.items()}} for i, c in enumerate(self.classes)]

    def confusion(self) -> np.ndarray | None:
        """The semantic confusion matrix int64 [K, K] (rows = ground truth) when semantic is reported."""
        return self.metrics["semantic"].confusion.copy() if "semantic" in self._reported() else None


def _spread(values: np.ndarray, ids: list[int], num_classes: int) -> np.ndarray:
    out = np.full(num_classes, np.nan)
    out[ids] = values
    return out
