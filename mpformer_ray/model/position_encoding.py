"""DETR's normalised sine position embedding for feature maps."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """Sine / cosine embedding of each pixel's (y, x) position, normalised to [0, 2*pi].

    The first ``num_pos_feats`` channels encode y, the next ``num_pos_feats`` encode x; within each half,
    even channels are sines and odd channels cosines of the position over geometric wavelengths.
    """

    def __init__(self, num_pos_feats: int, temperature: int = 10000, normalize: bool = True):
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"PositionEmbeddingSine: num_pos_feats must be even, got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] (only its shape and device are used) -> float32 [B, 2*num_pos_feats, H, W]."""
        b, _, h, w = x.shape
        # no padding masks: the cumulative sum of an all-valid mask is simply 1..H / 1..W
        y_embed = torch.arange(1, h + 1, dtype=torch.float32, device=x.device)
        x_embed = torch.arange(1, w + 1, dtype=torch.float32, device=x.device)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (h + eps) * self.scale
            x_embed = x_embed / (w + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_y = y_embed[:, None] / dim_t  # [H, F]
        pos_x = x_embed[:, None] / dim_t  # [W, F]
        pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)
        pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)
        pos = torch.cat((pos_y[:, None, :].expand(h, w, -1), pos_x[None, :, :].expand(h, w, -1)), dim=2)
        return pos.permute(2, 0, 1).unsqueeze(0).expand(b, -1, -1, -1)
