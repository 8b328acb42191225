"""Your own data, from the files on disk (or S3) to per-class results: a labelling tool's COCO instances export,
a COCO panoptic export with arbitrary file names and folders of label PNGs, written here as real files; each is
converted with a seeded val split and a preview, trained a few iterations by the plain loop with the classes
taken from the data, and evaluated by jobs/evaluate.py with per-class output. Every kind of bad input is named."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from mpformer_ray import storage
from mpformer_ray.config import load_config
from mpformer_ray.data.coco import convert_coco
from mpformer_ray.data.pipeline import local_stream
from mpformer_ray.data.prepare import Source, prepare
from mpformer_ray.data.records import DataError, read_manifest, read_records
from mpformer_ray.data.split import split_items
from mpformer_ray.data.synthetic import SYNTHETIC_CLASSES
from mpformer_ray.data.synthetic_exports import (EXPORT_CATEGORY_IDS, write_instance_export, write_label_folders,
                                                 write_panoptic_export)
from mpformer_ray.evaluation.evaluator import Evaluator
from mpformer_ray.evaluation.runner import evaluate_split
from mpformer_ray.model import build_model
from mpformer_ray.train import CheckpointStore, preflight, train_loop

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent
HEIGHT, WIDTH = 48, 64  # not square: a height / width mix-up shows
# the names each export's JSON / classes file gives, in the order the classes take (category id order for COCO)
BY_ID = sorted(zip(EXPORT_CATEGORY_IDS, SYNTHETIC_CLASSES))
INSTANCE_NAMES = [c["name"] for _, c in BY_ID if c["isthing"]]
PANOPTIC_NAMES = [c["name"] for _, c in BY_ID]
FOLDER_NAMES = [c["name"] for c in SYNTHETIC_CLASSES]


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, dict[str, str]]:
    """The three exports as a user brings them, under one folder."""
    root = tmp_path_factory.mktemp("exports")
    return {"instance": write_instance_export(root / "cvat export", 14, HEIGHT, WIDTH, seed=1),
            "panoptic": write_panoptic_export(root / "panoptic", 10, HEIGHT, WIDTH, seed=2),
            "folder": write_label_folders(root / "labels", 12, HEIGHT, WIDTH, seed=3)}


def _prepare_args(kind: str, paths: dict[str, str], out: str) -> list[str]:
    if kind == "folder":
        source = ["--dataset", "folder", "--images", paths["images"], "--masks", paths["masks"],
                  "--classes", paths["classes"]]
    else:
        source = ["--dataset", "coco", "--task", kind, "--annotations", paths["annotations"],
                  "--images", paths["images"]]
    return [*source, "--out", out, "--val-fraction", "0.25", "--seed", "0", "--workers", "1"]


def _column_means(rows: list[dict], column: str, kind: str | None = None) -> float | None:
    """The mean of a per_class.csv column's filled cells (of the things' / stuff's rows); None when none is."""
    values = [float(r[column]) for r in rows if r[column] != "" and kind in (None, r["type"])]
    return float(np.mean(values)) if values else None


def _check_per_class(out: str, names: list[str], metrics: dict) -> list[dict]:
    """per_class.csv at ``out`` names every class and averages back to ``metrics`` exactly."""
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(storage.join(out, "per_class.csv")).decode())))
    assert [r["name"] for r in rows] == names
    for column, metric in (("PQ", "panoptic/PQ"), ("SQ", "panoptic/SQ"), ("RQ", "panoptic/RQ"), ("AP", "segm/AP"),
                           ("IoU", "sem_seg/mIoU"), ("Acc", "sem_seg/mAcc")):
        if metric in metrics:
            assert _column_means(rows, column) == metrics[metric], column
    if "panoptic/PQ_th" in metrics:
        assert _column_means(rows, "PQ", "thing") == metrics["panoptic/PQ_th"]
        assert _column_means(rows, "PQ", "stuff") == metrics["panoptic/PQ_st"]
    return rows


