"""Reading one image and its label PNGs for the label-map datasets (ADE20K, Cityscapes, folders of label PNGs).

The converters pair an image file with label PNGs by name, check that every file decodes
and that the sizes agree, and count what they cannot use in a ConversionReport. The helpers
here do that per file, inside a conversion worker, so only file paths cross processes. Files
are read through ``mpformer_ray.storage``: ``root`` is a local directory or an ``s3://`` prefix.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import numpy as np
from PIL import Image

from mpformer_ray import storage
from mpformer_ray.data.records import ConversionReport

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
# single-channel modes a label PNG may have (P: a palette image, whose indices are the values)
LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")


def _read(uri: str) -> bytes:
    """The file's bytes; FileNotFoundError when it does not exist (counted like a file that does not decode)."""
    try:
        return storage.read_bytes(uri)
    except storage.StorageError:
        if not storage.exists(uri):
            raise FileNotFoundError(f"{uri} does not exist") from None
        raise


def read_image(root: str, rel: str, report: ConversionReport) -> tuple[bytes, int, int] | None:
    """The image file's bytes and (height, width) after a full decode (truncated files only fail
    there); None when it cannot be read, counted as ``unreadable_image``."""
    try:
        data = _read(storage.join(root, rel))
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            width, height = im.size
    except _DECODE_ERRORS as e:
        report.skip("unreadable_image", rel, f"{type(e).__name__}: {e}")
        return None
    return data, height, width


def read_label(root: str, rel: str, image_rel: str, size: tuple[int, int],
               report: ConversionReport) -> np.ndarray | None:
    """A single-channel label PNG as an int32 [H, W] array (8- or 16-bit files alike).

    None when it cannot be decoded (``unreadable_label``), holds colours instead of values (``rgb_label``)
    or its size differs from the image's ``size`` = (height, width) (``label_size_mismatch``); each is
    counted against ``image_rel`` with the label file named in the detail."""
    try:
        with Image.open(io.BytesIO(_read(storage.join(root, rel)))) as im:
            im.load()
            if im.mode not in LABEL_MODES:
                report.skip("rgb_label", image_rel,
                            f"{rel} is a {im.mode} image: a label PNG holds one class value per pixel in a single "
                            "channel (8- or 16-bit grey, or a palette image), not colours; map each colour to its "
                            "class index first")
                return None
            label = np.asarray(im).astype(np.int32)
    except _DECODE_ERRORS as e:
        report.skip("unreadable_label", image_rel, f"{rel}: {type(e).__name__}: {e}")
        return None
    if label.shape != size:
        report.skip("label_size_mismatch", image_rel,
                    f"{rel} is {label.shape[0]}x{label.shape[1]}, image is {size[0]}x{size[1]}")
        return None
    return label


def lookup(values: np.ndarray, table: np.ndarray, what: str, rel: str, image_rel: str,
           report: ConversionReport) -> np.ndarray:
    """Map label values through ``table`` (int64 [V], -1 = not in the dataset's table of values).

    Unknown values (negative, >= V, or -1 in the table) become 255 (ignore) and are counted
    once per image as ``unknown_label`` naming the values (``what``: how they are called, and
    why they are unknown); returns uint8 [H, W]."""
    if values.size and 0 <= values.min() and values.max() < len(table):
        mapped = table[values]  # the usual case: one gather, no clipping
    else:
        known = (values >= 0) & (values < len(table))
        mapped = np.where(known, table[np.clip(values, 0, len(table) - 1)], -1)
    unknown = mapped < 0
    if unknown.any():
        bad = np.unique(values[unknown])
        report.repair("unknown_label", image_rel,
                      f"{rel}: {what} {_short(bad.tolist())}, set to ignore (255)")
        mapped = np.where(unknown, 255, mapped)
    return mapped.astype(np.uint8)


def _short(values: Iterable[int], limit: int = 8) -> str:
    values = list(values)
    return ", ".join(map(str, values[:limit])) + (f", ... ({len(values)} values)" if len(values) > limit else "")


def class_segments(sem: np.ndarray, source_ids: list[int]) -> list[dict]:
    """One segment per class present in a uint8 [H, W] label map (255 = ignore), so semantic
    records carry the same segment list as the other tasks; a segment's id is its class's
    ``source_ids`` entry (unique within the image)."""
    # a histogram, not np.unique: no sort of every pixel
    present = [int(c) for c in np.flatnonzero(np.bincount(sem.ravel(), minlength=256)) if c != 255]
    return [{"id": source_ids[c], "category_id": c, "iscrowd": False, "mask": sem == c} for c in present]
