"""MP-Former: Mask2Former (backbone -> pixel decoder -> masked-attention decoder) with mask-piloted training.

Training (``model.train(); model(images, targets)``) returns the weighted losses; when
``model.pilot.enabled`` the decoder also runs the batch's pilot queries. Inference
(``model.eval(); model(images)``) never builds pilot queries: it is exactly Mask2Former.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpformer_ray.config import Config, ConfigError, ModelConfig
from mpformer_ray.model.backbone import build_backbone
from mpformer_ray.model.criterion import SetCriterion
from mpformer_ray.model.pilot import PilotQueries
from mpformer_ray.model.pixel_decoder import MSDeformAttnPixelDecoder
from mpformer_ray.model.postprocess import query_inference, thing_ids
from mpformer_ray.model.transformer_decoder import DecoderOutput, MultiScaleMaskedTransformerDecoder

Target = dict[str, Tensor]


class MPFormer(nn.Module):
    """The whole model: ``backbone``, ``pixel_decoder``, ``predictor`` (transformer decoder), ``pilot``
    (only when pilot training is enabled), and the training ``criterion``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg)
        self.pixel_decoder = MSDeformAttnPixelDecoder(cfg, self.backbone.out_channels)
        self.predictor = MultiScaleMaskedTransformerDecoder(cfg, in_channels=cfg.hidden_dim)
        self.pilot = PilotQueries.from_config(cfg) if cfg.pilot.enabled else None
        self.criterion = SetCriterion.from_config(cfg)
        self.thing_ids = thing_ids(cfg)

    def num_parameters(self, exclude_training_only: bool = True) -> int:
        """Parameter count; by default without the training-only pilot label embedding."""
        skip = {id(p) for p in self.pilot.parameters()} if exclude_training_only and self.pilot is not None else set()
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    def pad(self, images: Tensor, targets: list[Target] | None = None) -> tuple[Tensor, list[Target] | None]:
        """Zero-pad images [B, 3, H, W] (and target masks) on the bottom / right to ``size_divisibility``."""
        d = self.cfg.size_divisibility
        h, w = images.shape[-2:]
        ph, pw = (-h) % d if d > 1 else 0, (-w) % d if d > 1 else 0
        if ph or pw:
            images = F.pad(images, (0, pw, 0, ph))
            if targets is not None:
                targets = [{**t, "masks": F.pad(t["masks"], (0, pw, 0, ph))} for t in targets]
        return images, targets

    def _check(self, images: Tensor, targets: list[Target] | None) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"MPFormer: images must be float [B, 3, H, W], got shape {tuple(images.shape)}")
        if targets is None:
            return
        if len(targets) != images.shape[0]:
            raise ValueError(f"MPFormer: {images.shape[0]} images but {len(targets)} targets")
        for i, t in enumerate(targets):
            labels, masks = t.get("labels"), t.get("masks")
            if labels is None or masks is None:
                raise ValueError(f"MPFormer: targets[{i}] needs 'labels' and 'masks', has {sorted(t)}")
            if masks.dim() != 3 or masks.shape[0] != labels.shape[0] or masks.shape[-2:] != images.shape[-2:]:
                raise ValueError(f"MPFormer: targets[{i}]['masks'] must be [n, H, W] = [{labels.shape[0]}, "
                                 f"{images.shape[-2]}, {images.shape[-1]}] (n labels, the images' size), "
                                 f"got {tuple(masks.shape)}")
        # one range check for the whole batch: each check of a device tensor makes the host wait for the GPU
        labels = torch.cat([t["labels"].reshape(-1) for t in targets])
        if labels.numel() and not ((labels >= 0) & (labels < self.cfg.num_classes)).all():
            bad = next(i for i, t in enumerate(targets)
                       if ((t["labels"] < 0) | (t["labels"] >= self.cfg.num_classes)).any())
            raise ValueError(f"MPFormer: targets[{bad}]['labels'] must lie in [0, {self.cfg.num_classes}) "
                             f"(model.num_classes), got {targets[bad]['labels'].tolist()}")

    def forward_raw(self, images: Tensor, targets: list[Target] | None = None) -> DecoderOutput:
        """Decoder outputs for images [B, 3, H, W] (padded here to ``size_divisibility``; masks at
        H'/4 x W'/4 of the padded size), with pilot slots in training mode when targets are given and
        the pilot is enabled."""
        self._check(images, targets)
        return self._decode(*self.pad(images, targets))

    def _decode(self, images: Tensor, targets: list[Target] | None) -> DecoderOutput:
        """forward_raw on already padded images and targets."""
        mask_features, multi_scale = self.pixel_decoder(self.backbone(images))
        return self.decode_features(mask_features, multi_scale, targets, tuple(images.shape[-2:]))

    def decode_features(self, mask_features: Tensor, multi_scale: list[Tensor], targets: list[Target] | None,
                        image_size: tuple[int, int]) -> DecoderOutput:
        """The transformer decoder (with pilot queries in training mode when ``targets`` are given and the
        pilot is enabled) on pixel-decoder outputs: mask_features [B, mask_dim, H/4, W/4], multi_scale 3 maps
        [B, hidden_dim, h_l, w_l] (strides 32, 16, 8) of padded images of ``image_size`` = (H, W)."""
        pilot = None
        if self.training and self.pilot is not None and targets is not None:
            pilot = self.pilot(targets, self.cfg.num_queries, image_size)
        return self.predictor(multi_scale, mask_features, pilot)

    def forward(self, images: Tensor, targets: list[Target] | None = None,
                image_sizes: list[tuple[int, int]] | None = None,
                output_sizes: list[tuple[int, int]] | None = None) -> dict[str, Tensor] | list[dict]:
        """Training: weighted losses {name: scalar}. Inference: one result dict per image (module docstring
        of ``postprocess.py``) for the tasks ``model.test`` enables, at ``output_sizes`` (default: the valid
        ``image_sizes`` region, default: the whole input)."""
        if self.training and targets is None:
            raise ValueError("MPFormer in training mode needs targets; call model.eval() for inference")
        self._check(images, targets if self.training else None)
        input_size = tuple(images.shape[-2:])
        images, targets = self.pad(images, targets if self.training else None)
        outputs = self._decode(images, targets)
        if self.training:
            return self.criterion(outputs, targets)
        return self.postprocess(outputs, input_size, tuple(images.shape[-2:]), image_sizes, output_sizes)

    def postprocess(self, outputs: DecoderOutput, input_size: tuple[int, int], padded: tuple[int, int],
                    image_sizes: list[tuple[int, int]] | None, output_sizes: list[tuple[int, int]] | None,
                    compact: bool = False) -> list[dict]:
        """Decoder outputs of images of ``input_size`` (padded to ``padded``) -> one result dict per image;
        with ``compact`` the same results in ``postprocess.compact_inference``'s form, on the CPU, without
        any query's or class's full-resolution float map (prediction and evaluation of large images)."""
        return query_inference(outputs.pred_logits, outputs.pred_masks, self.cfg.test, self.thing_ids, input_size,
                               padded, image_sizes, output_sizes, compact)


def build_model(cfg: Config | ModelConfig) -> MPFormer:
    """The MP-Former described by ``cfg`` (a whole Config or its ``model`` section). Its classes must be set:
    the presets leave ``model.num_classes`` to the data, which the training job's preflight reads, and a
    checkpoint's config holds them; anything else fills them with ``config.with_classes``."""
    model_cfg = cfg.model if isinstance(cfg, Config) else cfg
    if model_cfg.num_classes is None:
        raise ConfigError(
            "model.num_classes is not set: it comes from the training data (jobs/train.py reads it from data.train's "
            "manifest). To build a model without that, take the classes of the data it is for with "
            "mpformer_ray.config.with_classes(cfg, read_manifest(uri)['classes']), or set --set model.num_classes=K")
    return MPFormer(model_cfg)
