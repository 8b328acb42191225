"""Training augmentations and the evaluation resize, as in Mask2Former.

All functions take one decoded record (the ``read_records`` format) and are pure numpy:
the randomness comes only from the ``rng`` argument, so a caller that seeds it from
(seed, epoch, image_id) (``augment_rng``) gets the same augmentation for the same image
in the same epoch wherever it runs (a Ray Data task or a DataLoader worker).

- ``lsj`` (COCO, large-scale jitter): resize so the image fits ``scale x crop_size`` with
  scale ~ U(min_scale, max_scale), crop a random ``crop_size`` window (or less when the
  resized image is smaller), pad to exactly ``crop_size``, flip.
- ``resize_crop`` (ADE20K / Cityscapes): resize the short side to r x max(crop_size) with
  r drawn from {0.5, 0.6, ..., 2.0} (long side capped at 4 x max(crop_size)), random crop of
  at most ``crop_size`` that avoids crops where one class covers more than ``cat_max_ratio``
  of the labelled pixels (up to 10 tries), flip.
- ``none``: the image as it is.

Resizing and cropping are fused: each output pixel is looked up in the source once, so
masks are never materialised at the (up to 2x) resized size. The image is resampled
bilinearly (PIL, over the source window that the crop covers), masks and label maps by
nearest neighbour on the same grid.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from mpformer_ray.config import DataConfig

if TYPE_CHECKING:
    import torch

PIXEL_MEAN = (123.675, 116.28, 103.53)  # RGB, 0-255 space
PIXEL_STD = (58.395, 57.12, 57.375)
IGNORE_LABEL = 255
# LSJ pads with the mean colour so the padding normalises to ~0, like the batch padding
_PAD_COLOUR = tuple(int(round(m)) for m in PIXEL_MEAN)
_SHORT_SIDE_RATIOS = np.arange(5, 21) / 10.0  # Mask2Former's [0.5, 0.6, ..., 2.0] x base
_CROP_TRIES = 10


def augment_rng(seed: int, epoch: int, image_id: int) -> np.random.Generator:
    """The generator for one image's augmentation: same (seed, epoch, image) -> same draw."""
    return np.random.default_rng([int(seed), int(epoch), int(image_id)])


def _semantic_map(record: dict) -> np.ndarray:
    """uint8 [H, W] class map for the crop constraint: the record's own ``sem_seg`` if it has
    one, else painted from its segments; crowd pixels and unlabelled pixels are 255."""
    h, w = record["image"].shape[:2]
    if record.get("sem_seg") is not None:
        sem = record["sem_seg"].copy()
    else:
        sem = np.full((h, w), IGNORE_LABEL, np.uint8)
        for seg in record["segments"]:
            sem[seg["mask"]] = seg["category_id"]
    for seg in record["segments"]:
        if seg["iscrowd"]:
            sem[seg["mask"]] = IGNORE_LABEL
    return sem


def _source_index(out_size: int, offset: int, resized: int, source: int) -> np.ndarray:
    """Nearest source index for output pixels ``offset .. offset + out_size`` of an axis
    resized from ``source`` to ``resized`` pixels: int64 [out_size]."""
    centres = (np.arange(out_size) + offset + 0.5) * (source / resized)
    return np.minimum(centres.astype(np.int64), source - 1)


