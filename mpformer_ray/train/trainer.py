"""Ray Train wiring: pre-flight checks on the driver, then a TorchTrainer whose workers run
the plain training loop on their Ray Data shard.

Ray 2.60 runs Train V2 (``RAY_TRAIN_V2_ENABLED``, on by default; set here explicitly so
an environment that turned it off cannot silently switch APIs).
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import uuid
from dataclasses import dataclass, field

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

import ray  # noqa: E402
import ray.data  # noqa: E402
import ray.train  # noqa: E402
import ray.train.torch  # noqa: E402
import torch  # noqa: E402

from mpformer_ray import storage  # noqa: E402
from mpformer_ray.config import Config, ConfigError, with_classes  # noqa: E402
from mpformer_ray.log import setup_logging  # noqa: E402
from mpformer_ray.data.records import DataError, check_shards, read_manifest  # noqa: E402
from mpformer_ray.errors import UserError  # noqa: E402
from mpformer_ray.tasks import main_metric, main_task, tasks_for  # noqa: E402
from mpformer_ray.train.checkpoint import (  # noqa: E402
    images_done,
    CheckpointError,
    CheckpointStore,
    check_resume,
    initial_weights,
    run_uri,
)
from mpformer_ray.train.cluster import current_cluster, findings, worker_bundle  # noqa: E402
from mpformer_ray.train.failure import FAULT_ENV, FailFast  # noqa: E402

log = logging.getLogger(__name__)


class PreflightError(UserError, ValueError):
    """The run cannot start; the message names the config field or URI and the fix."""


@dataclass
class TrainPlan:
    """Everything the workers need, checked on the driver before any worker starts; handed to them whole."""

    cfg: Config  # local URIs absolute, data.train / data.val resolved, model.num_classes / thing_classes filled
    run_uri: str
    classes: list[dict]
    tasks: list[str]  # mpformer_ray.tasks.tasks_for the training split and model.test
    resume_from: str | None = None  # the checkpoint the workers start from, checked on the driver
    resume_images: int = 0  # where in the data stream it left off (checkpoint.images_done)
    # marks this job's checkpoints in latest.json: restarted workers resume from its own newest one
    job: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def main_metric(self) -> str:
        """What ranks this run's checkpoints (and a sweep's trials): ``mpformer_ray.tasks.main_metric``."""
        return main_metric(self.tasks)


def _run_tasks(cfg: Config, train: dict, val: dict | None) -> list[str]:
    """The run's tasks: those of the training split that ``model.test`` keeps on. The validation split
    must be evaluated on the main one of them, else the main metric never comes and no best checkpoint
    is ever recorded."""
    try:
        tasks = tasks_for(train.get("task"), cfg.model.test, f"data.train={cfg.data.train!r}")
        val_tasks = tasks_for(val.get("task"), cfg.model.test, f"data.val={cfg.data.val!r}") if val else None
    except ValueError as e:
        raise PreflightError(str(e)) from None
    if val_tasks is not None and main_task(tasks) not in val_tasks:
        raise PreflightError(
            f"data.val={cfg.data.val!r} (a {val['task']} split) is evaluated on {val_tasks}, so it never gives "
            f"{main_metric(tasks)}, the main metric of training on data.train={cfg.data.train!r} (a "
            f"{train['task']} split, tasks {tasks} with model.test.*_on). Fix: prepare data.val with --task "
            f"{train['task']}, or set model.test.*_on so that the tasks data.val lacks are off")
    return tasks


def _manifest(uri: str, field: str) -> dict:
    """The split's manifest, once every shard it lists has a readable Parquet footer."""
    try:
        manifest = read_manifest(uri)
        check_shards(uri, manifest)
        return manifest
    except (DataError, storage.StorageError) as e:
        raise PreflightError(f"{field}={uri!r} cannot be read: {e}") from None


def _resolve_config(cfg: Config) -> Config:
    """A copy of ``cfg`` as the workers get it: this process's storage options set from it, the synthetic
    dataset generated when ``data.train`` is empty, local URIs absolute."""
    from mpformer_ray.data.synthetic import ensure_synthetic

    cfg = copy.deepcopy(cfg)
    storage.configure(cfg.storage)
    if not cfg.data.train:
        train_uri, val_uri = ensure_synthetic(cfg.data.synthetic)
        cfg.data.train, cfg.data.val = train_uri, cfg.data.val or val_uri
    cfg.storage.uri = storage.absolute(cfg.storage.uri)
    cfg.data.train, cfg.data.val = storage.absolute(cfg.data.train), storage.absolute(cfg.data.val)
    cfg.model.pretrained = storage.absolute(cfg.model.pretrained)
    cfg.model.weights = storage.absolute(cfg.model.weights)
    if "/runtime_resources/working_dir_files/" in cfg.storage.uri:
        log.warning("storage.uri=%s lies inside this Ray job's copy of --working-dir, which Ray deletes "
                    "when the job's files are garbage-collected: checkpoints there will be lost. Fix: set "
                    "storage.uri to an s3:// URI or an absolute path outside it", cfg.storage.uri)
    return cfg


