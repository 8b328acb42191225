"""Batch prediction with Ray Data: a stream of images through a pool of model replicas, outputs written
to storage as each image finishes; resumable.

    inputs (``list_inputs``)  a local folder or an s3:// prefix (image files at any depth), a text file of
                              image paths / URIs (one a line), or prepared records (a ``manifest.json``)
      -> load   (Ray tasks)   read and decode each image, resize it for the model (``eval_transform``)
      -> Replica (actors)     ``replicas`` model replicas (a GPU each, or CPUs); images of one size are
                              batched (``batch_size`` at most), then post-processed and written one by one
      -> driver               progress (done / total, images/s, ETA), failures, merged results

Per image, under ``out`` at the image's own relative path (``a/b/x.jpg`` -> ``a/b/x_*``): the files of
``mpformer_ray.predict.write_predictions``, then ``x_done.json`` (``DONE_SUFFIX``) last. An image that
fails (unreadable, corrupt, an output that cannot be written) gets ``x_failed.json`` (``FAILED_SUFFIX``)
with the reason instead, as it happens. A rerun skips every image with either marker (``retry_failed``:
tries the failed ones again), so outputs written before a crash or by an earlier run are kept and an image
cut off mid-way is predicted again (each file is written whole: a rename locally, one PUT on S3).

At the end: ``failures.json`` (``FAILURES``: every image of the input that has failed and not succeeded
since, with the reason) and, when the model predicts instances, ``instances_results.json``
(``MERGED_INSTANCES``): every done image's instances in one COCO results list, in input order.

Memory: a replica holds its batch's decoded images and post-processes one image at a time with
``compact_inference``, so its peak is ``jobs/predict.py``'s for one image plus the batch's pixels.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import shutil
import re
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TextIO

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mpformer_ray import storage
from mpformer_ray.errors import UserError
from mpformer_ray.log import format_eta

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DONE_SUFFIX = "_done.json"
FAILED_SUFFIX = "_failed.json"
FAILURES = "failures.json"
MERGED_INSTANCES = "instances_results.json"
PROGRESS_EVERY_S = 5.0
_READ_THREADS = 16


class InputError(UserError, ValueError):
    """The input names nothing to predict, or cannot be listed."""


class PredictError(UserError, ValueError):
    """Settings the cluster cannot run."""


@dataclass
class Item:
    """One image to predict. ``key``: its outputs' path under the output URI without the suffixes
    (``a/b/x`` for ``a/b/x.jpg``); ``source``: where it is read from (a URI, or ``SHARD_URI#file_name`` of
    records); ``name``: the file name ``write_predictions`` derives the output names from."""

    key: str
    source: str
    name: str
    image_id: int
    shard: str = ""  # records: the shard file that holds the image
    retry: bool = False  # an earlier run's failure is tried again: its failure marker goes on success


@dataclass
class Inputs:
    """What ``list_inputs`` found: the items in input order (sorted by path for a folder or prefix), the
    records URI when the input is prepared records, and the inputs that cannot be predicted
    [{"source", "key", "reason"}] (duplicate output names)."""

    items: list[Item]
    records: str | None = None
    rejected: list[dict] = field(default_factory=list)


def _stem(path: str) -> str:
    """``a/b/x.jpg`` -> ``a/b/x``: write_predictions' own naming (the last suffix of the base name goes)."""
    head, base = posixpath.split(path)
    return posixpath.join(head, re.sub(r"\.[^.]*$", "", base))


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_SUFFIXES)


