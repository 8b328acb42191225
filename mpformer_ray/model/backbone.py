"""Backbones: torchvision ResNets and Swin Transformers returning strides 4/8/16/32.

Every backbone maps ``images [B, 3, H, W]`` to a dict ``{"res2": [B, C2, H/4, W/4], "res3": [B, C3, H/8, W/8],
"res4": [B, C4, H/16, W/16], "res5": [B, C5, H/32, W/32]}`` (channels-last strides) and declares
``out_channels`` (name -> channels). ``model.backbone`` accepts the names in ``BACKBONES`` (name -> builder),
``model.backbone_norm`` those in ``NORMS``.
Networks come from torchvision constructors with ``weights=None``; pretrained weights are only ever read
from the path / URI in ``model.pretrained`` (a torchvision-format state dict), never downloaded.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpformer_ray import storage
from mpformer_ray.config import ModelConfig, registered

# (embed_dim, depths, num_heads, stochastic depth) of torchvision's swin_t / swin_s / swin_b, built here so that
# the window size can differ from their 7
_SWINS = {"swin_t": (96, [2, 2, 6, 2], [3, 6, 12, 24], 0.2), "swin_s": (96, [2, 2, 18, 2], [3, 6, 12, 24], 0.3),
          "swin_b": (128, [2, 2, 18, 2], [4, 8, 16, 32], 0.5)}


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the input's dtype: [B, C, H, W] (any dtype) -> fp32 [B, C, H, W].

    A group's statistics average (C / groups) x H x W values, and at the coarse levels of a small input that
    is a handful (16 channels x 2 pixels for resnet18's res5 at a 64x32 image). CUDA autocast already runs
    group_norm in fp32 and returns fp32; CPU autocast runs it in the input's dtype (bf16 in, bf16 out). Doing
    it in fp32 here gives every device the same numerics; the next convolution casts back under autocast.
    The parameters keep nn.GroupNorm's names, so state dicts are unchanged.
    """

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps)


def group_norm(channels: int, max_groups: int = 32) -> GroupNorm32:
    """GroupNorm (fp32, see GroupNorm32) with the largest group count <= ``max_groups`` that divides ``channels``."""
    groups = next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)
    return GroupNorm32(groups, channels)


def frozen_batch_norm(channels: int) -> nn.Module:
    # torchvision (about 2.5 s to import) is imported where a network is built: every config check reads the
    # names of NORMS and BACKBONES, in each job's driver and each sweep trial
    from torchvision.ops import FrozenBatchNorm2d

    return FrozenBatchNorm2d(channels)


# model.backbone_norm -> a ResNet's norm layer (channels -> module); the config's choices read this dict
NORMS: dict[str, Callable[[int], nn.Module]] = {"frozen": frozen_batch_norm, "group": group_norm}


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without avgpool / fc; attribute names match torchvision's state dict."""

    def __init__(self, name: str, norm: str, stride_in_1x1: bool = False):
        super().__init__()
        import torchvision  # see frozen_batch_norm

        build = getattr(torchvision.models, name)  # a BACKBONES name: resnet18 / resnet50 / resnet101
        net = build(weights=None, norm_layer=registered(NORMS, norm, "model.backbone_norm"))
        if stride_in_1x1:
            for layer in (net.layer2, net.layer3, net.layer4):
                block = layer[0]
                if not hasattr(block, "conv3"):
                    raise ValueError(f"model.resnet_stride_in_1x1=true needs a bottleneck ResNet; {name} has none")
                block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        widths = [self._width(layer) for layer in (self.layer1, self.layer2, self.layer3, self.layer4)]
        self.out_channels = {f"res{i + 2}": c for i, c in enumerate(widths)}
        # channels-last convolutions skip the layout conversions oneDNN (CPU) and cuDNN (tensor cores) make
        # around NCHW ones; the features stay channels-last, which the pixel decoder flattens without a copy
        self.to(memory_format=torch.channels_last)

    @staticmethod
    def _width(layer: nn.Sequential) -> int:
        block = layer[-1]
        last_norm = block.bn3 if hasattr(block, "bn3") else block.bn2
        return last_norm.weight.shape[0]

    def freeze_stem(self) -> None:
        """Mask2Former freezes res1 (conv1 + its norm) when starting from pretrained weights."""
        for p in [*self.conv1.parameters(), *self.bn1.parameters()]:
            p.requires_grad_(False)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = {}
        for name, layer in zip(self.out_channels, (self.layer1, self.layer2, self.layer3, self.layer4)):
            x = layer(x)
            out[name] = x
        return out


