"""The plain training loop, optimizer / schedule, checkpoints and pre-flight checks (no Ray)."""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from servers import start

from mpformer_ray import storage
from mpformer_ray.amp import resolve_amp
from mpformer_ray.config import ConfigError, load_config, with_classes
from mpformer_ray.data.pipeline import local_stream
from mpformer_ray.evaluation.report import Evaluation
from mpformer_ray.data.synthetic import SYNTHETIC_CLASSES, ensure_synthetic
from mpformer_ray.model import build_model
from mpformer_ray.train import (
    Checkpoint,
    CheckpointStore,
    PreflightError,
    build_optimizer,
    build_scheduler,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    param_groups,
    poly_warmup_factor,
    preflight,
    train_loop,
)

torch.set_num_threads(1)

TINY = [
    "model.dec_layers=1", "model.enc_layers=1", "model.num_queries=8", "model.hidden_dim=32", "model.nheads=2",
    "model.dim_feedforward=64", "model.enc_dim_feedforward=64", "model.mask_dim=32", "model.train_num_points=256",
    "data.crop_size=[64,64]", "data.test_short_side=64", "data.test_max_size=64",
    "data.synthetic.num_train=8", "data.synthetic.num_val=4", "data.synthetic.image_size=64",
    "train.batch_size=2", "train.workers=1", "train.eval_period=0",
]


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("synthetic")
    cfg = load_config("tiny", TINY + [f"data.synthetic.root={root}"])
    train_uri, val_uri = ensure_synthetic(cfg.data.synthetic)
    return {"root": str(root), "train": train_uri, "val": val_uri}


def tiny_cfg(records: dict, tmp_path: Path, *overrides: str):
    return load_config("tiny", TINY + [f"data.synthetic.root={records['root']}", f"data.train={records['train']}",
                                       f"data.val={records['val']}", f"storage.uri={tmp_path / 'runs'}",
                                       "run.name=unit", *overrides])


def run_loop(cfg, records: dict, store: CheckpointStore, reports: list | None = None,
             resume_from: str | None = None) -> dict:
    classes = json.loads(storage.read_bytes(storage.join(records["train"], "manifest.json")))["classes"]
    cfg = with_classes(cfg, classes)  # as the training job's preflight fills them
    torch.manual_seed(0)
    model = build_model(cfg)
    return train_loop(
        model,
        lambda start: local_stream(records["train"], cfg, cfg.train.batch_size, start),
        cfg, (reports if reports is not None else []).append, store, classes=classes, resume_from=resume_from)


def test_poly_schedule_with_warmup():
    assert poly_warmup_factor(0, 100, 0, 0.9) == 1.0
    assert poly_warmup_factor(50, 100, 0, 0.9) == pytest.approx(0.5 ** 0.9)
    assert poly_warmup_factor(100, 100, 0, 0.9) == 0.0
    # linear warmup from 0.001 to 1 over 10 iterations, times the poly decay
    assert poly_warmup_factor(0, 100, 10, 0.9) == pytest.approx(0.001)
    assert poly_warmup_factor(5, 100, 10, 0.9) == pytest.approx((0.001 * 0.5 + 0.5) * 0.95 ** 0.9)
    assert poly_warmup_factor(10, 100, 10, 0.9) == pytest.approx(0.9 ** 0.9)

    cfg = load_config("tiny", ["train.max_iters=20", "train.warmup_iters=4", "train.lr=0.001"]).train
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(1e-6) and seen[4] == pytest.approx(1e-3 * 0.8 ** 0.9)
    assert all(a > b for a, b in zip(seen[4:], seen[5:])) and opt.param_groups[0]["lr"] == 0.0


def test_param_groups_backbone_lr_multiplier(records, tmp_path):
    cfg = tiny_cfg(records, tmp_path, "train.lr=0.001", "train.backbone_lr_mult=0.1", "train.weight_decay=0.05")
    model = build_model(with_classes(cfg, SYNTHETIC_CLASSES))
    groups = {g["name"]: g for g in param_groups(model, cfg.train)}
    backbone = {id(p) for p in model.backbone.parameters() if p.requires_grad}
    assert backbone, "the tiny model's backbone must have trainable parameters"
    for g in groups.values():
        in_backbone = {id(p) in backbone for p in g["params"]}
        assert len(in_backbone) == 1
        assert g["lr"] == pytest.approx(1e-4 if in_backbone.pop() else 1e-3)
    assert groups["head"]["weight_decay"] == 0.05 and groups["head_no_decay"]["weight_decay"] == 0.0
    grouped = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert len(build_optimizer(model, cfg.train).param_groups) == len(groups)


def test_amp_resolution_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) is None and resolve_amp("off", cpu) is None
    assert resolve_amp("bf16", cpu) is torch.bfloat16


