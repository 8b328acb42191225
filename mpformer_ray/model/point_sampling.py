"""Point sampling for mask losses and matching costs (PointRend's helpers, as Mask2Former uses them).

Masks are compared on a few thousand points instead of every pixel: points are given in normalised
[0, 1] x [0, 1] image coordinates (x, y), so predictions and targets of different resolutions are sampled
at the same places.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def point_sample(inputs: Tensor, coords: Tensor) -> Tensor:
    """Bilinearly sample ``inputs`` [N, C, H, W] at ``coords`` [N, P, 2] ((x, y) in [0, 1]) -> [N, C, P]."""
    grid = 2.0 * coords.unsqueeze(2) - 1.0  # [N, P, 1, 2] in grid_sample's [-1, 1]
    return F.grid_sample(inputs, grid.to(inputs.dtype), mode="bilinear", align_corners=False).squeeze(3)


def uncertainty(logits: Tensor) -> Tensor:
    """Uncertainty of binary mask logits [N, 1, P]: points near the decision boundary score highest."""
    return -logits.abs()


def uncertain_point_coords(
    logits: Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    score: Callable[[Tensor], Tensor] = uncertainty,
) -> Tensor:
    """Importance sampling: of ``num_points`` points per mask, ``importance_sample_ratio`` are the most
    uncertain of ``oversample_ratio * num_points`` random candidates, the rest uniformly random.

    logits: [N, 1, H, W] mask logits -> coords [N, num_points, 2] in [0, 1].
    """
    n = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    candidates = torch.rand(n, num_sampled, 2, device=logits.device)
    scores = score(point_sample(logits, candidates))  # [N, 1, num_sampled]
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    top = torch.topk(scores[:, 0, :], k=num_uncertain, dim=1).indices  # [N, num_uncertain]
    coords = torch.gather(candidates, 1, top.unsqueeze(-1).expand(-1, -1, 2))
    if num_random > 0:
        coords = torch.cat((coords, torch.rand(n, num_random, 2, device=logits.device)), dim=1)
    return coords
