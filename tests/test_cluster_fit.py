"""What a cluster can run (mpformer_ray.train.cluster): Ray Data's whole free CPU after Train's
workers, local paths on more than one machine, error vs warning by whether the cluster can grow.

The rules are pure functions over node resource lists; the placement model is checked against
Ray 2.60's own autoscaling coordinator (the code that gives Ray Data its CPU budget), run in-process
on the same nodes.
"""

import json
import math

import pytest

from mpformer_ray.config import load_config
from mpformer_ray.train.cluster import (
    ClusterView,
    autoscaler_configured,
    data_cpu_problem,
    findings,
    local_path_problem,
    max_size,
    place_workers,
    worker_bundle,
)


def cpu_nodes(*cpus: float) -> list[dict[str, float]]:
    return [{"CPU": float(c), "memory": 8e9, "object_store_memory": 2e9} for c in cpus]


def gpu_nodes(n: int, cpus: float) -> list[dict[str, float]]:
    return [{"CPU": float(cpus), "GPU": 1.0, "memory": 60e9, "object_store_memory": 18e9} for _ in range(n)]


def cfg_with(*overrides: str, s3: bool = True):
    paths = ["storage.uri=s3://b/runs", "data.train=s3://b/train", "data.val=s3://b/val"] if s3 else []
    return load_config("tiny", [*paths, *overrides])


CASES = [
    # (nodes, workers, cpus per worker, data.cpus_per_task, use_gpu, fits)
    (cpu_nodes(2), 2, 0.5, 0.25, False, True),     # this machine's tests: 1 CPU left
    (cpu_nodes(2), 2, 1.0, 0.25, False, False),    # the hang seen on 2 cores: nothing left
    (cpu_nodes(2, 2), 2, 1.5, 0.25, False, False),  # issue 15: 0.5 left on each node
    (cpu_nodes(2, 2), 2, 1.0, 0.25, False, True),  # PACK fills one node, the other stays free
    (cpu_nodes(0, 3, 3), 2, 2.0, 0.25, False, True),  # issue 15's hand run: a CPU-less head, 1 left per node
    (cpu_nodes(0, 3, 3), 2, 2.0, 1.5, False, False),  # 1 CPU left per node: a 1.5-CPU task fits nowhere
    (cpu_nodes(0, 4), 2, 1.0, 0.25, False, True),  # the autoscaling sweep test's node, two trials' workers
    (cpu_nodes(2), 10, 0.1, 0.25, False, True),    # many fractional workers
    (cpu_nodes(1), 1, 0.25, 0.25, False, False),   # 0.75 left: never a whole CPU
    (gpu_nodes(8, 10), 8, 8.0, 0.25, True, True),  # cluster/rayjob.yaml: 2 CPUs left per GPU node
    (gpu_nodes(8, 10), 8, 10.0, 0.25, True, False),
    (gpu_nodes(2, 10), 4, 1.0, 0.25, True, False),  # 4 GPU workers on 2 GPUs do not fit at all
    (cpu_nodes(8), 1, 1.0, 0.25, True, False),     # a GPU worker on CPU-only nodes
]


@pytest.mark.parametrize("nodes, workers, cpus, per_task, gpu, fits", CASES)
def test_ray_data_needs_a_whole_cpu_after_the_workers(nodes, workers, cpus, per_task, gpu, fits):
    cfg = cfg_with(f"train.workers={workers}", f"train.cpus_per_worker={cpus}", f"data.cpus_per_task={per_task}",
                   f"train.use_gpu={str(gpu).lower()}")
    assert (data_cpu_problem(nodes, cfg) is None) == fits


def _coordinator_budget(nodes: list[dict], bundle: dict, workers: int) -> float:
    """Ray Data's CPU budget as Ray 2.60's coordinator computes it, Train's workers reserved first."""
    from ray.data._internal.cluster_autoscaler.base_autoscaling_coordinator import STANDARD_RESOURCE_TYPES
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        ResourceRequestPriority,
        _AutoscalingCoordinatorActor,
    )

    cluster = [{"NodeID": f"{i:04d}", "Alive": True, "Resources": dict(n), "Labels": {}} for i, n in enumerate(nodes)]
    coordinator = _AutoscalingCoordinatorActor(
        get_current_time=lambda: 0.0, send_resources_request=lambda *a, **k: None, get_cluster_nodes=lambda: cluster)
    coordinator.request_resources("train", [dict(bundle)] * workers, expire_after_s=1e9,
                                  priority=ResourceRequestPriority.HIGH)
    coordinator.request_resources("data", [], expire_after_s=1e9, request_remaining=STANDARD_RESOURCE_TYPES)
    return sum(r.get("CPU", 0.0) for r in coordinator.get_reserved_resources("data").values())


