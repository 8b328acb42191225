"""Hungarian matching between predicted queries and ground-truth segments (Mask2Former's matcher).

Cost of assigning query q to segment t = class_weight * (-p_q(label_t)) + mask_weight * BCE(q, t)
+ dice_weight * dice(q, t), the mask terms on ``num_points`` points sampled uniformly per image (the same
points for every prediction and target of that image).
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from mpformer_ray.model.point_sampling import point_sample


def pairwise_sigmoid_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean sigmoid BCE over points for every pair: logits [Q, P], targets [T, P] in {0, 1} -> [Q, T]."""
    num_points = logits.shape[1]
    pos = nn.functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = nn.functional.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / num_points


def pairwise_dice(logits: Tensor, targets: Tensor) -> Tensor:
    """Dice loss for every pair: logits [Q, P], targets [T, P] -> [Q, T]."""
    probs = logits.sigmoid()
    numerator = 2 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment of queries to segments, per image."""

    def __init__(self, class_weight: float, mask_weight: float, dice_weight: float, num_points: int):
        super().__init__()
        if class_weight == 0 and mask_weight == 0 and dice_weight == 0:
            raise ValueError("HungarianMatcher: all cost weights are 0 (model.class_weight / mask_weight / dice_weight)")
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.num_points = num_points

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """outputs: "pred_logits" [B, Q, K+1], "pred_masks" [B, Q, h, w];
        targets: B dicts {"labels": int64 [n], "masks": bool [n, H, W]} (n may be 0).

        Returns B pairs (query_idx int64 [m], target_idx int64 [m]) with m = min(Q, n), on CPU.
        """
        logits, masks = outputs["pred_logits"], outputs["pred_masks"]
        if logits.shape[0] != len(targets):
            raise ValueError(f"HungarianMatcher: {logits.shape[0]} predictions but {len(targets)} targets")
        with torch.autocast(masks.device.type, enabled=False):  # costs in float32 even under AMP
            return [self._match_one(logits[b], masks[b], target) for b, target in enumerate(targets)]

    def _match_one(self, logits: Tensor, masks: Tensor, target: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """logits [Q, K+1], masks [Q, h, w] of one image against its target -> (query_idx, target_idx)."""
        labels = target["labels"].to(logits.device)
        if len(labels) == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return empty, empty
        prob = logits.float().softmax(-1)  # [Q, K+1]
        cost_class = -prob[:, labels]  # [Q, n]
        coords = torch.rand(1, self.num_points, 2, device=masks.device)
        pred = point_sample(masks.float()[:, None], coords.expand(masks.shape[0], -1, -1))[:, 0]
        gt = target["masks"].to(device=masks.device, dtype=torch.float32)[:, None]
        gt = point_sample(gt, coords.expand(gt.shape[0], -1, -1))[:, 0]
        cost = (self.class_weight * cost_class + self.mask_weight * pairwise_sigmoid_ce(pred, gt)
                + self.dice_weight * pairwise_dice(pred, gt))
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)

