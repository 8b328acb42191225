"""Shared session fixtures: a real S3-compatible server (moto), a small synthetic COCO layout, and
token-authenticated Ray heads started for a test module."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from servers import start, stop_session

VENV_BIN = Path(sys.executable).parent
# a model small enough for end-to-end jobs on 2 cores, at 64 px
TINY_MODEL = [
    "model.dec_layers=2", "model.enc_layers=1", "model.num_queries=8", "model.hidden_dim=32", "model.nheads=2",
    "model.dim_feedforward=64", "model.enc_dim_feedforward=64", "model.mask_dim=32", "model.train_num_points=256",
    "data.crop_size=[64,64]", "data.test_short_side=64", "data.test_max_size=64",
]

_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def storage_options_from_environment():
    """Storage options are process-wide (``storage.configure``, e.g. by preflight): each test starts and ends
    with the environment's alone."""
    from mpformer_ray import storage

    storage.configure()
    yield
    storage.configure()


@pytest.fixture(scope="session")
def moto_server():
    """A real moto S3 server on 127.0.0.1 with one fresh bucket.

    Sets AWS_ENDPOINT_URL and dummy AWS credentials in os.environ for the whole session
    (subprocesses and Ray workers started later inherit them) and restores them at the end.
    Yields {"endpoint_url": "http://127.0.0.1:PORT", "bucket": name}.
    """
    import boto3

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with pytest.MonkeyPatch.context() as mp:
        try:
            deadline = time.time() + 30
            while True:
                try:
                    urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                    break
                except (urllib.error.URLError, ConnectionError, OSError):
                    if proc.poll() is not None or time.time() > deadline:
                        raise RuntimeError(f"moto server did not start on {endpoint} (exit code {proc.poll()})")
                    time.sleep(0.2)
            for key, value in {**_AWS_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
                mp.setenv(key, value)
            bucket = f"test-{uuid.uuid4().hex[:8]}"
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
            yield {"endpoint_url": endpoint, "bucket": bucket}
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory) -> Path:
    """A small synthetic COCO 2017 layout (12 train + 4 val images, 64x64) under a session tmp dir."""
    from mpformer_ray.data.synthetic import write_coco_layout

    root = tmp_path_factory.mktemp("synthetic_coco")
    write_coco_layout(root, "train", num=12, size=64, seed=0)
    write_coco_layout(root, "val", num=4, size=64, seed=0)
    return root


def upload_records(local: str, uri: str) -> str:
    """Copy a prepared records directory (manifest + shards) to ``uri`` (e.g. the moto bucket)."""
    from mpformer_ray import storage

    for name in storage.listdir(local):
        storage.write_bytes(storage.join(uri, name), storage.read_bytes(storage.join(local, name)))
    return uri


def synthetic_on_s3(root: Path, uri: str, num_train: int = 16, num_val: int = 4) -> dict[str, str]:
    """The synthetic dataset (64 px images) generated under ``root`` and uploaded to ``uri``/train and
    ``uri``/val: {"train": URI, "val": URI}."""
    from mpformer_ray.config import load_config
    from mpformer_ray.data.synthetic import ensure_synthetic

    cfg = load_config("tiny", [f"data.synthetic.root={root}", f"data.synthetic.num_train={num_train}",
                               f"data.synthetic.num_val={num_val}", "data.synthetic.image_size=64"])
    return {split: upload_records(local, f"{uri}/{split}")
            for split, local in zip(("train", "val"), ensure_synthetic(cfg.data.synthetic))}


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def client_env(home: Path, **auth: str) -> dict[str, str]:
    """Environment for a ``ray`` CLI client: no token source but those in ``auth`` (HOME points at
    an empty directory so a developer's own ~/.ray/auth_token is not picked up)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(home), PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1", **auth)
    return env


@contextlib.contextmanager
def started_ray_head(base: Path, *args: str, gcs_port: int | None = None, **env: str):
    """``ray start --head --block`` with token authentication, ``args`` (e.g. ``--num-cpus 2``), extra
    ``env`` and a temp dir of its own; yields {"address" (dashboard), "gcs", "token", "home"}. On exit
    stops only what it started: every process of the head's session."""
    home = base / "home"
    home.mkdir()
    token = secrets.token_hex(32)
    gcs, dashboard, client, agent_listen, agent_grpc, runtime_env, metrics = free_ports(7)
    gcs = gcs_port or gcs
    temp_dir = Path("/tmp") / f"rh-{secrets.token_hex(4)}"  # unix socket paths must stay short
    log = open(base / "head.log", "w")
    # the job's `python` resolves on the head's PATH: put this interpreter's env first
    head = start(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", *args, "--port", str(gcs),
         "--dashboard-port", str(dashboard), "--dashboard-host", "127.0.0.1", "--disable-usage-stats",
         "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent_listen),
         "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(runtime_env),
         "--metrics-export-port", str(metrics), "--temp-dir", str(temp_dir)],
        env=client_env(home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, **env), stdout=log,
        stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # the dashboard answers (refusing an unauthenticated call is an answer)
            except (urllib.error.URLError, ConnectionError, OSError):
                if head.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"ray head did not come up: {(base / 'head.log').read_text()[-3000:]}")
                time.sleep(1)
        yield {"address": address, "gcs": f"127.0.0.1:{gcs}", "token": token, "home": home}
    finally:
        # the whole session: an autoscaler's fake nodes and their workers outlive the head; its own
        # orderly stop rarely finishes within 30 s on 2 cores, so what is left after 5 s is killed
        stop_session(head.pid)
        head.wait(timeout=10)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)  # outside the test's tmp_path, so nothing else removes it


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A token-authenticated Ray head with 2 CPUs; yields {"address", "gcs", "token", "home"}."""
    with started_ray_head(tmp_path_factory.mktemp("ray_head"), "--num-cpus", "2") as head:
        yield head