def _train_and_evaluate(records: str, runs: str, eval_out: str, names: list[str], capsys) -> dict:
    """Two iterations of the plain training loop on ``records``/train with the tiny preset, which leaves the
    classes to the data, an evaluation on ``records``/val, then jobs/evaluate.py --out on its checkpoint."""
    cfg = load_config("tiny", TINY_MODEL + [
        f"data.train={records}/train", f"data.val={records}/val", f"storage.uri={runs}", "run.name=own",
        "train.max_iters=2", "train.batch_size=2", "train.workers=1", "train.eval_period=0"])
    assert cfg.model.num_classes is None and cfg.model.thing_classes is None
    plan = preflight(cfg)
    assert plan.cfg.model.num_classes == len(names) and [c["name"] for c in plan.classes] == names
    assert plan.cfg.model.thing_classes == [c["id"] for c in plan.classes if c["isthing"]]
    torch.manual_seed(0)
    train_loop(build_model(plan.cfg), lambda start: local_stream(plan.cfg.data.train, plan.cfg, 2, start), plan.cfg,
               lambda metrics: None, CheckpointStore(plan.run_uri), classes=plan.classes,
               evaluate=lambda net: evaluate_split(net, plan.cfg.data.val, plan.cfg, plan.classes),
               main_metric=plan.main_metric)
    # the training run's evaluation wrote its metrics and per-class table beside each other
    evaluated = storage.join(plan.run_uri, "evaluations", "iteration_0000002")
    _check_per_class(evaluated, names, json.loads(storage.read_bytes(storage.join(evaluated, "metrics.json"))))

    capsys.readouterr()
    assert _job("evaluate")(["--checkpoint", plan.run_uri, "--out", eval_out, "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    metrics = json.loads(printed.out)  # stdout holds nothing but the metrics
    assert metrics == json.loads(storage.read_bytes(storage.join(eval_out, "metrics.json")))
    assert all(name in printed.err for name in names)  # the per-class table
    _check_per_class(eval_out, names, metrics)
    if "sem_seg/mIoU" in metrics:
        rows = list(csv.reader(io.StringIO(storage.read_bytes(storage.join(eval_out, "confusion.csv")).decode())))
        assert rows[0][1:] == names and [r[0] for r in rows[1:]] == names
        assert all(math.isclose(sum(map(float, r[1:])), 1.0) for r in rows[1:] if r[1])  # rows normalised
        assert Image.open(io.BytesIO(storage.read_bytes(storage.join(eval_out, "confusion.png")))).size[0] > 100
    return metrics


def test_tool_instance_export_to_per_class_results(exports, tmp_path, capsys):
    paths, out = exports["instance"], str(tmp_path / "records")
    assert _job("prepare_data")(_prepare_args("instance", paths, out) + ["--preview", "3"]) == 0
    train, val = read_manifest(f"{out}/train"), read_manifest(f"{out}/val")
    assert (train["num_images"], val["num_images"]) == (10, 4)
    assert sum(m["kept"].get("no_annotations", 0) for m in (train, val)) >= 3  # every 7th, and an empty scene
    # classes in category-id order (3, 17, 42, 1000), names from the JSON, all things
    assert [(c["name"], c["source_id"], c["isthing"]) for c in train["classes"]] == [
        (n, sid, True) for n, sid in zip(INSTANCE_NAMES, sorted(EXPORT_CATEGORY_IDS[:4]))]
    coco = COCO(paths["annotations"])
    by_name = {im["file_name"]: im["id"] for im in coco.dataset["images"]}
    kinds = set()
    for split in ("train", "val"):
        for rec in read_records(f"{out}/{split}"):
            image_id = by_name[rec["file_name"]]  # the JSON's file_name, sub-folders and spaces kept
            assert rec["image_id"] == image_id and rec["image"].shape == (HEIGHT, WIDTH, 3)
            anns = {a["id"]: a for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))}
            assert {s["id"] for s in rec["segments"]} == set(anns)
            for seg in rec["segments"]:
                ann = anns[seg["id"]]
                assert np.array_equal(seg["mask"], coco.annToMask(ann).astype(bool))
                assert train["classes"][seg["category_id"]]["source_id"] == ann["category_id"]
                segmentation = ann["segmentation"]
                kinds.add("crowd" if ann["iscrowd"] else "polygons" if isinstance(segmentation, list) and
                          len(segmentation) > 1 else "polygon" if isinstance(segmentation, list) else
                          "rle" if isinstance(segmentation["counts"], str) else "uncompressed rle")
    assert kinds == {"crowd", "polygons", "polygon", "rle", "uncompressed rle"}
    assert {Path(f).suffix for f in by_name} == {".jpg", ".jpeg", ".PNG"}
    assert len(storage.listdir(f"{out}/preview")) == 3

    metrics = _train_and_evaluate(out, str(tmp_path / "runs"), str(tmp_path / "eval"), INSTANCE_NAMES, capsys)
    assert "segm/AP" in metrics and "panoptic/PQ" not in metrics
    assert not (tmp_path / "eval" / "confusion.csv").exists()  # no semantic task


