"""The hard embedded benchmark (``data.synthetic.variant=hard``) and its colour-cued medium variant:
their statistics against the spec, determinism down to the written files, the COCO converter path to
records, crowd regions ignored by PQ, caches kept apart, and the ``tiny-hard`` / ``tiny-medium`` presets."""

from __future__ import annotations

import colorsys
import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from pycocotools.coco import COCO

from mpformer_ray.config import ConfigError, SyntheticConfig, load_config, with_classes
from mpformer_ray.data import ensure_synthetic, read_manifest, read_records
from mpformer_ray.data.coco import convert_coco
from mpformer_ray.data.synthetic import split_seed, write_coco_layout
from mpformer_ray.data.synthetic_hard import (
    HARD_CLASSES,
    HARD_SOURCE_IDS,
    SMALL_CLASSES,
    THIN_CLASSES,
    generate_hard_scenes,
)
from mpformer_ray.evaluation.panoptic import PanopticEvaluator

REPO = Path(__file__).resolve().parent.parent
SIZE = 128
THINGS = [c["id"] for c in HARD_CLASSES if c["isthing"]]


@pytest.fixture(scope="module")
def scenes() -> list[dict]:
    return list(generate_hard_scenes(24, SIZE, SIZE, seed=5))


@pytest.fixture(scope="module")
def medium_scenes() -> list[dict]:
    return list(generate_hard_scenes(24, SIZE, SIZE, seed=5, colour_cue=True))


def _fits(mask: np.ndarray, k: int) -> bool:
    """Whether a k x k square of pixels lies entirely inside ``mask``."""
    return bool(sliding_window_view(mask, (k, k)).all(axis=(-1, -2)).any())


def test_scenes_are_deterministic_for_a_seed(scenes):
    again = list(generate_hard_scenes(4, SIZE, SIZE, seed=5))
    for x, y in zip(scenes, again):
        assert np.array_equal(x["image"], y["image"]) and len(x["segments"]) == len(y["segments"])
        for s, t in zip(x["segments"], y["segments"]):
            assert np.array_equal(s["mask"], t["mask"]) and s["class_id"] == t["class_id"]
            assert s["polygons"] == t["polygons"] and s["iscrowd"] == t["iscrowd"]
    assert not np.array_equal(next(generate_hard_scenes(1, SIZE, SIZE, seed=6))["image"], scenes[0]["image"])