def _check_reachable(cfg: Config, run: str) -> None:
    """One short request per S3 location, with no retries: an endpoint that accepts connections and never
    answers would hold every read after it for minutes without a word."""
    for name, value, uri in (("storage.uri", cfg.storage.uri, run), ("data.train", cfg.data.train, cfg.data.train),
                             ("data.val", cfg.data.val, cfg.data.val)):
        try:
            storage.check_reachable(uri)
        except storage.StorageError as e:
            raise PreflightError(f"{name}={value!r}: {e}") from None


def _read_data(cfg: Config) -> tuple[list[dict], list[str]]:
    """(the training split's classes, the run's tasks), both splits checked against ``cfg`` and each other;
    fills ``model.num_classes`` and ``model.thing_classes`` from the data where the config leaves them unset
    (``config.with_classes``; a set value that disagrees is an error naming both)."""
    train = _manifest(cfg.data.train, "data.train")
    classes = train["classes"]
    try:
        cfg.model = with_classes(cfg, classes, f"data.train={cfg.data.train!r}").model
    except ConfigError as e:
        raise PreflightError(str(e)) from None
    val = _manifest(cfg.data.val, "data.val") if cfg.data.val else None
    if val:
        if [c["name"] for c in val["classes"]] != [c["name"] for c in classes]:
            raise PreflightError(f"data.val={cfg.data.val!r} has different classes from data.train="
                                 f"{cfg.data.train!r}; prepare both splits of the same dataset")
    else:
        log.warning("data.val is empty: training runs without evaluation")
    return classes, _run_tasks(cfg, train, val)


def _resume_point(cfg: Config, classes: list[dict]) -> tuple[str | None, int]:
    """(checkpoint the run resumes from or None, its position in the data stream); a new run's
    ``model.weights`` are read here, so a bad file fails on the driver, not in every worker."""
    try:
        found = check_resume(cfg, classes)
    except CheckpointError as e:
        raise PreflightError(str(e)) from None
    if not found and cfg.model.weights:
        try:
            initial_weights(cfg)
        except (CheckpointError, storage.StorageError) as e:
            raise PreflightError(f"model.weights: {e}") from None
    return found or (None, 0)


def _check_writable(cfg: Config, run: str) -> None:
    try:
        storage.check_writable(run)
    except storage.StorageError as e:
        raise PreflightError(
            f"storage.uri={cfg.storage.uri!r}: cannot write the run directory {run}: {e}. Fix: point "
            "storage.uri at a writable directory or bucket (and storage.endpoint_url / AWS_ENDPOINT_URL "
            "at the S3 service)") from None


def preflight(cfg: Config) -> TrainPlan:
    """Check storage and datasets against ``cfg`` before any worker starts; generate the synthetic
    dataset when ``data.train`` is empty. Raises PreflightError naming the field / URI and fix."""
    cfg = _resolve_config(cfg)
    run = run_uri(cfg)
    _check_reachable(cfg, run)
    classes, tasks = _read_data(cfg)
    resume_from, resume_images = _resume_point(cfg, classes)
    _check_writable(cfg, run)  # last: the probe creates the run directory, which a failed check must not leave
    return TrainPlan(cfg=cfg, run_uri=run, classes=classes, tasks=tasks, resume_from=resume_from,
                     resume_images=resume_images)


