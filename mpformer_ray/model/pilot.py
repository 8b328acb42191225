"""Mask-piloted (MP) queries: MP-Former's training-only extra queries, one module for every noise strategy.

For each image, each ground-truth segment and each of G groups there is one pilot query. Its content is a
learned embedding of the segment's label (replaced by a uniformly random class with probability
``label_noise``); its positional embedding is zero. In the first ``layers`` decoder layers its
cross-attention mask is the segment's ground-truth mask, area-resized to that layer's feature scale and
noised by ``mask_noise``:

- ``none``:  the resized ground-truth mask;
- ``point``: flip cells chosen uniformly over the whole map, in expectation ``noise_ratio`` x the segment's
  area (at that scale) of them; drawn afresh for every layer at that layer's resolution;
- ``shift``: translate by up to ``noise_ratio`` x the segment's box size in x and y;
- ``scale``: rescale about the box centre by a factor drawn from [1 - noise_ratio, 1 + noise_ratio].

Shift and scale are drawn once per forward at the input resolution. Every group draws its own noise.
The kinds are the registry ``MASK_NOISE`` (name -> :class:`MaskNoise`): ``model.pilot.mask_noise`` accepts its
names, and a kind added there is one more choice for the config, the sweeps and ``PilotQueries``.

Batch layout of the decoder's queries: ``[matching Q | group 0 (n_max slots) | group 1 | ...]`` where
n_max is the batch's largest segment count; slots past an image's own count are padding. As in the released
code, padding slots carry zero content, attend everywhere in cross-attention, take part in their group's
self-attention like real slots, and are trained towards "no object" by the pilot class loss (no mask loss).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpformer_ray.config import ModelConfig, piloted_layers, registered
from mpformer_ray.model.transfer import to_device

MIN_SCALE = 0.05  # scale noise with noise_ratio >= 1 could draw factors <= 0


def area_resize(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """bool [B, P, H, W] -> bool [B, P, h, w]: a cell is set when any of the mask falls inside it."""
    if masks.shape[1] == 0:
        return masks.new_zeros(*masks.shape[:2], *size)
    return F.adaptive_max_pool2d(masks.to(torch.float32), size) > 0


def point_noise(masks: Tensor, ratio: float) -> Tensor:
    """Flip cells of bool ``masks`` [B, P, h, w] chosen uniformly over the map, ``ratio`` x area in expectation."""
    if ratio <= 0:
        return masks
    h, w = masks.shape[-2:]
    area = masks.sum((-2, -1), dtype=torch.float32)
    flip_prob = (ratio * area / (h * w)).clamp(max=1.0)
    flips = torch.rand(masks.shape, device=masks.device) < flip_prob[..., None, None]
    return masks ^ flips


def box_of(masks: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Tight boxes of bool masks [N, H, W]: (centre x, centre y, width, height) in pixels, float [N] each.

    Empty masks get width = height = 0."""
    h, w = masks.shape[-2:]
    rows, cols = masks.any(-1), masks.any(-2)  # [N, H], [N, W]
    ys = torch.arange(h, device=masks.device)
    xs = torch.arange(w, device=masks.device)
    y0 = torch.where(rows, ys, h).amin(-1).float()
    y1 = torch.where(rows, ys, -1).amax(-1).float()
    x0 = torch.where(cols, xs, w).amin(-1).float()
    x1 = torch.where(cols, xs, -1).amax(-1).float()
    width, height = (x1 - x0 + 1).clamp(min=0), (y1 - y0 + 1).clamp(min=0)
    return (x0 + x1) / 2, (y0 + y1) / 2, width, height


def warp(masks: Tensor, theta: Tensor) -> Tensor:
    """bool masks [N, H, W] -> bool [N, H, W] whose pixel p is the input's (nearest) at theta [N, 2, 3] @ p, in
    grid_sample's align_corners=False normalised coordinates."""
    n, h, w = masks.shape
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    moved = F.grid_sample(masks[:, None].to(torch.float32), grid, mode="nearest", align_corners=False)
    return moved[:, 0] > 0.5