@pytest.mark.parametrize("nodes, workers, cpus, per_task, gpu, fits", CASES)
def test_placement_model_agrees_with_rays_coordinator(nodes, workers, cpus, per_task, gpu, fits):
    cfg = cfg_with(f"train.workers={workers}", f"train.cpus_per_worker={cpus}", f"train.use_gpu={str(gpu).lower()}")
    bundle = worker_bundle(cfg.train)
    left = place_workers(nodes, bundle, workers)
    if left is None:
        return  # the coordinator reserves what fits and leaves the rest pending; Train waits either way
    assert sum(math.floor(n["CPU"]) for n in left) == _coordinator_budget(nodes, bundle, workers)


def test_placement_packs_in_the_coordinators_node_order():
    # GPU nodes first, then the most memory: both workers land on the bigger node, the small one stays free
    small, big = {"CPU": 2.0, "memory": 4e9}, {"CPU": 4.0, "memory": 16e9}
    assert place_workers([small, big], {"CPU": 1.5}, 2) == [{"CPU": 2.0, "memory": 4e9}, {"CPU": 1.0, "memory": 16e9}]
    assert place_workers([small, big], {"CPU": 1.5}, 4) is None


def test_custom_worker_resources_place_one_worker_per_labelled_node():
    cfg = cfg_with("train.workers=2", "train.cpus_per_worker=0.5", "train.worker_resources={trainer: 1}")
    assert worker_bundle(cfg.train) == {"trainer": 1.0, "CPU": 0.5}
    head, worker = {"CPU": 2.0, "memory": 8e9}, {"CPU": 2.0, "memory": 8e9, "trainer": 1.0}
    # PACK would put both workers on the first node; the resource sends one to each labelled node
    assert place_workers([head, worker, worker], worker_bundle(cfg.train), 2) == [
        head, {"CPU": 1.5, "memory": 8e9, "trainer": 0.0}, {"CPU": 1.5, "memory": 8e9, "trainer": 0.0}]
    assert data_cpu_problem([head, worker, worker], cfg) is None
    # one labelled node: the second worker has nowhere to go, and the error says which resource
    assert "train.worker_resources={'trainer': 1.0}" in data_cpu_problem([head, worker], cfg)


def test_the_error_names_the_fields_and_what_to_set():
    cfg = cfg_with("train.workers=2", "train.cpus_per_worker=1.5")
    (finding,) = findings(ClusterView(cpu_nodes(2, 2), autoscaling=False), cfg)
    assert finding.fatal
    assert "train.workers=2 x train.cpus_per_worker=1.5" in finding.message
    assert "leave CPUs [0.5, 0.5]" in finding.message and "data.cpus_per_task=0.25" in finding.message
    assert finding.message.endswith("Fix: set train.cpus_per_worker=1 or train.workers=1")

    big_tasks = cfg_with("train.workers=2", "train.cpus_per_worker=2", "data.cpus_per_task=1.5")
    assert "data.cpus_per_task=1" in data_cpu_problem(cpu_nodes(0, 3, 3), big_tasks)
    no_gpu = cfg_with("train.use_gpu=true", "train.workers=1")
    assert data_cpu_problem(cpu_nodes(4), no_gpu).endswith("Fix: set train.use_gpu=false")
    hopeless = cfg_with("train.workers=1", "train.cpus_per_worker=0.25")
    assert "use larger nodes or more of them" in data_cpu_problem(cpu_nodes(1), hopeless)