def _walk(uri: str) -> list[str]:
    """The files under a local folder or an s3:// prefix, at any depth, as paths relative to it, sorted."""
    fs, root = storage.resolve(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as e:
        raise storage.StorageError(f"cannot list {uri}: {e}") from None
    root = root.rstrip("/")
    return sorted(posixpath.relpath(i.path, root) for i in infos if i.type == pafs.FileType.File)


def _file_type(uri: str) -> pafs.FileType:
    fs, path = storage.resolve(uri)
    try:
        return fs.get_file_info(path).type
    except OSError as e:
        raise storage.StorageError(f"cannot reach {uri}: {e}") from None


def list_inputs(uri: str) -> Inputs:
    """The images ``uri`` names (module docstring), each with its output key and image id: a record's own
    id, else the digits of a file name like ``000000397133.jpg``, else its 1-based position in the input."""
    from mpformer_ray.data.records import MANIFEST, read_manifest
    from mpformer_ray.predict import image_id_for

    uri = storage.absolute(uri)
    kind = _file_type(uri)
    if kind == pafs.FileType.Directory and storage.exists(storage.join(uri, MANIFEST)):
        return _dedupe(_record_items(uri, read_manifest(uri)), records=uri)
    if kind == pafs.FileType.File and not _is_image(uri):
        sources = _listed(uri)
        # keys relative to the listed images' common folder; URIs of several buckets keep their bucket
        plain = [s[len("s3://"):] if storage.is_s3(s) else s.lstrip("/") for s in sources]
        common = posixpath.commonpath([posixpath.dirname(p) for p in plain]) if plain else ""
        relative = [posixpath.relpath(p, common) if common else p for p in plain]
    elif kind == pafs.FileType.File:
        sources, relative = [uri], [posixpath.basename(uri)]
    elif kind == pafs.FileType.Directory:
        relative = [p for p in _walk(uri) if _is_image(p)]
        sources = [storage.join(uri, p) for p in relative]
        if not relative:
            raise InputError(f"{uri} holds no image files ({', '.join(IMAGE_SUFFIXES)}) at any depth")
    else:
        raise InputError(f"{uri} does not exist: give a folder, an s3:// prefix, a text file of image URIs or "
                         "prepared records")
    items = [Item(key=_stem(rel), source=src, name=posixpath.basename(rel), image_id=image_id_for(rel, i))
             for i, (src, rel) in enumerate(zip(sources, relative), start=1)]
    return _dedupe(items)


def _listed(uri: str) -> list[str]:
    """The image paths / URIs of a text file, one a line (blank lines and ``#`` comments skipped); relative
    local paths are taken from the current directory."""
    try:
        text = storage.read_bytes(uri).decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{uri} is neither an image ({', '.join(IMAGE_SUFFIXES)}) nor a text file of image "
                         "URIs") from None
    lines = [line.strip() for line in text.splitlines()]
    sources = [storage.absolute(line) for line in lines if line and not line.startswith("#")]
    if not sources:
        raise InputError(f"{uri} lists no images (one path or URI a line)")
    return sources


def _record_items(uri: str, manifest: dict) -> list[Item]:
    """One item per record: key and name from its ``file_name``, its own image id. Only the two columns
    are read (Parquet's footer and those column chunks), not the images."""
    items = []
    for shard in manifest["shards"]:
        fs, path = storage.resolve(storage.join(uri, shard["file"]))
        try:
            with fs.open_input_file(path) as f:
                table = pq.ParquetFile(f).read(columns=["image_id", "file_name"])
        except (pa.ArrowException, OSError) as e:
            from mpformer_ray.data.records import damaged_shard
            raise damaged_shard(uri, shard["file"], e) from None
        for image_id, file_name in zip(table.column("image_id").to_pylist(), table.column("file_name").to_pylist()):
            items.append(Item(key=_stem(file_name), source=f"{storage.join(uri, shard['file'])}#{file_name}",
                              name=posixpath.basename(file_name), image_id=int(image_id), shard=shard["file"]))
    return items


def _dedupe(items: list[Item], records: str | None = None) -> Inputs:
    """Inputs whose outputs would overwrite an earlier one's (``x.jpg`` and ``x.png``) are rejected."""
    first: dict[str, str] = {}
    kept, rejected = [], []
    for item in items:
        if item.key in first:
            rejected.append({"source": item.source, "key": item.key,
                             "reason": f"its outputs would overwrite those of {first[item.key]} (the same name "
                                       "without the suffix); rename one of them"})
        else:
            first[item.key] = item.source
            kept.append(item)
    return Inputs(kept, records, rejected)


def markers(out_uri: str) -> tuple[set[str], set[str]]:
    """The keys of the images under ``out_uri`` with complete outputs, and of those that failed and have not
    succeeded since (one listing of the output tree)."""
    if _file_type(out_uri) != pafs.FileType.Directory:
        return set(), set()
    paths = _walk(out_uri)
    done = {p[: -len(DONE_SUFFIX)] for p in paths if p.endswith(DONE_SUFFIX)}
    return done, {p[: -len(FAILED_SUFFIX)] for p in paths if p.endswith(FAILED_SUFFIX)} - done