def test_loop_trains_checkpoints_and_resumes(records, tmp_path, caplog):
    cfg = tiny_cfg(records, tmp_path, "train.max_iters=4", "train.checkpoint_period=2", "train.log_period=2",
                   "train.keep_checkpoints=5")
    store = CheckpointStore(str(tmp_path / "runs" / "unit"), keep=cfg.train.keep_checkpoints)
    reports: list[dict] = []
    last = run_loop(cfg, records, store, reports)
    assert [r["iteration"] for r in reports] == [2, 4]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in reports)
    assert {"loss_ce", "loss_mask", "loss_dice", "loss_pilot", "lr", "images_per_s", "data_wait", "eta_s"} <= set(last)

    uri = latest_checkpoint(store.run_uri)
    assert uri.endswith("model_0000004.pth")
    ckpt = torch.load(uri, weights_only=True)  # plain torch.load, as a user would
    assert ckpt["iteration"] == 4 and ckpt["starts"] == [0]
    assert ckpt["config"]["train"]["max_iters"] == 4 and ckpt["classes"][0]["name"]
    # the position in the data stream: 4 batches of 2 = the 8 images of epoch 0
    assert ckpt["data"] == {"epoch": 0, "images": 8} == store.pointer()["data"]
    steps = {s["step"].item() for s in ckpt["optimizer"]["state"].values()}
    assert steps == {4.0}

    # a fresh process (new model, new optimizer) continues at the saved iteration with the saved state
    cfg6 = tiny_cfg(records, tmp_path, "train.max_iters=6", "train.checkpoint_period=2", "train.log_period=2",
                    "train.keep_checkpoints=5")
    reports = []
    run_loop(cfg6, records, store, reports, resume_from=uri)
    assert [r["iteration"] for r in reports] == [6]
    resumed = load_checkpoint(latest_checkpoint(store.run_uri))
    assert resumed.iteration == 6 and resumed.starts == [0, 4]
    assert resumed.data == {"epoch": 1, "images": 12}  # went on with epoch 1, not epoch 0 again
    assert {s["step"].item() for s in resumed.optimizer["state"].values()} == {6.0}
    assert resumed.scheduler["last_epoch"] == 6

    # rerunning a finished run trains nothing, returns its final metrics and says how to go on
    reports = []
    with caplog.at_level("INFO", logger="mpformer_ray.train.loop"):
        assert run_loop(cfg6, records, store, reports, resume_from=store.latest()) == resumed.metrics
    assert reports == [] and latest_checkpoint(store.run_uri).endswith("model_0000006.pth")
    assert "raise train.max_iters" in caplog.text and store.run_uri in caplog.text

    model, loaded_cfg, classes = load_model(store.run_uri)
    assert not model.training and loaded_cfg.train.max_iters == 6 and classes == ckpt["classes"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, resumed.model[k]), k

    # the curves for TensorBoard: one event file per attempt, the training windows of both
    curves = read_scalars(store.run_uri)
    assert len(storage.listdir(storage.join(store.run_uri, "tensorboard"))) == 2
    assert sorted(curves["train/loss"]) == [2, 4, 6]
    assert curves["train/loss"][6] == pytest.approx(resumed.metrics["loss"])
    assert {"train/lr", "train/images_per_s", "train/data_wait", "train/loss_pilot"} <= curves.keys()
    assert not {"train/iteration", "train/eta_s"} & curves.keys()


def read_scalars(run_uri: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from the run's TensorBoard event files (TFRecord framing: length, its CRC,
    the Event proto, its CRC)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, dict[int, float]] = {}
    directory = storage.join(run_uri, "tensorboard")
    for name in storage.listdir(directory):
        data, pos = storage.read_bytes(storage.join(directory, name)), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_evaluations_reach_tensorboard_and_a_failed_run_keeps_its_curves(records, tmp_path):
    cfg = tiny_cfg(records, tmp_path, "train.max_iters=4", "train.eval_period=2", "train.log_period=2",
                   "train.checkpoint_period=100")
    store = CheckpointStore(str(tmp_path / "runs" / "curves"))
    classes = json.loads(storage.read_bytes(storage.join(records["train"], "manifest.json")))["classes"]
    cfg = with_classes(cfg, classes)
    calls = []

    def evaluate(model):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("evaluation failed")  # training stops: the curves so far are still saved
        return Evaluation({"sem_seg/mIoU": 12.5, "segm/AP": float("nan"), "num_images": 4})

    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        train_loop(build_model(cfg), lambda start: local_stream(records["train"], cfg, cfg.train.batch_size, start),
                   cfg, lambda m: None, store, classes=classes, evaluate=evaluate)
    curves = read_scalars(store.run_uri)
    assert curves["sem_seg/mIoU"] == {2: 12.5}  # NaN (an empty AP bucket) and counters are no curves
    assert "segm/AP" not in curves and "num_images" not in curves
    assert sorted(curves["train/loss"]) == [2, 4]


