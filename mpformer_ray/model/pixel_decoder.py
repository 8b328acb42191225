"""Mask2Former's pixel decoder: a deformable-attention encoder over strides 32/16/8 plus an FPN step to stride 4.

features (res2..res5) -> input projections of res5/res4/res3 -> ``enc_layers`` deformable encoder layers over
the three levels jointly -> the stride-8 output upsampled and added to a lateral projection of res2 ->
``mask_features`` (stride 4) for the mask heads, and the three encoder outputs for the transformer decoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpformer_ray.config import ModelConfig
from mpformer_ray.model.backbone import group_norm
from mpformer_ray.model.ms_deform_attn import MSDeformAttn, Shapes
from mpformer_ray.model.position_encoding import PositionEmbeddingSine

ENCODER_FEATURES = ("res3", "res4", "res5")  # strides 8, 16, 32
FPN_FEATURES = ("res2",)  # stride 4


def c2_xavier_fill(module: nn.Module) -> None:
    """Caffe2's XavierFill as detectron2 uses it: kaiming_uniform with a=1, zero bias."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


class DeformableEncoderLayer(nn.Module):
    """Post-norm layer: deformable self-attention over all levels, then a ReLU FFN."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float, n_levels: int, n_heads: int,
                 n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Shapes,
                level_start_index: Tensor | None) -> Tensor:
        """src, pos: [B, S, C]; reference_points: [B, S, L, 2] -> [B, S, C]."""
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DeformableEncoder(nn.Module):
    """``num_layers`` deformable encoder layers over the flattened, concatenated levels."""

    def __init__(self, d_model: int, num_layers: int, dim_feedforward: int, dropout: float, n_levels: int,
                 n_heads: int, n_points: int):
        super().__init__()
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(d_model, dim_feedforward, dropout, n_levels, n_heads, n_points)
            for _ in range(num_layers)
        )
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    @staticmethod
    def reference_points(shapes: list[tuple[int, int]], batch: int, device: torch.device) -> Tensor:
        """Pixel centres of every level, normalised to [0, 1]: [B, S, L, 2] as (x, y)."""
        points = []
        for h, w in shapes:
            # arange + 0.5 is linspace(0.5, h - 0.5, h) exactly (the centres are whole numbers plus a half), and
            # unlike ONNX's linspace it holds for a 1-pixel side too (an exported graph's 32-pixel-wide input)
            ys, xs = torch.meshgrid((torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h,
                                    (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w, indexing="ij")
            points.append(torch.stack((xs.reshape(-1), ys.reshape(-1)), -1))
        ref = torch.cat(points, 0)  # [S, 2]
        return ref[None, :, None, :].expand(batch, -1, len(shapes), -1)

    def forward(self, srcs: list[Tensor], pos_embeds: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """srcs, pos_embeds: L tensors [B, C, h_l, w_l] -> ([B, S, C], the (h_l, w_l) per level)."""
        shapes = [(x.shape[2], x.shape[3]) for x in srcs]
        src = torch.cat([x.flatten(2).transpose(1, 2) for x in srcs], 1)
        pos = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl] for lvl, p in enumerate(pos_embeds)], 1)
        # the level shapes go to the attention as the maps' own sizes: Python ints that never make the host
        # wait for the GPU, and traced sizes under torch.onnx.export (an input-size-independent graph)
        reference_points = self.reference_points(shapes, src.shape[0], src.device)
        for layer in self.layers:
            src = layer(src, pos, reference_points, shapes, None)
        return src, shapes


class MSDeformAttnPixelDecoder(nn.Module):
    """Mask2Former's MSDeformAttnPixelDecoder (3 encoder levels, one FPN level)."""

    def __init__(self, cfg: ModelConfig, in_channels: dict[str, int]):
        super().__init__()
        missing = [f for f in (*FPN_FEATURES, *ENCODER_FEATURES) if f not in in_channels]
        if missing:
            raise ValueError(f"pixel decoder needs backbone features {missing}; the backbone gives {list(in_channels)}")
        dim = cfg.hidden_dim
        if dim % 2:
            raise ValueError(f"model.hidden_dim must be even for the sine position embedding, got {dim}")
        self.encoder_features = ENCODER_FEATURES[::-1]  # low to high resolution: res5, res4, res3
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels[f], dim, kernel_size=1), group_norm(dim)) for f in self.encoder_features
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
        self.pe_layer = PositionEmbeddingSine(dim // 2, normalize=True)
        self.encoder = DeformableEncoder(dim, cfg.enc_layers, cfg.enc_dim_feedforward, cfg.dropout,
                                         n_levels=len(ENCODER_FEATURES), n_heads=cfg.nheads,
                                         n_points=cfg.enc_n_points)
        self.lateral_convs = nn.ModuleList()
        self.output_convs = nn.ModuleList()
        for f in FPN_FEATURES[::-1]:
            lateral = nn.Conv2d(in_channels[f], dim, kernel_size=1, bias=False)
            output = nn.Conv2d(dim, dim, kernel_size=3, padding=1, bias=False)
            c2_xavier_fill(lateral)
            c2_xavier_fill(output)
            self.lateral_convs.append(nn.Sequential(lateral, group_norm(dim)))
            self.output_convs.append(nn.Sequential(output, group_norm(dim), nn.ReLU()))
        # Mask2Former's MSDeformAttnPixelDecoder uses a 1x1 conv here (MaskFormer's FPN decoder a 3x3)
        self.mask_features = nn.Conv2d(dim, cfg.mask_dim, kernel_size=1)
        c2_xavier_fill(self.mask_features)

    def forward(self, features: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        """features: {"res2": [B, C2, H/4, W/4], ..., "res5": [B, C5, H/32, W/32]} ->
        mask_features [B, mask_dim, H/4, W/4], and 3 maps [B, hidden_dim, h_i, w_i] at strides 32, 16, 8."""
        srcs, pos = [], []
        for proj, f in zip(self.input_proj, self.encoder_features):
            x = proj(features[f])
            srcs.append(x)
            pos.append(self.pe_layer(x).to(x.dtype))
        memory, shapes = self.encoder(srcs, pos)
        b = memory.shape[0]
        out = [
            level.transpose(1, 2).reshape(b, -1, h, w)
            for level, (h, w) in zip(memory.split([h * w for h, w in shapes], dim=1), shapes)
        ]
        multi_scale_features = list(out)
        for lateral, output, f in zip(self.lateral_convs, self.output_convs, FPN_FEATURES[::-1]):
            cur = lateral(features[f])
            up = F.interpolate(out[-1], size=cur.shape[-2:], mode="bilinear", align_corners=False)
            out.append(output(cur + up))
        return self.mask_features(out[-1]), multi_scale_features
