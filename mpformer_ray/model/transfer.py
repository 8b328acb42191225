"""Host-to-device copies that do not stall the device queue.

A plain ``tensor.to("cuda")`` of host memory waits until the GPU has finished everything queued before
it; in a training step bound by the host issuing kernels, each such copy lets the GPU run dry. Index
tensors built on the host (matching results, pilot layouts, level shapes) go through ``to_device``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def to_device(data: np.ndarray | Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """``data`` (host array or tensor) as a tensor on ``device``; to a CUDA device via pinned memory and an
    asynchronous copy (the caching host allocator keeps the pinned block until the copy is done), to
    other devices by a plain copy."""
    tensor = torch.as_tensor(data, dtype=dtype)
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)  # no copy when already there
