"""Resuming safely from what is really in a run directory: a lost or damaged latest.json, damaged
checkpoints, checkpoints that do not fit the config, NaN metrics, what a failed preflight leaves
behind, a pointer read torn by a concurrent save on S3. Real checkpoints written by the training loop,
real files. (Ctrl-C and damage during a real jobs/train.py run: tests/test_train_e2e.py.)"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from mpformer_ray import storage
from mpformer_ray.train import Checkpoint, CheckpointStore, PreflightError, load_checkpoint, preflight
from mpformer_ray.train.checkpoint import CheckpointError
from test_eval_predict import _job_main
from test_train_loop import records, run_loop, tiny_cfg  # noqa: F401 (records: a fixture)

RUN_SETTINGS = ["train.max_iters=4", "train.checkpoint_period=2", "train.log_period=2", "train.keep_checkpoints=5"]


@pytest.fixture(scope="module")
def trained(records, tmp_path_factory) -> Path:
    """A run directory the real loop wrote: checkpoints at iterations 2 and 4 plus latest.json."""
    root = tmp_path_factory.mktemp("trained")
    cfg = tiny_cfg(records, root, *RUN_SETTINGS)
    run_loop(cfg, records, CheckpointStore(str(root / "runs" / "unit"), keep=5))
    return root / "runs" / "unit"


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A copy of ``trained`` at ``tmp_path/runs/unit``, where ``tiny_cfg(records, tmp_path)`` points."""
    shutil.copytree(trained, tmp_path / "runs" / "unit")
    return tmp_path / "runs" / "unit"


def ckpt_path(run: Path, iteration: int) -> Path:
    return run / "checkpoints" / f"model_{iteration:07d}.pth"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_lost_pointer_resumes_from_newest_checkpoint(records, run, tmp_path, caplog):
    (run / "checkpoints" / "latest.json").unlink()
    with caplog.at_level("WARNING", logger="mpformer_ray.train.checkpoint"):
        plan = preflight(tiny_cfg(records, tmp_path, *RUN_SETTINGS[1:], "train.max_iters=6"))
    assert plan.resume_from == str(ckpt_path(run, 4))
    assert "no latest.json" in caplog.text and str(ckpt_path(run, 4)) in caplog.text

    # the workers start where the driver decided: nothing of the earlier run is overwritten
    run_loop(plan.cfg, records, CheckpointStore(plan.run_uri, keep=5), resume_from=plan.resume_from)
    resumed = load_checkpoint(str(ckpt_path(run, 6)))
    assert resumed.starts == [0, 4]
    assert load_checkpoint(str(ckpt_path(run, 2))).starts == [0]


def test_damaged_latest_checkpoint_falls_back_to_older_intact_one(records, run, tmp_path, caplog):
    truncate(ckpt_path(run, 4))
    with caplog.at_level("WARNING", logger="mpformer_ray.train.checkpoint"):
        plan = preflight(tiny_cfg(records, tmp_path, *RUN_SETTINGS))
    assert plan.resume_from == str(ckpt_path(run, 2))
    assert str(ckpt_path(run, 4)) in caplog.text and str(ckpt_path(run, 2)) in caplog.text


@pytest.mark.parametrize("damage", ["truncated", "names a missing file"])
def test_damaged_pointer_falls_back_to_newest_intact_checkpoint(records, run, tmp_path, caplog, damage):
    pointer = run / "checkpoints" / "latest.json"
    if damage == "truncated":
        pointer.write_text(pointer.read_text()[:20])
        named = pointer
    else:
        pointer.write_text(json.dumps({**json.loads(pointer.read_text()), "latest": "model_0000008.pth"}))
        named = ckpt_path(run, 8)
    with caplog.at_level("WARNING", logger="mpformer_ray.train.checkpoint"):
        plan = preflight(tiny_cfg(records, tmp_path, *RUN_SETTINGS))
    assert plan.resume_from == str(ckpt_path(run, 4))
    assert str(named) in caplog.text and str(ckpt_path(run, 4)) in caplog.text


def test_no_readable_checkpoint_is_a_preflight_error_naming_the_directory(records, run, tmp_path):
    for iteration in (2, 4):
        truncate(ckpt_path(run, iteration))
    with pytest.raises(PreflightError, match=rf"{run / 'checkpoints'}.*run\.name"):
        preflight(tiny_cfg(records, tmp_path, *RUN_SETTINGS))


@pytest.mark.parametrize("override", ["model.hidden_dim=64", "model.num_queries=16"])
def test_checkpoint_that_does_not_fit_the_config_is_a_preflight_error(records, run, tmp_path, override):
    field, value = override.split("=")
    saved = load_checkpoint(str(ckpt_path(run, 4))).config["model"][field.split(".")[1]]
    with pytest.raises(PreflightError) as error:
        preflight(tiny_cfg(records, tmp_path, *RUN_SETTINGS, override))
    message = str(error.value)
    assert str(ckpt_path(run, 4)) in message and f"{field}: checkpoint {saved}, config {value}" in message
    assert "run.name" in message


def test_restarted_workers_resume_from_their_own_job_not_the_drivers_first_choice(tmp_path):
    state = Checkpoint(iteration=2, model={})
    CheckpointStore(str(tmp_path / "run"), job="earlier").save(state)
    assert CheckpointStore(str(tmp_path / "run"), job="now").job_latest() is None
    saved = CheckpointStore(str(tmp_path / "run"), job="now").save(Checkpoint(iteration=4, model={}))
    assert CheckpointStore(str(tmp_path / "run"), job="now").job_latest() == saved