def test_panoptic_export_with_arbitrary_names_to_per_class_results(exports, tmp_path, capsys):
    paths, out = exports["panoptic"], str(tmp_path / "records")
    assert _job("prepare_data")(_prepare_args("panoptic", paths, out)) == 0
    manifest = read_manifest(f"{out}/train")
    # thing / stuff from the JSON; the PNGs found in the folder named like the JSON (COCO's convention)
    assert [(c["name"], c["isthing"]) for c in manifest["classes"]] == [
        (c["name"], c["isthing"]) for _, c in BY_ID]
    pan = json.loads(Path(paths["annotations"]).read_text())
    images = {im["file_name"]: im["id"] for im in pan["images"]}
    infos = {a["image_id"]: a for a in pan["annotations"]}
    for rec in read_records(f"{out}/train"):
        ann = infos[images[rec["file_name"]]]
        rgb = np.asarray(Image.open(Path(paths["annotations"]).with_suffix("") / ann["file_name"]), np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        assert [s["id"] for s in rec["segments"]] == [i["id"] for i in ann["segments_info"]]
        for seg, info in zip(rec["segments"], ann["segments_info"]):
            assert np.array_equal(seg["mask"], ids == info["id"]) and seg["iscrowd"] == bool(info["iscrowd"])
            assert manifest["classes"][seg["category_id"]]["source_id"] == info["category_id"]

    metrics = _train_and_evaluate(out, str(tmp_path / "runs"), str(tmp_path / "eval"), PANOPTIC_NAMES, capsys)
    assert {"panoptic/PQ", "segm/AP", "sem_seg/mIoU"} <= set(metrics)


def test_label_folders_to_per_class_results(exports, tmp_path, capsys):
    paths, out = exports["folder"], str(tmp_path / "records")
    assert _job("prepare_data")(_prepare_args("folder", paths, out) + ["--preview", "2"]) == 0
    manifest = read_manifest(f"{out}/train")
    assert manifest["task"] == "semantic" and [c["name"] for c in manifest["classes"]] == FOLDER_NAMES
    for split in ("train", "val"):
        for rec in read_records(f"{out}/{split}"):
            label = np.asarray(Image.open(Path(paths["masks"], rec["file_name"]).with_suffix(".png")))
            assert np.array_equal(rec["sem_seg"], label)  # class index = value, 255 kept as ignore
            image = Image.open(Path(paths["images"], rec["file_name"])).convert("RGB")
            assert np.array_equal(rec["image"], np.asarray(image))
    metrics = _train_and_evaluate(out, str(tmp_path / "runs"), str(tmp_path / "eval"), FOLDER_NAMES, capsys)
    assert "sem_seg/mIoU" in metrics and "segm/AP" not in metrics


def _upload(local: str, uri: str) -> None:
    for path in sorted(Path(local).rglob("*")):
        if path.is_file():
            storage.write_bytes(storage.join(uri, path.relative_to(local).as_posix()), path.read_bytes())


def _same_records(a: str, b: str) -> None:
    x, y = list(read_records(a)), list(read_records(b))
    assert [r["file_name"] for r in x] == [r["file_name"] for r in y] and x
    for r, s in zip(x, y):
        assert np.array_equal(r["image"], s["image"]) and r["image_id"] == s["image_id"]
        assert (r["sem_seg"] is None and s["sem_seg"] is None) or np.array_equal(r["sem_seg"], s["sem_seg"])
        assert [(t["id"], t["category_id"], t["iscrowd"]) for t in r["segments"]] == [
            (t["id"], t["category_id"], t["iscrowd"]) for t in s["segments"]]
        assert all(np.array_equal(t["mask"], u["mask"]) for t, u in zip(r["segments"], s["segments"]))


def test_exports_on_s3_convert_like_local_ones_and_train(exports, moto_server, tmp_path, capsys):
    bucket = f"s3://{moto_server['bucket']}/own-{tmp_path.name}"
    root = os.path.commonpath([p for paths in exports.values() for p in paths.values()])
    _upload(root, f"{bucket}/src")
    remote = {kind: {k: f"{bucket}/src/{Path(p).relative_to(root).as_posix()}" for k, p in paths.items()}
              for kind, paths in exports.items()}
    for kind in ("instance", "panoptic", "folder"):
        local, s3 = str(tmp_path / kind), f"{bucket}/records/{kind}"
        assert _job("prepare_data")(_prepare_args(kind, exports[kind], local)) == 0
        assert _job("prepare_data")(_prepare_args(kind, remote[kind], s3) + ["--preview", "1"]) == 0
        for split in ("train", "val"):
            _same_records(f"{local}/{split}", f"{s3}/{split}")  # the same split from the same seed
        assert len(storage.listdir(f"{s3}/preview")) == 1
    _train_and_evaluate(f"{bucket}/records/folder", f"{bucket}/runs", f"{bucket}/eval", FOLDER_NAMES, capsys)


def test_coco2017_root_and_split_are_a_shorthand_for_the_paths(synthetic_coco, tmp_path):
    short = convert_coco(str(synthetic_coco), "val", str(tmp_path / "short"), task="panoptic", num_workers=1,
                         progress=False)
    spelled = prepare("coco", Source(annotations=str(synthetic_coco / "annotations" / "panoptic_val2017.json"),
                                     images=str(synthetic_coco / "val2017")), str(tmp_path / "spelled"),
                      task="panoptic", num_workers=1, progress=False)[str(tmp_path / "spelled")]
    assert spelled["classes"] == short["classes"] and spelled["num_images"] == short["num_images"]
    for a, b in zip(read_records(str(tmp_path / "short")), read_records(str(tmp_path / "spelled"))):
        assert a["file_name"] == f"val2017/{b['file_name']}" and np.array_equal(a["sem_seg"], b["sem_seg"])


def test_the_split_is_seeded_and_the_same_everywhere(exports, tmp_path):
    names = [{"image": f"{c}.jpg"} for c in "abcdefghij"]
    train, val = split_items(names, "image", 0.3, seed=0)
    # pinned: SHA-256 of the seed and the path decides, on every machine and Python
    assert [v["image"] for v in val] == ["b.jpg", "g.jpg", "j.jpg"] and len(train) == 7
    assert split_items(list(reversed(names)), "image", 0.3, seed=0)[1] == list(reversed(val))
    assert split_items(names, "image", 0.3, seed=1)[1] != val
    code = ("from mpformer_ray.data.split import split_items; print([v['image'] for v in split_items("
            "[{'image': c + '.jpg'} for c in 'abcdefghij'], 'image', 0.3, seed=0)[1]])")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                           env={**os.environ, "PYTHONHASHSEED": "12345"}, timeout=60)
    assert other.stdout.strip() == "['b.jpg', 'g.jpg', 'j.jpg']", other.stderr
    # a rerun of the same command reuses every shard: the same images land in the same splits
    args = _prepare_args("folder", exports["folder"], str(tmp_path / "out"))
    assert _job("prepare_data")(args) == 0
    assert _job("prepare_data")(args) == 0
    assert read_manifest(str(tmp_path / "out" / "val"))["reused_shards"] == 1
    with pytest.raises(DataError, match="too few to split"):
        split_items(names[:1], "image", 0.5, seed=0)


