"""Mixed precision: ``train.amp`` -> the autocast dtype, for training and evaluation alike."""

from __future__ import annotations

import torch

from mpformer_ray.config import ConfigError


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """``train.amp`` -> autocast dtype (None = fp32). ``auto``: bf16 on GPUs that support it,
    fp16 (with a GradScaler) on older GPUs, fp32 on CPU."""
    if mode == "off":
        return None
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if mode == "bf16" and not bf16_ok:
            raise ConfigError(f"train.amp=bf16 but {torch.cuda.get_device_name(device)} has no bf16; "
                              "use train.amp=fp16 or train.amp=auto")
        if mode == "auto":
            return torch.bfloat16 if bf16_ok else torch.float16
    elif mode == "auto":
        return None
    return torch.bfloat16 if mode == "bf16" else torch.float16
