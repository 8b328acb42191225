"""From sharded Parquet records to model batches: Ray Data streaming, or plain PyTorch.

Training data is one stream of images (``Units``): epoch after epoch, each a fresh seeded order
of the shards and of the rows in them; a position in it counts images from its start, and a
checkpoint records how far the run got.

Ray path (training on a cluster)::

    range(work items) -> map_batches(read shard + decode + augment, num_cpus=data.cpus_per_task)
      -> TorchTrainer(datasets={"train": factory}) / ds.streaming_split(n)  # one stream per worker
      -> stream_batches(shard, batch_size)                                  # on the training worker

``build_train_stream`` makes all the epochs a run still needs one Ray Data execution, so no
epoch boundary stops the stream while the next epoch's first shards are read. Rows travel through
Ray's object store as uint8 image bytes plus bit-packed masks (about 1/8 byte per mask pixel);
normalisation and padding happen on the training worker.

Plain path (unit tests, the benchmark's DataLoader peer): ``local_stream`` / ``local_batches``
run the same read + decode + augment + collate in a ``torch.utils.data.IterableDataset``.

Augmentation randomness is a function of (train.seed, epoch, image_id) in both paths.
"""

from __future__ import annotations

import functools
import itertools
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from mpformer_ray import storage
from mpformer_ray.config import Config, DataConfig
from mpformer_ray.data.records import DataError, damaged_shard, decode_row, read_manifest
from mpformer_ray.data.transforms import augment, augment_rng, eval_transform, normalize

_MAP_BATCH_ROWS = 8  # images per decode/augment call: small, so a task's output streams out in small pieces
_SHUFFLE_BUFFER_BATCHES = 8
# Output block size of the read + decode tasks. Ray's default (128 MiB) holds back a task's output
# until ~40 augmented 1024^2 images are done, delaying the first batches; a separate repartition
# step instead cost 40% of the steady rate (benchmarks/data_pipeline.py, 512^2 crops on 2 cores).
_BLOCK_BYTES = 16 * 2**20
_RECORD_COLUMNS = ["image_id", "file_name", "height", "width", "image", "segments", "sem_seg"]

Batch = tuple[torch.Tensor, list[dict[str, torch.Tensor]]]


def _sample(record: dict, data_cfg: DataConfig, train: bool, seed: int, epoch: int) -> dict:
    """Decoded record -> {"image_id", "image" uint8 [h, w, 3], and for training
    "masks" bool [n, h, w] / "labels" int64 [n], for evaluation "orig_size" (H, W)}."""
    if train:
        out = augment(record, data_cfg, augment_rng(seed, epoch, record["image_id"]))
        return {"image_id": out["image_id"], "image": out["image"], "masks": out["masks"], "labels": out["labels"]}
    image, orig_size = eval_transform(record, data_cfg)
    return {"image_id": int(record["image_id"]), "image": image, "orig_size": orig_size}


def _pack(samples: list[dict], epoch: int) -> pa.Table:
    """Training samples of epoch ``epoch`` -> an Arrow table Ray can ship: images as raw uint8 bytes,
    masks bit-packed."""
    return pa.table({
        "image_id": pa.array([s["image_id"] for s in samples], pa.int64()),
        "epoch": pa.array([epoch] * len(samples), pa.int32()),
        "height": pa.array([s["image"].shape[0] for s in samples], pa.int32()),
        "width": pa.array([s["image"].shape[1] for s in samples], pa.int32()),
        "image": pa.array([s["image"].tobytes() for s in samples], pa.binary()),
        "labels": pa.array([s["labels"].tolist() for s in samples], pa.list_(pa.int64())),
        "masks": pa.array([np.packbits(s["masks"].reshape(-1)).tobytes() for s in samples], pa.binary()),
    })


def _unpack(table: pa.Table) -> list[dict]:
    """Inverse of ``_pack`` (without the epoch)."""
    ids, hs, ws = (table.column(c).to_pylist() for c in ("image_id", "height", "width"))
    images = table.column("image").to_pylist()
    out = []
    for i, (image_id, h, w) in enumerate(zip(ids, hs, ws)):
        labels = np.asarray(table.column("labels")[i].as_py(), np.int64)
        bits = np.frombuffer(table.column("masks")[i].as_py(), np.uint8)
        masks = np.unpackbits(bits, count=len(labels) * h * w).reshape(len(labels), h, w).astype(bool)
        out.append({"image_id": image_id, "image": np.frombuffer(images[i], np.uint8).reshape(h, w, 3),
                    "labels": labels, "masks": masks})
    return out