def test_per_class_values_average_back_to_the_aggregates(synthetic_coco, tmp_path):
    """Predictions derived from the ground truth (some segments dropped, relabelled or eroded) give varied
    per-class values; their means are the reported PQ / SQ / RQ (all, things, stuff), AP and mIoU / mAcc."""
    out = str(tmp_path / "val")
    convert_coco(str(synthetic_coco), "train", out, task="panoptic", num_workers=1, progress=False)
    classes = read_manifest(out)["classes"]
    evaluator = Evaluator(classes, {"panoptic", "instance", "semantic"})
    rng = np.random.default_rng(0)
    for rec in read_records(out):
        ids, info, masks, scores, labels = np.zeros(rec["image"].shape[:2], np.int32), [], [], [], []
        sem = np.zeros((len(classes), *ids.shape), np.float32)
        for k, seg in enumerate(rec["segments"]):
            label = int(seg["category_id"]) if rng.random() > 0.2 else int(rng.integers(len(classes)))
            mask = seg["mask"] if rng.random() > 0.3 else seg["mask"] & (rng.random(ids.shape) > 0.6)
            if rng.random() < 0.15 or not mask.any():
                continue
            ids[mask] = k + 1
            info.append({"id": k + 1, "category_id": label, "isthing": classes[label]["isthing"]})
            sem[label][mask] = 1.0
            if classes[label]["isthing"]:
                masks.append(mask)
                scores.append(float(rng.random()))
                labels.append(label)
        evaluator.process(rec, {"panoptic": (ids, info), "sem_seg": sem, "instances": {
            "masks": np.array(masks, bool).reshape(-1, *ids.shape), "scores": np.array(scores),
            "labels": np.array(labels, np.int64)}})
    metrics, rows = evaluator.evaluate(), evaluator.per_class()
    aps = [r["AP"] for r in rows if not math.isnan(r["AP"])]
    assert len({round(v, 6) for v in aps}) > 1 and 0 < metrics["panoptic/PQ"] < 100  # not all equal: a real check

    def mean(column: str, kind: str | None = None) -> float:
        return float(np.mean([r[column] for r in rows if not math.isnan(r[column]) and kind in (None, r["type"])]))

    for column, metric in (("PQ", "panoptic/PQ"), ("SQ", "panoptic/SQ"), ("RQ", "panoptic/RQ"),
                           ("AP", "segm/AP"), ("IoU", "sem_seg/mIoU"), ("Acc", "sem_seg/mAcc")):
        assert mean(column) == metrics[metric], column
    for suffix, kind in (("_th", "thing"), ("_st", "stuff")):
        for column in ("PQ", "SQ", "RQ"):
            assert mean(column, kind) == metrics[f"panoptic/{column}{suffix}"]
    assert all(math.isnan(r["AP"]) for r in rows if r["type"] == "stuff")
    # AP computed as the per-class mean is COCOeval's own number
    from pycocotools.cocoeval import COCOeval

    from mpformer_ray.evaluation.instance import quiet_pycocotools

    instance = evaluator.metrics["instance"]
    coco_eval = COCOeval(instance._coco("gt"), instance._coco("dt"), iouType="segm")
    with quiet_pycocotools():
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    assert metrics["segm/AP"] == pytest.approx(100 * coco_eval.stats[0], abs=1e-9)


