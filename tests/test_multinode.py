"""Training across nodes (slow): a token-authenticated Ray cluster of a head without CPUs and two
worker nodes, each a raylet of its own on this machine (`ray start --address`), with records and
checkpoints on the moto S3 server. `jobs/train.py` places one Train worker on each worker node
(`train.worker_resources`, a custom resource only worker nodes have); one worker node is then
killed mid-run and a new one started in its place.

Shown: the workers ran on different nodes; after the node loss Ray Train restarted the worker group
on the surviving and the new node from the latest S3 checkpoint (at most `checkpoint_period`
iterations lost); the run ends with the checkpoints a single-node run of the same config gives, and
its model has learned: its training loss on fixed images is well below that of the initial weights.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path
from statistics import mean

import pytest
import torch

from conftest import TINY_MODEL, VENV_BIN, client_env, free_ports, started_ray_head, synthetic_on_s3
from servers import session_pids, start

from mpformer_ray import storage
from mpformer_ray.config import Config, load_config, with_classes
from mpformer_ray.data.pipeline import local_batches
from mpformer_ray.model import build_model
from mpformer_ray.model.criterion import total_loss
from mpformer_ray.train import latest_checkpoint, load_checkpoint
from mpformer_ray.train.checkpoint import CheckpointStore

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
MAX_ITERS, PERIOD = 30, 10


@pytest.fixture(scope="module")
def s3_data(moto_server, tmp_path_factory) -> dict:
    uris = synthetic_on_s3(tmp_path_factory.mktemp("synthetic"), f"s3://{moto_server['bucket']}/multinode")
    return {**uris, "storage": f"s3://{moto_server['bucket']}/multinode/runs"}


def start_node(head: dict, name: str, log: Path) -> subprocess.Popen:
    """A worker node of 2 CPUs joining ``head``, with the resources {"trainer": 1, name: 1}."""
    manager, objects, agent, agent_grpc, runtime_env, metrics = free_ports(6)
    return start(
        [str(VENV_BIN / "ray"), "start", "--block", "--address", head["gcs"], "--num-cpus", "2",
         "--resources", json.dumps({"trainer": 1, name: 1}), "--node-manager-port", str(manager),
         "--object-manager-port", str(objects), "--dashboard-agent-listen-port", str(agent),
         "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(runtime_env),
         "--metrics-export-port", str(metrics), "--disable-usage-stats"],
        env=client_env(head["home"], RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=head["token"]),
        stdout=open(log, "w"), stderr=subprocess.STDOUT)


def kill_node(node: subprocess.Popen) -> None:
    """SIGKILL a worker node's raylet and every process it started (its session)."""
    for pid in session_pids(node.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    node.wait(timeout=30)


def cluster_query(head: dict, code: str) -> object:
    """The JSON ``code`` prints, run by a separate driver connected to ``head``."""
    env = client_env(head["home"], RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=head["token"], RAY_ADDRESS=head["gcs"])
    out = subprocess.run([sys.executable, "-c", "import json, ray; ray.init(logging_level='ERROR'); " + code],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def wait_for_nodes(head: dict, names: set[str], starting: dict[str, tuple[subprocess.Popen, Path]] | None = None
                   ) -> dict[str, str]:
    """{resource name: node id} once an alive node offers each of ``names``; ``starting``: name ->
    (its `ray start` process, its log), failing at once when one of them has exited."""
    deadline = time.time() + 120
    while True:
        for name, (proc, log) in (starting or {}).items():
            assert proc.poll() is None, f"{name} exited: {log.read_text()[-3000:]}"
        nodes = cluster_query(head, "print(json.dumps([[n['NodeID'], list(n['Resources'])] "
                                    "for n in ray.nodes() if n['Alive']]))")
        found = {name: node_id for node_id, resources in nodes for name in names if name in resources}
        if found.keys() == names:
            return found
        assert time.time() < deadline, f"nodes {names - found.keys()} did not join: {nodes}"
        time.sleep(1)


def training_loss(cfg: Config, weights: dict | None, uri: str) -> float:
    """Mean training loss over the first 4 batches of 2 images of ``uri``'s epoch 0 (the run's seed)
    of the model with ``weights`` (None: the run's initial weights, as its workers build them), the
    pilot noise seeded: every model is scored on the same images and draws, so the comparison is free
    of the batch-to-batch spread of the loss log (one 5-iteration window swings by +-10)."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    if weights is not None:
        model.load_state_dict(weights)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        return mean(float(total_loss(model(images, targets)))
                    for images, targets in islice(local_batches(uri, cfg, 2, seed=cfg.train.seed), 4))


def test_training_spans_nodes_and_survives_losing_one(s3_data, tmp_path):
    # the GCS declares a silent node dead after 5 missed health checks a second apart (Ray's default: 30 s)
    (tmp_path / "head").mkdir()
    with started_ray_head(tmp_path / "head", "--num-cpus", "0", RAY_health_check_period_ms="1000",
                         RAY_health_check_timeout_ms="2000", RAY_health_check_failure_threshold="5") as head:
        nodes, node_ids = {}, {}
        try:
            for name in ("node_a", "node_b"):  # one at a time: two raylets starting at once time out on 2 cores
                nodes[name] = start_node(head, name, tmp_path / f"{name}.log")
                node_ids.update(wait_for_nodes(head, {name}, {name: (nodes[name], tmp_path / f"{name}.log")}))
            run = f"{s3_data['storage']}/spread"
            store = CheckpointStore(run)
            overrides = [*TINY_MODEL, "train.batch_size=2", "train.workers=2", "train.cpus_per_worker=0.5",
                         "train.worker_resources={trainer: 1}", "train.log_period=5", f"train.max_iters={MAX_ITERS}",
                         f"train.checkpoint_period={PERIOD}", "train.eval_period=0", "train.max_failures=2",
                         f"data.train={s3_data['train']}", f"data.val={s3_data['val']}",
                         f"storage.uri={s3_data['storage']}", "run.name=spread"]
            cmd = [sys.executable, str(REPO / "jobs" / "train.py"), "--set", *overrides]
            env = client_env(head["home"], RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=head["token"],
                             RAY_ADDRESS=head["gcs"])
            log = open(tmp_path / "job.log", "w+")
            job = start(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                deadline = time.time() + 400
                while (store.pointer() or {}).get("iteration", 0) < PERIOD:
                    assert job.poll() is None, f"training ended early: {(tmp_path / 'job.log').read_text()[-4000:]}"
                    assert time.time() < deadline, "no checkpoint within 400 s"
                    time.sleep(0.5)
                kill_node(nodes["node_b"])
                lost_at = store.pointer()["iteration"]
                nodes["node_c"] = start_node(head, "node_c", tmp_path / "node_c.log")
                assert job.wait(timeout=600) == 0, (tmp_path / "job.log").read_text()[-5000:]
            finally:
                if job.poll() is None:
                    job.kill()
                log.close()
            node_ids.update(wait_for_nodes(head, {"node_a", "node_c"}))

            # every Train worker actor there was, by worker group (a placement group per attempt): each
            # attempt's two workers on two different nodes, the first on node_a and node_b, the
            # restarted one on node_a and node_c
            actors = cluster_query(head, (
                "from ray.util.state import list_actors; "
                "print(json.dumps([[a.placement_group_id, a.node_id] for a in list_actors("
                "filters=[('class_name', '=', 'RayTrainWorker')], detail=True, limit=1000)]))"))
            names = {node_id: name for name, node_id in node_ids.items()}
            groups: dict[str, list[str]] = {}
            for group, node_id in actors:
                groups.setdefault(group, []).append(names.get(node_id, node_id))
            attempts = sorted(sorted(placed) for placed in groups.values())
            assert all(len(set(placed)) == len(placed) == 2 for placed in attempts), attempts
            assert ["node_a", "node_b"] in attempts and ["node_a", "node_c"] in attempts, attempts
        finally:
            for node in nodes.values():
                if node.poll() is None:
                    kill_node(node)

    # the run went on from the last S3 checkpoint before the loss, and ended as a single-node run does
    ckpt = load_checkpoint(latest_checkpoint(run))
    assert ckpt.iteration == MAX_ITERS and ckpt.starts[0] == 0 and len(ckpt.starts) >= 2, ckpt.starts
    assert ckpt.starts[1] == lost_at, (lost_at, ckpt.starts)  # at most checkpoint_period iterations lost
    assert [n for n in storage.listdir(store.dir) if n.endswith(".pth")] == ["model_0000020.pth", "model_0000030.pth"]
    out = (tmp_path / "job.log").read_text()
    losses = [float(x) for x in re.findall(rf"iter \d+/{MAX_ITERS}\s+loss ([0-9.]+)", out)]
    assert len(losses) >= 4, out[-3000:]
    cfg = with_classes(load_config(overrides=overrides), ckpt.classes)
    before, after = training_loss(cfg, None, s3_data["train"]), training_loss(cfg, ckpt.model, s3_data["train"])
    assert after < 0.9 * before, (before, after, losses)
    assert "final metrics" in out and "sem_seg/mIoU" in out