# -- the Ray Data stages ----------------------------------------------------------------------------

_LOADED = pa.schema([("key", pa.string()), ("source", pa.string()), ("name", pa.string()),
                     ("image_id", pa.int64()), ("retry", pa.bool_()), ("error", pa.string()), ("image", pa.binary()),
                     ("height", pa.int32()), ("width", pa.int32()), ("resized", pa.binary()),
                     ("resized_height", pa.int32()), ("resized_width", pa.int32())])


def _loaded_row(item: dict, data: bytes | None, data_cfg) -> dict:
    """An item and its file's bytes (None: read them from ``source``) -> a ``_LOADED`` row: the decoded
    image and its resized copy as raw uint8 [H, W, 3] bytes, or ``error`` with the reason."""
    from mpformer_ray.data.transforms import eval_transform
    from mpformer_ray.predict import decode_image

    row = {k: item[k] for k in ("key", "source", "name", "image_id", "retry")}
    try:
        image = decode_image(storage.read_bytes(item["source"]) if data is None else data, item["source"])
        resized, (h, w) = eval_transform({"image": image}, data_cfg)
    except (storage.StorageError, ValueError) as e:  # their messages name the source
        return _failed_row(row, str(e))
    except Exception as e:  # noqa: BLE001 - e.g. Pillow's DecompressionBombError: that image fails, not the stream
        return _failed_row(row, f"{type(e).__name__}: {e}")
    return {**row, "error": "", "image": image.tobytes(), "height": h, "width": w, "resized": resized.tobytes(),
            "resized_height": resized.shape[0], "resized_width": resized.shape[1]}


def _failed_row(row: dict, reason: str) -> dict:
    return {**row, "error": reason, "image": b"", "height": 0, "width": 0, "resized": b"", "resized_height": 0,
            "resized_width": 0}


def load_images(items: pa.Table, *, data_cfg, records: str | None, rows_per_batch: int) -> Iterator[pa.Table]:
    """Ray Data UDF: items (``Item`` fields) -> ``_LOADED`` rows, ``rows_per_batch`` at a time. Records
    come as one item per shard: {"shard", "items": its records' ``Item`` fields to predict}."""
    from mpformer_ray.data.records import DataError, shard_rows

    rows = []
    for item in items.to_pylist():
        if records is None:
            rows.append(_loaded_row(item, None, data_cfg))
        else:
            wanted = {entry["key"]: entry for entry in item["items"]}
            try:
                for record in shard_rows(records, item["shard"]):
                    entry = wanted.pop(_stem(record["file_name"]), None)
                    if entry is not None:
                        rows.append(_loaded_row(entry, record["image"], data_cfg))
                        if len(rows) == rows_per_batch:
                            yield pa.Table.from_pylist(rows, schema=_LOADED)
                            rows = []
            except (DataError, storage.StorageError) as e:  # a damaged or missing shard: its unread images fail
                rows += [_failed_row({k: entry[k] for k in _LOADED.names[:5]}, str(e)) for entry in wanted.values()]
            continue
        if len(rows) == rows_per_batch:
            yield pa.Table.from_pylist(rows, schema=_LOADED)
            rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=_LOADED)


@dataclass
class ModelSpec:
    """What a replica loads: a checkpoint (file or run directory) or an exported ONNX file, with overrides."""

    checkpoint: str | None = None
    onnx: str | None = None
    overrides: list[str] = field(default_factory=list)
    device: str = "cpu"
    threads: int = 1

    def load(self):
        """(model, cfg, classes) in this process."""
        import torch

        torch.set_num_threads(self.threads)
        if self.onnx:
            from mpformer_ray.export import load_onnx
            return load_onnx(self.onnx, self.overrides, self.device, self.threads)
        from mpformer_ray.predict import load_for_inference
        return load_for_inference(self.checkpoint, self.overrides, self.device)


