"""The record format every converter writes and every reader reads.

A prepared split is a directory (local or ``s3://``) holding ``manifest.json`` and sharded
Parquet files ``part-00000.parquet``, ... with one row per image:

    image_id int64, file_name string (relative to the dataset root), height int32, width int32,
    image binary (the source file's bytes, never re-encoded),
    segments list<struct<id int64, category_id int32 (contiguous train id), iscrowd bool,
                         area int64, bbox list<float64> (x, y, w, h),
                         rle binary (COCO compressed RLE counts; size = height, width)>>,
    sem_seg binary nullable (PNG of a uint8 label map, 255 = ignore)

``write_dataset`` converts small picklable work items in parallel, one shard per task; each
shard lands atomically with a ``part-XXXXX.report.json`` sidecar, so a rerun skips finished
shards. The manifest is written last and says what was skipped or repaired and why; when more
than ``max_skipped`` of the split was skipped there is no manifest but a DataError with the counts.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pycocotools import mask as mask_util

from mpformer_ray import storage
from mpformer_ray.errors import UserError
from mpformer_ray.log import format_eta

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
_EXAMPLES_PER_REASON = 5
# share of a split that may be skipped before a conversion fails: a few bad files are normal, most of
# a split missing (an archive not unpacked, a wrong folder) is a mistake to stop at
MAX_SKIPPED = 0.01

SEGMENT_TYPE = pa.struct([
    ("id", pa.int64()),
    ("category_id", pa.int32()),
    ("iscrowd", pa.bool_()),
    ("area", pa.int64()),
    ("bbox", pa.list_(pa.float64())),
    ("rle", pa.binary()),
])
SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("file_name", pa.string()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("image", pa.binary()),
    ("segments", pa.list_(SEGMENT_TYPE)),
    ("sem_seg", pa.binary()),
])


class DataError(UserError, ValueError):
    """Bad dataset input; the message names the file and the fix."""


class ConversionReport:
    """Counts what happened to bad input: ``skipped`` (the image is left out), ``repaired``
    (the image is kept, the bad part dropped) and ``kept`` (unusual but valid, e.g. an image
    with no annotations). With ``strict`` any skip or repair raises a DataError naming the file."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.skipped: dict[str, int] = {}
        self.repaired: dict[str, int] = {}
        self.kept: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}

    def _count(self, table: dict[str, int], reason: str, file: str) -> None:
        table[reason] = table.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < _EXAMPLES_PER_REASON and file not in examples:
            examples.append(file)

    def _fail(self, what: str, reason: str, file: str, detail: str) -> None:
        raise DataError(
            f"{file}: {reason}{': ' + detail if detail else ''} ({what} without --strict); fix or remove the file, "
            "or rerun without --strict to skip bad input and have it counted in the manifest"
        )

    def skip(self, reason: str, file: str, detail: str = "") -> None:
        if self.strict:
            self._fail("the image would be skipped", reason, file, detail)
        self._count(self.skipped, reason, file)

    def repair(self, reason: str, file: str, detail: str = "") -> None:
        if self.strict:
            self._fail("the bad part would be dropped", reason, file, detail)
        self._count(self.repaired, reason, file)

    def keep(self, reason: str, file: str) -> None:
        self._count(self.kept, reason, file)

    def merge(self, other: ConversionReport) -> None:
        self.merge_dict(other.to_dict())

    def merge_dict(self, data: dict) -> None:
        for name in ("skipped", "repaired", "kept"):
            table = getattr(self, name)
            for reason, n in data.get(name, {}).items():
                table[reason] = table.get(reason, 0) + n
        for reason, files in data.get("examples", {}).items():
            examples = self.examples.setdefault(reason, [])
            examples.extend(f for f in files if f not in examples)
            del examples[_EXAMPLES_PER_REASON:]

    def to_dict(self) -> dict:
        return {"skipped": dict(self.skipped), "repaired": dict(self.repaired), "kept": dict(self.kept),
                "examples": {k: list(v) for k, v in self.examples.items()}}


def encode_mask(mask: np.ndarray) -> dict:
    """bool [H, W] -> COCO compressed RLE {"size": [H, W], "counts": bytes}."""
    return mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))


