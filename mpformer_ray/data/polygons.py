"""Polygon masks for the synthetic generators (``synthetic``, ``synthetic_hard``), rasterised the way
COCO tools decode the polygons written to ``instances_*.json``, so both agree with the panoptic PNGs."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_util


def rasterize(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """Flat [x0, y0, x1, y1, ...] polygons -> bool [H, W] (union), as COCO tools decode them."""
    rles = mask_util.frPyObjects(polygons, height, width)
    return mask_util.decode(mask_util.merge(rles)).astype(bool)