def test_pointer_is_valid_json_with_nan_metrics_and_old_nan_pointers_still_read(tmp_path):
    store = CheckpointStore(str(tmp_path / "run"))
    store.save(Checkpoint(iteration=2, model={}, metrics={"segm/APs": float("nan"), "segm/AP": 0.5}))

    def strict(word: str):
        raise ValueError(f"{word} is not JSON")

    text = (tmp_path / "run" / "checkpoints" / "latest.json").read_text()
    assert json.loads(text, parse_constant=strict)["metrics"] == {"segm/APs": None, "segm/AP": 0.5}

    # a pointer written before this fix holds a bare NaN
    (tmp_path / "run" / "checkpoints" / "latest.json").write_text(text.replace("null", "NaN"))
    assert store.latest() == str(tmp_path / "run" / "checkpoints" / "model_0000002.pth")


def test_resumed_run_without_pointer_keeps_its_best_checkpoint(tmp_path):
    store = CheckpointStore(str(tmp_path / "run"), keep=1)
    for iteration in (10, 20):
        best = {"metric": "panoptic/PQ", "value": 1.0, "iteration": 10}
        store.save(Checkpoint(iteration=iteration, model={}, best=best), is_best=iteration == 10)
    (tmp_path / "run" / "checkpoints" / "latest.json").unlink()
    store.save(Checkpoint(iteration=30, model={}, best=best))
    assert [n for n in storage.listdir(store.dir) if n.endswith(".pth")] == ["model_0000010.pth", "model_0000030.pth"]
    assert store.pointer()["best"]["checkpoint"] == "model_0000010.pth"


def test_failed_preflight_leaves_no_run_directory(records, tmp_path):
    with pytest.raises(PreflightError, match="data.train"):
        preflight(tiny_cfg(records, tmp_path, f"data.train={tmp_path / 'nowhere'}"))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("job", ["evaluate", "predict"])
def test_inference_jobs_name_the_damaged_or_unfitting_checkpoint(job, run, tmp_path, capsys):
    # an image that exists: predict names a missing one before it loads the checkpoint
    image = tmp_path / "image.png"
    Image.new("RGB", (8, 8)).save(image)

    def fails(checkpoint: Path, *extra: str) -> str:
        argv = ["--checkpoint", str(checkpoint), "--device", "cpu", *extra]
        if job == "predict":
            argv += ["--out", str(tmp_path / "pred"), str(image)]
        assert _job_main(job)(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        return err

    assert "model.hidden_dim: checkpoint 32, config 64" in fails(run, "--set", "model.hidden_dim=64")
    truncate(ckpt_path(run, 4))
    assert str(ckpt_path(run, 4)) in fails(run)
    pointer = run / "checkpoints" / "latest.json"
    pointer.write_text(json.dumps({**json.loads(pointer.read_text()), "latest": "model_0000008.pth"}))
    assert str(ckpt_path(run, 8)) in fails(run)
    pointer.write_text("{")
    assert str(pointer) in fails(run)


def test_load_checkpoint_names_a_damaged_file(run):
    truncate(ckpt_path(run, 2))
    with pytest.raises(CheckpointError, match=rf"{ckpt_path(run, 2)}.*truncated or damaged"):
        load_checkpoint(str(ckpt_path(run, 2)))
    torch.save([1, 2], ckpt_path(run, 4))
    with pytest.raises(CheckpointError, match=rf"{ckpt_path(run, 4)}.*not a training checkpoint"):
        load_checkpoint(str(ckpt_path(run, 4)))


def test_a_pointer_read_torn_by_a_concurrent_save_is_read_again(moto_server):
    store = CheckpointStore(f"s3://{moto_server['bucket']}/torn-pointer")
    uri = storage.join(store.dir, "latest.json")
    old = json.dumps({"latest": "model_0000002.pth", "iteration": 2}).encode()
    new = json.dumps({"latest": "model_0000004.pth", "iteration": 4, "metrics": {"panoptic/PQ": 1.0}}).encode()
    # the tear: storage.read_bytes takes the size (pyarrow's HEAD, at open) and then the bytes; a save
    # in between gives the new version cut to the old length
    storage.write_bytes(uri, old)
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        storage.write_bytes(uri, new)
        torn = f.read(f.size())
    assert torn == new[:len(old)]
    # a torn copy that the next save replaces while pointer() waits to read again
    storage.write_bytes(uri, torn)
    save = threading.Timer(0.2, storage.write_bytes, (uri, new))
    save.start()
    try:
        assert store.pointer() == json.loads(new)
    finally:
        save.join()
    # one that stays damaged is reported after the store's attempts
    storage.write_bytes(uri, torn)
    with pytest.raises(CheckpointError, match="latest.json is damaged"):
        store.pointer()


def test_checkpoint_format_is_versioned(tmp_path):
    store = CheckpointStore(str(tmp_path / "run"))
    uri = store.save(Checkpoint(iteration=3, model={"w": torch.ones(2)}, starts=[0]))
    raw = torch.load(uri, weights_only=True)
    assert raw["format"] == 1 and raw["iteration"] == 3 and raw["starts"] == [0]
    # written before the format had a version: the same keys, read as they are
    old = tmp_path / "old.pth"
    torch.save({k: v for k, v in raw.items() if k not in ("format", "converted_from")}, old)
    assert load_checkpoint(str(old)).starts == [0]
    newer = tmp_path / "newer.pth"
    torch.save({**raw, "format": 2}, newer)
    with pytest.raises(CheckpointError, match=rf"{newer} has checkpoint format 2.*upgrade"):
        load_checkpoint(str(newer))