class Replica:
    """Ray Data callable class: one model replica. ``__call__`` predicts a batch of ``_LOADED`` rows,
    writes each image's outputs and its done or failed marker, and returns one row per image: key, source,
    error ("" when written), and this process's pid and peak RSS (bytes)."""

    def __init__(self, spec: ModelSpec, out_uri: str, score_threshold: float):
        self.model, self.cfg, self.classes = spec.load()
        self.device = spec.device
        self.out_uri = out_uri
        self.score_threshold = score_threshold

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        errors = {row["key"]: row["error"] for row in rows if row["error"]}
        groups: dict[tuple[int, int], list[dict]] = {}
        for row in rows:
            if not row["error"]:
                groups.setdefault((row["resized_height"], row["resized_width"]), []).append(row)
        for (rh, rw), group in groups.items():
            try:
                predictions = self._predict(group, rh, rw)
            except Exception as e:  # noqa: BLE001 - the batch fails, the stream goes on (e.g. out of memory)
                errors.update({row["key"]: f"prediction failed: {type(e).__name__}: {e}" for row in group})
                continue
            for row, prediction in zip(group, predictions):
                try:
                    self._write(row, prediction)
                except Exception as e:  # noqa: BLE001 - one image's outputs failed; the others go on
                    errors[row["key"]] = f"writing the outputs failed: {type(e).__name__}: {e}"
        for row in rows:
            if row["key"] in errors:
                failure = {"source": row["source"], "key": row["key"], "reason": errors[row["key"]]}
                try:
                    storage.write_bytes(storage.join(self.out_uri, row["key"] + FAILED_SUFFIX),
                                        json.dumps(failure).encode())
                except storage.StorageError:
                    pass  # the driver records the failure from the returned row all the same
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        return pa.Table.from_pylist([{"key": row["key"], "source": row["source"], "error": errors.get(row["key"], ""),
                                      "pid": os.getpid(), "peak_rss": peak} for row in rows])

    def _predict(self, group: list[dict], rh: int, rw: int) -> list[dict]:
        from mpformer_ray.predict import predict_resized

        resized = [np.frombuffer(row["resized"], np.uint8).reshape(rh, rw, 3) for row in group]
        return predict_resized(self.model, resized, [(row["height"], row["width"]) for row in group], self.device)

    def _write(self, row: dict, prediction: dict) -> None:
        from mpformer_ray.predict import write_predictions

        image = np.frombuffer(row["image"], np.uint8).reshape(row["height"], row["width"], 3)
        folder = posixpath.dirname(row["key"])
        out = storage.join(self.out_uri, folder) if folder else self.out_uri
        written = write_predictions(out, row["name"], image, prediction, self.classes, row["image_id"],
                                    score_threshold=self.score_threshold)
        marker = {"source": row["source"], "image_id": row["image_id"], "outputs": written}
        storage.write_bytes(storage.join(self.out_uri, row["key"] + DONE_SUFFIX), json.dumps(marker).encode())
        if row["retry"]:
            storage.delete(storage.join(self.out_uri, row["key"] + FAILED_SUFFIX))


# -- the driver --------------------------------------------------------------------------------------

@dataclass
class Settings:
    """How the stream runs: ``replicas`` actors of ``cpus_per_replica`` CPUs and ``gpus_per_replica`` GPUs;
    ``batch_size`` images per replica call (those of one size go through the model together);
    ``load_cpus``: the CPUs of each load task."""

    replicas: int = 1
    batch_size: int = 4
    cpus_per_replica: float = 1.0
    gpus_per_replica: float | None = None  # None: 1 when the cluster has GPUs and the device is not "cpu"
    load_cpus: float = 0.25
    score_threshold: float = 0.5
    retry_failed: bool = False


@dataclass
class Summary:
    """What a run did: images in the input, already done before it, predicted now, failed (with reasons:
    this run's, earlier runs' not tried again, duplicate names), seconds of the prediction stream (Ray's and
    the replicas' start included) and from its first result to its last (the steady rate's span), each replica's peak RSS in bytes {pid: bytes}, GPUs per replica."""

    total: int
    skipped: int
    predicted: int
    failures: list[dict]
    seconds: float
    steady_seconds: float
    peak_rss: dict[int, int]
    gpus_per_replica: float

    @property
    def images_per_s(self) -> float:
        return self.predicted / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_s(self) -> float:
        """Images per second once the replicas run: the first result's wait (starts, model loads) left out."""
        return (self.predicted - 1) / self.steady_seconds if self.steady_seconds > 0 else 0.0


def _progress(done: int, total: int, failed: int, start: float) -> str:
    elapsed = time.perf_counter() - start
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = format_eta((total - done) / rate) if rate > 0 else "?"
    return (f"[predict] {done}/{total} images ({failed} failed), {rate:.2f} images/s, eta {eta}")


