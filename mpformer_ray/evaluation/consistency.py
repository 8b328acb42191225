"""Per-layer mask consistency, MP-Former's diagnostic for Mask2Former's decoder.

For the queries matched to ground truth at the final layer, compare the binary masks
(logit > 0) that consecutive decoder predictions give the same query: prediction 0 is the
one made from the initial queries, prediction i the one after decoder layer i. A model whose
layers agree scores IoU near 1 for every pair; MP-Former reports Mask2Former's early pairs
well below that. Two empty masks count as agreeing (IoU 1).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch


class MaskConsistency:
    """Mean IoU between consecutive layers' masks of matched queries, over all updates."""

    def __init__(self, num_layers: int):
        """num_layers: decoder layers L (``model.dec_layers``); updates carry L + 1 predictions."""
        if num_layers < 1:
            raise ValueError(f"MaskConsistency: num_layers must be >= 1 (model.dec_layers); got {num_layers}")
        self.num_layers = num_layers
        self.iou_sum = np.zeros(num_layers, dtype=np.float64)
        self.count = np.zeros(num_layers, dtype=np.int64)

    def update(self, layer_mask_logits: Sequence[Any], query_idx: Any) -> None:
        """layer_mask_logits: L + 1 mask logits [Q, h, w] (query init, then each layer) of one image;
        query_idx: int64 [m] indices of the queries matched to ground truth at the final layer."""
        if len(layer_mask_logits) != self.num_layers + 1:
            raise ValueError(f"MaskConsistency.update: got {len(layer_mask_logits)} mask predictions, expected "
                             f"num_layers + 1 = {self.num_layers + 1} (query init then every decoder layer)")
        idx = torch.as_tensor(query_idx, dtype=torch.long).reshape(-1)
        if idx.numel() == 0:
            return
        masks = [torch.as_tensor(m) for m in layer_mask_logits]
        shapes = {tuple(m.shape) for m in masks}
        if len(shapes) != 1 or len(next(iter(shapes))) != 3:
            raise ValueError(f"MaskConsistency.update: every prediction must be [Q, h, w] of one shape; got {sorted(shapes)}")
        binary = [(m[idx.to(m.device)] > 0).flatten(1).cpu() for m in masks]  # [m, h*w] each
        for i in range(self.num_layers):
            a, b = binary[i], binary[i + 1]
            inter = (a & b).sum(1).double()
            union = (a | b).sum(1).double()
            iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
            self.iou_sum[i] += float(iou.sum())
            self.count[i] += idx.numel()

    def state(self) -> dict:
        return {"iou_sum": self.iou_sum.copy(), "count": self.count.copy()}

    def merge(self, states: list[dict]) -> None:
        for s in states:
            if len(s["count"]) != self.num_layers:
                raise ValueError(f"MaskConsistency.merge: state has {len(s['count'])} layer pairs, this one "
                                 f"{self.num_layers}; merge states of the same model only")
            self.iou_sum += np.asarray(s["iou_sum"], dtype=np.float64)
            self.count += np.asarray(s["count"], dtype=np.int64)

    def compute(self) -> dict[str, float]:
        """{"consistency/layer_{i}_{i+1}" for i in 0..L-1, "consistency/mean"}: mean IoU in [0, 1]
        (nan before any matched query was seen)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            per_pair = np.where(self.count > 0, self.iou_sum / np.maximum(self.count, 1), np.nan)
        out = {f"consistency/layer_{i}_{i + 1}": float(v) for i, v in enumerate(per_pair)}
        out["consistency/mean"] = float(np.nanmean(per_pair)) if (self.count > 0).any() else float("nan")
        return out
