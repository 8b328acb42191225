"""jobs/train.py end to end on a real local Ray (2 workers at 0.5 CPU) with data and checkpoints
on the moto S3 server: checkpoints land in S3; a killed driver, Ctrl-C, lost and damaged checkpoints
and a killed worker each lose nothing; relative local paths mean the launch directory."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_MODEL, upload_records
from servers import start

from mpformer_ray import storage
from mpformer_ray.config import load_config
from mpformer_ray.data.synthetic import ensure_synthetic
from mpformer_ray.train import latest_checkpoint, load_checkpoint
from mpformer_ray.train.checkpoint import CheckpointStore
from mpformer_ray.train.failure import FAULT_ENV
from mpformer_ray.train.loop import fault_marker

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
TINY = TINY_MODEL + [
    "train.batch_size=2", "train.workers=2", "train.cpus_per_worker=0.5", "train.log_period=5",
    "train.checkpoint_period=10", "train.eval_period=0", "train.keep_checkpoints=2",
]


@pytest.fixture(scope="module")
def local_data(tmp_path_factory) -> dict:
    """The synthetic dataset (16 train / 4 val images at 64 px) on local disk: {"train": dir, "val": dir}."""
    root = tmp_path_factory.mktemp("synthetic")
    cfg = load_config("tiny", [f"data.synthetic.root={root}", "data.synthetic.num_train=16",
                               "data.synthetic.num_val=4", "data.synthetic.image_size=64"])
    return dict(zip(("train", "val"), ensure_synthetic(cfg.data.synthetic)))


@pytest.fixture(scope="module")
def s3_data(moto_server, local_data) -> dict:
    """local_data copied into the moto bucket."""
    uris = {split: upload_records(local, f"s3://{moto_server['bucket']}/data/{split}")
            for split, local in local_data.items()}
    return {**uris, "storage": f"s3://{moto_server['bucket']}/runs"}


def train_argv(*sets: str) -> list[str]:
    """jobs/train.py with the TINY model and the given ``key=value`` overrides."""
    return [sys.executable, str(REPO / "jobs" / "train.py")] + [a for s in TINY + list(sets) for a in ("--set", s)]


def train_command(s3_data: dict, run_name: str, *overrides: str) -> list[str]:
    return train_argv(f"data.train={s3_data['train']}", f"data.val={s3_data['val']}",
                      f"storage.uri={s3_data['storage']}", f"run.name={run_name}", *overrides)


def run_job(cmd: list[str], timeout: float, cwd: Path = REPO, **env_vars: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": "", **env_vars}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and everything it started (its local Ray runs in the driver's session)."""
    with contextlib.suppress(ProcessLookupError):  # the driver's process group is gone once it has exited
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    for _ in range(2):  # Ray workers have their own process groups but share the session
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == proc.pid:  # field 6 of /proc/PID/stat: session id
                try:
                    os.kill(int(stat.parent.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(1)


def wait_for_checkpoint(proc: subprocess.Popen, store: CheckpointStore, iteration: int) -> int:
    """Block until ``store``'s pointer reaches ``iteration``; returns the pointer's iteration."""
    deadline = time.time() + 300
    while (at := (store.pointer() or {}).get("iteration", -1)) < iteration:
        assert proc.poll() is None, f"training ended before the checkpoint at iteration {iteration}"
        assert time.time() < deadline, f"no checkpoint at iteration {iteration} within 300 s"
        time.sleep(0.5)
    return at


def test_killed_interrupted_and_failing_run_loses_nothing(s3_data, tmp_path):
    """One run on S3 through everything that stops training, each attempt resuming the last:
    the driver is SIGKILLed; the rerun is stopped with Ctrl-C (SIGINT to the job's process group,
    as a terminal sends it), which says where the latest checkpoint is and exits 130; latest.json
    and the newest checkpoint are then lost, and the same command resumes from the newest intact
    one, where a worker dies and Ray Train restarts every worker from the job's latest checkpoint.
    Finally the evaluation job reproduces the run's final (2-rank) evaluation."""
    run = f"{s3_data['storage']}/survivor"
    store = CheckpointStore(run)
    cmd = train_command(s3_data, "survivor", "train.max_iters=40", "train.checkpoint_period=5",
                        "train.max_failures=2")
    # the worker's death at iteration 33 (the harness's fault injection, passed on to Ray's workers)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": "", FAULT_ENV: "33"}

    proc = start(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        killed_at = wait_for_checkpoint(proc, store, 5)
    finally:
        kill_session(proc)
    assert store.pointer()["iteration"] == killed_at < 20

    with open(tmp_path / "ctrl_c.log", "w+") as log:
        proc = start(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_checkpoint(proc, store, killed_at + 10)
            os.killpg(proc.pid, signal.SIGINT)
            assert proc.wait(timeout=120) == 130
        finally:
            kill_session(proc)
        log.seek(0)
        out = log.read()
    latest = store.latest()
    assert f"interrupted; latest checkpoint: {latest}; rerun the same command to resume" in out, out[-3000:]
    assert load_checkpoint(latest).starts == [0, killed_at]

    names = [n for n in storage.listdir(store.dir) if n.endswith(".pth")]
    newest, intact = (storage.join(store.dir, n) for n in names[::-1][:2])
    intact_at = load_checkpoint(intact).iteration
    assert intact_at < 33, "the Ctrl-C came too late for the fault to fire after it"
    storage.delete(storage.join(store.dir, "latest.json"))
    storage.write_bytes(newest, storage.read_bytes(newest)[:1000])
    out = run_job(cmd, timeout=480, **{FAULT_ENV: "33"})
    assert newest in out and intact in out  # the damaged file is named, and where it went instead
    assert storage.exists(fault_marker(run, 33)), "the injected fault never fired"
    ckpt = load_checkpoint(latest_checkpoint(run))
    # every attempt began at the checkpoint the previous one left: the restarted workers at 30
    assert ckpt.iteration == 40 and ckpt.starts == [0, killed_at, intact_at, 30]
    # and each read the data stream on from where its checkpoint left it (2 workers x batch 2 per iteration)
    assert ckpt.data["images"] == 40 * 4
    for at in (intact_at, 30):
        assert f"the stream of {s3_data['train']} from image {at * 4}" in out, out[-5000:]
    names = [n for n in storage.listdir(store.dir) if n.endswith(".pth")]
    assert names == ["model_0000035.pth", "model_0000040.pth"]
    # metrics reached the driver through ray.train.report
    table = out[out.index("final metrics"):]
    assert "loss" in table and "iteration" in table and run in out
    # the preset sets no classes: the run took the data's, and its evaluation's per-class table names them
    assert ckpt.config["model"]["num_classes"] == 6 and [c["name"] for c in ckpt.classes][:2] == ["square", "disk"]
    evaluation = f"{run}/evaluations/iteration_0000040"
    per_class = storage.read_bytes(f"{evaluation}/per_class.csv").decode().splitlines()
    assert per_class[0].startswith("class_id,name,type,PQ,SQ,RQ,AP,IoU,Acc") and per_class[1].startswith("0,square,thing,")
    assert json.loads(storage.read_bytes(f"{evaluation}/metrics.json"))["num_images"] == 4

    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "evaluate.py"), "--checkpoint", run, "--device", "cpu"],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.loads(proc.stdout)
    final = ckpt.metrics
    assert evaluated["num_images"] == 4
    for key in ["panoptic/PQ", "segm/AP", "sem_seg/mIoU", "consistency/mean", "num_images"]:
        want, got = final[key], evaluated[key]
        assert (got is None and math.isnan(want)) or math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-4), key


def test_non_finite_loss_fails_the_run_at_once(local_data, tmp_path):
    """A resume replays the same batches from the same checkpoint, so a non-finite loss is not
    retried train.max_failures times: the job ends at the first failure, exit status 1, with the
    worker's error and where the run stands."""
    proc = subprocess.run(
        train_argv(f"data.train={local_data['train']}", f"data.val={local_data['val']}",
                   f"storage.uri={tmp_path / 'runs'}", "run.name=nan", "train.max_iters=20", "train.max_failures=3",
                   # every weight ~1e30 after the first step: the next loss overflows
                   "train.lr=1e30", "train.clip_grad=0", "train.amp=off"),
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""}, capture_output=True, text=True,
        timeout=300)
    err = proc.stderr
    assert proc.returncode == 1, proc.stdout[-2000:] + err[-4000:]
    assert "error: training failed: worker " in err and "FloatingPointError: " in err, err[-4000:]
    assert "lower train.lr" in err
    assert "not retried: a restart from the latest checkpoint would fail the same way" in err
    assert f"failed before the first checkpoint in {tmp_path / 'runs' / 'nan' / 'checkpoints'}" in err
    assert "[FailurePolicy] RETRY" not in proc.stdout + err


def test_relative_local_paths_mean_the_launch_directory(local_data, tmp_path):
    """Ray Train runs its workers in a directory of its own: relative data and storage paths
    (the default storage.uri is ./runs) must still name the directory the job was started in."""
    train, val = (os.path.relpath(local_data[split], tmp_path) for split in ("train", "val"))
    out = run_job(train_argv(f"data.train={train}", f"data.val={val}", "storage.uri=runs", "run.name=rel",
                             "train.max_iters=10", "train.eval_period=10"), timeout=300, cwd=tmp_path)
    checkpoint = tmp_path / "runs" / "rel" / "checkpoints" / "model_0000010.pth"
    assert checkpoint.is_file(), out[-3000:]
    assert f"latest:       {checkpoint}" in out
    # the workers' evaluation read data.val (relative on the command line) and its metrics reached the pointer
    assert CheckpointStore(str(tmp_path / "runs" / "rel")).pointer()["metrics"]["num_images"] == 4