def predict_stream(inputs: Inputs, todo: list[Item], spec: ModelSpec, cfg, out_uri: str,
                   settings: Settings) -> Iterator[dict]:
    """Run ``todo`` through the Ray Data pipeline (Ray must be up); yields each image's result row
    (``Replica.__call__``) as it finishes."""
    import ray.data

    from mpformer_ray.train.trainer import _quiet_ray_data

    _quiet_ray_data()
    if inputs.records is None:
        work = [asdict(item) for item in todo]
    else:  # one work item per shard: its rows are read once, those to predict kept
        by_shard: dict[str, list[dict]] = {}
        for item in todo:
            by_shard.setdefault(item.shard, []).append(asdict(item))
        work = [{"shard": shard, "items": items} for shard, items in by_shard.items()]
    ds = ray.data.from_items(work, override_num_blocks=max(1, min(len(work), 4 * settings.replicas * 8)))
    ds = ds.map_batches(load_images, fn_kwargs={"data_cfg": cfg.data, "records": inputs.records,
                                                "rows_per_batch": settings.batch_size},
                        batch_format="pyarrow", batch_size=1 if inputs.records else settings.batch_size,
                        num_cpus=settings.load_cpus)
    replicas = _replicas(settings, len(todo))
    ds = ds.map_batches(Replica, fn_constructor_kwargs={"spec": spec, "out_uri": out_uri,
                                                        "score_threshold": settings.score_threshold},
                        batch_format="pyarrow", batch_size=settings.batch_size,
                        # two batches queued per replica: the next is at hand when one ends, and a replica
                        # holds at most three batches' images (not Ray's default of four queued)
                        compute=ray.data.ActorPoolStrategy(size=replicas, max_tasks_in_flight_per_actor=2),
                        num_cpus=settings.cpus_per_replica, num_gpus=settings.gpus_per_replica or None)
    yield from ds.iter_rows()


def run_batch(input_uri: str, out_uri: str, spec: ModelSpec, settings: Settings, address: str | None = None,
              log: TextIO | None = None) -> Summary:
    """Predict every image of ``input_uri`` not yet done (nor failed, unless ``settings.retry_failed``) under
    ``out_uri`` (module docstring) on a Ray cluster (``address`` / RAY_ADDRESS, else a local one); progress
    and each failure on ``log`` (default: stderr)."""
    import ray

    from mpformer_ray.train.trainer import init_ray

    log = log or sys.stderr
    out_uri = storage.absolute(out_uri)
    # the model loads here first: a bad checkpoint, ONNX file or override fails before any worker starts
    _, cfg, _ = dataclasses.replace(spec, device="cpu").load()
    storage.check_writable(out_uri)
    inputs = list_inputs(input_uri)
    done, failed_before = markers(out_uri)
    todo = [dataclasses.replace(item, retry=item.key in failed_before) for item in inputs.items
            if item.key not in done and (settings.retry_failed or item.key not in failed_before)]
    kept_failures = [item for item in inputs.items if item.key in failed_before and not settings.retry_failed]
    total = len(inputs.items) + len(inputs.rejected)
    skipped = len(inputs.items) - len(todo) - len(kept_failures)
    print(f"[predict] {total} images: {skipped} already done, {len(kept_failures)} failed before (not tried "
          f"again{'' if not kept_failures else '; --retry-failed tries them'}), {len(todo)} to predict",
          file=log, flush=True)
    failures = list(inputs.rejected)
    for failure in inputs.rejected:
        print(f"error: {failure['source']}: {failure['reason']}", file=log, flush=True)
    peak: dict[int, int] = {}
    start = first = last_result = time.perf_counter()
    predicted, gpus = 0, 0.0
    if todo:
        started = init_ray(address)
        try:
            if started:
                _check_cpus(settings, len(todo), ray.cluster_resources().get("CPU", 0.0))
            gpus = settings.gpus_per_replica
            if gpus is None:
                gpus = 1.0 if spec.device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
            run_spec = dataclasses.replace(spec, device="cuda" if gpus else "cpu")
            print(f"[predict] up to {settings.replicas} replica(s) of {settings.cpus_per_replica:g} CPU and {gpus:g} "
                  f"GPU, batches of {settings.batch_size}", file=log, flush=True)
            last_print = start
            for row in predict_stream(inputs, todo, run_spec, cfg, out_uri,
                                      dataclasses.replace(settings, gpus_per_replica=gpus)):
                predicted += 1
                last_result = time.perf_counter()
                if predicted == 1:
                    first = last_result
                peak[row["pid"]] = max(peak.get(row["pid"], 0), row["peak_rss"])
                if row["error"]:
                    failures.append({"source": row["source"], "key": row["key"], "reason": row["error"]})
                    reason = row["error"]
                    named = reason if reason.startswith(row["source"]) else f"{row['source']}: {reason}"
                    print(f"error: {named}", file=log, flush=True)
                if last_result - last_print >= PROGRESS_EVERY_S or predicted == len(todo):
                    last_print = last_result
                    print(_progress(predicted, len(todo), len(failures) - len(inputs.rejected), start), file=log,
                          flush=True)
        finally:
            if started:
                ray.shutdown()
    seconds = time.perf_counter() - start
    failures += _read_failures(kept_failures, out_uri)
    storage.write_bytes(storage.join(out_uri, FAILURES), json.dumps(failures, indent=1).encode())
    if cfg.model.test.instance_on:
        failed = {f["key"] for f in failures}
        merge_instances([item for item in inputs.items if item.key not in failed], out_uri)
    return Summary(total=total, skipped=skipped, predicted=predicted, failures=failures, seconds=seconds,
                   steady_seconds=last_result - first, peak_rss=peak, gpus_per_replica=gpus)


