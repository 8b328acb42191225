"""A sweep on an autoscaling cluster (slow): Ray's fake multi-node provider on this machine.

The head, started for the test with ``RAY_FAKE_CLUSTER=1 ray start --head --num-cpus=0
--autoscaling-config=...`` and a temp dir of its own, has no CPU; the autoscaler may start one
worker node of 4 (logical) CPUs: Ray Data gets whole CPUs that Train's workers leave on a node,
split between the trials running there, so 2 trials of 1 worker x 1 CPU need 4 on a node. A 2-trial sweep submitted to it can only run on worker nodes that did
not exist when it started; they are gone again after the idle timeout (15 s). One of the two
trials loses a Train worker (fault injection, no restarts allowed): it is recorded as failed with
its reason and the other trial still runs to the end.

Teardown stops only what the test started: every process of the head's session (the fake worker
nodes included).
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import TINY_MODEL, client_env, free_ports, started_ray_head, synthetic_on_s3

from mpformer_ray import storage
from mpformer_ray.train.failure import FAULT_ENV

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
TINY = TINY_MODEL + [
    "train.batch_size=2", "train.workers=1", "train.cpus_per_worker=1", "train.log_period=4",
    "train.max_iters=8", "train.eval_period=4", "train.checkpoint_period=4", "train.max_failures=0",
]
SWEEP = """
search: grid
scheduler: none
max_concurrent: 2
space:
  train.seed: {grid: [0, 1]}
"""


@pytest.fixture(scope="module")
def autoscaling_head(tmp_path_factory):
    """A token-authenticated fake-multinode head without CPUs; yields {"address", "gcs", "token", "home"}."""
    base = tmp_path_factory.mktemp("autoscaling_head")
    (gcs,) = free_ports(1)
    config = {
        "cluster_name": "fake-autoscaling", "max_workers": 1, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.25,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{gcs}"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            # one node: a second one, launched for Ray Data's own resource requests and idle for the
            # 15 s timeout, was terminated under a Ray Data actor placed on it (the trial failed)
            "ray.worker.cpu": {"resources": {"CPU": 4}, "node_config": {}, "min_workers": 0, "max_workers": 1},
        },
        "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "file_mounts": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [], "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }
    config_file = base / "fake.yaml"
    config_file.write_text(yaml.safe_dump(config))
    with started_ray_head(base, "--num-cpus", "0", "--autoscaling-config", str(config_file), gcs_port=gcs,
                          RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1") as head:
        yield head


def _env(head: dict) -> dict:
    return client_env(head["home"], RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=head["token"], RAY_ADDRESS=head["gcs"])


def _nodes(head: dict) -> list[dict]:
    """Every node the cluster has known (alive or dead): id, state, CPUs, start time (ms)."""
    code = ("import json, ray; from ray.util.state import list_nodes; ray.init(address='auto', logging_level='ERROR');"
            "print('NODES', json.dumps([{'id': n.node_id, 'state': n.state, 'cpus': n.resources_total.get('CPU', 0),"
            " 'head': n.is_head_node, 'start_ms': n.start_time_ms} for n in list_nodes(detail=True)]))")
    out = subprocess.run([sys.executable, "-c", code], env=_env(head), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # the driver also prints the autoscaler's events ("Resized to 0 CPUs.")
    (line,) = [line for line in out.stdout.splitlines() if line.startswith("NODES ")]
    return json.loads(line[len("NODES "):])


def test_sweep_scales_the_cluster_up_and_down(autoscaling_head, moto_server, tmp_path):
    data = synthetic_on_s3(tmp_path / "synthetic", f"s3://{moto_server['bucket']}/autoscale-data", num_train=8,
                           num_val=2)
    space = tmp_path / "sweep.yaml"
    space.write_text(SWEEP)

    before = _nodes(autoscaling_head)
    assert [n for n in before if n["state"] == "ALIVE" and not n["head"]] == [], before
    started = time.time() * 1000
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "tune.py"), "--space", str(space), "--set", *TINY,
         f"data.train={data['train']}", f"data.val={data['val']}",
         f"storage.uri=s3://{moto_server['bucket']}/autoscale", "run.name=grid"],
        # the seed-1 trial's worker dies at iteration 4 (the harness's fault injection)
        cwd=REPO, env={**_env(autoscaling_head), FAULT_ENV: "4,seed=1"}, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    (tmp_path / "sweep.log").write_text(out)
    assert proc.returncode == 0, out[-5000:]
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(
        f"s3://{moto_server['bucket']}/autoscale/grid/trials.csv").decode())))
    by_seed = {int(r["train.seed"]): r for r in rows}
    assert by_seed[0]["status"] == "completed" and float(by_seed[0]["iteration"]) == 8, rows
    assert by_seed[1]["status"] == "error" and by_seed[1]["error"], rows

    # the trials' Train workers asked for CPUs only new worker nodes had
    workers = [n for n in _nodes(autoscaling_head) if not n["head"]]
    assert workers and all(n["start_ms"] >= started and n["cpus"] == 4 for n in workers), workers

    # idle worker nodes go after idle_timeout_minutes (15 s) plus the autoscaler's rounds
    deadline = time.time() + 120
    while alive := [n for n in _nodes(autoscaling_head) if n["state"] == "ALIVE" and not n["head"]]:
        assert time.time() < deadline, f"worker nodes still alive 120 s after the sweep: {alive}"
        time.sleep(3)
