"""The training data stream's Ray side: what Ray Data tasks run (read a shard, decode, augment,
pack), free of torch, which would add about 0.5 GiB to every data task's process.

``pipeline.py`` has the worker side (unpack, collate, model batches) and the plain PyTorch path.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mpformer_ray import storage
from mpformer_ray.config import Config, DataConfig
from mpformer_ray.data.records import DataError, damaged_shard, decode_row, read_manifest
from mpformer_ray.data.transforms import augment, augment_rng

_MAP_BATCH_ROWS = 8  # images per decode/augment call: small, so a task's output streams out in small pieces
# Output block size of the read + decode tasks. Ray's default (128 MiB) holds back a task's output
# until ~40 augmented 1024^2 images are done, delaying the first batches; a separate repartition
# step instead cost 40% of the steady rate (benchmarks/data_pipeline.py, 512^2 crops on 2 cores).
_BLOCK_BYTES = 16 * 2**20
_RECORD_COLUMNS = ["image_id", "file_name", "height", "width", "image", "segments", "sem_seg"]


def augmented_sample(record: dict, data_cfg: DataConfig, seed: int, epoch: int) -> dict:
    """Decoded record -> {"image_id", "image" uint8 [h, w, 3], "masks" bool [n, h, w], "labels" int64 [n]},
    augmented as epoch ``epoch`` of a run seeded ``seed`` does."""
    out = augment(record, data_cfg, augment_rng(seed, epoch, record["image_id"]))
    return {"image_id": out["image_id"], "image": out["image"], "masks": out["masks"], "labels": out["labels"]}


def pack(samples: list[dict], epoch: int) -> pa.Table:
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


def unpack(table: pa.Table) -> list[dict]:
    """Inverse of ``pack`` (without the epoch)."""
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
    def open(cls, uri: str, *, seed: int = 0, shuffle: bool = True) -> Units:
        shards = [s for s in read_manifest(uri)["shards"] if s["num_images"] > 0]
        if not shards:
            raise DataError(f"{uri}: the manifest lists no images; re-run jobs/prepare_data.py on a non-empty split")
        fs, root = storage.resolve(uri)
        return cls(uri, tuple(posixpath.join(root, s["file"]) for s in shards),
                   tuple(s["num_images"] for s in shards), seed, shuffle, fs)

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


def _decode_augment(items: pa.Table, *, units: Units, data_cfg: DataConfig) -> Iterator[pa.Table]:
    """Ray Data ``map_batches`` UDF: work items (rows "epoch", "shard", "skip" of ``Units.work``) ->
    packed training samples, ``_MAP_BATCH_ROWS`` at a time."""
    for item in items.to_pylist():
        epoch, samples = item["epoch"], []
        for row in units.rows(epoch, item["shard"], item["skip"]):
            samples.append(augmented_sample(decode_row(row), data_cfg, units.seed, epoch))
            if len(samples) == _MAP_BATCH_ROWS:
                yield pack(samples, epoch)
                samples = []
        if samples:
            yield pack(samples, epoch)


def build_train_stream(uri: str, cfg: Config, *, start: int, stop: int):
    """A Ray Dataset of packed training samples: images ``[start, stop)`` of the split's stream (see
    ``Units``; rounded out to whole shards) and one epoch more, because Ray's equal split among
    training workers holds back up to (workers - 1) rows at the end. All epochs are one execution,
    so that no epoch boundary waits for the next epoch's first reads. Consume it (or its
    ``streaming_split``) with ``stream_batches``.

    One work item (a shard in one epoch) per Ray task of ``data.cpus_per_task`` CPUs, which reads,
    decodes and augments it.
    """
    import ray.data

    units = Units.open(uri, seed=cfg.train.seed)
    work = [{"epoch": e, "shard": shard, "skip": skip} for e, shard, skip in units.work(start, stop + units.num_images)]
    # one block per work item: a task per shard and epoch, and no read tasks (the items are in memory)
    ds = ray.data.from_items(work, override_num_blocks=len(work))
    ds.context.target_max_block_size = _BLOCK_BYTES
    return ds.map_batches(
        _decode_augment,
        fn_kwargs={"units": units, "data_cfg": cfg.data},
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=cfg.data.cpus_per_task,
    )
