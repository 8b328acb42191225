"""Record format, synthetic generator, COCO converters and the prepare_data job, on real files
(and a real moto S3 server for the s3:// round trip)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_util
from PIL import Image
from pycocotools.coco import COCO

from mpformer_ray.config import SyntheticConfig
from mpformer_ray.data import (
    SYNTHETIC_CLASSES,
    DataError,
    ensure_synthetic,
    generate_scenes,
    read_manifest,
    read_records,
)
from mpformer_ray.data.coco import convert_coco
from mpformer_ray.data.synthetic import COCO_SOURCE_IDS, split_seed

REPO = Path(__file__).resolve().parent.parent
TRAIN = 12  # images in the synthetic_coco fixture's train split (64x64)


def _records(uri: str) -> dict[int, dict]:
    return {r["image_id"]: r for r in read_records(uri)}


def test_generator_is_deterministic_disjoint_and_varied():
    a, b = list(generate_scenes(16, 48, 48, seed=3)), list(generate_scenes(16, 48, 48, seed=3))
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b))
    classes_seen, crowds, empties = set(), 0, 0
    for scene in a:
        assert scene["image"].shape == (48, 48, 3) and scene["image"].dtype == np.uint8
        cover = np.zeros((48, 48), int)
        for seg in scene["segments"]:
            assert seg["mask"].any() and 0 <= seg["class_id"] < len(SYNTHETIC_CLASSES)
            cover += seg["mask"]
            classes_seen.add(seg["class_id"])
            crowds += seg["iscrowd"]
        assert cover.max() <= 1  # occlusion resolved: masks are disjoint
        empties += not scene["segments"]
    assert classes_seen == set(range(6)) and crowds >= 1 and empties >= 1
    assert [c["isthing"] for c in SYNTHETIC_CLASSES] == [True] * 4 + [False] * 2


def test_instance_records_equal_decoded_annotations(synthetic_coco, tmp_path):
    manifest = convert_coco(str(synthetic_coco), "train", str(tmp_path / "inst"), task="instance",
                            shard_size=5, num_workers=1, progress=False)
    assert [(c["id"], c["name"], c["source_id"], c["isthing"]) for c in manifest["classes"]] == [
        (i, SYNTHETIC_CLASSES[i]["name"], COCO_SOURCE_IDS[i], True) for i in range(4)]
    assert manifest["num_images"] == TRAIN and manifest["kept"] == {"no_annotations": 1}
    assert manifest["skipped"] == {} and manifest["repaired"] == {}
    coco = COCO(str(synthetic_coco / "annotations" / "instances_train2017.json"))
    records = _records(str(tmp_path / "inst"))
    assert sorted(records) == sorted(coco.getImgIds())
    kinds = {"polygon": 0, "rle": 0, "crowd": 0}
    for image_id, rec in records.items():
        anns = {a["id"]: a for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))}
        assert {s["id"] for s in rec["segments"]} == set(anns) and rec["sem_seg"] is None
        assert rec["image"].shape == (64, 64, 3)
        for seg in rec["segments"]:
            ann = anns[seg["id"]]
            assert np.array_equal(seg["mask"], coco.annToMask(ann).astype(bool))
            assert COCO_SOURCE_IDS[seg["category_id"]] == ann["category_id"]
            assert seg["iscrowd"] == bool(ann["iscrowd"])
            kinds["crowd" if ann["iscrowd"] else "polygon" if isinstance(ann["segmentation"], list) else "rle"] += 1
    assert all(n > 0 for n in kinds.values()), kinds  # every COCO encoding was exercised


@pytest.mark.parametrize("task", ["panoptic", "semantic"])
def test_panoptic_records_equal_generator_masks(synthetic_coco, tmp_path, task):
    manifest = convert_coco(str(synthetic_coco), "train", str(tmp_path / task), task=task, shard_size=5,
                            num_workers=1, progress=False)
    assert manifest["task"] == task and [c["source_id"] for c in manifest["classes"]] == COCO_SOURCE_IDS
    assert [c["isthing"] for c in manifest["classes"]] == [c["isthing"] for c in SYNTHETIC_CLASSES]
    records = _records(str(tmp_path / task))
    scenes = list(generate_scenes(TRAIN, 64, 64, split_seed(0, "train")))
    crowds = 0
    for i, scene in enumerate(scenes):
        rec = records[i + 1]
        source = np.asarray(Image.open(synthetic_coco / rec["file_name"]).convert("RGB"))
        assert np.array_equal(rec["image"], source)  # the file's own bytes, not re-encoded
        assert np.abs(source.astype(int) - scene["image"]).mean() < 12  # the generator's picture, JPEG'd
        assert len(rec["segments"]) == len(scene["segments"])
        expected_sem = np.full((64, 64), 255, np.uint8)
        for src, seg in zip(scene["segments"], rec["segments"]):
            assert np.array_equal(src["mask"], seg["mask"])
            assert seg["category_id"] == src["class_id"] and seg["iscrowd"] == src["iscrowd"]
            expected_sem[src["mask"]] = src["class_id"]
            crowds += seg["iscrowd"]
        assert np.array_equal(rec["sem_seg"], expected_sem)
    assert crowds >= 1


def _corrupt(root: Path, case: str) -> str:
    """Apply one kind of bad input to a copy of the synthetic layout; returns the file it names."""
    inst_path = root / "annotations" / "instances_train2017.json"
    inst = json.loads(inst_path.read_text())
    first_ann_of = {}
    for ann in inst["annotations"]:
        first_ann_of.setdefault(ann["image_id"], ann)
    if case == "unreadable_image":
        jpg = root / "train2017" / "000000000001.jpg"
        jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
        return "train2017/000000000001.jpg"
    if case == "missing_image":
        (root / "train2017" / "000000000002.jpg").unlink()
        return "train2017/000000000002.jpg"
    if case == "annotation_without_image":
        inst["annotations"].append({**first_ann_of[3], "id": 99999, "image_id": 4242})
        target = "annotations/instances_train2017.json"
    elif case == "unknown_category":
        first_ann_of[3]["category_id"] = 999
        target = "train2017/000000000003.jpg"
    elif case == "mask_size_mismatch":
        small = mask_util.encode(np.asfortranarray(np.ones((32, 32), np.uint8)))
        first_ann_of[4]["segmentation"] = {"size": [32, 32], "counts": small["counts"].decode()}
        target = "train2017/000000000004.jpg"
    elif case == "degenerate_polygon":
        inst["annotations"].append({**first_ann_of[8], "id": 99998, "segmentation": [[1.0, 1.0, 9.0, 9.0]],
                                    "iscrowd": 0})
        target = "train2017/000000000008.jpg"
    inst_path.write_text(json.dumps(inst))
    return target


CASES = {  # case -> (manifest section, images written)
    "unreadable_image": ("skipped", TRAIN - 1),
    "missing_image": ("skipped", TRAIN - 1),
    "annotation_without_image": ("skipped", TRAIN),
    "unknown_category": ("repaired", TRAIN),
    "mask_size_mismatch": ("repaired", TRAIN),
    "degenerate_polygon": ("repaired", TRAIN),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_counted_or_strict_error(synthetic_coco, tmp_path, case):
    root = tmp_path / "coco"
    shutil.copytree(synthetic_coco, root)
    named = _corrupt(root, case)
    section, images = CASES[case]
    # one bad input of 12: more than the default max_skipped share, so allowed explicitly
    manifest = convert_coco(str(root), "train", str(tmp_path / "out"), task="instance", shard_size=5,
                            num_workers=1, progress=False, max_skipped=1.0)
    assert manifest[section] == {case: 1}
    other = "repaired" if section == "skipped" else "skipped"
    assert manifest[other] == {} and manifest["kept"] == {"no_annotations": 1}
    assert manifest["num_images"] == images and named in manifest["examples"][case]
    with pytest.raises(DataError, match=case) as err:
        convert_coco(str(root), "train", str(tmp_path / "strict"), task="instance", shard_size=5,
                     num_workers=1, progress=False, strict=True)
    assert named in str(err.value)


def test_panoptic_bad_png_and_strict_allows_empty_images(synthetic_coco, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(synthetic_coco, root)
    png = root / "annotations" / "panoptic_train2017" / "000000000003.png"
    Image.new("RGB", (32, 32)).save(png)
    pan_path = root / "annotations" / "panoptic_train2017.json"
    pan = json.loads(pan_path.read_text())
    pan["annotations"][3]["segments_info"][0]["category_id"] = 555  # image 4
    pan_path.write_text(json.dumps(pan))
    manifest = convert_coco(str(root), "train", str(tmp_path / "out"), task="panoptic", num_workers=1,
                            progress=False, max_skipped=1.0)
    assert manifest["skipped"] == {"mask_size_mismatch": 1} and manifest["repaired"] == {"unknown_category": 1}
    assert manifest["num_images"] == TRAIN - 1
    rec = _records(str(tmp_path / "out"))[4]
    dropped = pan["annotations"][3]["segments_info"][0]["id"]
    assert dropped not in {s["id"] for s in rec["segments"]}
    covered = np.zeros((64, 64), bool)
    for s in rec["segments"]:
        covered |= s["mask"]
    assert (rec["sem_seg"][~covered] == 255).all() and (~covered).any()  # its pixels became void
    # an image without annotations is valid data: strict mode accepts the clean layout
    clean = convert_coco(str(synthetic_coco), "train", str(tmp_path / "clean"), task="panoptic", num_workers=1,
                         progress=False, strict=True)
    assert clean["kept"] == {"no_annotations": 1} and clean["num_images"] == TRAIN


def test_rerun_skips_finished_shards(synthetic_coco, tmp_path):
    out = tmp_path / "out"
    first = convert_coco(str(synthetic_coco), "train", str(out), task="panoptic", shard_size=4, num_workers=1,
                         progress=False)
    assert len(first["shards"]) == 3 and first["reused_shards"] == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    (out / "part-00001.parquet").unlink()  # a lost shard
    (out / "part-00002.report.json").unlink()  # a shard interrupted before its sidecar landed
    (out / "manifest.json").unlink()
    second = convert_coco(str(synthetic_coco), "train", str(out), task="panoptic", shard_size=4, num_workers=1,
                          progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    assert second["reused_shards"] == 1 and second["num_images"] == first["num_images"] == TRAIN
    assert after["part-00000.parquet"] == before["part-00000.parquet"]
    assert after["part-00000.report.json"] == before["part-00000.report.json"]
    assert after["part-00002.parquet"] != before["part-00002.parquet"]
    assert {k: v for k, v in second.items() if k != "reused_shards"} == {
        k: v for k, v in first.items() if k != "reused_shards"}


def test_s3_round_trip_with_worker_pool(synthetic_coco, tmp_path, moto_server):
    uri = f"s3://{moto_server['bucket']}/x/train"
    local = convert_coco(str(synthetic_coco), "train", str(tmp_path / "local"), task="panoptic", shard_size=5,
                         num_workers=1, progress=False)
    remote = convert_coco(str(synthetic_coco), "train", uri, task="panoptic", shard_size=5, num_workers=2,
                          progress=False)
    assert read_manifest(uri)["num_images"] == local["num_images"] == remote["num_images"]
    a, b = _records(str(tmp_path / "local")), _records(uri)
    assert sorted(a) == sorted(b)
    for image_id in a:
        x, y = a[image_id], b[image_id]
        assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["sem_seg"], y["sem_seg"])
        assert [(s["id"], s["category_id"], s["iscrowd"]) for s in x["segments"]] == [
            (s["id"], s["category_id"], s["iscrowd"]) for s in y["segments"]]
        assert all(np.array_equal(s["mask"], t["mask"]) for s, t in zip(x["segments"], y["segments"]))
    again = convert_coco(str(synthetic_coco), "train", uri, task="panoptic", shard_size=5, num_workers=1,
                         progress=False)
    assert again["reused_shards"] == len(again["shards"]) == 3


def test_prepare_data_job_subprocess(tmp_path):
    out = tmp_path / "records"
    job = [sys.executable, str(REPO / "jobs" / "prepare_data.py"), "--task", "panoptic", "--root",
           str(tmp_path / "syn"), "--split", "val"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(job + ["--dataset", "synthetic", "--out", str(out), "--num-images", "10", "--image-size",
                                 "48", "--shard-size", "4", "--workers", "2"],
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "images written: 10" in proc.stdout and "no_annotations=1" in proc.stdout
    assert f"manifest: {out}/manifest.json" in proc.stdout
    assert "[prepare] val: shards 3/3 (0 reused)" in proc.stderr and "eta 0:00:00" in proc.stderr  # progress
    manifest = read_manifest(str(out))
    assert manifest["dataset"] == "synthetic" and len(manifest["shards"]) == 3
    # strict mode on broken input: a non-zero exit and an error naming the file
    (tmp_path / "syn" / "val2017" / "000000000002.jpg").write_bytes(b"not a jpeg")
    bad = subprocess.run(job + ["--dataset", "coco", "--out", str(tmp_path / "strict"), "--strict", "--workers", "1"],
                         capture_output=True, text=True, timeout=180, env=env)
    assert bad.returncode == 2 and "val2017/000000000002.jpg" in bad.stderr and "unreadable_image" in bad.stderr


def test_ensure_synthetic_generates_once(tmp_path):
    cfg = SyntheticConfig(root=str(tmp_path), num_train=6, num_val=3, image_size=48, seed=1)
    train, val = ensure_synthetic(cfg)
    assert read_manifest(train)["num_images"] == 6 and read_manifest(val)["num_images"] == 3
    assert read_manifest(train)["task"] == "panoptic"
    stamp = (Path(train) / "manifest.json").stat().st_mtime_ns
    assert ensure_synthetic(cfg) == (train, val)
    assert (Path(train) / "manifest.json").stat().st_mtime_ns == stamp


def test_split_mostly_skipped_fails_with_counts_unless_allowed(synthetic_coco, tmp_path):
    """The panoptic PNG folder not unpacked: 11 of 12 images skipped used to write a manifest (issue 17)."""
    root = tmp_path / "coco"
    shutil.copytree(synthetic_coco, root)
    pngs = root / "annotations" / "panoptic_train2017"
    shutil.move(pngs, tmp_path / "unpacked-later")
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        convert_coco(str(root), "train", str(out), task="panoptic", shard_size=4, num_workers=1, progress=False)
    message = str(err.value)
    assert "11 of 12 images (91.7 %) were skipped" in message and "max_skipped=0.01" in message
    assert "missing_annotation_file=11 (e.g. train2017/000000000001.jpg" in message
    assert f"{out}/manifest.json was not written" in message and "--max-skipped 0.92" in message
    assert not (out / "manifest.json").exists()
    # unpacked at last: the rerun converts every shard again instead of reusing what skipped
    shutil.move(tmp_path / "unpacked-later", pngs)
    fixed = convert_coco(str(root), "train", str(out), task="panoptic", shard_size=4, num_workers=1, progress=False)
    assert fixed["num_images"] == TRAIN and fixed["skipped"] == {} and fixed["reused_shards"] == 0


def test_prepare_data_job_refuses_a_mostly_skipped_split_unless_allowed(synthetic_coco, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_data_job", REPO / "jobs" / "prepare_data.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    root = tmp_path / "coco"
    shutil.copytree(synthetic_coco, root)
    for png in sorted((root / "annotations" / "panoptic_val2017").glob("*.png"))[2:]:
        png.unlink()
    argv = ["--dataset", "coco", "--task", "panoptic", "--root", str(root), "--split", "val", "--workers", "1"]
    assert job.main(argv + ["--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "error: split 'val': 2 of 4 images (50.0 %) were skipped" in err and "missing_annotation_file=2" in err
    assert job.main(argv + ["--out", str(tmp_path / "allowed"), "--max-skipped", "0.5"]) == 0
    assert "skipped (image left out): missing_annotation_file=2" in capsys.readouterr().out
    assert read_manifest(str(tmp_path / "allowed"))["num_images"] == 2


def _val_split(synthetic_coco: Path, out: Path) -> dict:
    """The 4 synthetic val images as panoptic records in 2 shards."""
    return convert_coco(str(synthetic_coco), "val", str(out), task="panoptic", shard_size=2, num_workers=1,
                        progress=False)


@pytest.mark.parametrize("damage", ["truncated", "a list", "no shards"])
def test_damaged_manifest_names_the_file_and_the_fix(synthetic_coco, tmp_path, damage):
    out = tmp_path / "val"
    _val_split(synthetic_coco, out)
    path = out / "manifest.json"
    text = path.read_text()
    path.write_text({"truncated": text[: len(text) // 2], "a list": "[]",
                     "no shards": json.dumps({k: v for k, v in json.loads(text).items() if k != "shards"})}[damage])
    for read in (read_manifest, lambda uri: next(read_records(uri))):
        with pytest.raises(DataError) as err:
            read(str(out))
        assert str(path) in str(err.value) and f"re-run jobs/prepare_data.py with --out {out}" in str(err.value)
    assert _val_split(synthetic_coco, out)["reused_shards"] == 2  # the fix: the rerun writes the manifest again
    assert len(list(read_records(str(out)))) == 4


def test_truncated_shard_names_the_file_and_the_fix(synthetic_coco, tmp_path):
    from mpformer_ray.config import load_config
    from mpformer_ray.data.pipeline import local_batches
    from mpformer_ray.data.records import check_shards
    from mpformer_ray.evaluation.runner import shard_records
    from mpformer_ray.train import PreflightError, preflight

    out = tmp_path / "val"
    _val_split(synthetic_coco, out)
    shard = out / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    cfg = load_config("tiny", [f"data.train={out}", f"data.val={out}", f"storage.uri={tmp_path / 'runs'}"])
    readers = {
        "read_records": lambda: list(read_records(str(out))),
        "evaluation": lambda: list(shard_records(str(out), 0, 1)),
        "local_batches": lambda: list(local_batches(str(out), cfg, 2)),
        "check_shards": lambda: check_shards(str(out)),
        "preflight": lambda: preflight(cfg),
    }
    for name, read in readers.items():
        with pytest.raises((DataError, PreflightError)) as err:
            read()
        assert str(shard) in str(err.value), name
        assert "truncated or damaged" in str(err.value) and "re-run jobs/prepare_data.py" in str(err.value), name
    assert not (tmp_path / "runs").exists()
    rerun = _val_split(synthetic_coco, out)  # the fix: converts the damaged shard again, keeps the other
    assert rerun["reused_shards"] == 1 and len(list(read_records(str(out)))) == 4


def test_dataset_formats_are_the_registry_the_cli_and_prepare_read(tmp_path, capsys, monkeypatch):
    """jobs/prepare_data.py --dataset offers DATASETS' names and prepare() dispatches on them: an unknown
    name is refused naming the known ones; a converter registered there is offered and run."""
    import importlib.util

    from mpformer_ray.data.prepare import DATASETS, Dataset, Source, prepare
    from mpformer_ray.data.records import Work, make_row

    spec = importlib.util.spec_from_file_location("prepare_data_job", REPO / "jobs" / "prepare_data.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    with pytest.raises(SystemExit) as e:
        job.main(["--dataset", "voc"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid choice: 'voc'" in err and all(repr(name) in err for name in DATASETS)
    with pytest.raises(ValueError, match=r"dataset must be one of \['coco', 'ade20k', .*got 'voc'"):
        prepare("voc", Source(root=str(tmp_path)), str(tmp_path / "out"), task="semantic")

    seen = {}

    def voc_items(source: Source, task: str, report) -> Work:
        seen.update(root=source.root, split=source.split, task=task)
        return Work([], [{"id": 0, "name": "sheep", "isthing": False}], make_row)

    monkeypatch.setitem(DATASETS, "voc", Dataset(voc_items, ("semantic",)))
    out = str(tmp_path / "out")
    assert job.main(["--dataset", "voc", "--root", str(tmp_path), "--out", out]) == 0  # its one task, the default
    assert (seen["root"], seen["split"], seen["task"]) == (str(tmp_path), "train", "semantic")
    assert "dataset=voc task=semantic split=train" in capsys.readouterr().out
    assert read_manifest(out)["classes"][0]["name"] == "sheep"
    assert job.main(["--dataset", "voc", "--task", "panoptic", "--root", str(tmp_path), "--out", out]) == 2
    assert "--dataset voc has annotations for ['semantic'], not --task panoptic" in capsys.readouterr().err
