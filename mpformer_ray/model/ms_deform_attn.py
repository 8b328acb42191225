"""Multi-scale deformable attention (Deformable DETR), in pure PyTorch via ``F.grid_sample``.

Same semantics as Deformable DETR's CUDA op: bilinear sampling with ``align_corners=False`` (a location
in [0, 1] maps to pixel coordinate ``loc * size - 0.5``) and zeros outside the map; the op runs in float32
(float64 stays float64) like the original's ``custom_fwd(cast_inputs=torch.float32)`` under AMP.

The level shapes come as Deformable DETR's int64 [L, 2] tensor or as the L (h, w) pairs read off the
feature maps' ``shape``. The pixel decoder passes the pairs: under ``torch.onnx.export``'s tracer they are
the traced sizes, so the exported graph follows the input's height and width, where the tensor's values
would be frozen into it. Both give the same values, bit for bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpformer_ray.model.transfer import to_device


Shapes = Tensor | list[tuple[int, int]]


def level_shapes(spatial_shapes: Shapes) -> list[tuple[int, int]]:
    """int64 [L, 2] tensor (best on the host: it is read as Python ints) or L (h, w) pairs -> the pairs."""
    if isinstance(spatial_shapes, Tensor):
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    return [(h, w) for h, w in spatial_shapes]


def ms_deform_attn(value: Tensor, spatial_shapes: Shapes, level_start_index: Tensor | None,
                   sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Sample every level at each query's points and sum them with the attention weights.

    value:              [B, S, nH, Dh], the L levels flattened and concatenated (S = sum h_l * w_l)
    spatial_shapes:     int64 [L, 2], (h_l, w_l) per level, or the L (h_l, w_l) pairs (module docstring)
    level_start_index:  int64 [L], offset of each level in S (implied by spatial_shapes; kept for the
                        CUDA op's signature; may be None)
    sampling_locations: [B, Lq, nH, L, P, 2], (x, y) in [0, 1] (outside reads zeros)
    attention_weights:  [B, Lq, nH, L, P]
    returns             [B, Lq, nH * Dh] in value's dtype
    """
    b, s, n_heads, head_dim = value.shape
    _, n_queries, _, n_levels, n_points, _ = sampling_locations.shape
    shapes = level_shapes(spatial_shapes)
    # traced sizes (torch.onnx.export) cannot be compared in Python; the graph's own ops check them
    if not torch.jit.is_tracing() and (len(shapes) != n_levels or sum(h * w for h, w in shapes) != s):
        raise ValueError(f"ms_deform_attn: spatial_shapes {shapes} do not match value length {s} "
                         f"and {n_levels} sampling levels")
    dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    levels = value.to(dtype).split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations.to(dtype) - 1  # grid_sample wants [-1, 1]
    weights = attention_weights.to(dtype).transpose(1, 2).flatten(0, 1)  # [B*nH, Lq, L, P]
    out = None
    # weighting and summing level by level avoids materialising all levels' samples at once (faster, less memory)
    for lvl, (h, w) in enumerate(shapes):
        v = levels[lvl].flatten(2).transpose(1, 2).reshape(b * n_heads, head_dim, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # [B*nH, Lq, P, 2]
        sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # [B*nH, Dh, Lq, P]
        level_out = (sampled * weights[:, None, :, lvl]).sum(-1)  # [B*nH, Dh, Lq]
        out = level_out if out is None else out + level_out
    return out.view(b, n_heads * head_dim, n_queries).transpose(1, 2).to(value.dtype)


class MSDeformAttn(nn.Module):
    """Deformable attention: each query attends to ``n_points`` learned offsets around its reference
    point on each of ``n_levels`` feature maps, per head."""

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"MSDeformAttn: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: head h starts sampling along direction 2*pi*h/nH, point p at distance p+1."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.constant_(proj.bias, 0.0)

    def forward(self, query: Tensor, reference_points: Tensor, input_flatten: Tensor, spatial_shapes: Shapes,
                level_start_index: Tensor | None, padding_mask: Tensor | None = None) -> Tensor:
        """
        query:            [B, Lq, C]
        reference_points: [B, Lq, L, 2] (x, y) in [0, 1], or [B, Lq, L, 4] boxes (cx, cy, w, h)
        input_flatten:    [B, S, C], the L levels flattened and concatenated
        spatial_shapes:   int64 [L, 2] (h, w), or the L (h, w) pairs; level_start_index: int64 [L] or None
        padding_mask:     bool [B, S], True at padding (its values are zeroed), or None
        returns           [B, Lq, C]
        """
        b, n_queries, _ = query.shape
        _, s, _ = input_flatten.shape
        value = self.value_proj(input_flatten)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(b, s, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(b, n_queries, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(b, n_queries, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(b, n_queries, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: normalise by (w, h)
            normalizer = to_device(_widths_heights(spatial_shapes), reference_points.device, reference_points.dtype)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"MSDeformAttn: reference_points must end in 2 or 4 values, got "
                             f"{tuple(reference_points.shape)}")
        out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(out)


def _widths_heights(spatial_shapes: Shapes) -> Tensor:
    """int64 [L, 2] (w, h) per level. From the pairs by stacking: traced sizes (0-dim tensors under
    ``torch.onnx.export``) stay in the graph, where ``torch.tensor`` would freeze their values."""
    if isinstance(spatial_shapes, Tensor):
        return spatial_shapes.flip(-1)
    return torch.stack([torch.stack([torch.as_tensor(w), torch.as_tensor(h)]) for h, w in spatial_shapes])
