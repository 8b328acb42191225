"""The evaluation runner, the prediction writers and the evaluate / predict jobs, on a tiny real model."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from mpformer_ray.config import load_config
from mpformer_ray.data.coco import convert_coco
from mpformer_ray.data.records import read_manifest, read_records
from mpformer_ray.data.synthetic import generate_scene
from mpformer_ray.evaluation.runner import evaluate_model, shard_records
from mpformer_ray.model import build_model
from mpformer_ray.predict import (
    decode_panoptic_ids,
    encode_panoptic_ids,
    image_id_for,
    predict,
    write_predictions,
)
from mpformer_ray.train.checkpoint import Checkpoint, save_checkpoint

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
VAL_IMAGES = 4  # the synthetic_coco fixture's val split
TINY = [
    "model.dec_layers=2", "model.enc_layers=1", "model.num_queries=8", "model.hidden_dim=32", "model.nheads=2",
    "model.dim_feedforward=64", "model.enc_dim_feedforward=64", "model.mask_dim=32", "model.train_num_points=256",
    "data.test_short_side=64", "data.test_max_size=64",
    # the synthetic data's classes: these models are built without the training job, which takes them from the data
    "model.num_classes=6", "model.thing_classes=[0, 1, 2, 3]",
]
# keep every query's segment, so an untrained model still predicts panoptic segments to write
KEEP_ALL = ["model.test.object_mask_threshold=0.0", "model.test.overlap_threshold=0.0"]


@pytest.fixture(scope="module")
def val_uri(synthetic_coco, tmp_path_factory) -> str:
    """The 4 synthetic val images as panoptic records in 2 shards."""
    out = str(tmp_path_factory.mktemp("eval_records") / "val")
    convert_coco(str(synthetic_coco), "val", out, task="panoptic", shard_size=2, num_workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def classes(val_uri) -> list[dict]:
    return read_manifest(val_uri)["classes"]


@pytest.fixture(scope="module")
def model_and_cfg(val_uri):
    cfg = load_config("tiny", TINY + [f"data.val={val_uri}"])
    torch.manual_seed(0)
    return build_model(cfg).eval(), cfg


def _ids(records) -> list[int]:
    return [int(r["image_id"]) for r in records]


def test_shards_cover_every_image_once_and_max_images_limits(val_uri):
    everything = _ids(read_records(val_uri))
    assert len(everything) == VAL_IMAGES
    for world in (1, 2, 3):
        parts = [_ids(shard_records(val_uri, r, world)) for r in range(world)]
        assert sorted(sum(parts, [])) == sorted(everything)
    first3 = [_ids(shard_records(val_uri, r, 2, max_images=3)) for r in range(2)]
    assert sorted(sum(first3, [])) == sorted(everything[:3])
    with pytest.raises(ValueError, match="rank"):
        list(shard_records(val_uri, 2, 2))


def test_evaluate_model_reports_every_metric(model_and_cfg, val_uri, classes):
    model, cfg = model_and_cfg
    metrics = evaluate_model(model, val_uri, cfg, classes)
    for key in ("panoptic/PQ", "panoptic/SQ", "panoptic/RQ", "segm/AP", "sem_seg/mIoU"):
        assert key in metrics and 0.0 <= metrics[key] <= 100.0, (key, metrics.get(key))
    assert metrics["num_images"] == VAL_IMAGES
    layer_keys = [f"consistency/layer_{i}_{i + 1}" for i in range(cfg.model.dec_layers)]
    for key in layer_keys + ["consistency/mean"]:
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics.get(key))
    assert metrics["consistency/mean"] == pytest.approx(np.mean([metrics[k] for k in layer_keys]))
    assert not model.training  # left as it was


def test_evaluate_model_max_images_and_rank_split(model_and_cfg, val_uri, classes):
    model, cfg = model_and_cfg
    model.train()
    assert evaluate_model(model, val_uri, cfg, classes, max_images=3)["num_images"] == 3
    assert model.training  # the caller's mode is restored
    model.eval()
    counts = [evaluate_model(model, val_uri, cfg, classes, rank=r, world_size=3)["num_images"] for r in range(3)]
    assert counts == [2, 1, 1]


def test_evaluate_model_progress_lines(model_and_cfg, val_uri, classes, caplog, monkeypatch):
    """Rank 0 logs its progress every PROGRESS_EVERY images and at its last one, with an eta; other
    ranks stay quiet."""
    from mpformer_ray.evaluation import runner

    model, cfg = model_and_cfg
    monkeypatch.setattr(runner, "PROGRESS_EVERY", 1)
    with caplog.at_level("INFO", logger=runner.log.name):
        evaluate_model(model, val_uri, cfg, classes, world_size=2)
        evaluate_model(model, val_uri, cfg, classes, rank=1, world_size=2)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluation: ")]
    assert [line.split(" images")[0] for line in lines] == ["evaluation: 1/2", "evaluation: 2/2"], lines
    assert all(", eta " in line and "2 ranks, 4 images in all" in line for line in lines), lines


def test_evaluate_model_rejects_other_datasets_classes(model_and_cfg, val_uri, classes):
    model, cfg = model_and_cfg
    renamed = [{**c, "name": c["name"] + "_x"} for c in classes]
    with pytest.raises(ValueError, match="differ"):
        evaluate_model(model, val_uri, cfg, renamed)


def _dist_worker(rank: int, world: int, port: int, state_path: str, val_uri: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = load_config("tiny", TINY)
        model = build_model(cfg)
        model.load_state_dict(torch.load(state_path, weights_only=True))
        classes = read_manifest(val_uri)["classes"]
        metrics = evaluate_model(model.eval(), val_uri, cfg, classes, rank=rank, world_size=world)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters importing torch
def test_distributed_evaluation_matches_single_process(model_and_cfg, val_uri, classes, tmp_path):
    import socket

    import torch.multiprocessing as mp

    model, cfg = model_and_cfg
    state_path = str(tmp_path / "state.pt")
    torch.save(model.state_dict(), state_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_dist_worker, args=(2, port, state_path, val_uri, str(tmp_path)), nprocs=2, join=True)
    single = evaluate_model(model, val_uri, cfg, classes)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for key, value in single.items():
        if key == "eval_seconds":
            assert ranks[0][key] == ranks[1][key]
            continue
        for merged in ranks:
            assert (math.isnan(value) and math.isnan(merged[key])) or merged[key] == pytest.approx(value, abs=1e-4), key


def _scene_image(height: int, width: int) -> np.ndarray:
    return generate_scene(np.random.default_rng(1), height, width, empty=False)["image"]


def test_panoptic_id_encoding_round_trips():
    ids = np.array([[0, 1, 255], [256, 70000, 256 ** 3 - 1]])
    assert (decode_panoptic_ids(encode_panoptic_ids(ids)) == ids).all()
    assert image_id_for("s3://b/val/000000397133.jpg", 5) == 397133
    assert image_id_for("photo.png", 5) == 5


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_write_predictions_files(model_and_cfg, classes, tmp_path, fmt):
    _, cfg = model_and_cfg
    cfg = load_config("tiny", TINY + KEEP_ALL)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = _scene_image(48, 80)
    src = tmp_path / f"scene.{fmt.lower()}"
    Image.fromarray(image).save(src, format=fmt)
    from mpformer_ray.predict import load_image

    loaded = load_image(str(src))
    prediction = predict(model, loaded, cfg)
    out = tmp_path / "out"
    written = write_predictions(str(out), str(src), loaded, prediction, classes, image_id=7)
    assert set(written) == {"overlay", "sem_seg", "panoptic_png", "panoptic_json", "instances_json"}

    overlay = Image.open(written["overlay"])
    assert overlay.format == "PNG" and overlay.size == (80, 48) and overlay.mode == "RGB"
    assert not np.array_equal(np.asarray(overlay), loaded)  # something was drawn
    sem = Image.open(written["sem_seg"])
    assert sem.format == "PNG" and sem.mode == "L" and sem.size == (80, 48)
    assert np.asarray(sem).max() < len(classes)

    pan = Image.open(written["panoptic_png"])
    assert pan.mode == "RGB" and pan.size == (80, 48)
    ids = set(np.unique(decode_panoptic_ids(np.asarray(pan))).tolist()) - {0}
    annotation = json.loads(Path(written["panoptic_json"]).read_text())
    info = {s["id"]: s for s in annotation["segments_info"]}
    assert ids and ids == set(info)
    assert annotation["image_id"] == 7 and annotation["file_name"] == "scene_panoptic.png"
    source_ids = {c["source_id"]: c for c in classes}
    for seg in info.values():
        cls = source_ids[seg["category_id"]]
        assert seg["name"] == cls["name"] and seg["isthing"] == cls["isthing"] and 0 <= seg["score"] <= 1
        assert seg["area"] == int((decode_panoptic_ids(np.asarray(pan)) == seg["id"]).sum())

    results = json.loads(Path(written["instances_json"]).read_text())
    assert results, "an untrained model still predicts instance masks"
    gt = COCO()
    gt.dataset = {"images": [{"id": 7, "height": 48, "width": 80}], "annotations": [],
                  "categories": [{"id": c["source_id"], "name": c["name"]} for c in classes]}
    gt.createIndex()
    dt = gt.loadRes(results)
    for ann in dt.anns.values():
        assert ann["image_id"] == 7 and ann["category_id"] in source_ids
        assert gt.annToMask(ann).shape == (48, 80)
        assert ann["area"] > 0


def _checkpoint(run_uri: str, cfg, classes: list[dict]) -> str:
    torch.manual_seed(0)
    model = build_model(cfg)
    return save_checkpoint(Checkpoint(iteration=1, model=model.state_dict(), config=cfg.to_dict(), classes=classes),
                           run_uri)


def _job_main(name: str):
    """``main`` of jobs/NAME.py, for the cheap in-process error-path checks."""
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240, **kwargs)


def test_evaluate_job_on_s3_checkpoint_and_records(synthetic_coco, classes, moto_server, capsys):
    bucket = f"s3://{moto_server['bucket']}"
    val = f"{bucket}/eval/val"
    convert_coco(str(synthetic_coco), "val", val, task="panoptic", shard_size=2, num_workers=1, progress=False)
    cfg = load_config("tiny", TINY + [f"data.val={val}"])
    _checkpoint(f"{bucket}/eval/run", cfg, classes)
    proc = _run(["jobs/evaluate.py", "--checkpoint", f"{bucket}/eval/run", "--max-images", "3",
                 "--set", "model.test.object_mask_threshold=0.5", "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout)  # stdout holds nothing but the JSON
    assert metrics["num_images"] == 3
    assert {"panoptic/PQ", "segm/AP", "sem_seg/mIoU", "consistency/mean"} <= set(metrics)
    assert "evaluation" in proc.stderr  # progress went to stderr

    assert _job_main("evaluate")(["--checkpoint", f"{bucket}/eval/no-such-run"]) == 2
    assert "no checkpoint under" in capsys.readouterr().err


def test_predict_job_writes_outputs(val_uri, classes, tmp_path, capsys):
    cfg = load_config("tiny", TINY + [f"data.val={val_uri}"])
    ckpt = _checkpoint(str(tmp_path / "run"), cfg, classes)
    images = []
    for i, (h, w) in enumerate([(40, 56), (64, 48)]):
        path = tmp_path / f"00000000012{i}.jpg"
        Image.fromarray(_scene_image(h, w)).save(path, quality=90)
        images.append(str(path))
    out = tmp_path / "pred"
    # the images before --set: a --set takes every KEY=VALUE that follows it
    proc = _run(["jobs/predict.py", "--checkpoint", ckpt, "--out", str(out), "--device", "cpu", *images,
                 *KEEP_ALL_ARGS])
    assert proc.returncode == 0, proc.stderr[-3000:]
    listed = proc.stdout.split()
    assert len(listed) == 2 * 5 and all(Path(p).exists() for p in listed)
    for i, (h, w) in enumerate([(40, 56), (64, 48)]):
        stem = f"00000000012{i}"
        assert Image.open(out / f"{stem}_overlay.png").size == (w, h)
        assert json.loads((out / f"{stem}_panoptic.json").read_text())["image_id"] == 120 + i
        assert all(r["image_id"] == 120 + i for r in json.loads((out / f"{stem}_instances.json").read_text()))

    bad = tmp_path / "not_an_image.jpg"
    bad.write_bytes(b"hello")
    assert _job_main("predict")(["--checkpoint", ckpt, "--out", str(out), "--device", "cpu", str(bad)]) == 2
    assert "cannot decode" in capsys.readouterr().err


KEEP_ALL_ARGS = [arg for setting in KEEP_ALL for arg in ("--set", setting)]


def test_predict_job_writes_every_good_image_and_names_each_bad_one(val_uri, classes, tmp_path, capsys):
    """Bad inputs first: the job used to stop at the first one and write nothing (issue 17)."""
    cfg = load_config("tiny", TINY + [f"data.val={val_uri}"])
    ckpt = _checkpoint(str(tmp_path / "run"), cfg, classes)
    garbage, truncated, missing = tmp_path / "garbage.png", tmp_path / "truncated.jpg", tmp_path / "missing.jpg"
    garbage.write_bytes(b"hello")
    Image.fromarray(_scene_image(40, 56)).save(truncated, quality=90)
    truncated.write_bytes(truncated.read_bytes()[:300])
    good = []
    for i in range(2):
        good.append(tmp_path / f"good{i}.png")
        Image.fromarray(_scene_image(40 + 8 * i, 56)).save(good[-1])
    out = tmp_path / "pred"
    argv = ["--checkpoint", ckpt, "--out", str(out), "--device", "cpu",
            *map(str, [garbage, missing, good[0], truncated, good[1]]), *KEEP_ALL_ARGS]
    assert _job_main("predict")(argv) == 2
    captured = capsys.readouterr()
    assert all((out / f"good{i}_overlay.png").exists() for i in range(2))
    assert len(captured.out.split()) == 2 * 5
    lines = captured.err.strip().splitlines()
    assert lines[0] == f"error: {missing} does not exist"  # reported before the model loads
    assert any(line.startswith(f"error: {garbage}: cannot decode as an image") for line in lines)
    assert any(line.startswith(f"error: {truncated}: cannot decode as an image") for line in lines)
    assert lines[-1] == f"error: 3 of 5 images failed, the others were written: {missing}, {garbage}, {truncated}"
    assert "0x" not in captured.err and "<" not in captured.err  # no repr of internal objects
    assert any(line.startswith("[predict] 3/4 images, ") and " eta 0:" in line for line in lines)  # progress
