"""From sharded Parquet records to model batches: Ray Data streaming, or plain PyTorch.

Training data is one stream of images (``Units``): epoch after epoch, each a fresh seeded order
of the shards and of the rows in them; a position in it counts images from its start, and a
checkpoint records how far the run got.

Ray path (training on a cluster)::

    from_items(work items) -> map_batches(read shard + decode + augment, num_cpus=data.cpus_per_task)
      -> TorchTrainer(datasets={"train": factory}) / ds.streaming_split(n)  # one stream per worker
      -> stream_batches(shard, batch_size)                                  # on the training worker

``stream.build_train_stream`` makes all the epochs a run still needs one Ray Data execution, so no
epoch boundary stops the stream while the next epoch's first shards are read; what its tasks run
is in ``stream.py``, which does not import torch. Rows travel through
Ray's object store as uint8 image bytes plus bit-packed masks (about 1/8 byte per mask pixel);
normalisation and padding happen on the training worker.

Plain path (unit tests, the benchmark's DataLoader peer): ``local_stream`` / ``local_batches``
run the same read + decode + augment + collate in a ``torch.utils.data.IterableDataset``.

Augmentation randomness is a function of (train.seed, epoch, image_id) in both paths.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator

import numpy as np
import pyarrow.compute as pc
import torch

from mpformer_ray.config import Config, DataConfig
from mpformer_ray.data.records import decode_row
from mpformer_ray.data.stream import Units, augmented_sample, unpack
from mpformer_ray.data.transforms import normalize

_SHUFFLE_BUFFER_BATCHES = 8

Batch = tuple[torch.Tensor, list[dict[str, torch.Tensor]]]


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
        images, sizes, targets = collate(unpack(table), size_divisibility)
        yield pc.max(table.column("epoch")).as_py(), to_model_input(images, sizes, targets, device)


class RecordsStream(torch.utils.data.IterableDataset):
    """Training samples (``augmented_sample`` dicts plus their "epoch") of images ``[start, stop)`` of
    ``units``' stream (endless when ``stop`` is None), without Ray, for a DataLoader: the work items
    are dealt round-robin to the DataLoader workers."""

    def __init__(self, units: Units, data_cfg: DataConfig, *, start: int = 0, stop: int | None = None):
        self.units, self.data_cfg, self.start, self.stop = units, data_cfg, start, stop

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        left = None if self.stop is None else self.stop - self.start
        for i, (epoch, shard, skip) in enumerate(self.units.work(self.start, self.stop)):
            size = self.units.sizes[shard] - skip
            if i % workers == worker:
                rows = self.units.rows(epoch, shard, skip)
                for row in rows if left is None else itertools.islice(rows, left):
                    yield {**augmented_sample(decode_row(row), self.data_cfg, self.units.seed, epoch), "epoch": epoch}
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


def local_stream(uri: str, cfg: Config, batch_size: int, start: int = 0, *,
                 num_workers: int = 0, device: torch.device | str = "cpu") -> Iterator[tuple[int, Batch]]:
    """``stream_batches`` without Ray, endless, from image ``start`` of the stream (same images, same
    augmentation): the training loop's data in unit tests."""
    stream = RecordsStream(Units.open(uri, seed=cfg.train.seed), cfg.data, start=start)
    return _local(stream, batch_size, num_workers, device, cfg.model.size_divisibility)


def local_batches(uri: str, cfg: Config, batch_size: int, *, seed: int = 0, epoch: int = 0, num_workers: int = 0, shuffle: bool = True,
                  device: torch.device | str = "cpu", size_divisibility: int = 32) -> Iterator[Batch]:
    """One epoch of the stream (every image once, augmented as the Ray path does for the same seed /
    epoch / image), from a plain ``torch.utils.data.DataLoader`` with ``num_workers`` processes."""
    units = Units.open(uri, seed=seed, shuffle=shuffle)
    stream = RecordsStream(units, cfg.data, start=epoch * units.num_images, stop=(epoch + 1) * units.num_images)
    for _, batch in _local(stream, batch_size, num_workers, device, size_divisibility):
        yield batch
