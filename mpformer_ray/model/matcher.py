"""Hungarian matching between predicted queries and ground-truth segments (Mask2Former's matcher).

Cost of assigning query q to segment t = class_weight * (-p_q(label_t)) + mask_weight * BCE(q, t)
+ dice_weight * dice(q, t), the mask terms on ``num_points`` points sampled uniformly per image (the same
points for every query and segment of one image and prediction).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from mpformer_ray.config import ModelConfig
from mpformer_ray.model.point_sampling import point_sample


def pairwise_sigmoid_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean sigmoid BCE over points for every pair: logits [..., Q, P], targets [..., T, P] in [0, 1]
    -> [..., Q, T].

    BCE(x, t) = softplus(x) - x * t, so the mean over points is one softplus pass and one matrix product.
    """
    num_points = logits.shape[-1]
    return (nn.functional.softplus(logits).sum(-1)[..., :, None] - logits @ targets.transpose(-1, -2)) / num_points


def pairwise_dice(logits: Tensor, targets: Tensor) -> Tensor:
    """Dice loss for every pair: logits [..., Q, P], targets [..., T, P] -> [..., Q, T]."""
    probs = logits.sigmoid()
    numerator = 2 * probs @ targets.transpose(-1, -2)
    denominator = probs.sum(-1)[..., :, None] + targets.sum(-1)[..., None, :]
    return 1 - (numerator + 1) / (denominator + 1)


Pairs = tuple[Tensor, Tensor]


class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment of queries to segments, per prediction and image."""

    def __init__(self, *, class_weight: float, mask_weight: float, dice_weight: float, num_points: int):
        super().__init__()
        if class_weight == 0 and mask_weight == 0 and dice_weight == 0:
            raise ValueError("HungarianMatcher: all cost weights are 0 "
                             "(model.class_weight / mask_weight / dice_weight)")
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.num_points = num_points

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> HungarianMatcher:
        """Mask2Former's matcher: the loss weights as cost weights, ``train_num_points`` points per image."""
        return cls(class_weight=cfg.class_weight, mask_weight=cfg.mask_weight, dice_weight=cfg.dice_weight,
                   num_points=cfg.train_num_points)

    def forward(self, logits: Tensor, masks: Tensor, targets: list[dict[str, Tensor]]) -> list[Pairs]:
        """One prediction: class logits [B, Q, K+1], mask logits [B, Q, h, w]; targets: B dicts
        {"labels": int64 [n], "masks": bool [n, H, W]} (n may be 0).

        Returns B pairs (query_idx int64 [m], target_idx int64 [m]) with m = min(Q, n), on CPU.
        """
        return self.match_all(logits[None], [masks], targets)[0]

    @torch.no_grad()
    def match_all(self, logits: Tensor, masks: Sequence[Tensor], targets: list[dict[str, Tensor]]
                  ) -> list[list[Pairs]]:
        """L predictions of the same queries at once: logits [L, B, Q, K+1], masks L x [B, Q, h, w] ->
        per prediction, per image (query_idx, target_idx) as ``forward`` returns them.

        All costs are computed on the device and copied to the host in one transfer: the host waits for
        the GPU once per batch, not once per prediction and image.
        """
        num_preds, b, q = logits.shape[:3]
        if b != len(targets):
            raise ValueError(f"HungarianMatcher: {b} predictions but {len(targets)} targets")
        costs = []
        with torch.autocast(logits.device.type, enabled=False):  # costs in float32 even under AMP
            for i, target in enumerate(targets):
                if len(target["labels"]):
                    costs.append(self._costs(logits[:, i], [m[i] for m in masks], target).flatten())
        flat = torch.cat(costs).cpu().numpy() if costs else None
        if flat is not None and not np.isfinite(flat).all():
            # scipy's own error ("matrix contains invalid numeric entries") names neither cause nor fix
            raise FloatingPointError(
                "the model's predictions are not finite (NaN / inf in the matching costs): training diverged; "
                "lower train.lr, raise train.warmup_iters, or set train.amp=off")
        empty = torch.empty(0, dtype=torch.int64)
        result = [[(empty, empty)] * b for _ in range(num_preds)]
        offset = 0
        for i, target in enumerate(targets):
            n = len(target["labels"])
            if n == 0:
                continue
            block = flat[offset:offset + num_preds * q * n].reshape(num_preds, q, n)
            offset += block.size
            for p in range(num_preds):
                rows, cols = linear_sum_assignment(block[p])
                result[p][i] = (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
        return result

    def _costs(self, logits: Tensor, masks: list[Tensor], target: dict[str, Tensor]) -> Tensor:
        """logits [L, Q, K+1], masks L x [Q, h, w] of one image's L predictions against its n > 0 segments
        -> costs [L, Q, n] (fresh random points per prediction)."""
        num_preds = logits.shape[0]
        labels = target["labels"].to(logits.device)
        cost_class = -logits.float().softmax(-1)[..., labels]  # [L, Q, n]
        coords = torch.rand(num_preds, self.num_points, 2, device=logits.device)
        gt = target["masks"].to(device=logits.device, dtype=torch.float32)[None]  # [1, n, H, W]
        gt = point_sample(gt, coords.view(1, -1, 2)).view(-1, num_preds, self.num_points).transpose(0, 1)
        # On a CPU one prediction at a time keeps the [Q, P] temporaries in cache (all L at once runs the
        # elementwise passes 2x slower per element); elsewhere all at once, for fewer kernel launches.
        step = 1 if logits.device.type == "cpu" else num_preds
        cost_mask = []
        for p in range(0, num_preds, step):
            pred = point_sample(torch.stack(masks[p:p + step]).float(), coords[p:p + step])  # [l, Q, P]
            cost_mask.append(self.mask_weight * pairwise_sigmoid_ce(pred, gt[p:p + step])
                             + self.dice_weight * pairwise_dice(pred, gt[p:p + step]))
        return self.class_weight * cost_class + torch.cat(cost_mask)