def encode_png(label: np.ndarray) -> bytes:
    """uint8 [H, W] label map -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(label.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def make_row(*, image_id: int, file_name: str, image_bytes: bytes, height: int, width: int,
             segments: list[dict], sem_seg: np.ndarray | None) -> dict:
    """One Parquet row. ``segments``: {"id", "category_id", "iscrowd"} plus either "mask"
    (bool [H, W]) or "rle" (COCO RLE dict, compressed or not, of size [H, W]).
    ``sem_seg``: uint8 [H, W] (255 = ignore) or None."""
    out = []
    for seg in segments:
        if "mask" in seg:
            if seg["mask"].shape != (height, width):
                raise ValueError(f"{file_name}: segment {seg['id']} mask is {seg['mask'].shape}, "
                                 f"image is {(height, width)}")
            rle = encode_mask(seg["mask"])
        else:
            rle = seg["rle"]
            if list(rle["size"]) != [height, width]:
                raise ValueError(f"{file_name}: segment {seg['id']} RLE size {rle['size']}, image is {[height, width]}")
            if not isinstance(rle["counts"], (bytes, str)):
                rle = mask_util.frPyObjects(rle, height, width)
        counts = rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]
        rle = {"size": [height, width], "counts": counts}
        out.append({
            "id": int(seg["id"]), "category_id": int(seg["category_id"]), "iscrowd": bool(seg["iscrowd"]),
            "area": int(mask_util.area(rle)), "bbox": [float(v) for v in mask_util.toBbox(rle)], "rle": counts,
        })
    if sem_seg is not None and sem_seg.shape != (height, width):
        raise ValueError(f"{file_name}: sem_seg is {sem_seg.shape}, image is {(height, width)}")
    return {"image_id": int(image_id), "file_name": file_name, "height": int(height), "width": int(width),
            "image": image_bytes, "segments": out, "sem_seg": None if sem_seg is None else encode_png(sem_seg)}


def decode_row(row: dict) -> dict:
    """One Parquet row (a python dict) -> {"image_id", "file_name", "image": uint8 [H, W, 3],
    "segments": [{"id", "category_id", "iscrowd", "mask": bool [H, W]}], "sem_seg": uint8 [H, W] or None}."""
    height, width = int(row["height"]), int(row["width"])
    image = np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"))
    segments = [{
        "id": int(s["id"]), "category_id": int(s["category_id"]), "iscrowd": bool(s["iscrowd"]),
        "mask": mask_util.decode({"size": [height, width], "counts": s["rle"]}).astype(bool),
    } for s in ([] if row["segments"] is None else row["segments"])]
    sem = row.get("sem_seg")
    return {"image_id": int(row["image_id"]), "file_name": row["file_name"], "image": image, "segments": segments,
            "sem_seg": None if sem is None else np.asarray(Image.open(io.BytesIO(sem)))}


@dataclass
class Work:
    """What a converter hands ``write_dataset``: the work ``items`` (small picklable descriptions, file paths
    plus one image's annotations), the manifest ``classes`` and the picklable ``convert(item, report)``.
    ``key`` names the item field holding the image's path, the name a seeded split (``data.split``) sorts by;
    ``split`` is the split name the manifest records when it is not the one asked for (ADE20K's "training")."""

    items: list[dict]
    classes: list[dict]
    convert: Callable[[Any, ConversionReport], dict | None]
    key: str = "image"
    split: str | None = None


def _shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _report_name(index: int) -> str:
    return f"part-{index:05d}.report.json"


def _convert_shard(out_uri: str, index: int, items: Sequence, convert: Callable, strict: bool) -> dict:
    """Convert one shard's items and write its Parquet file, then its sidecar report."""
    report = ConversionReport(strict)
    rows = []
    for item in items:
        row = convert(item, report)
        if row is not None:
            rows.append(row)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=64)
    storage.write_bytes(storage.join(out_uri, _shard_name(index)), sink.getvalue().to_pybytes())
    sidecar = {"file": _shard_name(index), "num_items": len(items), "num_images": len(rows),
               "num_segments": sum(len(r["segments"]) for r in rows), **report.to_dict()}
    storage.write_bytes(storage.join(out_uri, _report_name(index)), json.dumps(sidecar).encode())
    return sidecar


def write_dataset(out_uri: str, items: Sequence, convert: Callable[[Any, ConversionReport], dict | None], *,
                  dataset: str, task: str, split: str, classes: list[dict], shard_size: int = 500,
                  num_workers: int = 0, strict: bool = False,
                  progress: bool = True, report: ConversionReport | None = None,
                  max_skipped: float = MAX_SKIPPED) -> dict:
    """Convert ``items`` into sharded Parquet under ``out_uri`` and return the manifest.

    ``items`` are small picklable work descriptions (file paths plus that image's annotations,
    never decoded images); ``convert`` is a picklable top-level function (or partial) turning one
    item into a ``make_row`` dict, or None when it skipped the item (after counting it in the
    report). Shards run in a process pool of ``num_workers`` (0 = all cores, 1 = in this process);
    the pool spawns fresh interpreters, so a calling script needs ``if __name__ == "__main__":``.
    ``report`` carries problems the caller found while building the items (merged into the
    manifest). A rerun reuses shards whose Parquet file and sidecar both exist.

    When more than ``max_skipped`` (a share, 0..1) of everything skipped or written was skipped, a
    DataError gives the counts by reason and no manifest is written; the shards that skipped
    something are forgotten, so a rerun after fixing the input converts them again.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if not 0 <= max_skipped <= 1:
        raise ValueError(f"max_skipped is a share of the split in [0, 1], got {max_skipped}")
    storage.check_writable(out_uri)
    shards = [items[i:i + shard_size] for i in range(0, len(items), shard_size)]
    existing = set(storage.listdir(out_uri))
    results: dict[int, dict] = {}
    for index in range(len(shards)):
        if _shard_name(index) in existing and _report_name(index) in existing:
            sidecar = json.loads(storage.read_bytes(storage.join(out_uri, _report_name(index))))
            # else written with another --shard-size, or the shard was truncated or damaged since
            if sidecar.get("num_items") == len(shards[index]) and _shard_rows_or_none(
                    out_uri, _shard_name(index)) == sidecar.get("num_images"):
                results[index] = sidecar
    todo = [i for i in range(len(shards)) if i not in results]
    workers = num_workers or os.cpu_count() or 1
    start, done_images = time.time(), 0

    def note(index: int, sidecar: dict) -> None:
        nonlocal done_images
        results[index] = sidecar
        done_images += sidecar["num_images"]
        if progress:
            elapsed = max(time.time() - start, 1e-6)
            converted = len(results) - (len(shards) - len(todo))  # this run's shards, not the reused ones
            eta = format_eta(elapsed / max(converted, 1) * (len(shards) - len(results)))
            print(f"[prepare] {split}: shards {len(results)}/{len(shards)} ({len(shards) - len(todo)} reused), "
                  f"{done_images / elapsed:.1f} images/s, eta {eta}", file=sys.stderr, flush=True)

    if workers == 1 or len(todo) <= 1:
        for index in todo:
            note(index, _convert_shard(out_uri, index, shards[index], convert, strict))
    else:
        # spawn, not fork: a forked child would inherit pyarrow's S3 client threads mid-state
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx) as pool:
            futures = {pool.submit(_convert_shard, out_uri, i, shards[i], convert, strict): i
                       for i in todo}
            try:
                for future in as_completed(futures):
                    note(futures[future], future.result())
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    total = ConversionReport()
    if report is not None:
        total.merge(report)
    for index in range(len(shards)):
        total.merge_dict(results[index])
    num_images = sum(r["num_images"] for r in results.values())
    skipped = sum(total.skipped.values())
    if skipped > max_skipped * (skipped + num_images):
        for index, sidecar in results.items():
            if sidecar.get("skipped"):
                storage.delete(storage.join(out_uri, _report_name(index)))
        raise DataError(_too_many_skipped(split, out_uri, total, skipped, num_images, max_skipped))
    manifest = {
        "schema_version": SCHEMA_VERSION, "dataset": dataset, "task": task, "split": split, "classes": classes,
        "num_images": num_images,
        "num_segments": sum(r["num_segments"] for r in results.values()),
        "shards": [{"file": _shard_name(i), "num_images": results[i]["num_images"]} for i in range(len(shards))],
        "reused_shards": len(shards) - len(todo),
        **total.to_dict(),
    }
    storage.write_bytes(storage.join(out_uri, MANIFEST), json.dumps(manifest, indent=1).encode())
    return manifest


def _too_many_skipped(split: str, out_uri: str, report: ConversionReport, skipped: int, written: int,
                      max_skipped: float) -> str:
    reasons = "; ".join(f"{reason}={n} (e.g. {', '.join(report.examples.get(reason, [])[:3])})"
                        for reason, n in sorted(report.skipped.items(), key=lambda kv: -kv[1]))
    share = skipped / (skipped + written)
    return (f"split {split!r}: {skipped} of {skipped + written} images ({100 * share:.1f} %) were skipped, more "
            f"than max_skipped={max_skipped:g} ({100 * max_skipped:g} %) allows, so {storage.join(out_uri, MANIFEST)} "
            f"was not written. Skipped: {reasons}. Fix: repair the input the reasons name (e.g. unpack every "
            "archive of the split where the dataset root expects it) and rerun; or rerun with --max-skipped "
            f"{math.ceil(100 * share) / 100:g} to write the split without them")


def _rerun(uri: str) -> str:
    return (f"re-run jobs/prepare_data.py with --out {uri} and the flags the split was prepared with (--dataset and "
            "its source: --root / --split, or --annotations / --images / --masks ...): it converts again what is "
            "missing or damaged, keeps the intact shards and writes the manifest")


def read_manifest(uri: str) -> dict:
    """The manifest of a prepared split; a DataError naming the file and the fix when it is absent,
    not valid JSON (truncated) or lacks the fields a split needs."""
    path = storage.join(uri, MANIFEST)
    if not storage.exists(path):
        raise DataError(f"{path} does not exist: prepare the split first with "
                        f"jobs/prepare_data.py --dataset ... --out {uri}")
    try:
        manifest = json.loads(storage.read_bytes(path))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise DataError(f"{path} is not valid JSON ({e}): it is truncated or damaged. Fix: {_rerun(uri)}") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path} holds a JSON {type(manifest).__name__}, not a manifest object. Fix: {_rerun(uri)}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"{path}: schema_version {manifest.get('schema_version')!r}, this code reads "
                        f"{SCHEMA_VERSION}; re-run jobs/prepare_data.py")
    missing = [k for k in ("classes", "shards", "num_images") if k not in manifest]
    shards = manifest.get("shards")
    if missing or not isinstance(shards, list) or not all(isinstance(s, dict) and {"file", "num_images"} <= s.keys()
                                                          for s in shards):
        what = f"lacks {missing}" if missing else "has a 'shards' list without 'file' / 'num_images' entries"
        raise DataError(f"{path} {what}. Fix: {_rerun(uri)}")
    return manifest


def damaged_shard(uri: str, file: str, err: Exception) -> DataError:
    """The error for shard ``file`` of the split at ``uri`` that Parquet cannot read (``err``)."""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return DataError(f"{storage.join(uri, file)} is not a readable Parquet shard ({reason}): it is truncated or "
                     f"damaged. Fix: {_rerun(uri)}")


def shard_rows(uri: str, file: str, batch_size: int = 16) -> Iterator[dict]:
    """The undecoded rows of shard ``file`` of the split at ``uri`` (one GET, ``batch_size`` rows decoded
    from Parquet at a time); a DataError naming the shard and the fix when it is truncated or damaged."""
    data = storage.read_bytes(storage.join(uri, file))
    try:
        for batch in pq.ParquetFile(pa.BufferReader(data)).iter_batches(batch_size=batch_size):
            yield from batch.to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise damaged_shard(uri, file, e) from None


def _shard_rows_or_none(uri: str, file: str) -> int | None:
    """Rows a shard's Parquet footer records (a few KB read), None when the footer cannot be read."""
    fs, path = storage.resolve(storage.join(uri, file))
    try:
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata.num_rows
    except (pa.ArrowException, OSError):
        return None


def check_shards(uri: str, manifest: dict | None = None) -> None:
    """Read every shard's Parquet footer (8 at a time): a DataError naming the first shard that is
    missing, truncated or damaged, or holds another number of rows than the manifest says."""
    manifest = manifest or read_manifest(uri)
    shards = manifest["shards"]
    with ThreadPoolExecutor(8) as pool:
        rows = list(pool.map(lambda s: _shard_rows_or_none(uri, s["file"]), shards))
    for shard, n in zip(shards, rows):
        if n is None:
            raise DataError(f"{storage.join(uri, shard['file'])} is missing or not a readable Parquet shard: it is "
                            f"truncated or damaged. Fix: {_rerun(uri)}")
        if n != shard["num_images"]:
            raise DataError(f"{storage.join(uri, shard['file'])} holds {n} rows, the manifest says "
                            f"{shard['num_images']}: it was replaced after the manifest was written. Fix: {_rerun(uri)}")


def read_records(uri: str) -> Iterator[dict]:
    """Decoded records of a prepared split, shard by shard (a few rows in memory at a time)."""
    manifest = read_manifest(uri)
    for shard in manifest["shards"]:
        for row in shard_rows(uri, shard["file"]):
            yield decode_row(row)
