"""From sharded Parquet records to model batches: Ray Data streaming, or plain PyTorch.

Ray path (training on a cluster)::

    read_parquet(shards, filesystem=storage.resolve(uri))      # shard order reshuffled per epoch
      -> map_batches(decode + augment, num_cpus=data.cpus_per_task)   # CPU tasks
      -> TorchTrainer(datasets={"train": ds}) / ds.streaming_split(n)  # one stream per worker
      -> iter_batches(shard, batch_size, epoch=e)                      # on the training worker

Rows travel through Ray's object store as uint8 image bytes plus bit-packed masks (about
1/8 byte per mask pixel); normalisation and padding happen on the training worker.

Plain path (unit tests, the benchmark's DataLoader peer): ``local_batches`` runs the same
decode + augment + collate in a ``torch.utils.data.IterableDataset`` over the shards' row groups.

Augmentation randomness is a function of (train.seed, epoch, image_id) in both paths. In
the Ray path the epoch is Ray Data's execution count of the dataset (it advances each time
the dataset, or every split of it, is iterated again; Ray reseeds its own file shuffle from
the same counter); ``iter_batches(dataset, epoch=e)`` on a plain Dataset pins it to ``e``.
"""

from __future__ import annotations

import contextlib
import functools
import posixpath
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
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


def _pack(samples: list[dict], train: bool) -> pa.Table:
    """Samples -> an Arrow table Ray can ship: images as raw uint8 bytes, masks bit-packed."""
    cols: dict[str, Any] = {
        "image_id": pa.array([s["image_id"] for s in samples], pa.int64()),
        "height": pa.array([s["image"].shape[0] for s in samples], pa.int32()),
        "width": pa.array([s["image"].shape[1] for s in samples], pa.int32()),
        "image": pa.array([s["image"].tobytes() for s in samples], pa.binary()),
    }
    if train:
        cols["labels"] = pa.array([s["labels"].tolist() for s in samples], pa.list_(pa.int64()))
        cols["masks"] = pa.array([np.packbits(s["masks"].reshape(-1)).tobytes() for s in samples], pa.binary())
    else:
        cols["orig_size"] = pa.array([list(s["orig_size"]) for s in samples], pa.list_(pa.int32()))
    return pa.table(cols)


def _unpack(table: pa.Table) -> list[dict]:
    """Inverse of ``_pack``."""
    train = "masks" in table.column_names
    ids, hs, ws = (table.column(c).to_pylist() for c in ("image_id", "height", "width"))
    images = table.column("image").to_pylist()
    out = []
    for i, (image_id, h, w) in enumerate(zip(ids, hs, ws)):
        sample = {"image_id": image_id, "image": np.frombuffer(images[i], np.uint8).reshape(h, w, 3)}
        if train:
            labels = np.asarray(table.column("labels")[i].as_py(), np.int64)
            bits = np.frombuffer(table.column("masks")[i].as_py(), np.uint8)
            masks = np.unpackbits(bits, count=len(labels) * h * w).reshape(len(labels), h, w).astype(bool)
            sample.update(labels=labels, masks=masks)
        else:
            sample["orig_size"] = tuple(table.column("orig_size")[i].as_py())
        out.append(sample)
    return out


def _execution_epoch() -> int:
    """Inside a Ray Data task: how many times this dataset has been executed before (its
    epoch). Ray keeps this counter on the DataContext it ships to every task."""
    import ray.data

    return int(getattr(ray.data.DataContext.get_current(), "_execution_idx", 0))


def _decode_augment(table: pa.Table, *, data_cfg: DataConfig, train: bool, seed: int) -> pa.Table:
    """Ray Data ``map_batches`` UDF: Parquet record rows -> packed model samples."""
    epoch = _execution_epoch()
    samples = [_sample(decode_row(row), data_cfg, train, seed, epoch) for row in table.to_pylist()]
    return _pack(samples, train)


def _shard_paths(uri: str, endpoint_url: str | None) -> tuple[Any, list[str], dict]:
    manifest = read_manifest(uri, endpoint_url)
    fs, root = storage.resolve(uri, endpoint_url)
    paths = [posixpath.join(root, s["file"]) for s in manifest["shards"] if s["num_images"] > 0]
    if not paths:
        raise DataError(f"{uri}: the manifest lists no images; re-run jobs/prepare_data.py on a non-empty split")
    return fs, paths, manifest


