"""ADE20K and Cityscapes converters on synthetic data written in the real layouts: records equal
an independent decoding of the written PNGs, the official class mappings hold, and every kind
of bad input is counted (or, with strict, raised naming the file)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mpformer_ray.data import DataError, generate_scenes, read_records
from mpformer_ray.data.ade20k import convert_ade20k, write_ade20k_layout
from mpformer_ray.data.cityscapes import convert_cityscapes, write_cityscapes_layout
from mpformer_ray.data.synthetic import split_seed

REPO = Path(__file__).resolve().parent.parent
ADE_N, ADE_SIZE = 12, 32
CS_N, CS_SIZE = 12, 24  # Cityscapes images are CS_SIZE x 2 * CS_SIZE
# The official Cityscapes labelId -> trainId table (cityscapesscripts labels.py), written out
# here independently of the converter; labelIds not listed map to 255.
CS_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
               26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CS_THING_LABEL_IDS = [24, 25, 26, 27, 28, 31, 32, 33]  # person .. bicycle, instance-task ids 0..7
CS_HAS_INSTANCES = set(CS_THING_LABEL_IDS) | {29, 30}  # plus caravan, trailer (not trainable)


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int64)


def _cs_train(label_ids: np.ndarray) -> np.ndarray:
    out = np.full(label_ids.shape, 255, np.int64)
    for lid, tid in CS_TRAIN_ID.items():
        out[label_ids == lid] = tid
    return out


def _by_id(segments: list[dict]) -> dict[int, dict]:
    out = {s["id"]: s for s in segments}
    assert len(out) == len(segments), "segment ids must be unique within an image"
    return out


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ade")
    write_ade20k_layout(root, "training", ADE_N, ADE_SIZE, seed=0)
    return root


@pytest.fixture(scope="module")
def cs_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cityscapes")
    write_cityscapes_layout(root, "train", CS_N, CS_SIZE, seed=0)
    return root


def test_ade20k_layout_and_records_equal_pngs(ade_root, tmp_path):
    base = ade_root / "ADEChallengeData2016"
    assert sorted(p.name for p in (base / "images" / "training").iterdir())[:2] == [
        "ADE_train_00000001.jpg", "ADE_train_00000002.jpg"]
    # "train" is an alias of "training"; the root may also be ADEChallengeData2016 itself
    manifest = convert_ade20k(str(base), "train", str(tmp_path / "ade"), shard_size=5, num_workers=1,
                              progress=False)
    assert manifest["split"] == "training" and manifest["task"] == "semantic"
    assert manifest["num_images"] == ADE_N and manifest["skipped"] == {} and manifest["repaired"] == {}
    assert manifest["kept"] == {"no_annotations": 1}  # the generator's empty scene
    classes = manifest["classes"]
    assert len(classes) == 150 and not any(c["isthing"] for c in classes)
    assert (classes[0]["name"], classes[2]["name"], classes[149]["name"]) == ("wall", "sky", "flag")
    assert all(c["source_id"] == c["id"] + 1 for c in classes)

    records = list(read_records(str(tmp_path / "ade")))
    assert len(records) == ADE_N
    saw_void = saw_classes = 0
    for rec in records:
        name = Path(rec["file_name"]).stem
        assert rec["file_name"] == f"images/training/{name}.jpg"
        assert np.array_equal(rec["image"], np.asarray(Image.open(base / rec["file_name"]).convert("RGB")))
        raw = _png(base / "annotations" / "training" / f"{name}.png")
        expected = np.where(raw == 0, 255, raw - 1)  # 0 -> ignore, v -> v - 1
        assert np.array_equal(rec["sem_seg"], expected)
        segs = _by_id(rec["segments"])
        assert sorted(segs) == sorted(int(v) for v in np.unique(raw) if v != 0)
        for v, seg in segs.items():
            assert seg["category_id"] == v - 1 and seg["iscrowd"] is False
            assert np.array_equal(seg["mask"], raw == v)
        saw_void += (raw == 0).all()
        saw_classes += len(segs)
    assert saw_void == 1 and saw_classes > ADE_N


def test_ade20k_class_mapping_follows_scenes(ade_root, tmp_path):
    """The synthetic classes land on the intended real ADE20K classes (names, not indices)."""
    manifest = convert_ade20k(str(ade_root), "training", str(tmp_path / "ade"), num_workers=1, progress=False)
    names = [c["name"] for c in manifest["classes"]]
    intended = ["box", "ball", "tent", "plate", "sky", "grass"]  # synthetic square .. grass
    scenes = generate_scenes(ADE_N, ADE_SIZE, ADE_SIZE, split_seed(0, "training"))
    for scene, rec in zip(scenes, read_records(str(tmp_path / "ade"))):
        for seg in scene["segments"]:
            assert {names[v] for v in np.unique(rec["sem_seg"][seg["mask"]])} == {intended[seg["class_id"]]}


@pytest.mark.parametrize("task", ["semantic", "instance", "panoptic"])
def test_cityscapes_records_equal_pngs(cs_root, tmp_path, task):
    city_dirs = sorted(p.name for p in (cs_root / "leftImg8bit" / "train").iterdir())
    assert city_dirs == ["aachen", "bochum", "bremen"]
    assert (cs_root / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png").is_file()
    # the process pool once (spawned workers must import the converter and unpickle its partial)
    manifest = convert_cityscapes(str(cs_root), "train", str(tmp_path / task), task=task, shard_size=5,
                                  num_workers=2 if task == "panoptic" else 1, progress=False)
    assert manifest["num_images"] == CS_N and manifest["skipped"] == {} and manifest["repaired"] == {}
    names = [c["name"] for c in manifest["classes"]]
    if task == "instance":
        assert names == ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
        assert [c["source_id"] for c in manifest["classes"]] == CS_THING_LABEL_IDS
    else:
        assert len(names) == 19 and names[0] == "road" and names[10] == "sky" and names[18] == "bicycle"
        assert [c["id"] for c in manifest["classes"] if c["isthing"]] == list(range(11, 19))

    crowds = instances = 0
    for rec in read_records(str(tmp_path / task)):
        stem = rec["file_name"].split("/")[-1][: -len("_leftImg8bit.png")]
        city = stem.split("_")[0]
        assert rec["file_name"] == f"leftImg8bit/train/{city}/{stem}_leftImg8bit.png"
        assert np.array_equal(rec["image"], np.asarray(Image.open(cs_root / rec["file_name"]).convert("RGB")))
        label_ids = _png(cs_root / "gtFine" / "train" / city / f"{stem}_gtFine_labelIds.png")
        inst = _png(cs_root / "gtFine" / "train" / city / f"{stem}_gtFine_instanceIds.png")
        train = _cs_train(label_ids)
        assert (train[-CS_SIZE // 8:] == 255).all() and (label_ids[-CS_SIZE // 8:] == 1).all()  # ego vehicle
        expected: dict[int, tuple[int, bool, np.ndarray]] = {}  # id -> (category, iscrowd, mask)
        if task == "semantic":
            for lid, tid in CS_TRAIN_ID.items():
                if (label_ids == lid).any():
                    expected[lid] = (tid, False, label_ids == lid)
        else:
            for v in np.unique(inst).tolist():
                lid = v // 1000 if v >= 1000 else v
                if lid not in CS_TRAIN_ID or (task == "instance" and lid not in CS_THING_LABEL_IDS):
                    continue
                crowd = v < 1000 and lid in CS_HAS_INSTANCES
                cat = CS_THING_LABEL_IDS.index(lid) if task == "instance" else CS_TRAIN_ID[lid]
                expected[v] = (cat, crowd, inst == v)
        segs = _by_id(rec["segments"])
        assert sorted(segs) == sorted(expected)
        for sid, seg in segs.items():
            cat, crowd, mask = expected[sid]
            assert (seg["category_id"], seg["iscrowd"]) == (cat, crowd)
            assert np.array_equal(seg["mask"], mask)
            crowds += crowd
            instances += sid >= 1000
        if task == "instance":
            assert rec["sem_seg"] is None
        else:
            assert np.array_equal(rec["sem_seg"], train)
    if task != "semantic":
        assert crowds >= 1 and instances >= CS_N // 2  # group regions kept as crowd


def test_cityscapes_class_mapping_follows_scenes(cs_root, tmp_path):
    """Synthetic square/disk/triangle/ring/sky/grass become car/person/bicycle/truck/sky/terrain."""
    convert_cityscapes(str(cs_root), "train", str(tmp_path / "sem"), task="semantic", num_workers=1, progress=False)
    intended = [13, 11, 18, 14, 10, 9]  # trainIds
    order = sorted(range(CS_N), key=lambda i: f"{['aachen', 'bochum', 'bremen'][i % 3]}_{i // 3:06d}")
    scenes = list(generate_scenes(CS_N, CS_SIZE, 2 * CS_SIZE, split_seed(0, "train")))
    band = CS_SIZE - CS_SIZE // 8
    for i, rec in zip(order, read_records(str(tmp_path / "sem"))):
        for seg in scenes[i]["segments"]:
            mask = seg["mask"].copy()
            mask[band:] = False
            if mask.any():
                assert set(np.unique(rec["sem_seg"][mask]).tolist()) == {intended[seg["class_id"]]}


# --- bad input -----------------------------------------------------------------------------------

def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _resize(path: Path) -> None:
    im = Image.open(path)
    im.resize((im.width + 2, im.height), Image.NEAREST).save(path)


def _paint(path: Path, value: int) -> None:
    a = np.asarray(Image.open(path)).copy()
    a[:4, :4] = value
    Image.fromarray(a).save(path)


ADE_IMG = "ADEChallengeData2016/images/training/ADE_train_00000002.jpg"
ADE_LBL = "ADEChallengeData2016/annotations/training/ADE_train_00000002.png"
ADE_CASES = {  # name -> (corrupt(root), table, reason, file named, images written of 4)
    "truncated_image": (lambda r: _truncate(r / ADE_IMG), "skipped", "unreadable_image", ADE_IMG, 3),
    "garbage_label": (lambda r: (r / ADE_LBL).write_bytes(b"not a png"), "skipped", "unreadable_label", ADE_IMG, 3),
    "missing_label": (lambda r: (r / ADE_LBL).unlink(), "skipped", "missing_label", ADE_IMG, 3),
    "missing_image": (lambda r: (r / ADE_IMG).unlink(), "skipped", "missing_image", ADE_LBL, 3),
    "size_mismatch": (lambda r: _resize(r / ADE_LBL), "skipped", "label_size_mismatch", ADE_IMG, 3),
    "unknown_value": (lambda r: _paint(r / ADE_LBL, 201), "repaired", "unknown_label", ADE_IMG, 4),
}


@pytest.fixture(scope="module")
def small_ade(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small_ade")
    write_ade20k_layout(root, "training", 4, 24, seed=1)
    return root


@pytest.mark.parametrize("case", sorted(ADE_CASES))
def test_ade20k_bad_input_counted_or_strict(small_ade, tmp_path, case):
    corrupt, table, reason, named, written = ADE_CASES[case]
    root = tmp_path / "root"
    shutil.copytree(small_ade, root)
    corrupt(root)
    # one bad image of 4: more than the default max_skipped share, so allowed explicitly
    manifest = convert_ade20k(str(root), "training", str(tmp_path / "out"), num_workers=1, progress=False,
                              max_skipped=1.0)
    other = "repaired" if table == "skipped" else "skipped"
    assert manifest[table] == {reason: 1} and manifest[other] == {}
    assert manifest["num_images"] == written and manifest["examples"][reason] == [named]
    if case == "unknown_value":
        rec = next(r for r in read_records(str(tmp_path / "out")) if r["file_name"].endswith(Path(ADE_IMG).name))
        raw = _png(root / ADE_LBL)
        assert (rec["sem_seg"][:4, :4] == 255).all()
        assert np.array_equal(rec["sem_seg"][4:], np.where(raw == 0, 255, raw - 1)[4:])
    with pytest.raises(DataError, match=named.replace(".", r"\.")):
        convert_ade20k(str(root), "training", str(tmp_path / "strict"), num_workers=1, strict=True, progress=False)


CS_IMG = "leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png"
CS_LBL = "gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png"
CS_INST = "gtFine/val/lindau/lindau_000000_000019_gtFine_instanceIds.png"


def _break_consistency(root: Path) -> None:
    """Mark a block of road (labelId 7, not present in the scene) in labelIds only."""
    _paint(root / CS_LBL, 7)


CS_CASES = {
    "truncated_image": (lambda r: _truncate(r / CS_IMG), "skipped", "unreadable_image", CS_IMG, 3),
    "garbage_instance_ids": (lambda r: (r / CS_INST).write_bytes(b"\x89PNG junk"), "skipped", "unreadable_label",
                             CS_IMG, 3),
    "missing_label_ids": (lambda r: (r / CS_LBL).unlink(), "skipped", "missing_label", CS_IMG, 3),
    "missing_image": (lambda r: (r / CS_IMG).unlink(), "skipped", "missing_image", CS_LBL, 3),
    "size_mismatch": (lambda r: _resize(r / CS_INST), "skipped", "label_size_mismatch", CS_IMG, 3),
    "unknown_label_id": (lambda r: _paint(r / CS_LBL, 77), "repaired", "unknown_label", CS_IMG, 4),
    "unknown_instance_id": (lambda r: _paint(r / CS_INST, 7005), "repaired", "unknown_label", CS_IMG, 4),
    "instance_label_mismatch": (_break_consistency, "repaired", "instance_label_mismatch", CS_IMG, 4),
}


@pytest.fixture(scope="module")
def small_cs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small_cs")
    write_cityscapes_layout(root, "val", 4, 16, seed=1)
    return root


@pytest.mark.parametrize("case", sorted(CS_CASES))
def test_cityscapes_bad_input_counted_or_strict(small_cs, tmp_path, case):
    corrupt, table, reason, named, written = CS_CASES[case]
    root = tmp_path / "root"
    shutil.copytree(small_cs, root)
    corrupt(root)
    manifest = convert_cityscapes(str(root), "val", str(tmp_path / "out"), task="panoptic", num_workers=1,
                                  progress=False, max_skipped=1.0)  # one bad image of 4: allowed explicitly
    other = "repaired" if table == "skipped" else "skipped"
    assert manifest[table] == {reason: 1} and manifest[other] == {}
    assert manifest["num_images"] == written and manifest["examples"][reason] == [named]
    if table == "repaired":  # the bad block is ignored, the rest of the image kept as it was
        rec = next(r for r in read_records(str(tmp_path / "out")) if r["file_name"] == CS_IMG)
        assert (rec["sem_seg"][:4, :4] == 255).all()
        assert np.array_equal(rec["sem_seg"][4:], _cs_train(_png(root / CS_LBL))[4:])
        assert not any(s["mask"][:4, :4].any() for s in rec["segments"])
    with pytest.raises(DataError, match=named.replace(".", r"\.")):
        convert_cityscapes(str(root), "val", str(tmp_path / "strict"), task="panoptic", num_workers=1,
                           strict=True, progress=False)


def test_ade20k_rejects_other_tasks_and_missing_layout(small_ade, tmp_path):
    with pytest.raises(DataError, match="semantic"):
        convert_ade20k(str(small_ade), "training", str(tmp_path / "x"), task="panoptic")
    with pytest.raises(DataError, match="images/validation"):
        convert_ade20k(str(small_ade), "val", str(tmp_path / "x"))


def test_prepare_data_job_converts_cityscapes(small_cs, tmp_path):
    out = tmp_path / "job"
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "prepare_data.py"), "--dataset", "cityscapes",
                           "--task", "instance", "--root", str(small_cs), "--split", "val", "--out", str(out),
                           "--workers", "1"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "images written: 4" in proc.stdout
    recs = list(read_records(str(out)))
    assert len(recs) == 4 and all(s["category_id"] < 8 for r in recs for s in r["segments"])


def test_ade20k_to_s3(small_ade, moto_server):
    uri = f"s3://{moto_server['bucket']}/ade20k/training"
    manifest = convert_ade20k(str(small_ade), "training", uri, shard_size=2, num_workers=1, progress=False)
    assert manifest["num_images"] == 4 and len(manifest["shards"]) == 2
    recs = list(read_records(uri))
    raw = _png(small_ade / "ADEChallengeData2016" / "annotations" / "training" / "ADE_train_00000001.png")
    assert len(recs) == 4 and np.array_equal(recs[0]["sem_seg"], np.where(raw == 0, 255, raw - 1))