# -- bad input: each kind is counted by reason, and --strict names it ---------------------------------------


def _small_instance_export(root: Path) -> dict[str, str]:
    return write_instance_export(root, 6, 32, 40, seed=5)


def _bad_coco(root: Path, case: str) -> tuple[dict[str, str], str]:
    """A small instance export with one bad input of kind ``case``; returns its paths and the file named."""
    paths = _small_instance_export(root)
    data = json.loads(Path(paths["annotations"]).read_text())
    first = data["annotations"][0]
    image = next(im for im in data["images"] if im["id"] == first["image_id"])
    if case == "annotation_without_image":
        data["annotations"].append({**first, "id": 9999, "image_id": 424242})
        named = paths["annotations"]
    elif case == "unknown_category":
        first["category_id"] = 555
        named = image["file_name"]
    elif case == "degenerate_polygon":
        data["annotations"].append({**first, "id": 9998, "segmentation": [[1.0, 1.0, 9.0, 9.0]], "iscrowd": 0})
        named = image["file_name"]
    elif case == "mask_size_mismatch":
        small = mask_util.encode(np.asfortranarray(np.ones((16, 16), np.uint8)))
        first["segmentation"] = {"size": [16, 16], "counts": small["counts"].decode()}
        named = image["file_name"]
    elif case == "unreadable_image":
        path = Path(paths["images"], image["file_name"])
        path.write_bytes(path.read_bytes()[:40])
        named = image["file_name"]
    else:  # duplicate_image_id: a second entry claims the id of the last image
        last = data["images"][-1]
        data["images"].append({**last, "file_name": data["images"][0]["file_name"]})
        named = last["file_name"]
    Path(paths["annotations"]).write_text(json.dumps(data))
    return paths, named


COCO_CASES = {"annotation_without_image": "skipped", "unknown_category": "repaired",
              "degenerate_polygon": "repaired", "mask_size_mismatch": "repaired", "unreadable_image": "skipped",
              "duplicate_image_id": "skipped"}