def _quiet_ray_report_log() -> None:
    """Ray Train logs every ``report`` call's whole metrics dict at INFO, which buries the loop's
    own progress lines; that logger is named after its module's file path."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its log lines stay, nothing else changes
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_worker(config: dict) -> None:
    """Ray Train's per-worker function: adapts Ray's model / data / report to ``train_loop``.
    ``config``: {"plan": the driver's TrainPlan}."""
    # the model, the loop and the evaluation are imported here, in the workers only: the job's driver,
    # a sweep's trial actors and Train's controller import this module too and need none of them
    # (torchvision and scipy alone take about 2 s to import)
    from mpformer_ray.data.pipeline import stream_batches
    from mpformer_ray.evaluation.report import Evaluation
    from mpformer_ray.evaluation.runner import evaluate_split
    from mpformer_ray.model import build_model
    from mpformer_ray.train.loop import train_loop

    setup_logging()
    _quiet_ray_report_log()
    plan: TrainPlan = config["plan"]
    cfg = plan.cfg
    storage.configure(cfg.storage)
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    # same seed on every rank for the model init (DDP also broadcasts rank 0's weights);
    # the loop's random draws (pilot noise) then differ because the data differs
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    # every parameter takes part in every step (tests/test_model.py), so DDP needs no search for unused ones
    model = ray.train.torch.prepare_model(model)
    shard = ray.train.get_dataset_shard("train")
    store = CheckpointStore(plan.run_uri, keep=cfg.train.keep_checkpoints, job=plan.job)

    def evaluate(net: torch.nn.Module) -> Evaluation:
        return evaluate_split(net, cfg.data.val, cfg, plan.classes, device=device, rank=rank, world_size=world_size,
                              max_images=cfg.train.eval_max_images)

    train_loop(
        model,
        # the shard starts where this attempt resumes (train_stream), so the position needs no skipping
        lambda start: stream_batches(shard, cfg.train.batch_size, seed=cfg.train.seed + rank, device=device,
                                     size_divisibility=cfg.model.size_divisibility),
        cfg,
        ray.train.report,
        store,
        classes=plan.classes,
        device=device,
        rank=rank,
        world_size=world_size,
        evaluate=evaluate if cfg.data.val else None,
        main_metric=plan.main_metric,
        # the driver's choice; after a restart (train.max_failures), what this job saved since
        resume_from=store.job_latest() or plan.resume_from,
    )


def _quiet_ray_data() -> None:
    """Ray Data's progress bars and execution plan, which would bury the training log (it reports
    throughput and data wait itself)."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def train_stream(plan: TrainPlan):
    """The Ray Dataset an attempt of ``plan`` trains on: the data stream from where the attempt
    resumes (this job's newest checkpoint after a restart, else the driver's choice) to
    ``train.max_iters``. Ray Train calls it in its controller at every worker-group start."""
    from mpformer_ray.data.stream import build_train_stream

    setup_logging()
    _quiet_ray_data()
    cfg = plan.cfg
    storage.configure(cfg.storage)
    pointer = CheckpointStore(plan.run_uri, job=plan.job).job_pointer()
    start = images_done(pointer.get("data", {}), pointer["iteration"], cfg) if pointer else plan.resume_images
    stop = cfg.train.max_iters * cfg.train.batch_size * cfg.train.workers
    log.info("training data: the stream of %s from image %d", cfg.data.train, start)
    return build_train_stream(cfg.data.train, cfg, start=start, stop=stop)


def build_trainer(plan: TrainPlan, callbacks: list | None = None) -> ray.train.torch.TorchTrainer:
    """A TorchTrainer for ``plan``: ``train.workers`` DDP workers, each with
    ``train.cpus_per_worker`` CPUs (and a GPU when ``train.use_gpu``), restarted up to
    ``train.max_failures`` times unless the error is one no restart fixes (``failure.FailFast``),
    Ray's run files under the run directory."""
    cfg, t = plan.cfg, plan.cfg.train
    _quiet_ray_data()
    fs, path = storage.resolve(cfg.storage.uri)
    return ray.train.torch.TorchTrainer(
        train_worker,
        train_loop_config={"plan": plan},
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.workers, use_gpu=t.use_gpu, resources_per_worker=worker_bundle(t)),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            callbacks=[FailFast(), *(callbacks or [])],
        ),
        datasets={"train": functools.partial(train_stream, plan)},
    )


# merged into the job's runtime environment (Ray refuses keys that ``ray job submit`` also set)
RUNTIME_ENV = {"worker_process_setup_hook": "mpformer_ray.ray_hooks.setup_worker"}


def init_ray(address: str | None = None) -> bool:
    """Connect to ``address`` / ``RAY_ADDRESS`` (a cluster or ``ray job submit``), else start a
    local Ray on this machine's cores; either way with ``RUNTIME_ENV`` and this process's storage options. Returns whether it started
    that local Ray, a cluster of this one machine."""
    if ray.is_initialized():
        return False
    # the storage options reach every worker of the job (storage.configure), and so does a test's fault injection
    env_vars = {**storage.env_vars(), **({FAULT_ENV: os.environ[FAULT_ENV]} if FAULT_ENV in os.environ else {})}
    runtime_env = {**RUNTIME_ENV, "env_vars": env_vars}
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, runtime_env=runtime_env)
        return False
    ray.init(num_cpus=len(os.sched_getaffinity(0)), runtime_env=runtime_env)
    return True


def check_resources(cfg: Config, own_instance: bool = False) -> None:
    """Refuse, before any worker starts, what the connected cluster can never run: Train workers
    that leave Ray Data no whole CPU on any node (training would hang), local paths on more than one
    machine (``mpformer_ray.train.cluster``). Where nodes may still come (an autoscaler), warn.
    ``own_instance``: ``init_ray`` started the cluster here, so it cannot grow."""
    errors = []
    for finding in findings(current_cluster(own_instance), cfg):
        if finding.fatal:
            errors.append(finding.message)
        else:
            log.warning("%s", finding.message)
    if errors:
        raise PreflightError("\n".join(errors))


def run_training(cfg: Config, address: str | None = None) -> tuple[TrainPlan, ray.train.Result]:
    """Pre-flight, start (or join) Ray, train, and return (plan, Ray's Result); raises
    PreflightError before any worker starts, or Ray's TrainingFailedError when workers fail
    more than ``train.max_failures`` times."""
    plan = preflight(cfg)
    check_resources(plan.cfg, own_instance=init_ray(address))
    result = build_trainer(plan).fit()
    return plan, result