def _replicas(settings: Settings, images: int) -> int:
    """Replicas to start: no more than there are batches (an idle actor only costs its start and memory)."""
    return min(settings.replicas, -(-images // settings.batch_size))


def _check_cpus(settings: Settings, images: int, cpus: float) -> None:
    """On a Ray of this machine alone (it cannot grow): the replicas must leave a load task its CPUs, else the
    stream waits forever for images no task can read."""
    need = _replicas(settings, images) * settings.cpus_per_replica + settings.load_cpus
    if need > cpus:
        raise PredictError(f"{_replicas(settings, images)} replica(s) of {settings.cpus_per_replica:g} CPU leave no "
                           f"{settings.load_cpus:g} CPU for reading images on this machine's {cpus:g} CPUs; lower "
                           f"--cpus-per-replica (e.g. {max(0.1, (cpus - settings.load_cpus) / settings.replicas):.2g}) "
                           "or --replicas")


def _read_failures(items: list[Item], out_uri: str) -> list[dict]:
    """The failure markers of ``items`` (earlier runs' failures), read 16 at a time."""
    def read(item: Item) -> dict:
        return json.loads(storage.read_bytes(storage.join(out_uri, item.key + FAILED_SUFFIX)))

    with ThreadPoolExecutor(_READ_THREADS) as pool:
        return list(pool.map(read, items))


def merge_instances(items: list[Item], out_uri: str) -> str:
    """Concatenate the done images' ``*_instances.json`` (in input order) into ``MERGED_INSTANCES`` under
    ``out_uri``: streamed through a local temporary file, so a million images' results never sit in memory."""
    def read(item: Item) -> list:
        return json.loads(storage.read_bytes(storage.join(out_uri, item.key + "_instances.json")))

    target = storage.join(out_uri, MERGED_INSTANCES)
    with tempfile.TemporaryDirectory(prefix="mpformer-merge-") as tmp:
        local = os.path.join(tmp, MERGED_INSTANCES)
        with open(local, "w") as f, ThreadPoolExecutor(_READ_THREADS) as pool:
            f.write("[")
            first = True
            for start in range(0, len(items), 1024):  # bounded read-ahead
                for results in pool.map(read, items[start:start + 1024]):
                    for result in results:
                        f.write(("" if first else ",\n") + json.dumps(result))
                        first = False
            f.write("]\n")
        fs, path = storage.resolve(target)
        try:
            if storage.is_s3(target):  # one (multipart) upload: the object appears whole
                pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
            else:  # beside the target, then renamed: a reader never sees a partial file
                shutil.copyfile(local, f"{path}.tmp")
                os.replace(f"{path}.tmp", path)
        except OSError as e:
            raise storage.StorageError(f"cannot write {target}: {e}") from None
    return target
