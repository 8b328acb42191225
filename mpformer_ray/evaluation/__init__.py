"""Evaluation: semantic mIoU, instance AP (COCOeval), panoptic PQ, and MP-Former's per-layer
mask consistency."""

from mpformer_ray.evaluation.consistency import MaskConsistency
from mpformer_ray.evaluation.evaluator import Evaluator

__all__ = ["Evaluator", "MaskConsistency"]
