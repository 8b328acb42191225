"""What a Ray cluster can run, decided on the driver before any worker starts.

Two rules, each a pure function over the cluster's nodes (resource dicts as ``ray.nodes()``
reports them), so they are tested without a cluster:

- **Ray Data must get a whole CPU** (``data_cpu_problem``). In Ray 2.60 a Ray Data execution
  beside Ray Train takes its CPU budget from Ray's autoscaling coordinator
  (``ray/data/_internal/cluster_autoscaler/default_autoscaling_coordinator.py``): it reserves
  Train's worker bundles first (PACK, over the nodes in a fixed order), then gives Ray Data the
  *whole* CPUs left on each node (integer division: 0.5 CPU left on a node counts as none). Ray
  Data's first task (ListFiles) asks for 1 CPU whatever ``data.cpus_per_task`` says, and its read
  and decode tasks for ``data.cpus_per_task``. So after Train's workers some node must keep
  ``max(1, data.cpus_per_task)`` CPUs, else no read task ever starts and training waits forever
  (seen: 2 nodes x 2 CPUs with 2 workers x 1.5 CPUs; 1 node x 2 CPUs with 2 workers x 1 CPU).
- **Local paths need one machine** (``local_path_problem``): a local ``storage.uri`` / ``data.*`` /
  ``model.pretrained`` names a different disk on every node, so workers elsewhere would write
  checkpoints nobody reads back or find no records. ``storage.shared_local_paths=true`` says the
  path is on storage every node mounts (NFS, a fake multi-node cluster on one machine).

Whether the cluster can grow decides an error from a warning (``findings``). Ray has no public
API for a cluster's maximum size: when Ray reports its node groups (``get_cluster_config``, what
Ray Data itself reads) the check runs at the maximum size; else the autoscaler's status tells a
fixed cluster (Ray's read-only autoscaler, which names every node type ``node_<node id>``) from an
autoscaling one (node types from a cluster config: ``ray up``, KubeRay, the fake multi-node
provider); a local Ray started by this job is this machine. Where it cannot be told, a resource
shortfall is only a warning (nodes may come), and local paths are refused only where the work runs
on another machine than the driver's already (more than one node, or one without CPU and GPU): an
error needs evidence that the run would hang or lose files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

from mpformer_ray.config import Config, TrainConfig

# keys the coordinator orders nodes by (scarcest first, most of it first), as Ray Core orders bundles
_NODE_ORDER = ("GPU", "object_store_memory", "memory", "CPU")


@dataclass
class ClusterView:
    """The cluster as the checks see it. ``nodes``: the alive nodes' total resources, sorted by node
    id (the coordinator's tie-break); ``max_nodes``: every node at the cluster's maximum size, when
    known; ``autoscaling``: whether an autoscaler may add nodes (None: cannot be told)."""

    nodes: list[dict[str, float]]
    max_nodes: list[dict[str, float]] | None = None
    autoscaling: bool | None = None


@dataclass
class Finding:
    message: str
    fatal: bool  # an error (the run could never work) rather than a warning


def worker_bundle(train: TrainConfig) -> dict[str, float]:
    """One Train worker's resources, as Ray Train's ScalingConfig asks for them."""
    return {**train.worker_resources, "CPU": train.cpus_per_worker, **({"GPU": 1.0} if train.use_gpu else {})}


def place_workers(nodes: list[dict[str, float]], bundle: dict[str, float], count: int) -> list[dict] | None:
    """The resources left on each of ``nodes`` (same order) once the coordinator has reserved ``count``
    ``bundle``s for Train, or None when they do not all fit. PACK as the coordinator does it: nodes in
    its order, each bundle on the first node from the previous bundle's onwards that still holds it.
    Float arithmetic in the coordinator's order too (fit by subtracting bundle by bundle, the leftover
    as the node's total minus the sum of its bundles): a leftover of 0.9999 is no whole CPU there either."""
    avail = [dict(n) for n in nodes]
    reserved: list[dict[str, float]] = [{} for _ in nodes]
    order = sorted(range(len(nodes)), key=lambda i: tuple(-nodes[i].get(k, 0) for k in _NODE_ORDER))
    start = 0
    for _ in range(count):
        for offset in range(len(order)):
            i = order[(start + offset) % len(order)]
            if all(avail[i].get(k, 0) >= v for k, v in bundle.items()):
                for k, v in bundle.items():
                    avail[i][k] -= v
                    reserved[i][k] = reserved[i].get(k, 0) + v
                start = (start + offset) % len(order)
                break
        else:
            return None
    return [{k: v - r.get(k, 0) for k, v in n.items()} for n, r in zip(nodes, reserved)]


def _fits(nodes: list[dict[str, float]], train: TrainConfig, cpus_per_task: float) -> bool:
    left = place_workers(nodes, worker_bundle(train), train.workers)
    if left is None:
        return False
    need = max(1.0, cpus_per_task)
    cpus = [n.get("CPU", 0.0) for n in left]
    return sum(math.floor(c) for c in cpus) >= need and max(cpus, default=0.0) >= need


def _fixes(nodes: list[dict[str, float]], cfg: Config) -> list[str]:
    """Single changes that make ``cfg`` fit ``nodes``: the most CPUs per worker (in steps of 0.25),
    the most workers, data.cpus_per_task=1, or no GPU."""
    t, per_task = cfg.train, cfg.data.cpus_per_task
    steps = [k / 4 for k in range(math.ceil(t.cpus_per_worker * 4) - 1, 0, -1)]
    cpus = next((c for c in steps if _fits(nodes, replace(t, cpus_per_worker=c), per_task)), None)
    workers = next((w for w in range(t.workers - 1, 0, -1) if _fits(nodes, replace(t, workers=w), per_task)), None)
    fixes = []
    if cpus is not None:
        fixes.append(f"train.cpus_per_worker={cpus:g}")
    if workers is not None:
        fixes.append(f"train.workers={workers}")
    if per_task > 1 and _fits(nodes, t, 1.0):
        fixes.append("data.cpus_per_task=1")
    if t.use_gpu and _fits(nodes, replace(t, use_gpu=False), per_task):
        fixes.append("train.use_gpu=false")
    return fixes


def data_cpu_problem(nodes: list[dict[str, float]], cfg: Config) -> str | None:
    """Why ``cfg``'s Train workers and Ray Data cannot both run on ``nodes`` (None: they can)."""
    t = cfg.train
    shape = f"train.workers={t.workers} x train.cpus_per_worker={t.cpus_per_worker:g}" + \
        (" (+ 1 GPU each, train.use_gpu=true)" if t.use_gpu else "") + \
        (f" (+ train.worker_resources={t.worker_resources} each)" if t.worker_resources else "")
    left = place_workers(nodes, worker_bundle(t), t.workers)
    if left is None:
        problem = f"{shape} do not fit on nodes {_node_list(nodes)}"
    elif _fits(nodes, t, cfg.data.cpus_per_task):
        return None
    else:
        need = max(1.0, cfg.data.cpus_per_task)
        problem = (f"{shape} on nodes {_node_list(nodes)} leave CPUs {[round(n.get('CPU', 0.0), 4) for n in left]}; "
                   f"Ray Data needs {need:g} whole free CPU(s) on one node (its file listing takes 1 CPU, its read / "
                   f"decode tasks data.cpus_per_task={cfg.data.cpus_per_task:g}, and it only gets the whole CPUs a "
                   "node has left), so no read task would ever start")
    fixes = _fixes(nodes, cfg)
    return problem + (f". Fix: set {' or '.join(fixes)}" if fixes else
                      ". No single change of train.cpus_per_worker, train.workers or data.cpus_per_task fits: use "
                      "larger nodes or more of them")


def _node_list(nodes: list[dict[str, float]]) -> str:
    return "[" + ", ".join(f"{{CPU: {n.get('CPU', 0):g}" + (f", GPU: {n['GPU']:g}}}" if n.get("GPU") else "}")
                           for n in nodes) + "]"


def local_paths(cfg: Config) -> list[str]:
    """``field=path`` for every location the workers use that is a local path."""
    fields = {"storage.uri": cfg.storage.uri, "data.train": cfg.data.train, "data.val": cfg.data.val,
              "model.pretrained": cfg.model.pretrained, "model.weights": cfg.model.weights}
    return [f"{name}={value}" for name, value in fields.items() if value and "://" not in value]


def local_path_problem(view: ClusterView, cfg: Config) -> str | None:
    """Why ``cfg``'s local paths would name different disks on ``view`` (None: one machine, or the
    paths are on shared storage by ``storage.shared_local_paths``)."""
    paths = local_paths(cfg)
    if not paths or cfg.storage.shared_local_paths:
        return None
    nodes = view.max_nodes if view.max_nodes is not None else view.nodes
    if len(nodes) > 1:
        why = f"this Ray cluster has {len(nodes)} nodes{' at its maximum size' if view.max_nodes is not None else ''}"
    elif view.autoscaling:
        why = "this Ray cluster's autoscaler adds nodes on demand"
    elif not any(n.get("CPU") or n.get("GPU") for n in view.nodes):
        why = "this Ray cluster's only node has no CPU or GPU, so the workers run on nodes yet to join"
    else:
        return None
    return (f"{', '.join(paths)}: local path(s), but {why}: each node would read and write its own disk (checkpoints "
            "lost with their node, records missing). Fix: use s3://bucket/prefix URIs (storage.uri, and data.train / "
            "data.val prepared with jobs/prepare_data.py --out s3://...), or, if these paths are on storage that every "
            "node mounts, set storage.shared_local_paths=true")


def findings(view: ClusterView, cfg: Config) -> list[Finding]:
    """The resource and local-path checks on ``view``: an error where the run can never work, a
    warning where it waits for nodes an autoscaler may add."""
    out = []
    paths = local_path_problem(view, cfg)
    if paths:
        out.append(Finding(paths, fatal=True))
    now = data_cpu_problem(view.nodes, cfg)
    if now is None:
        return out
    if view.max_nodes is not None:
        at_max = data_cpu_problem(view.max_nodes, cfg)
        if at_max:
            out.append(Finding(f"even at its maximum size the cluster cannot run this: {at_max}", fatal=True))
        else:
            out.append(Finding(f"the cluster's nodes now cannot run this ({now}); it waits for the autoscaler to "
                               "add nodes", fatal=False))
    elif view.autoscaling is False:
        out.append(Finding(now, fatal=True))
    else:
        out.append(Finding(f"{now}. Training waits until an autoscaler adds nodes that fit, and hangs if none "
                           "comes", fatal=False))
    return out


def max_size(groups: list[tuple[dict[str, float], int, int]]) -> list[dict[str, float]] | None:
    """Every node of a cluster at its maximum size from its node groups ``(resources, min_count,
    max_count)``; None when a group has no bound (max_count -1)."""
    if any(max_count < 0 for _, _, max_count in groups):
        return None
    return [dict(resources) for resources, _, max_count in groups for _ in range(max_count)]


def _node_groups() -> list[tuple[dict[str, float], int, int]] | None:
    """The node groups Ray reports for this cluster (None on clusters that report none: in Ray 2.60
    neither ``ray up`` nor KubeRay nor the fake multi-node provider does)."""
    from ray._private.state import state

    try:
        config = state.get_cluster_config()
    except Exception:  # private API: a Ray without it reports nothing
        return None
    if not config or not config.node_group_configs:
        return None
    return [({k: float(v) for k, v in g.resources.items()}, g.min_count, g.max_count)
            for g in config.node_group_configs]


def autoscaler_configured(status: bytes | str | None) -> bool | None:
    """From the autoscaler status ``ray status`` prints (JSON in Ray's internal KV): True when the
    autoscaler runs from a cluster config (it may add nodes), False when it is Ray's read-only one
    (a fixed cluster of hand-started nodes, every node type ``node_<node id>``), None when there is
    no status (not written yet, or Ray's autoscaler v2) or it has another shape."""
    try:
        types = json.loads(status)["autoscaler_report"]["node_type_mapping"] if status else None
    except (ValueError, KeyError, TypeError):
        return None
    if not types:
        return None
    return any(node_type != f"node_{node_id}" for node_id, node_type in types.items())


def _autoscaler_status() -> bytes | None:
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        return _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    except Exception:  # private API: no status
        return None


def current_cluster(own_instance: bool) -> ClusterView:
    """The connected Ray cluster. ``own_instance``: this process started it (a local Ray on this
    machine), so it is exactly its one node."""
    import ray

    nodes = [n["Resources"] for n in sorted((n for n in ray.nodes() if n["Alive"]), key=lambda n: n["NodeID"])]
    if own_instance:
        return ClusterView(nodes, autoscaling=False)
    groups = _node_groups()
    if groups:
        return ClusterView(nodes, max_nodes=max_size(groups),
                           autoscaling=any(mx < 0 or mx > mn for _, mn, mx in groups))
    return ClusterView(nodes, autoscaling=autoscaler_configured(_autoscaler_status()))