def test_error_on_a_fixed_cluster_warning_where_it_may_grow():
    cfg = cfg_with("train.workers=2", "train.cpus_per_worker=1.5")
    nodes = cpu_nodes(2, 2)
    assert [f.fatal for f in findings(ClusterView(nodes, autoscaling=False), cfg)] == [True]
    assert [f.fatal for f in findings(ClusterView(nodes, autoscaling=True), cfg)] == [False]
    assert [f.fatal for f in findings(ClusterView(nodes, autoscaling=None), cfg)] == [False]
    # a known maximum size decides: 3 workers x 1.5 on up to 3 nodes of 2 CPUs leave 0.5 on each,
    # on up to 4 nodes one stays free for Ray Data
    three = cfg_with("train.workers=3", "train.cpus_per_worker=1.5")
    (finding,) = findings(ClusterView(nodes, max_nodes=cpu_nodes(2, 2, 2), autoscaling=True), three)
    assert finding.fatal and "even at its maximum size" in finding.message
    (finding,) = findings(ClusterView(nodes, max_nodes=cpu_nodes(2, 2, 2, 2), autoscaling=True), three)
    assert not finding.fatal and "waits for the autoscaler" in finding.message
    # the autoscaling sweep test's cluster starts with a CPU-less head only: its workers wait for nodes
    assert [f.fatal for f in findings(ClusterView(cpu_nodes(0), autoscaling=True), cfg_with())] == [False]
    assert findings(ClusterView(cpu_nodes(2, 2), autoscaling=False), cfg_with("train.cpus_per_worker=1")) == []


def test_max_size_from_node_groups():
    head, gpu = {"CPU": 0.0}, {"CPU": 10.0, "GPU": 1.0}
    assert max_size([(head, 1, 1), (gpu, 0, 3)]) == [head, gpu, gpu, gpu]
    assert max_size([(head, 1, 1), (gpu, 0, -1)]) is None  # unbounded


def test_local_paths_are_refused_on_more_than_one_machine(tmp_path):
    local = cfg_with(f"storage.uri={tmp_path / 'runs'}", s3=False)
    local.data.train, local.data.val = str(tmp_path / "train"), ""  # as preflight leaves them
    one_node = ClusterView(cpu_nodes(2), autoscaling=False)
    assert local_path_problem(one_node, local) is None
    assert local_path_problem(ClusterView(cpu_nodes(2), autoscaling=None), local) is None
    two_nodes = ClusterView(cpu_nodes(2, 2), autoscaling=None)
    problem = local_path_problem(two_nodes, local)
    assert f"storage.uri={tmp_path / 'runs'}, data.train={tmp_path / 'train'}: local path(s)" in problem
    assert "has 2 nodes" in problem and "s3://" in problem and "storage.shared_local_paths=true" in problem
    assert "autoscaler adds nodes" in local_path_problem(ClusterView(cpu_nodes(4), autoscaling=True), local)
    assert "nodes yet to join" in local_path_problem(ClusterView(cpu_nodes(0), autoscaling=None), local)
    assert "at its maximum size" in local_path_problem(
        ClusterView(cpu_nodes(4), max_nodes=cpu_nodes(4, 4), autoscaling=True), local)
    assert [f.fatal for f in findings(two_nodes, local)] == [True]

    shared = cfg_with(f"storage.uri={tmp_path / 'runs'}", "storage.shared_local_paths=true", s3=False)
    assert local_path_problem(two_nodes, shared) is None
    assert local_path_problem(two_nodes, cfg_with()) is None  # all s3://
    pretrained = cfg_with(f"model.pretrained={tmp_path / 'r50.pth'}")
    assert "model.pretrained=" in local_path_problem(two_nodes, pretrained)


def _status(node_types: dict[str, str]) -> str:
    """The autoscaler status as Ray 2.60's monitor writes it (fields trimmed to those read here)."""
    return json.dumps({"time": 0.0, "monitor_pid": 1, "autoscaler_report": {
        "active_nodes": {t: 1 for t in node_types.values()}, "pending_nodes": [], "failed_nodes": [],
        "node_type_mapping": node_types, "legacy": True}})


def test_the_autoscaler_status_tells_a_fixed_cluster_from_an_autoscaling_one():
    node = "7941afc5c6c4c3c376bb12b8d35e916e943e3a4586200bcce00265b8"
    # `ray start --head` without --autoscaling-config: Ray's read-only autoscaler, one type per node
    assert autoscaler_configured(_status({node: f"node_{node}"})) is False
    # the fake multi-node provider (as `ray up` and KubeRay): the cluster config's node types
    assert autoscaler_configured(_status({"f" * 51 + "00000": "ray.head.default",
                                          "f" * 51 + "00001": "ray.worker.cpu"})) is True
    assert autoscaler_configured(None) is None
    assert autoscaler_configured(b"not json") is None
    assert autoscaler_configured(json.dumps({"time": 0.0})) is None