class _Window:
    """A crop window ``[y0, y0 + ch) x [x0, x0 + cw)`` of the image resized to (nh, nw)."""

    def __init__(self, src_hw: tuple[int, int], resized_hw: tuple[int, int], y0: int, x0: int, ch: int, cw: int):
        self.h, self.w = src_hw
        self.nh, self.nw = resized_hw
        self.y0, self.x0, self.ch, self.cw = y0, x0, ch, cw
        self.rows = _source_index(ch, y0, self.nh, self.h)
        self.cols = _source_index(cw, x0, self.nw, self.w)

    def image(self, image: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> bilinear-resampled uint8 [ch, cw, 3]."""
        sy, sx = self.h / self.nh, self.w / self.nw
        box = (self.x0 * sx, self.y0 * sy, (self.x0 + self.cw) * sx, (self.y0 + self.ch) * sy)
        return np.asarray(Image.fromarray(image).resize((self.cw, self.ch), Image.BILINEAR, box=box))

    def nearest(self, array: np.ndarray) -> np.ndarray:
        """[..., H, W] (masks or label maps) -> [..., ch, cw] by nearest neighbour."""
        return array[..., self.rows[:, None], self.cols[None, :]]


def _resized_size(h: int, w: int, scale: float) -> tuple[int, int]:
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def _random_offset(rng: np.random.Generator, resized: int, crop: int) -> int:
    return int(rng.integers(0, resized - crop + 1))


def _lsj_window(rng: np.random.Generator, h: int, w: int, cfg: DataConfig) -> _Window:
    crop_h, crop_w = cfg.crop_size
    s = rng.uniform(cfg.min_scale, cfg.max_scale)
    nh, nw = _resized_size(h, w, min(crop_h * s / h, crop_w * s / w))
    ch, cw = min(crop_h, nh), min(crop_w, nw)
    return _Window((h, w), (nh, nw), _random_offset(rng, nh, ch), _random_offset(rng, nw, cw), ch, cw)


def _resize_crop_window(rng: np.random.Generator, record: dict, cfg: DataConfig) -> _Window:
    h, w = record["image"].shape[:2]
    base = max(cfg.crop_size)
    scale = base * float(rng.choice(_SHORT_SIDE_RATIOS)) / min(h, w)
    scale = min(scale, 4 * base / max(h, w))
    nh, nw = _resized_size(h, w, scale)
    ch, cw = min(cfg.crop_size[0], nh), min(cfg.crop_size[1], nw)
    sem = _semantic_map(record) if cfg.cat_max_ratio < 1.0 else None
    for _ in range(_CROP_TRIES):
        window = _Window((h, w), (nh, nw), _random_offset(rng, nh, ch), _random_offset(rng, nw, cw), ch, cw)
        if sem is None:
            break
        labels = window.nearest(sem)
        counts = np.bincount(labels[labels != IGNORE_LABEL], minlength=1)
        counts = counts[counts > 0]
        # Mask2Former accepts a crop with >= 2 classes none of which dominates; after
        # the last try it keeps whatever it drew
        if len(counts) > 1 and counts.max() < cfg.cat_max_ratio * counts.sum():
            break
    return window


def augment(record: dict, cfg: DataConfig, rng: np.random.Generator) -> dict:
    """One training sample from a decoded record.

    Args:
        record: ``read_records`` format: "image" uint8 [H, W, 3], "segments" with bool [H, W]
            masks, "sem_seg" uint8 [H, W] or None, "image_id".
        cfg: ``augmentation``, ``crop_size`` [h, w], ``min_scale`` / ``max_scale``, ``flip``,
            ``cat_max_ratio``.
        rng: the only source of randomness (see ``augment_rng``).

    Returns:
        {"image": uint8 [h, w, 3], "masks": bool [n, h, w], "labels": int64 [n],
         "sem_seg": uint8 [h, w] or None, "image_id": int}. Crowd segments and segments
        the crop left empty are dropped; crowd pixels are 255 in "sem_seg". ``lsj`` output is
        exactly ``crop_size`` (padding: mean colour, masks False, sem_seg 255);
        ``resize_crop`` output is at most ``crop_size``.
    """
    image = record["image"]
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"record {record.get('file_name')!r}: image must be uint8 [H, W, 3], "
                         f"got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    kept = [s for s in record["segments"] if not s["iscrowd"]]
    masks = np.stack([s["mask"] for s in kept]) if kept else np.zeros((0, h, w), bool)
    labels = np.array([s["category_id"] for s in kept], np.int64)
    has_sem = record.get("sem_seg") is not None
    sem = _semantic_map(record) if has_sem else None

    if cfg.augmentation == "lsj":
        window = _lsj_window(rng, h, w, cfg)
    elif cfg.augmentation == "resize_crop":
        window = _resize_crop_window(rng, record, cfg)
    elif cfg.augmentation == "none":
        window = None
    else:
        raise ValueError(f"data.augmentation={cfg.augmentation!r}: use lsj, resize_crop or none")

    if window is not None:
        image, masks = window.image(image), window.nearest(masks)
        sem = window.nearest(sem) if has_sem else None
    if cfg.augmentation == "lsj":
        image, masks, sem = _pad_to(image, masks, sem, tuple(cfg.crop_size))
    if window is not None and cfg.flip and rng.random() < 0.5:
        image, masks = image[:, ::-1], masks[:, :, ::-1]
        sem = sem[:, ::-1] if has_sem else None

    nonempty = masks.any(axis=(1, 2))
    return {"image": np.ascontiguousarray(image), "masks": np.ascontiguousarray(masks[nonempty]),
            "labels": labels[nonempty], "sem_seg": None if sem is None else np.ascontiguousarray(sem),
            "image_id": int(record["image_id"])}


def _pad_to(image: np.ndarray, masks: np.ndarray, sem: np.ndarray | None,
            size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Pad bottom / right to ``size`` = (h, w)."""
    h, w = image.shape[:2]
    if (h, w) == size:
        return image, masks, sem
    out = np.empty((*size, 3), np.uint8)
    out[:] = _PAD_COLOUR
    out[:h, :w] = image
    padded = np.zeros((len(masks), *size), bool)
    padded[:, :h, :w] = masks
    if sem is not None:
        sem_out = np.full(size, IGNORE_LABEL, np.uint8)
        sem_out[:h, :w] = sem
        sem = sem_out
    return out, padded, sem


def eval_size(h: int, w: int, short_side: int, max_size: int) -> tuple[int, int]:
    """(h, w) after resizing the short side to ``short_side`` with the long side <= ``max_size``."""
    scale = short_side / min(h, w)
    if max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return _resized_size(h, w, scale)


def eval_transform(record: dict, cfg: DataConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """Evaluation input: (uint8 [h, w, 3] resized by ``test_short_side`` / ``test_max_size``,
    the original (H, W) that predictions are resized back to). No randomness."""
    image = record["image"]
    h, w = image.shape[:2]
    nh, nw = eval_size(h, w, cfg.test_short_side, cfg.test_max_size)
    if (nh, nw) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    return image, (h, w)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or float 0-255) images [B, H, W, 3] or [B, 3, H, W] -> float32 [B, 3, H, W],
    ``(x - PIXEL_MEAN) / PIXEL_STD``, on the input's device. A tensor whose dim 1 is 3 is read
    as channels-first."""
    import torch  # here only: the augmentations run in Ray Data tasks, which need no torch

    if images.dim() != 4 or 3 not in (images.shape[1], images.shape[3]):
        raise ValueError(f"images must be [B, H, W, 3] or [B, 3, H, W], got {tuple(images.shape)}")
    if images.shape[1] != 3:
        images = images.permute(0, 3, 1, 2)
    mean = torch.tensor(PIXEL_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() - mean) / std