@dataclass(frozen=True)
class Units:
    """A split's training stream: its shards, visited epoch after epoch in a seeded order.

    Epoch ``e`` visits every shard once, in ``order(e)`` (a permutation seeded by (seed, e)); in a
    shard, its row groups in a permutation seeded by (seed, e, shard) and each group's rows in one
    seeded by (seed, e, shard, group). Positions in the stream count images from its start, so the
    stream can start anywhere (``work``), e.g. where a checkpoint left it. Ray Data hands out shards
    as its tasks finish them, so neighbouring epochs interleave a little, and a resume serves again
    (or skips) at most the images of the shards that were in flight.
    """

    uri: str
    paths: tuple[str, ...]
    sizes: tuple[int, ...]  # images per shard
    seed: int = 0
    shuffle: bool = True
    filesystem: Any = field(default=None, compare=False)

    @classmethod
    def open(cls, uri: str, *, seed: int = 0, shuffle: bool = True, endpoint_url: str | None = None) -> Units:
        fs, paths, manifest = _shard_paths(uri, endpoint_url)
        sizes = [s["num_images"] for s in manifest["shards"] if s["num_images"] > 0]
        return cls(uri, tuple(paths), tuple(sizes), seed, shuffle, fs)

    @property
    def num_images(self) -> int:
        return sum(self.sizes)

    def order(self, epoch: int) -> np.ndarray:
        """Shard indices in the order epoch ``epoch`` visits them."""
        order = np.arange(len(self.paths))
        return np.random.default_rng([self.seed, epoch]).permutation(order) if self.shuffle else order

    def work(self, start: int, stop: int | None = None) -> Iterator[tuple[int, int, int]]:
        """(epoch, shard, rows of it to skip) covering images ``[start, stop)`` of the stream (endless
        when ``stop`` is None); the last shard may yield past ``stop``."""
        epoch, offset = divmod(start, self.num_images)
        position = epoch * self.num_images
        while stop is None or position + offset < stop:
            for shard in self.order(epoch):
                size = self.sizes[shard]
                if offset >= size:
                    offset -= size
                elif stop is None or position < stop:
                    yield epoch, int(shard), offset
                    offset = 0
                position += size
            epoch += 1

    def rows(self, epoch: int, shard: int, skip: int = 0) -> Iterator[dict]:
        """The undecoded records of ``shard`` in epoch ``epoch``'s order, after the first ``skip``; a
        DataError naming the shard and the fix when it is truncated or damaged."""
        path = self.paths[shard]
        try:
            with self.filesystem.open_input_file(path) as f:
                parquet = pq.ParquetFile(f)
                groups = np.arange(parquet.metadata.num_row_groups)
                if self.shuffle:
                    groups = np.random.default_rng([self.seed, epoch, shard]).permutation(groups)
                for group in groups:
                    size = parquet.metadata.row_group(int(group)).num_rows
                    if skip >= size:
                        skip -= size
                        continue
                    rows = parquet.read_row_group(int(group), columns=_RECORD_COLUMNS).to_pylist()
                    if self.shuffle:
                        perm = np.random.default_rng([self.seed, epoch, shard, int(group)]).permutation(len(rows))
                        rows = [rows[i] for i in perm]
                    yield from rows[skip:]
                    skip = 0
        except (pa.ArrowException, OSError) as e:
            raise damaged_shard(self.uri, posixpath.basename(path), e) from None


def _decode_augment(ids: pa.Table, *, units: Units, work: list[tuple[int, int, int]],
                    data_cfg: DataConfig) -> Iterator[pa.Table]:
    """Ray Data ``map_batches`` UDF: numbers of work items (``ids["id"]`` indexes ``work``, as made by
    ``Units.work``) -> packed training samples, ``_MAP_BATCH_ROWS`` at a time, so a shard's output
    streams out while it is decoded."""
    for item in ids.column("id").to_pylist():
        epoch, shard, skip = work[item]
        samples = []
        for row in units.rows(epoch, shard, skip):
            samples.append(_sample(decode_row(row), data_cfg, True, units.seed, epoch))
            if len(samples) == _MAP_BATCH_ROWS:
                yield _pack(samples, epoch)
                samples = []
        if samples:
            yield _pack(samples, epoch)


