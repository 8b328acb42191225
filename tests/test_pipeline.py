"""Augmentations (pure numpy) and the Ray Data / DataLoader pipelines on real records."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import pytest
import torch
from scipy import ndimage

from mpformer_ray.config import DataConfig, load_config
from mpformer_ray.data.coco import convert_coco
from mpformer_ray.data.pipeline import RecordsStream, local_batches, stream_batches
from mpformer_ray.data.stream import Units, build_train_stream
from mpformer_ray.data.transforms import PIXEL_MEAN, PIXEL_STD, augment, augment_rng, eval_transform, normalize

COLOURS = {0: (230, 20, 20), 1: (20, 230, 20), 2: (20, 20, 230)}


def coloured_record(height: int = 96, width: int = 128, image_id: int = 7) -> dict:
    """Grey image with three solid rectangles whose colour encodes their class, placed
    asymmetrically so a flip of the image without its masks (or vice versa) shows; plus a
    crowd region of class 3 and a sem_seg map."""
    image = np.full((height, width, 3), 128, np.uint8)
    sem = np.full((height, width), 255, np.uint8)
    boxes = {0: (5, 5, 40, 30), 1: (50, 60, 90, 120), 2: (10, 70, 35, 110)}  # y0, x0, y1, x1
    segments = []
    for cls, (y0, x0, y1, x1) in boxes.items():
        mask = np.zeros((height, width), bool)
        mask[y0:y1, x0:x1] = True
        image[mask] = COLOURS[cls]
        sem[mask] = cls
        segments.append({"id": cls + 1, "category_id": cls, "iscrowd": False, "mask": mask})
    crowd = np.zeros((height, width), bool)
    crowd[60:90, 5:40] = True
    sem[crowd] = 3
    segments.append({"id": 9, "category_id": 3, "iscrowd": True, "mask": crowd})
    return {"image_id": image_id, "file_name": "synthetic.png", "image": image, "segments": segments, "sem_seg": sem}


@pytest.mark.parametrize("mode,crop", [("lsj", [64, 64]), ("lsj", [160, 200]), ("resize_crop", [64, 96])])
def test_flip_keeps_image_masks_and_sem_seg_aligned(mode, crop):
    record = coloured_record()
    cfg = DataConfig(augmentation=mode, crop_size=crop, min_scale=0.5, max_scale=2.0, flip=True)
    checked = 0
    for seed in range(12):  # P(no flip in 12 draws) = 2**-12
        out = augment(record, cfg, augment_rng(seed, 0, record["image_id"]))
        assert out["masks"].shape[1:] == out["image"].shape[:2] == out["sem_seg"].shape
        assert 3 not in out["labels"].tolist(), "crowd segments are dropped"
        for mask, label in zip(out["masks"], out["labels"]):
            inner = ndimage.binary_erosion(mask, iterations=2)  # bilinear edges blend colours
            pixels = out["image"][inner].astype(int)
            assert np.abs(pixels - COLOURS[int(label)]).max(initial=0) < 40
            assert (out["sem_seg"][inner] == label).all()
            checked += int(inner.sum())
        # crowd pixels are ignored, never class 3
        assert 3 not in np.unique(out["sem_seg"]).tolist()
    assert checked > 1000


@pytest.mark.parametrize("size", [(96, 128), (30, 20), (300, 90)])
def test_lsj_output_is_crop_size_with_empty_segments_dropped(size):
    record = coloured_record(*size)
    cfg = DataConfig(augmentation="lsj", crop_size=[64, 80], min_scale=0.1, max_scale=2.0)
    for seed in range(8):
        out = augment(record, cfg, augment_rng(seed, 0, 1))
        assert out["image"].shape == (64, 80, 3) and out["image"].dtype == np.uint8
        assert out["masks"].dtype == bool and out["masks"].shape[1:] == (64, 80)
        assert out["labels"].dtype == np.int64 and len(out["labels"]) == len(out["masks"])
        assert out["masks"].any(axis=(1, 2)).all(), "segments emptied by the crop are dropped"
        assert set(out["labels"].tolist()) <= {0, 1, 2}


def test_resize_crop_respects_cat_max_ratio():
    # class 1 covers the left 40 columns (31%), class 0 the rest: many crops see only class 0
    sem = np.zeros((128, 128), np.uint8)
    sem[:, :40] = 1
    record = {"image_id": 3, "file_name": "x.png", "image": np.zeros((128, 128, 3), np.uint8), "sem_seg": sem,
              "segments": [{"id": c + 1, "category_id": c, "iscrowd": False, "mask": sem == c} for c in (0, 1)]}

    def balanced(ratio: float) -> int:
        cfg = DataConfig(augmentation="resize_crop", crop_size=[64, 64], cat_max_ratio=ratio)
        good = 0
        for seed in range(40):
            out = augment(record, cfg, augment_rng(seed, 0, 3))
            assert out["image"].shape[0] <= 64 and out["image"].shape[1] <= 64
            counts = np.bincount(out["sem_seg"].ravel(), minlength=2)[:2]
            good += int(counts.min() > 0 and counts.max() < 0.75 * counts.sum())
        return good

    unconstrained, constrained = balanced(1.0), balanced(0.75)
    assert unconstrained < 36  # without the constraint a good share of crops is dominated
    assert constrained >= 38 and constrained > unconstrained


def test_resize_crop_scales_short_side_by_half_to_double_the_crop():
    record = coloured_record(50, 100)
    cfg = DataConfig(augmentation="resize_crop", crop_size=[200, 200], flip=False)  # crop never binds the height
    short_sides = {augment(record, cfg, augment_rng(s, 0, 1))["image"].shape[0] for s in range(60)}
    assert min(short_sides) >= 100 and max(short_sides) <= 200  # 0.5x .. 2x of 200, cropped at 200
    assert len(short_sides) > 4


def test_eval_transform_size_rules():
    cfg = DataConfig(test_short_side=800, test_max_size=1333)
    image, orig = eval_transform(coloured_record(480, 640), cfg)
    assert image.shape == (800, 1067, 3) and image.dtype == np.uint8 and orig == (480, 640)
    image, orig = eval_transform(coloured_record(400, 1200), cfg)  # long side would be 2400
    assert image.shape == (444, 1333, 3) and orig == (400, 1200)
    record = coloured_record(96, 128)
    image, _ = eval_transform(record, DataConfig(test_short_side=96, test_max_size=1000))
    np.testing.assert_array_equal(image, record["image"])


def test_augmentation_is_seeded_by_seed_epoch_and_image():
    record = coloured_record()
    cfg = DataConfig(augmentation="lsj", crop_size=[64, 64], min_scale=0.3, max_scale=2.0)
    a = augment(record, cfg, augment_rng(0, 0, 7))
    b = augment(record, cfg, augment_rng(0, 0, 7))
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["masks"], b["masks"])
    others = [augment(record, cfg, augment_rng(*key))["image"] for key in [(0, 1, 7), (1, 0, 7), (0, 0, 8)]]
    assert all(not np.array_equal(a["image"], o) for o in others)


def test_normalize_accepts_both_layouts():
    rng = np.random.default_rng(0)
    hwc = torch.from_numpy(rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8))
    out = normalize(hwc)
    assert out.shape == (2, 3, 5, 7) and out.dtype == torch.float32
    torch.testing.assert_close(normalize(hwc.permute(0, 3, 1, 2)), out)
    expected = (hwc[1, 2, 3, 0].item() - PIXEL_MEAN[0]) / PIXEL_STD[0]
    assert out[1, 0, 2, 3].item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="B, H, W, 3"):
        normalize(torch.zeros(2, 4, 5, 6))


# ---------------------------------------------------------------- pipelines on real records

TINY = ["data.crop_size=[64,64]", "data.min_scale=0.5", "data.max_scale=1.5", "data.cpus_per_task=0.25"]


@pytest.fixture(scope="module")
def records(synthetic_coco, tmp_path_factory) -> str:
    """The 12 synthetic train images as records in 3 shards (5 + 5 + 2)."""
    out = str(tmp_path_factory.mktemp("pipeline_records") / "train")
    convert_coco(str(synthetic_coco), "train", out, task="panoptic", shard_size=5, num_workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def ray_local(moto_server):
    """A real 2-CPU local Ray (started after the moto fixture so its workers see the S3 env)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def collect(batches) -> dict[int, torch.Tensor]:
    """image_id -> image tensor [3, H, W], checking every batch's format on the way."""
    images = {}
    for x, targets in batches:
        assert x.dtype == torch.float32 and x.dim() == 4 and x.shape[1:] == (3, 64, 64)
        assert len(targets) == len(x) and torch.isfinite(x).all()
        for image, t in zip(x, targets):
            assert t["labels"].dtype == torch.int64 and t["masks"].dtype == torch.bool
            assert t["masks"].shape == (len(t["labels"]), 64, 64)
            assert ((t["labels"] >= 0) & (t["labels"] < 6)).all()
            image_id = int(t["image_id"])
            assert image_id not in images, f"image {image_id} delivered twice in one epoch"
            images[image_id] = image
    return images


