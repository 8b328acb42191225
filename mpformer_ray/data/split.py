"""A seeded train / val split of one export (``jobs/prepare_data.py --val-fraction F --seed S``).

Each image is ranked by SHA-256 of the seed and its path (the item's ``Work.key``), and the first
``round(F * N)`` ranks go to val. The rank depends on nothing but those bytes (no process-salted hash, no
random generator state, no listing order), so the same seed gives the same split on every machine and
every run; adding images to an export moves only the images whose ranks straddle the new boundary.
"""

from __future__ import annotations

import hashlib

from mpformer_ray.data.records import DataError


def _rank(seed: int, key: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{key}".encode()).digest()


def split_items(items: list[dict], key: str, val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train items, val items), each in the input order. At least one image lands on each side when there
    are two or more; ``val_fraction`` lies in (0, 1)."""
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction}: the share of images for val, in (0, 1) (e.g. 0.1)")
    if len(items) < 2:
        raise DataError(f"--val-fraction: {len(items)} image(s) to convert, too few to split into train and val")
    num_val = min(max(round(val_fraction * len(items)), 1), len(items) - 1)
    order = sorted(range(len(items)), key=lambda i: _rank(seed, str(items[i][key])))
    val = set(order[:num_val])
    return ([item for i, item in enumerate(items) if i not in val],
            [item for i, item in enumerate(items) if i in val])