def _check_spec(scenes: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Assert the scene statistics both variants share; return the non-crowd things' mean colours [n, 3]
    and classes [n]."""
    classes, per_image, thin, small, occluded, things = set(), [], 0, 0, 0, 0
    colours, labels = [], []
    for i, scene in enumerate(scenes):
        assert scene["image"].shape == (SIZE, SIZE, 3) and scene["image"].dtype == np.uint8
        cover = np.zeros((SIZE, SIZE), int)
        crowds = [s for s in scene["segments"] if s["iscrowd"]]
        assert len(crowds) == (i % 3 == 1)  # a crowd region in every third image
        for seg in scene["segments"]:
            cover += seg["mask"]
            classes.add(seg["class_id"])
            visible = int(seg["mask"].sum())
            assert 0 < visible <= seg["drawn_area"]
            if not HARD_CLASSES[seg["class_id"]]["isthing"]:
                continue
            assert visible >= 0.3 * seg["drawn_area"]  # occluded, but never hidden beyond learning
            things += 1
            occluded += visible < seg["drawn_area"]
            if seg["iscrowd"]:
                continue
            colours.append(scene["image"][seg["mask"]].mean(axis=0))
            labels.append(seg["class_id"])
            if seg["class_id"] in THIN_CLASSES and visible == seg["drawn_area"]:
                assert not _fits(seg["mask"], 5)  # at most ~4 px wide
                thin += 1
            if seg["class_id"] in SMALL_CLASSES:
                assert seg["drawn_area"] <= 48  # a few pixels
                small += 1
        assert (cover == 1).all()  # disjoint, and stuff fills every pixel no thing covers
        per_image.append(sum(not s["iscrowd"] for s in scene["segments"] if s["class_id"] in THINGS))
    assert classes == set(range(20)) and len(THINGS) == 14
    assert min(per_image) >= 4 and max(per_image) <= 12 and min(per_image) <= 5 and max(per_image) >= 11
    assert thin >= 5 and small >= 5 and occluded >= 0.2 * things
    return np.array(colours), np.array(labels)


def test_statistics_match_the_spec(scenes):
    colours, labels = _check_spec(scenes)
    # colour alone does not tell the classes apart: nearest mean colour is no better than a guess
    half = len(labels) // 2
    means = np.array([colours[:half][labels[:half] == c].mean(axis=0) for c in THINGS])
    guess = np.argmin(((colours[half:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (guess == labels[half:]).mean() < 0.25


def test_medium_scenes_add_a_colour_cue_to_the_same_spec(medium_scenes):
    colours, labels = _check_spec(medium_scenes)
    # a thing's hue names its pair of classes (2k, 2k + 1) and nothing more; the pairs' hues are 1/13 apart
    hues = np.array([colorsys.rgb_to_hsv(*(c / 255))[0] for c in colours])
    family = np.rint(hues * 13).astype(int) % 13
    assert (family == labels // 2).mean() > 0.9
    assert set(labels % 2) == {0, 1}  # both classes of a pair occur, so hue alone leaves shape to learn


def test_layout_is_reproducible_and_converts_like_coco(tmp_path):
    for name in ("a", "b"):
        write_coco_layout(tmp_path / name, "train", 16, SIZE, seed=2, variant="hard")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 2 * 16 + 2
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    root = tmp_path / "a"
    info = json.loads((root / "annotations" / "panoptic_train2017.json").read_text())["info"]
    assert info["description"] == "mpformer-ray synthetic shapes (hard)"

    manifest = convert_coco(str(root), "train", str(tmp_path / "pan"), task="panoptic", num_workers=1,
                            progress=False)
    assert [(c["id"], c["name"], c["source_id"], c["isthing"]) for c in manifest["classes"]] == [
        (c["id"], c["name"], sid, c["isthing"]) for c, sid in zip(HARD_CLASSES, HARD_SOURCE_IDS)]
    assert manifest["num_images"] == 16 and not manifest["skipped"] and not manifest["repaired"]
    scenes = list(generate_hard_scenes(16, SIZE, SIZE, split_seed(2, "train")))
    records = sorted(read_records(str(tmp_path / "pan")), key=lambda r: r["image_id"])
    evaluator = PanopticEvaluator(len(HARD_CLASSES), THINGS)
    for rec, scene in zip(records, scenes):
        assert [(s["category_id"], s["iscrowd"]) for s in rec["segments"]] == [
            (s["class_id"], s["iscrowd"]) for s in scene["segments"]]
        assert all(np.array_equal(r["mask"], s["mask"]) for r, s in zip(rec["segments"], scene["segments"]))
        # every segment predicted exactly, crowds included: a crowd never matches and is not counted
        id_map = np.zeros((SIZE, SIZE), np.int32)
        for k, seg in enumerate(rec["segments"], start=1):
            id_map[seg["mask"]] = k
        evaluator.process(rec["segments"], (SIZE, SIZE), (id_map, [
            {"id": k, "category_id": s["category_id"]} for k, s in enumerate(rec["segments"], start=1)]))
    crowds = sum(s["iscrowd"] for r in records for s in r["segments"])
    assert crowds == 5 and evaluator.stats["fp"].sum() == 0 and evaluator.stats["fn"].sum() == 0
    assert evaluator.stats["tp"].sum() == sum(len(r["segments"]) for r in records) - crowds
    assert evaluator.evaluate()["panoptic/PQ"] == pytest.approx(100.0)

    # the instances file decodes, with the COCO tools, to the same visible masks
    coco = COCO(str(root / "annotations" / "instances_train2017.json"))
    kinds = {"polygon": 0, "rle": 0, "crowd": 0}
    for image_id, scene in enumerate(scenes, start=1):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        segs = [s for s in scene["segments"] if HARD_CLASSES[s["class_id"]]["isthing"]]
        assert len(anns) == len(segs)
        for ann, seg in zip(anns, segs):
            assert np.array_equal(coco.annToMask(ann).astype(bool), seg["mask"])
            kinds["crowd" if ann["iscrowd"] else "polygon" if isinstance(ann["segmentation"], list) else "rle"] += 1
    assert all(n > 0 for n in kinds.values()), kinds


def test_ensure_synthetic_keeps_variants_apart(tmp_path):
    easy = SyntheticConfig(root=str(tmp_path), num_train=4, num_val=2, image_size=48, seed=0)
    hard = dataclasses.replace(easy, variant="hard")
    easy_uris, hard_uris = ensure_synthetic(easy), ensure_synthetic(hard)
    medium_uris = ensure_synthetic(dataclasses.replace(easy, variant="medium"))
    assert len({*easy_uris, *hard_uris, *medium_uris}) == 6
    assert [c["name"] for c in read_manifest(medium_uris[0])["classes"]] == [c["name"] for c in HARD_CLASSES]
    assert len(read_manifest(easy_uris[0])["classes"]) == 6
    assert [c["name"] for c in read_manifest(hard_uris[1])["classes"]] == [c["name"] for c in HARD_CLASSES]
    assert ensure_synthetic(hard) == hard_uris


def test_prepare_data_job_takes_the_variant(tmp_path):
    spec = importlib.util.spec_from_file_location("job_prepare_data", REPO / "jobs" / "prepare_data.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out = tmp_path / "records"
    assert job.main(["--variant", "hard", "--root", str(tmp_path / "syn"), "--out", str(out), "--num-images", "3",
                     "--image-size", "48", "--workers", "1"]) == 0
    manifest = read_manifest(str(out))
    assert manifest["dataset"] == "synthetic" and len(manifest["classes"]) == 20


@pytest.mark.parametrize("preset, variant", [("tiny-hard", "hard"), ("tiny-medium", "medium")])
def test_tiny_hard_and_medium_presets_match_the_generator(preset, variant):
    cfg = load_config(preset)
    assert cfg.data.synthetic.variant == variant and load_config("tiny").data.synthetic.variant == "easy"
    # the classes come from the generator's records, not the preset
    assert cfg.model.num_classes is None and cfg.model.thing_classes is None
    filled = with_classes(cfg, HARD_CLASSES).model
    assert filled.num_classes == len(HARD_CLASSES) and filled.thing_classes == THINGS
    assert cfg.model.num_queries >= 12 + 1 + 4  # most things + a crowd + most stuff segments in one image
    assert cfg.data.synthetic.num_train // (cfg.train.batch_size * cfg.train.workers) > 100  # iterations per epoch
    assert cfg.train.max_iters % cfg.train.eval_period == 0  # an evaluation at the end of the schedule
    with pytest.raises(ConfigError, match=r"data\.synthetic\.variant.*'extreme' is not one of "
                                          r"\['easy', 'medium', 'hard'\]"):
        load_config("tiny", ["data.synthetic.variant=extreme"])