def build_dataset(uri: str, cfg: Config, *, train: bool = True, endpoint_url: str | None = None):
    """A Ray Dataset of packed samples from the records at ``uri`` (local dir or s3://).

    Training datasets reshuffle shard order every epoch and augment (``data.augmentation``);
    evaluation datasets keep shard order and apply ``eval_transform``. Decode + augment run
    as Ray tasks of ``data.cpus_per_task`` CPUs each. Consume with ``iter_batches``.
    """
    import ray.data

    fs, paths, _ = _shard_paths(uri, endpoint_url)
    shuffle = ray.data.FileShuffleConfig(seed=cfg.train.seed) if train else None
    ds = ray.data.read_parquet(paths, filesystem=fs, shuffle=shuffle, num_cpus=cfg.data.cpus_per_task)
    ds.context.target_max_block_size = _BLOCK_BYTES
    return ds.map_batches(
        _decode_augment,
        fn_kwargs={"data_cfg": cfg.data, "train": train, "seed": cfg.train.seed},
        batch_format="pyarrow",
        batch_size=_MAP_BATCH_ROWS,
        num_cpus=cfg.data.cpus_per_task,
    )


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


def iter_batches(source, batch_size: int, *, epoch: int = 0, device: torch.device | str = "cpu",
                 shuffle: bool = True, size_divisibility: int = 32) -> Iterator[Batch]:
    """Model batches from a Ray ``DataIterator`` (``ray.train.get_dataset_shard`` /
    ``streaming_split``) or a ``Dataset`` made by ``build_dataset``.

    Yields (images float [B, 3, H, W] normalised and zero-padded to the batch max rounded up to
    ``size_divisibility``, targets as in ``collate``). One call = one epoch. ``epoch`` pins the
    augmentation epoch of a plain Dataset (a split's epoch is its iteration count) and seeds
    the local shuffle buffer that mixes rows within and across shards when ``shuffle``.
    """
    import ray.data

    if isinstance(source, ray.data.Dataset):
        # the map tasks read the epoch from the execution counter of the context they receive
        source.context._execution_idx = epoch
    buffer = batch_size * _SHUFFLE_BUFFER_BATCHES if shuffle else None
    for table in source.iter_batches(batch_size=batch_size, batch_format="pyarrow", prefetch_batches=2,
                                     local_shuffle_buffer_size=buffer,
                                     local_shuffle_seed=epoch if shuffle else None):
        images, sizes, targets = collate(_unpack(table), size_divisibility)
        yield to_model_input(images, sizes, targets, device)


class RecordsStream(torch.utils.data.IterableDataset):
    """Samples (``_sample`` dicts) of the records at ``uri`` without Ray, for a DataLoader.

    The unit of work is one Parquet row group; each epoch the units are permuted with
    (seed, epoch) and dealt round-robin to the DataLoader workers, and the rows of a unit are
    permuted too, so every image appears once per epoch across workers.
    """

    def __init__(self, uri: str, data_cfg: DataConfig, *, train: bool = True, seed: int = 0, epoch: int = 0,
                 shuffle: bool = True, endpoint_url: str | None = None):
        self.data_cfg, self.train, self.seed, self.epoch, self.shuffle = data_cfg, train, seed, epoch, shuffle
        self.fs, paths, manifest = _shard_paths(uri, endpoint_url)
        self.num_images = manifest["num_images"]
        self.uri, self.units = uri, []
        for path in paths:
            with self._shard(path) as shard:
                self.units += [(path, g) for g in range(shard.metadata.num_row_groups)]

    @contextlib.contextmanager
    def _shard(self, path: str) -> Iterator[pq.ParquetFile]:
        """One shard opened; a DataError naming it and the fix when it is truncated or damaged."""
        try:
            with self.fs.open_input_file(path) as f:
                yield pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as e:
            raise damaged_shard(self.uri, posixpath.basename(path), e) from None

    def __len__(self) -> int:
        return self.num_images

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = np.arange(len(self.units))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
        for unit in order[worker::workers]:
            path, group = self.units[unit]
            with self._shard(path) as shard:
                rows = shard.read_row_group(group, columns=_RECORD_COLUMNS).to_pylist()
            if self.shuffle:
                rows = [rows[i] for i in np.random.default_rng([self.seed, self.epoch, unit]).permutation(len(rows))]
            for row in rows:
                yield _sample(decode_row(row), self.data_cfg, self.train, self.seed, self.epoch)


def local_batches(uri: str, cfg: Config, batch_size: int, *, seed: int = 0, epoch: int = 0,
                  endpoint_url: str | None = None, train: bool = True, num_workers: int = 0,
                  shuffle: bool = True, device: torch.device | str = "cpu",
                  size_divisibility: int = 32) -> Iterator[Batch]:
    """The same batches as ``iter_batches`` (same augmentation for the same seed / epoch /
    image), from a plain ``torch.utils.data.DataLoader`` with ``num_workers`` processes."""
    stream = RecordsStream(uri, cfg.data, train=train, seed=seed, epoch=epoch, shuffle=shuffle,
                           endpoint_url=endpoint_url)
    loader = torch.utils.data.DataLoader(
        stream, batch_size=batch_size, num_workers=num_workers,
        collate_fn=functools.partial(collate, size_divisibility=size_divisibility),
        persistent_workers=False, prefetch_factor=2 if num_workers else None,
        multiprocessing_context="spawn" if num_workers else None)
    for images, sizes, targets in loader:
        yield to_model_input(images, sizes, targets, device)