@pytest.mark.parametrize("case", sorted(COCO_CASES))
def test_bad_coco_export_input_is_counted_and_named(tmp_path, case):
    paths, named = _bad_coco(tmp_path / "export", case)
    source = Source(annotations=paths["annotations"], images=paths["images"])
    out = str(tmp_path / "out")
    manifest = prepare("coco", source, out, task="instance", num_workers=1, progress=False, max_skipped=1.0)[out]
    assert manifest[COCO_CASES[case]][case] == (2 if case == "duplicate_image_id" else 1)
    assert named in manifest["examples"][case]
    with pytest.raises(DataError, match=case) as err:
        prepare("coco", source, str(tmp_path / "strict"), task="instance", num_workers=1, progress=False,
                strict=True)
    assert named in str(err.value)


def _bad_folder(root: Path, case: str) -> tuple[dict[str, str], str]:
    """A small label-folder dataset with one bad input of kind ``case``; returns its paths and the file named."""
    paths = write_label_folders(root, 6, 32, 40, seed=6)
    images, masks = Path(paths["images"]), Path(paths["masks"])
    image = sorted(p for p in images.rglob("*") if p.is_file())[0]
    rel = image.relative_to(images)
    label = (masks / rel).with_suffix(".png")
    if case == "unknown_label":
        values = np.asarray(Image.open(label)).copy()
        values[:4, :4] = 77  # neither one of the 6 classes nor 255
        Image.fromarray(values).save(label)
    elif case == "rgb_label":
        Image.open(label).convert("RGB").save(label)
    elif case == "missing_label":
        label.unlink()
    elif case == "missing_image":
        image.unlink()
        return paths, str(masks / label.relative_to(masks))
    elif case == "unreadable_image":
        image.write_bytes(image.read_bytes()[:40])
    else:  # duplicate_image: a second image of the same name, another extension, would share the label
        shutil.copy(image, image.with_suffix(".bmp" if image.suffix != ".bmp" else ".png"))
    return paths, str(rel)


FOLDER_CASES = {"unknown_label": "repaired", "rgb_label": "skipped", "missing_label": "skipped",
                "missing_image": "skipped", "unreadable_image": "skipped", "duplicate_image": "skipped"}


@pytest.mark.parametrize("case", sorted(FOLDER_CASES))
def test_bad_label_folder_input_is_counted_and_named(tmp_path, case):
    paths, named = _bad_folder(tmp_path / "data", case)
    source = Source(images=paths["images"], masks=paths["masks"], classes=paths["classes"])
    out = str(tmp_path / "out")
    manifest = prepare("folder", source, out, num_workers=1, progress=False, max_skipped=1.0)[out]
    assert manifest[FOLDER_CASES[case]][case] == (2 if case == "duplicate_image" else 1)
    assert named in manifest["examples"][case]
    with pytest.raises(DataError, match=case) as err:
        prepare("folder", source, str(tmp_path / "strict"), num_workers=1, progress=False, strict=True)
    assert named in str(err.value)


def test_source_flags_and_class_files_are_checked(tmp_path, capsys):
    paths = write_label_folders(tmp_path / "data", 2, 16, 16, seed=0)
    prepare_data = _job("prepare_data")
    folder = ["--dataset", "folder", "--images", paths["images"], "--masks", paths["masks"]]
    assert prepare_data([*folder, "--out", str(tmp_path / "a")]) == 2
    assert "error: --dataset folder needs --classes" in capsys.readouterr().err
    assert prepare_data([*folder, "--classes", paths["classes"], "--ignore-index", "0",
                         "--out", str(tmp_path / "b")]) == 2
    assert "--ignore-index 0 is also the value of class 'square'" in capsys.readouterr().err
    assert prepare_data(["--dataset", "coco", "--root", str(tmp_path), "--annotations", "x.json", "--images",
                         str(tmp_path), "--out", str(tmp_path / "c")]) == 2
    assert "either --root and --split" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prepare_data(["--dataset", "folder", "--images", paths["images"]])  # no --out and no --root
    assert "--out is needed" in capsys.readouterr().err
    # the class names as a YAML list, a JSON list or an index mapping give the same classes
    names = [c["name"] for c in SYNTHETIC_CLASSES]
    files = {"classes.yaml": "".join(f"- {n}\n" for n in names), "classes.json": json.dumps(names),
             "map.yml": "".join(f"{i}: {n}\n" for i, n in enumerate(names))}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        out = str(tmp_path / f"out-{name}")
        manifest = prepare("folder", Source(images=paths["images"], masks=paths["masks"],
                                            classes=str(tmp_path / name)), out, num_workers=1, progress=False)[out]
        assert [c["name"] for c in manifest["classes"]] == names