def shift_noise(masks: Tensor, ratio: float) -> Tensor:
    """Translate every bool mask [N, H, W] by its own draw of up to ``ratio`` x its box size in x and y."""
    n, h, w = masks.shape
    if n == 0 or ratio <= 0:
        return masks
    _, _, bw, bh = box_of(masks)
    tx = (torch.rand(n, device=masks.device) * 2 - 1) * ratio * bw
    ty = (torch.rand(n, device=masks.device) * 2 - 1) * ratio * bh
    theta = torch.zeros(n, 2, 3, device=masks.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = -2 * tx / w
    theta[:, 1, 2] = -2 * ty / h
    return warp(masks, theta)


def scale_noise(masks: Tensor, ratio: float) -> Tensor:
    """Rescale every bool mask [N, H, W] about its box centre by its own factor drawn from
    [1 - ratio, 1 + ratio] (at least MIN_SCALE)."""
    n, h, w = masks.shape
    if n == 0 or ratio <= 0:
        return masks
    cx, cy, _, _ = box_of(masks)
    factor = (1 + (torch.rand(n, device=masks.device) * 2 - 1) * ratio).clamp(min=MIN_SCALE)
    cx_n, cy_n = (2 * cx + 1) / w - 1, (2 * cy + 1) / h - 1
    theta = torch.zeros(n, 2, 3, device=masks.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / factor
    theta[:, 0, 2] = cx_n * (1 - 1 / factor)
    theta[:, 1, 2] = cy_n * (1 - 1 / factor)
    return warp(masks, theta)


def unchanged(masks: Tensor, ratio: float) -> Tensor:
    return masks


@dataclass(frozen=True)
class MaskNoise:
    """One mask-noise kind as two steps, each ``(bool masks, noise_ratio) -> bool masks`` of the same shape:
    ``source`` noises the ground-truth masks [N, H, W] at input resolution, once per forward and group;
    ``layer`` noises the masks resized to a piloted layer's feature size [B, P, h, w], at every such layer."""

    source: Callable[[Tensor, float], Tensor] = unchanged
    layer: Callable[[Tensor, float], Tensor] = unchanged


# model.pilot.mask_noise -> its noise: the config's choices (so the sweeps' too) and PilotQueries read this dict
MASK_NOISE: dict[str, MaskNoise] = {
    "none": MaskNoise(),
    "point": MaskNoise(layer=point_noise),
    "shift": MaskNoise(source=shift_noise),
    "scale": MaskNoise(source=scale_noise),
}


def self_attention_mask(batch: int, num_queries: int, groups: int, n_max: int, device: torch.device | str
                        ) -> Tensor:
    """bool [B, Q + P, Q + P], True = blocked, P = groups * n_max: matching queries see no pilot slot; a pilot
    slot sees the matching queries and every slot of its own group, padding included (the released
    ``tgt_mask``, which ignores padding), and no other group."""
    t = num_queries + groups * n_max
    blocked = torch.zeros(t, t, dtype=torch.bool, device=device)
    blocked[:num_queries, num_queries:] = True
    group = torch.arange(groups * n_max, device=device) // max(n_max, 1)
    blocked[num_queries:, num_queries:] = group[:, None] != group[None, :]
    return blocked.expand(batch, t, t)


@dataclass
class PilotBatch:
    """The pilot queries of one training batch; P = groups * n_max slots per image.

    content:        [B, P, C] query features (zero for padding slots)
    labels:         int64 [B, P] true (un-noised) label of the source segment, 0 for padding
    target_index:   int64 [B, P] index of the source segment in ``targets[b]``, -1 for padding; on the host
                    (CPU) whatever the device
    valid:          bool [B, P] real pilot query (not padding)
    self_attn_mask: bool [B, Q + P, Q + P], True = blocked
    masks:          bool [B, P, H, W] source masks at input resolution after shift / scale noise (padding: empty)
    """

    content: Tensor
    labels: Tensor
    target_index: Tensor
    valid: Tensor
    self_attn_mask: Tensor
    masks: Tensor
    groups: int
    piloted_layers: int
    noise: MaskNoise
    noise_ratio: float
    _resized: dict[tuple[int, int], Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_slots(self) -> int:
        return self.content.shape[1]

    def cross_attention_mask(self, layer: int, size: tuple[int, int]) -> Tensor | None:
        """Attendable cells of decoder layer ``layer`` (0-based) at feature size ``size`` = (h, w):
        bool [B, P, h * w], True = may attend; None when the layer is not piloted."""
        if layer >= self.piloted_layers:
            return None
        if size not in self._resized:
            # per group, so the float copy that pooling needs stays one group's size
            n_max = self.num_slots // self.groups
            chunks = self.masks.split(n_max, dim=1) if n_max else [self.masks]
            self._resized[size] = torch.cat([area_resize(c, size) for c in chunks], dim=1)
        return self.noise.layer(self._resized[size], self.noise_ratio).flatten(2)


class PilotQueries(nn.Module):
    """Builds a :class:`PilotBatch` from a batch's targets (training only; owns the label embedding)."""

    def __init__(self, *, num_classes: int, hidden_dim: int, groups: int, mask_noise: str, noise_ratio: float,
                 label_noise: float, piloted_layers: int):
        super().__init__()
        self.num_classes = num_classes
        self.groups = groups
        self.noise = registered(MASK_NOISE, mask_noise, "model.pilot.mask_noise")
        self.noise_ratio = noise_ratio
        self.label_noise = label_noise
        self.piloted_layers = piloted_layers
        self.label_embed = nn.Embedding(num_classes, hidden_dim)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> PilotQueries:
        """The pilot of ``cfg.pilot`` (checked by ``config.validate``) for ``cfg``'s classes and decoder."""
        p = cfg.pilot
        return cls(num_classes=cfg.num_classes, hidden_dim=cfg.hidden_dim, groups=p.groups, mask_noise=p.mask_noise,
                   noise_ratio=p.noise_ratio, label_noise=p.label_noise, piloted_layers=piloted_layers(cfg))

    def noisy_labels(self, labels: Tensor) -> Tensor:
        """Replace each label by a uniformly random class with probability ``label_noise``."""
        if self.label_noise <= 0:
            return labels
        replace = torch.rand(labels.shape, device=labels.device) < self.label_noise
        random = torch.randint(0, self.num_classes, labels.shape, device=labels.device)
        return torch.where(replace, random, labels)

    def forward(self, targets: list[dict[str, Tensor]], num_queries: int, image_size: tuple[int, int]) -> PilotBatch:
        """targets: B dicts {"labels": int64 [n], "masks": bool [n, H, W]} at ``image_size`` = (H, W);
        num_queries: Q matching queries that precede the pilot slots."""
        device = self.label_embed.weight.device
        b, g = len(targets), self.groups
        counts = [len(t["labels"]) for t in targets]
        n_max = max(counts, default=0)
        # the layout follows from the counts alone, so it is built on the host: the criterion reads
        # target_index there, and reading a device copy would make the host wait for the GPU
        slot = np.tile(np.arange(n_max), g)[None, :]  # [1, P]
        valid_host = slot < np.array(counts).reshape(b, 1)  # [B, P]
        target_index = torch.from_numpy(np.where(valid_host, slot, -1))
        valid = to_device(valid_host, device)
        labels = torch.zeros(b, n_max, dtype=torch.int64, device=device)
        gt = torch.zeros(b, n_max, *image_size, dtype=torch.bool, device=device)
        for i, t in enumerate(targets):
            labels[i, : counts[i]] = t["labels"].to(device)
            gt[i, : counts[i]] = t["masks"].to(device=device, dtype=torch.bool)
        labels = labels.repeat(1, g)

        content = self.label_embed(self.noisy_labels(labels)) * valid[..., None]
        masks = torch.cat([self.noise.source(gt.flatten(0, 1), self.noise_ratio).view_as(gt) for _ in range(g)], dim=1)
        return PilotBatch(
            content=content,
            labels=labels,
            target_index=target_index,
            valid=valid,
            self_attn_mask=self_attention_mask(b, num_queries, g, n_max, device),
            masks=masks,
            groups=g,
            piloted_layers=self.piloted_layers,
            noise=self.noise,
            noise_ratio=self.noise_ratio,
        )