def _shard_paths(uri: str, endpoint_url: str | None) -> tuple[Any, list[str], dict]:
    manifest = read_manifest(uri, endpoint_url)
    fs, root = storage.resolve(uri, endpoint_url)
    paths = [posixpath.join(root, s["file"]) for s in manifest["shards"] if s["num_images"] > 0]
    if not paths:
        raise DataError(f"{uri}: the manifest lists no images; re-run jobs/prepare_data.py on a non-empty split")
    return fs, paths, manifest


def collate(samples: list[dict], size_divisibility: int = 32) -> tuple[torch.Tensor, list[tuple[int, int]], list[dict]]:
    """Pad a list of samples into one uint8 batch.

    Returns:
        images: uint8 [B, H, W, 3], H / W the batch max rounded up to ``size_divisibility``,
            zeros in the padding; sizes: each image's (h, w) before padding;
        targets: training {"labels": int64 [n], "masks": bool [n, H, W]} (False in the
            padding), evaluation {"orig_size": int64 [2]}; both also "image_id": int64 [].
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    step = max(1, size_divisibility)
    height = -(-max(s["image"].shape[0] for s in samples) // step) * step
    width = -(-max(s["image"].shape[1] for s in samples) // step) * step
    images = np.zeros((len(samples), height, width, 3), np.uint8)
    sizes, targets = [], []
    for i, s in enumerate(samples):
        h, w = s["image"].shape[:2]
        images[i, :h, :w] = s["image"]
        sizes.append((h, w))
        if "masks" in s:
            masks = np.zeros((len(s["masks"]), height, width), bool)
            masks[:, :h, :w] = s["masks"]
            target = {"labels": torch.tensor(s["labels"], dtype=torch.int64), "masks": torch.from_numpy(masks)}
        else:
            target = {"orig_size": torch.tensor(s["orig_size"], dtype=torch.int64)}
        targets.append({**target, "image_id": torch.tensor(s["image_id"], dtype=torch.int64)})
    return torch.from_numpy(images), sizes, targets


def to_model_input(images: torch.Tensor, sizes: list[tuple[int, int]], targets: list[dict],
                   device: torch.device | str = "cpu") -> Batch:
    """uint8 [B, H, W, 3] batch -> (float [B, 3, H, W] normalised with 0 in the padding, as
    Mask2Former pads after normalising; targets on ``device``)."""
    images = normalize(images.to(device, non_blocking=True))
    for i, (h, w) in enumerate(sizes):
        images[i, :, h:, :] = 0
        images[i, :, :, w:] = 0
    return images, [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]


def build_train_stream(uri: str, cfg: Config, *, start: int, stop: int, endpoint_url: str | None = None):
    """A Ray Dataset of packed training samples: images ``[start, stop)`` of the split's stream (see
    ``Units``; rounded out to whole shards) and one epoch more, because Ray's equal split among
    training workers holds back up to (workers - 1) rows at the end. All epochs are one execution,
    so that no epoch boundary waits for the next epoch's first reads. Consume it (or its
    ``streaming_split``) with ``stream_batches``.

    One work item (a shard in one epoch) per Ray task of ``data.cpus_per_task`` CPUs, which reads,
    decodes and augments it.
    """
    import ray.data

    units = Units.open(uri, seed=cfg.train.seed, endpoint_url=endpoint_url)
    work = list(units.work(start, stop + units.num_images))
    ds = ray.data.range(len(work), override_num_blocks=len(work))
    ds.context.target_max_block_size = _BLOCK_BYTES
    return ds.map_batches(
        _decode_augment,
        fn_kwargs={"units": units, "work": work, "data_cfg": cfg.data},
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=cfg.data.cpus_per_task,
    )


def stream_batches(source, batch_size: int, *, seed: int = 0, device: torch.device | str = "cpu",
                   size_divisibility: int = 32) -> Iterator[tuple[int, Batch]]:
    """(epoch, model batch) from a Ray ``DataIterator`` (``ray.train.get_dataset_shard`` /
    ``streaming_split``) or ``Dataset`` of ``build_train_stream``, until it ends.

    A batch is (images float [B, 3, H, W] normalised and zero-padded to the batch max rounded up to
    ``size_divisibility``, targets as in ``collate``); its epoch is that of its newest image (a batch
    at an epoch boundary holds both). A local shuffle buffer seeded with ``seed`` mixes rows across
    the shards in flight.
    """
    for table in source.iter_batches(batch_size=batch_size, batch_format="pyarrow", prefetch_batches=2,
                                     local_shuffle_buffer_size=batch_size * _SHUFFLE_BUFFER_BATCHES,
                                     local_shuffle_seed=seed):
        images, sizes, targets = collate(_unpack(table), size_divisibility)
        yield pc.max(table.column("epoch")).as_py(), to_model_input(images, sizes, targets, device)


class RecordsStream(torch.utils.data.IterableDataset):
    """Samples (``_sample`` dicts plus their "epoch") of images ``[start, stop)`` of the stream of the
    records at ``uri`` (``Units``; endless when ``stop`` is None), without Ray, for a DataLoader: the
    work items are dealt round-robin to the DataLoader workers."""

    def __init__(self, uri: str, data_cfg: DataConfig, *, train: bool = True, seed: int = 0, start: int = 0,
                 stop: int | None = None, shuffle: bool = True, endpoint_url: str | None = None):
        self.units = Units.open(uri, seed=seed, shuffle=shuffle, endpoint_url=endpoint_url)
        self.data_cfg, self.train, self.start, self.stop = data_cfg, train, start, stop

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        left = None if self.stop is None else self.stop - self.start
        for i, (epoch, shard, skip) in enumerate(self.units.work(self.start, self.stop)):
            size = self.units.sizes[shard] - skip
            if i % workers == worker:
                rows = self.units.rows(epoch, shard, skip)
                for row in rows if left is None else itertools.islice(rows, left):
                    yield {**_sample(decode_row(row), self.data_cfg, self.train, self.units.seed, epoch), "epoch": epoch}
            if left is not None:
                left -= size


def _collate_epoch(samples: list[dict], size_divisibility: int) -> tuple[int, torch.Tensor, list, list]:
    return max(s["epoch"] for s in samples), *collate(samples, size_divisibility)


def _local(stream: RecordsStream, batch_size: int, num_workers: int, device: torch.device | str,
           size_divisibility: int) -> Iterator[tuple[int, Batch]]:
    loader = torch.utils.data.DataLoader(
        stream, batch_size=batch_size, num_workers=num_workers,
        collate_fn=functools.partial(_collate_epoch, size_divisibility=size_divisibility),
        persistent_workers=False, prefetch_factor=2 if num_workers else None,
        multiprocessing_context="spawn" if num_workers else None)
    for epoch, images, sizes, targets in loader:
        yield epoch, to_model_input(images, sizes, targets, device)


def local_stream(uri: str, cfg: Config, batch_size: int, start: int = 0, *, endpoint_url: str | None = None,
                 num_workers: int = 0, device: torch.device | str = "cpu") -> Iterator[tuple[int, Batch]]:
    """``stream_batches`` without Ray, endless, from image ``start`` of the stream (same images, same
    augmentation): the training loop's data in unit tests."""
    stream = RecordsStream(uri, cfg.data, seed=cfg.train.seed, start=start, endpoint_url=endpoint_url)
    return _local(stream, batch_size, num_workers, device, cfg.model.size_divisibility)


def local_batches(uri: str, cfg: Config, batch_size: int, *, seed: int = 0, epoch: int = 0,
                  endpoint_url: str | None = None, train: bool = True, num_workers: int = 0,
                  shuffle: bool = True, device: torch.device | str = "cpu",
                  size_divisibility: int = 32) -> Iterator[Batch]:
    """One epoch of the stream (every image once; with ``train``, augmented as the Ray path does for the
    same seed / epoch / image), from a plain ``torch.utils.data.DataLoader`` with ``num_workers`` processes."""
    size = Units.open(uri, endpoint_url=endpoint_url).num_images
    stream = RecordsStream(uri, cfg.data, train=train, seed=seed, start=epoch * size, stop=(epoch + 1) * size,
                           shuffle=shuffle, endpoint_url=endpoint_url)
    for _, batch in _local(stream, batch_size, num_workers, device, size_divisibility):
        yield batch