class SwinBackbone(nn.Module):
    """A torchvision Swin Transformer's 4 stages, each output LayerNorm-ed and permuted to NCHW.

    As in Mask2Former's Swin, every output stage gets its own fresh LayerNorm (``out_norms``); the
    classification model's final ``norm`` and ``head`` are not part of this module.

    One difference from Mask2Former's (detection) Swin remains: where a stage's feature map is no larger than
    the window on a side (below 224 pixels of input for the last stage at window 7), torchvision does not shift
    windows along that side, Mask2Former's Swin still does (and Hugging Face's shrinks the window instead).
    Inputs of at least 32 x (window + 1) pixels a side compute the same in all three.
    """

    def __init__(self, name: str, window: int = 7):
        super().__init__()
        import torchvision  # see frozen_batch_norm

        embed_dim, depths, num_heads, drop_path = _SWINS[name]
        net = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=embed_dim, depths=depths,
                                                 num_heads=num_heads, window_size=[window, window],
                                                 stochastic_depth_prob=drop_path)
        self.features = net.features  # [patch embed, stage1, merge, stage2, merge, stage3, merge, stage4]
        widths = [self.features[i][-1].norm1.normalized_shape[0] for i in (1, 3, 5, 7)]
        self.out_norms = nn.ModuleList(nn.LayerNorm(c) for c in widths)
        self.out_channels = {f"res{i + 2}": c for i, c in enumerate(widths)}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = {}
        for i, stage in enumerate(self.features):
            x = stage(x)  # NHWC
            if i % 2 == 1:
                level = i // 2
                out[f"res{level + 2}"] = self.out_norms[level](x).permute(0, 3, 1, 2)  # channels-last, as ResNet's
        return out


def load_pretrained(backbone: ResNetBackbone | SwinBackbone, uri: str) -> None:
    """Load a torchvision-format state dict from a local path or s3:// URI into ``backbone``.

    The classifier (``fc.`` / ``head.``, and Swin's final ``norm.``) is ignored; any other missing or
    unexpected key, or a shape mismatch, is an error naming ``uri`` and the keys.
    """
    data = storage.read_bytes(uri)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"model.pretrained={uri}: not a torch state dict readable with weights_only=True: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"model.pretrained={uri}: expected a torchvision state dict (name -> tensor), "
                         f"got {type(state).__name__}")
    ignored = ("fc.", "head.") + (("norm.",) if isinstance(backbone, SwinBackbone) else ())
    new_here = ("out_norms.",) if isinstance(backbone, SwinBackbone) else ()
    state = {k: v for k, v in state.items() if not k.startswith(ignored)}
    try:
        missing, unexpected = backbone.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ValueError(f"model.pretrained={uri} does not fit the backbone: {e}") from e
    missing = [k for k in missing if not k.startswith(new_here)]
    if missing or unexpected:
        raise ValueError(
            f"model.pretrained={uri} does not match the backbone: missing keys {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''} ({len(missing)}), unexpected keys {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''} ({len(unexpected)}); check model.backbone"
        )


def build_resnet(cfg: ModelConfig) -> ResNetBackbone:
    if cfg.pretrained and cfg.backbone_norm != "frozen":
        raise ValueError(f"model.pretrained={cfg.pretrained} holds BatchNorm statistics; set "
                         "model.backbone_norm=frozen to load it (group norm is for training from scratch)")
    return ResNetBackbone(cfg.backbone, cfg.backbone_norm, cfg.resnet_stride_in_1x1)


def build_swin(cfg: ModelConfig) -> SwinBackbone:
    return SwinBackbone(cfg.backbone, cfg.swin_window)


# model.backbone -> its builder (ModelConfig -> module); the config's choices read this dict
BACKBONES: dict[str, Callable[[ModelConfig], ResNetBackbone | SwinBackbone]] = {
    **dict.fromkeys(("resnet18", "resnet50", "resnet101"), build_resnet), **dict.fromkeys(_SWINS, build_swin)}


def build_backbone(cfg: ModelConfig) -> ResNetBackbone | SwinBackbone:
    """The backbone named by ``cfg.backbone`` (``out_channels`` tells the pixel decoder its inputs)."""
    backbone = registered(BACKBONES, cfg.backbone, "model.backbone")(cfg)
    if cfg.pretrained:
        load_pretrained(backbone, cfg.pretrained)
        if isinstance(backbone, ResNetBackbone):
            backbone.freeze_stem()
    return backbone
