"""Shared session fixtures: a real S3-compatible server (moto) and a small synthetic COCO layout."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

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
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
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
