"""Array helpers shared by the metrics: predictions arrive as torch tensors (any device) or numpy."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def to_numpy(x: Any) -> np.ndarray:
    """A torch tensor (any device, any dtype) or array-like -> numpy array on the host."""
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bfloat16:  # numpy has no bfloat16 (AMP inference can produce it)
            x = x.float()
        return x.detach().cpu().numpy()
    return np.asarray(x)


def check_size(name: str, array: np.ndarray, size: tuple[int, int], where: str) -> None:
    """Raise when a prediction's trailing [H, W] differs from the ground truth's."""
    if tuple(array.shape[-2:]) != tuple(size):
        raise ValueError(f"{where}: prediction {name!r} has spatial size {tuple(array.shape[-2:])} but the ground "
                         f"truth is {tuple(size)}; resize predictions to the original image resolution before "
                         "evaluating")
