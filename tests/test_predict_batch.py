"""Batch prediction with Ray Data (mpformer_ray.predict_batch, jobs/predict.py --input): a folder, an s3://
prefix on the moto server and prepared records through 2 CPU replicas on a local Ray; corrupt images recorded
and the rest written; a rerun predicts nothing; outputs equal the single-image path's."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mpformer_ray import storage
from mpformer_ray.config import load_config
from mpformer_ray.data.synthetic import generate_scene
from mpformer_ray.model import build_model
from mpformer_ray.predict import (image_id_for, load_for_inference, load_image, predict, predict_resized,
                                  write_predictions)
from mpformer_ray.predict_batch import (DONE_SUFFIX, FAILED_SUFFIX, FAILURES, MERGED_INSTANCES, InputError, ModelSpec,
                                        Settings, list_inputs, run_batch)
from mpformer_ray.train.checkpoint import Checkpoint, save_checkpoint

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
CLASSES = [{"id": i, "name": f"class{i}", "isthing": i < 4, "source_id": i + 1} for i in range(6)]
# a small model; every query kept, so an untrained model still writes panoptic segments and instances
TINY = [
    "model.dec_layers=2", "model.enc_layers=1", "model.num_queries=8", "model.hidden_dim=32", "model.nheads=2",
    "model.dim_feedforward=64", "model.enc_dim_feedforward=64", "model.mask_dim=32", "model.train_num_points=256",
    "data.test_short_side=64", "data.test_max_size=64", "model.num_classes=6", "model.thing_classes=[0,1,2,3]",
    "model.test.object_mask_threshold=0.0", "model.test.overlap_threshold=0.0",
]
OUTPUTS = ("overlay.png", "sem_seg.png", "panoptic.png", "panoptic.json", "instances.json")
# 2 replicas of half a CPU each on 2 cores: the load tasks (a quarter CPU) still get one
SETTINGS = Settings(replicas=2, batch_size=2, cpus_per_replica=0.5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    cfg = load_config("tiny", TINY)
    torch.manual_seed(0)
    return save_checkpoint(Checkpoint(iteration=1, model=build_model(cfg).state_dict(), config=cfg.to_dict(),
                                      classes=CLASSES), str(tmp_path_factory.mktemp("run")))


def _scene(seed: int, height: int, width: int) -> np.ndarray:
    return generate_scene(np.random.default_rng(seed), height, width, empty=False)["image"]


def _encode(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


# relative path -> (height, width): every size differs, so no two images share a forward pass and each
# output must equal the single-image path's bit for bit
TREE = {"000000000042.jpg": (48, 64), "a/street.png": (64, 40), "a/b/c/deep.jpg": (56, 72), "a/b/x.png": (40, 40)}
CORRUPT = "a/b/corrupt.jpg"


def _write_tree(put) -> None:
    for i, (rel, (h, w)) in enumerate(TREE.items()):
        put(rel, _encode(_scene(i, h, w), "PNG" if rel.endswith(".png") else "JPEG"))
    put(CORRUPT, _encode(_scene(9, 32, 32), "JPEG")[:200])  # a truncated JPEG


def test_list_inputs_folder_text_list_and_duplicate_names(tmp_path):
    root = tmp_path / "in"
    for rel in ["b/two.jpg", "a/one.png", "a/one.jpg", "000000000007.jpg", "notes.txt"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    found = list_inputs(str(root))
    assert [i.key for i in found.items] == ["000000000007", "a/one", "b/two"]  # sorted, images only, any depth
    assert [i.image_id for i in found.items] == [7, 2, 4]  # digits of the name, else the position
    assert [r["source"] for r in found.rejected] == [str(root / "a/one.png")]  # a/one.jpg came first
    listing = tmp_path / "list.txt"
    listing.write_text(f"# images\n{root / 'b/two.jpg'}\n\n{root / 'a/one.jpg'}\n")
    assert [(i.key, i.source) for i in list_inputs(str(listing)).items] == [
        ("b/two", str(root / "b/two.jpg")), ("a/one", str(root / "a/one.jpg"))]
    with pytest.raises(InputError, match="does not exist"):
        list_inputs(str(tmp_path / "nowhere"))


def test_a_batch_matches_one_image_at_a_time_but_for_rounding(checkpoint):
    model, cfg, _ = load_for_inference(checkpoint)
    resized = [_scene(seed, 64, 64) for seed in (1, 2)]
    together = predict_resized(model, resized, [(64, 64), (64, 64)])
    for image, batched in zip(resized, together):
        alone = predict(model, image, cfg)
        assert (alone["sem_seg_labels"] == batched["sem_seg_labels"]).float().mean() >= 0.999
        assert torch.allclose(alone["instances"]["scores"], batched["instances"]["scores"], atol=1e-4)


@pytest.fixture(scope="module")
def local_ray(moto_server):
    """One local Ray for the module, started as the jobs start it; after the moto server, so that its
    workers inherit the S3 endpoint and credentials."""
    import ray

    from mpformer_ray.train.trainer import init_ray

    assert init_ray()
    yield
    ray.shutdown()


def _single_image_outputs(loaded: tuple, source: str, out: str, image_id: int) -> dict[str, bytes]:
    model, cfg, classes = loaded
    image = load_image(source)
    written = write_predictions(out, source, image, predict(model, image, cfg), classes, image_id)
    return {Path(uri).name: Path(uri).read_bytes() for uri in written.values()}


@pytest.mark.slow
def test_folder_two_replicas_then_a_rerun_predicts_nothing(local_ray, checkpoint, tmp_path):
    root, out = tmp_path / "in", tmp_path / "out"

    def put(rel: str, data: bytes) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)

    _write_tree(put)
    log = io.StringIO()
    summary = run_batch(str(root), str(out), ModelSpec(checkpoint=checkpoint), SETTINGS, log=log)
    assert (summary.total, summary.predicted, summary.skipped) == (5, 5, 0)
    # one replica may take every batch when reading is the slower stage; each reports its peak memory
    assert 1 <= len(summary.peak_rss) <= 2 and all(0 < v < 4 * 2**30 for v in summary.peak_rss.values())
    lines = log.getvalue().splitlines()
    assert "[predict] up to 2 replica(s) of 0.5 CPU and 0 GPU, batches of 2" in lines
    assert any(line.startswith("[predict] 5/5 images (1 failed), ") and "images/s, eta " in line for line in lines)
    assert any(line.startswith(f"error: {root / CORRUPT}: cannot decode as an image") for line in lines)

    failures = json.loads((out / FAILURES).read_text())
    assert [(f["source"], f["key"]) for f in failures] == [(str(root / CORRUPT), "a/b/corrupt")]
    assert "cannot decode" in failures[0]["reason"] and (out / ("a/b/corrupt" + FAILED_SUFFIX)).exists()
    merged = json.loads((out / MERGED_INSTANCES).read_text())
    per_image = []
    position = {rel: i for i, rel in enumerate(sorted([*TREE, CORRUPT]), start=1)}  # the input's order
    loaded = load_for_inference(checkpoint)
    for rel in sorted(TREE):
        stem = rel.rsplit(".", 1)[0]
        assert (out / (stem + DONE_SUFFIX)).exists()
        single = _single_image_outputs(loaded, str(root / rel), str(tmp_path / "single"),
                                       image_id_for(rel, position[rel]))
        assert sorted(single) == sorted(f"{Path(stem).name}_{suffix}" for suffix in OUTPUTS)
        for name, data in single.items():  # the same bytes as the one-image-at-a-time path
            assert (out / Path(stem).parent / name).read_bytes() == data, name
        per_image += json.loads(single[f"{Path(stem).name}_instances.json"])
    assert merged == per_image and merged  # every image's instances, in input order

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*_overlay.png")}
    log = io.StringIO()
    again = run_batch(str(root), str(out), ModelSpec(checkpoint=checkpoint), SETTINGS, log=log)
    assert (again.predicted, again.skipped, len(again.failures)) == (0, 4, 1)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*_overlay.png")} == stamps
    assert "4 already done, 1 failed before" in log.getvalue()


def _job_main(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.slow
def test_s3_prefix_through_the_job_with_nested_keys_and_a_corrupt_image(local_ray, moto_server, checkpoint, capsys):
    prefix = f"s3://{moto_server['bucket']}/batch"
    _write_tree(lambda rel, data: storage.write_bytes(f"{prefix}/in/{rel}", data))
    argv = ["--checkpoint", checkpoint, "--input", f"{prefix}/in/", "--out", f"{prefix}/out", "--replicas", "2",
            "--cpus-per-replica", "0.5", "--batch-size", "2"]
    assert _job_main("predict")(argv) == 2  # the corrupt image failed, the others were written
    err = capsys.readouterr().err
    assert f"error: 1 of 5 images failed, the others were written; see {prefix}/out/failures.json" in err
    for rel in TREE:
        stem = rel.rsplit(".", 1)[0]
        assert all(storage.exists(f"{prefix}/out/{stem}_{suffix}") for suffix in OUTPUTS), rel
        assert storage.exists(f"{prefix}/out/{stem}{DONE_SUFFIX}")
    failures = json.loads(storage.read_bytes(f"{prefix}/out/{FAILURES}"))
    assert [f["source"] for f in failures] == [f"{prefix}/in/{CORRUPT}"]
    merged = json.loads(storage.read_bytes(f"{prefix}/out/{MERGED_INSTANCES}"))
    assert {r["image_id"] for r in merged} == {42, 2, 4, 5}  # the digits of the name, else the position

    assert _job_main("predict")(argv) == 2
    err = capsys.readouterr().err
    assert "0 predicted, 4 already done, 1 failed" in err and "to predict" in err


@pytest.mark.slow
def test_prepared_records(local_ray, synthetic_coco, checkpoint, tmp_path):
    from mpformer_ray.data.coco import convert_coco

    records = str(tmp_path / "records")
    convert_coco(str(synthetic_coco), "val", records, task="panoptic", shard_size=2, num_workers=1, progress=False)
    out = tmp_path / "out"
    summary = run_batch(records, str(out), ModelSpec(checkpoint=checkpoint),
                        Settings(replicas=1, batch_size=4, cpus_per_replica=0.5), log=io.StringIO())
    assert (summary.predicted, summary.failures) == (4, [])
    done = sorted(p.relative_to(out).as_posix() for p in out.rglob("*" + DONE_SUFFIX))
    assert sorted(json.loads((out / d).read_text())["image_id"] for d in done) == [1, 2, 3, 4]  # the records' ids


def test_replicas_that_leave_no_cpu_for_reading_are_refused():
    from mpformer_ray.predict_batch import PredictError, _check_cpus

    _check_cpus(SETTINGS, images=10, cpus=2.0)  # 2 x 0.5 + a quarter for reading
    with pytest.raises(PredictError, match="--cpus-per-replica"):
        _check_cpus(Settings(replicas=2, cpus_per_replica=1.0), images=10, cpus=2.0)
    _check_cpus(Settings(replicas=2, cpus_per_replica=1.0), images=3, cpus=2.0)  # one batch: one replica