def _state(iteration: int) -> Checkpoint:
    return Checkpoint(iteration=iteration, model={"w": torch.full((2,), float(iteration))},
                      best={"metric": "panoptic/PQ", "value": float(iteration), "iteration": iteration})


def test_retention_keeps_last_k_plus_best(tmp_path):
    store = CheckpointStore(str(tmp_path / "run"), keep=2)
    for it, best in [(10, False), (20, True), (30, False), (40, False), (50, False)]:
        store.save(_state(it), is_best=best)
    names = [n for n in storage.listdir(store.dir) if n.endswith(".pth")]
    assert names == ["model_0000020.pth", "model_0000040.pth", "model_0000050.pth"]
    pointer = store.pointer()
    assert pointer["latest"] == "model_0000050.pth" and pointer["best"]["checkpoint"] == "model_0000020.pth"
    store.save(_state(60), is_best=True)
    names = [n for n in storage.listdir(store.dir) if n.endswith(".pth")]
    assert names == ["model_0000050.pth", "model_0000060.pth"]


def test_failed_write_leaves_previous_latest(tmp_path):
    store = CheckpointStore(str(tmp_path / "run"), keep=2, attempts=2, retry_wait_s=0.01)
    store.save(_state(2))
    # a directory squatting on the next checkpoint's name makes the real rename fail
    (Path(store.dir) / "model_0000004.pth").mkdir()
    with pytest.raises(storage.StorageError, match=r"model_0000004\.pth.*after 2 attempts"):
        store.save(_state(4))
    assert latest_checkpoint(store.run_uri).endswith("model_0000002.pth")
    assert load_checkpoint(latest_checkpoint(store.run_uri)).iteration == 2


def test_s3_outage_during_checkpoint_upload_fails_loudly(tmp_path, monkeypatch):
    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    proc = start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.setenv(key, "testing")
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                assert time.time() < deadline, "moto server did not start"
                time.sleep(0.2)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="ckpt")
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        store = CheckpointStore("s3://ckpt/runs/outage", keep=2, attempts=2, retry_wait_s=0.01)
        store.save(_state(2))
        assert store.latest() == "s3://ckpt/runs/outage/checkpoints/model_0000002.pth"
        proc.terminate()
        proc.wait(timeout=10)
        with pytest.raises(storage.StorageError, match=r"s3://ckpt/runs/outage/checkpoints/model_0000004\.pth"):
            store.save(_state(4))
    finally:
        proc.kill()


def test_preflight_fills_thing_classes_and_names_bad_fields(records, tmp_path, monkeypatch, caplog):
    plan = preflight(tiny_cfg(records, tmp_path, "model.thing_classes=null"))
    things = [c["id"] for c in plan.classes if c["isthing"]]
    assert plan.cfg.model.thing_classes == things and things
    assert plan.run_uri == str(tmp_path / "runs" / "unit") and plan.tasks == ["panoptic", "instance", "semantic"]

    # relative local paths mean the driver's working directory, whatever directory Ray gives its workers
    monkeypatch.chdir(tmp_path)
    relative = [f"data.{split}={os.path.relpath(records[split], tmp_path)}" for split in ("train", "val")]
    plan = preflight(tiny_cfg(records, tmp_path, "storage.uri=rel-runs", *relative))
    assert plan.run_uri == str(tmp_path / "rel-runs" / "unit")
    assert (plan.cfg.data.train, plan.cfg.data.val) == (records["train"], records["val"])
    # under `ray job submit --working-dir`, the default ./runs would land in Ray's temporary copy
    job_dir = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0"
    job_dir.mkdir(parents=True)
    monkeypatch.chdir(job_dir)
    with caplog.at_level("WARNING", logger="mpformer_ray.train.trainer"):
        preflight(tiny_cfg(records, tmp_path, "storage.uri=./runs"))
    assert f"storage.uri={job_dir / 'runs'} lies inside this Ray job's copy" in caplog.text

    with pytest.raises(PreflightError, match=r"model\.num_classes=7.*num_classes=6"):
        preflight(tiny_cfg(records, tmp_path, "model.num_classes=7"))
    missing = str(tmp_path / "nowhere")
    with pytest.raises(PreflightError, match=rf"data\.train='{missing}'.*prepare_data"):
        preflight(tiny_cfg(records, tmp_path, f"data.train={missing}"))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(PreflightError, match=rf"storage\.uri='{blocker}'.*writable"):
        preflight(tiny_cfg(records, tmp_path, f"storage.uri={blocker}"))
    # a rule about the config's own values: refused where the config is built, before any preflight
    with pytest.raises(ConfigError, match=r"train\.checkpoint_period must be >= 1"):
        tiny_cfg(records, tmp_path, "train.checkpoint_period=0")