def test_local_batches_cover_every_image_once_per_epoch(records):
    cfg = load_config("tiny", TINY)
    ids = {s["image_id"] for s in RecordsStream(Units.open(records, shuffle=False), cfg.data, stop=12)}
    assert len(ids) == 12
    epoch0 = collect(local_batches(records, cfg, 5, seed=0, epoch=0))
    again = collect(local_batches(records, cfg, 3, seed=0, epoch=0))
    epoch1 = collect(local_batches(records, cfg, 5, seed=0, epoch=1))
    assert set(epoch0) == set(epoch1) == ids
    assert all(torch.equal(epoch0[i], again[i]) for i in ids), "same seed + epoch -> same augmentation"
    assert sum(not torch.equal(epoch0[i], epoch1[i]) for i in ids) >= 10


def test_the_stream_starts_anywhere_and_goes_on_across_epochs(records):
    cfg = load_config("tiny", TINY)
    units = Units.open(records, seed=3)
    assert units.num_images == 12 and len(units.paths) == 3  # shards of 5, 5, 2
    assert [e for e, _, _ in units.work(0, 36)] == [0] * 3 + [1] * 3 + [2] * 3
    # 25 images from the start, and from image 7 (mid-shard: a checkpoint's position): the same tail
    whole = [(s["epoch"], s["image_id"], s["image"]) for s in RecordsStream(units, cfg.data, stop=25)]
    tail = [(s["epoch"], s["image_id"], s["image"]) for s in RecordsStream(units, cfg.data, start=7, stop=25)]
    assert len(whole) == 25 and len(tail) == 18
    assert all(a[:2] == b[:2] and np.array_equal(a[2], b[2]) for a, b in zip(whole[7:], tail))
    # each epoch: every image once, in a new order
    epochs = [[i for e, i, _ in whole if e == k] for k in (0, 1)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted({i for _, i, _ in whole}) and epochs[0] != epochs[1]


def _signatures(batches) -> list[tuple[int, bytes]]:
    """(image id, hash of its augmented pixels) of every image, sorted."""
    return sorted((int(t["image_id"]), hashlib.sha256(x.numpy().tobytes()).digest())
                  for images, targets in batches for x, t in zip(images, targets))


def test_streaming_split_feeds_two_consumers_epoch_after_epoch(records, ray_local):
    cfg = load_config("tiny", TINY)
    # images [0, 24) and one epoch more: 3 epochs of 12 in one execution
    splits = build_train_stream(records, cfg, start=0, stop=24).streaming_split(2, equal=True)
    seen: dict[int, list] = {}
    errors = []

    def consume(rank: int) -> None:
        try:
            seen[rank] = list(stream_batches(splits[rank], 4, seed=rank))
        except Exception as e:  # surfaced below; a thread's exception would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "streaming_split consumers hung"
    for rank in range(2):
        batches = [batch for _, batch in seen[rank]]
        for x, ts in batches:  # the batch format (an image may come twice: from two epochs)
            for i, t in enumerate(ts):
                collect([(x[i:i + 1], [t])])
        assert sum(len(ts) for _, ts in batches) == 18
        # shards come as Ray finishes them, so epochs next to each other interleave a little
        assert {epoch for epoch, _ in seen[rank]} <= {0, 1, 2}
    # together: each image once per epoch, augmented exactly as the local path does for that epoch
    ray_images = _signatures(batch for rank in range(2) for _, batch in seen[rank])
    local = _signatures(b for epoch in range(3) for b in local_batches(records, cfg, 4, seed=cfg.train.seed, epoch=epoch))
    assert ray_images == local


def test_s3_records_through_moto(synthetic_coco, moto_server, ray_local):
    uri = f"s3://{moto_server['bucket']}/pipeline/train"
    convert_coco(str(synthetic_coco), "train", uri, task="panoptic", shard_size=8, num_workers=1, progress=False)
    cfg = load_config("tiny", TINY)
    local = collect(local_batches(uri, cfg, 4, seed=cfg.train.seed, epoch=0))
    assert len(local) == 12
    remote = collect(batch for _, batch in stream_batches(build_train_stream(uri, cfg, start=0, stop=0), 4))
    assert set(remote) == set(local) and all(torch.equal(remote[i], local[i]) for i in local)
