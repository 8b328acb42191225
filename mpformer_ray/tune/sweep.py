"""Ray Tune wiring: a sweep is many runs of the training job, each a Tune trial.

With Ray 2.60's Train V2 a Tuner does not wrap a TorchTrainer; a trial is a function that
builds the training job's own TorchTrainer (``build_trainer``: same loop, workers, Ray Data
input, checkpoint store) for its sampled config and fits it. Evaluations reach Tune through
a ``TuneReportCallback`` on the Train controller, where ASHA and Optuna see them.

Layout of a sweep under ``{storage.uri}/{run.name}/`` (local or ``s3://``)::

    tuner.pkl, experiment_state-*.json, searcher / scheduler state   Tune's, for resume
    sweep.json                     the sweep file and base config it started with
    <trial_id>/                    one trial: Tune's result files and the training run
      checkpoints/model_*.pth      (the training job's own layout and retention)
    trials.csv, best_config.yaml, plots/*.png                         written at the end

What makes this work on Ray 2.60; without each, a sweep hangs or cannot resume:

- The trial function asks for no CPU (its Train workers ask for theirs). A trial holding the CPUs
  its own workers need deadlocks the sweep without a word (worker-group start timeouts retried
  forever), and even a fraction of a CPU leaves Ray Data no whole CPU to read with.
- Each trial's TorchTrainer has its own storage path and name, the trial's run directory
  ``{storage.uri}/{run.name}/<trial_id>``; with Train's defaults it writes to ``~/ray_results``
  and a restarted trial cannot find its checkpoints.
- Every Ray worker process gets ``RAY_ADDRESS`` set to this cluster's GCS
  (``mpformer_ray.ray_hooks``). When a trial stops, Train's placement-group cleaner asks Ray's
  state API whether the trial's controller is gone; without the address it may ask another Ray
  instance on the machine (or none), fail, and the stopped trial's workers never release their
  CPUs, so the next trial waits forever.
- ASHA counts the iteration the training loop reports, not Tune's ``training_iteration``, which
  starts again from 1 when a trial resumes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
from dataclasses import dataclass
from typing import Any

from mpformer_ray import storage
from mpformer_ray.config import Config, flatten, to_yaml
from mpformer_ray.tune.space import Sweep, SweepError, trial_config
from mpformer_ray.train.trainer import TrainPlan, build_trainer, check_resources, init_ray, preflight

log = logging.getLogger(__name__)

# Tune saves its experiment state at most this often (seconds); a killed driver loses at most
# this much of the sweep's bookkeeping (the trials' own checkpoints are separate)
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "10")
# a trial that does not stop within this many seconds of ASHA's decision is killed (default 600)
os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", "10")

# import after the environment is set: Tune reads it at import time
import ray  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.experiment import Trial  # noqa: E402
from ray.tune.integration.ray_train import TuneReportCallback  # noqa: E402
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler  # noqa: E402
from ray.tune.search import BasicVariantGenerator  # noqa: E402

SWEEP_STATE = "sweep.json"


class EvaluationReport(TuneReportCallback):
    """Forward to Tune only the reports that carry the objective (the evaluations): Tune
    requires the objective in every result, and ASHA / Optuna should only see evaluations.
    The training-window reports stay in the trial's own log."""

    def __init__(self, metric: str) -> None:
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if metrics and self.metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def run_trial(params: dict[str, Any], plan: TrainPlan, sweep_uri: str) -> None:
    """One Tune trial: the training job for ``plan.cfg`` with ``params`` ({dotted field: value})
    applied, its run directory ``{sweep_uri}/{trial_id}`` (a restarted trial resumes there)."""
    from mpformer_ray.log import setup_logging

    setup_logging()
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(plan.cfg, params)
    cfg.storage.uri, cfg.run.name = sweep_uri, trial_id
    # the training job's own checks, resume decision included (a restarted trial's checkpoint)
    trial_plan = preflight(cfg)
    build_trainer(trial_plan, callbacks=[EvaluationReport(trial_plan.main_metric)]).fit()


@dataclass
class SweepResult:
    """What a finished (or already finished) sweep hands back to the job."""

    uri: str
    metric: str
    grid: Any  # ray.tune.ResultGrid
    plan: TrainPlan
    # trials an interrupted sweep left running or waiting; rerunning the job continues them
    unfinished: frozenset[str] = frozenset()


def concurrency_problem(cpus: float, cfg: Config, concurrent: int) -> str | None:
    """Why ``concurrent`` trials cannot all train on one node of ``cpus`` CPUs, or None. Each trial's
    Ray Data execution gets an equal share of the *whole* CPUs its Train workers leave on the node
    (Ray 2.60's coordinator: ``leftover // requesters``) and needs at least one, else it never
    starts a read task and the trial hangs."""
    t = cfg.train
    if concurrent < 2 or t.use_gpu:
        return None
    per_trial = t.workers * t.cpus_per_worker
    fits = [k for k in range(1, concurrent + 1) if (cpus - k * per_trial) // k >= 1]
    if len(fits) == concurrent:
        return None
    most = max(fits, default=0)
    return (f"--max-concurrent {concurrent}: on this machine's {cpus:g} CPUs, {concurrent} trials of train.workers x "
            f"train.cpus_per_worker ({t.workers} x {t.cpus_per_worker:g}) leave Ray Data less than one whole CPU per "
            f"trial, and a trial without one hangs. Fix: --max-concurrent {most}" if most else
            f"--max-concurrent {concurrent}: this machine's {cpus:g} CPUs cannot run even one trial of "
            f"train.workers x train.cpus_per_worker ({t.workers} x {t.cpus_per_worker:g}) with a whole CPU left for "
            "Ray Data. Fix: lower train.cpus_per_worker or train.workers")


def _search_alg(sweep: Sweep, metric: str):
    if sweep.search == "grid":
        # Tune ignores max_concurrent_trials for a generator it did not build itself
        return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=sweep.max_concurrent)
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(metric=metric, mode="max", points_to_evaluate=sweep.points_to_evaluate or None,
                        seed=sweep.seed)


def _reported(trial, time_attr: str, metric: str) -> list[tuple[float, float]]:
    """(time, objective) of every result ``trial`` reported, from its result.json in storage."""
    fs = trial.storage.storage_filesystem
    path = posixpath.join(trial.storage.trial_fs_path, "result.json")
    try:
        with fs.open_input_stream(path) as f:
            lines = f.read().decode().splitlines()
    except (FileNotFoundError, OSError):
        return []
    results = [json.loads(line) for line in lines if line.strip()]
    return [(r[time_attr], r[metric]) for r in results if time_attr in r and r.get(metric) is not None]


class ResumableASHA(ASHAScheduler):
    """ASHA whose rungs survive a driver restart. Tune restores a sweep's scheduler as it was
    pickled when the sweep started, with no rung recorded, so a resumed trial would be compared
    with nobody; at its first decision in a new driver this scheduler replays every trial's
    reported evaluations (their result.json) into the rungs, as if it had seen them live."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._replayed = False

    def __setstate__(self, state: dict) -> None:
        # unpickled = restored: its rungs may lag behind what the trials reported
        self.__dict__.update(state, _replayed=False)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if not self._replayed:
            self._replayed = True
            for known in tune_controller.get_trials():
                if known.trial_id not in self._trial_info:
                    self.on_trial_add(tune_controller, known)
                bracket = self._trial_info[known.trial_id]
                for time, value in _reported(known, self._time_attr, self._metric):
                    bracket.on_result(known, time, self._metric_op * value)
        return super().on_trial_result(tune_controller, trial, result)


def _scheduler(sweep: Sweep, cfg: Config):
    if sweep.scheduler == "none":
        return FIFOScheduler()
    # a resumed trial restarts Tune's own training_iteration; the reported iteration does not
    return ResumableASHA(time_attr="iteration", max_t=cfg.train.max_iters,
                        grace_period=sweep.grace_iters(cfg.train.max_iters), reduction_factor=sweep.reduction_factor)


def _sweep_state(sweep: Sweep, cfg: Config) -> dict:
    """What defines a sweep; a rerun with a different one under the same run.name is refused."""
    return {"sweep": dataclasses.asdict(sweep) | {"path": os.path.basename(sweep.path)}, "config": cfg.to_dict()}


def _check_same_sweep(uri: str, state: dict) -> None:
    """Refuse to continue a sweep with another sweep file or config. Only what the sweep was
    started with counts: a field a later version of the platform added (with its default) does not
    make a sweep un-resumable, and the CLI may change how many trials run at once."""
    saved = json.loads(storage.read_bytes(storage.join(uri, SWEEP_STATE)))
    now = {**flatten(state["sweep"], "sweep "), **flatten(state["config"])}
    changed = sorted(k for k, v in {**flatten(saved["sweep"], "sweep "), **flatten(saved["config"])}.items()
                     if k != "sweep max_concurrent" and now.get(k, v) != v)
    if changed:
        raise SweepError(f"{uri} holds a sweep started with another sweep file or config (differs in: "
                         f"{', '.join(changed)}); rerun it unchanged to resume, or set another run.name")


def run_sweep(cfg: Config, sweep: Sweep, *, resume: bool = False, address: str | None = None) -> SweepResult:
    """Run (or resume, or just report) the sweep ``{cfg.storage.uri}/{cfg.run.name}``.

    Pre-flight checks run on the driver before any trial starts (storage writable, datasets
    readable, the sweep's fields valid). An existing sweep there is resumed: finished trials
    are not rerun, unfinished ones continue from their latest checkpoint, the searcher's
    state is restored. ``resume=True`` requires an existing sweep.
    """
    # what the directory holds decides before preflight, which creates it
    uri = storage.join(storage.absolute(cfg.storage.uri), cfg.run.name)
    storage.configure(cfg.storage)
    existing = storage.exists(storage.join(uri, SWEEP_STATE))
    if resume and not existing:
        raise SweepError(f"--resume: no sweep to resume at {uri} (no {SWEEP_STATE}); run without --resume to start it")
    if not existing and storage.exists(storage.join(uri, "checkpoints")):
        raise SweepError(f"{uri} holds a training run (checkpoints/), not a sweep; set another run.name for the sweep")
    plan = preflight(cfg)
    fs, root = storage.resolve(plan.cfg.storage.uri)
    exp_path = storage.resolve(uri)[1]
    state = _sweep_state(sweep, plan.cfg)
    if existing:
        _check_same_sweep(uri, state)
    own_instance = init_ray(address)
    check_resources(plan.cfg, own_instance=own_instance)
    if own_instance and (problem := concurrency_problem(ray.cluster_resources().get("CPU", 0.0), plan.cfg,
                                                         sweep.max_concurrent)):
        raise SweepError(problem)

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, plan=plan, sweep_uri=uri),
        # The trial only waits on its TorchTrainer, so it takes no CPU: any fraction of one
        # (even 0.01) leaves the node less than a whole free CPU, and Ray Data, which gets
        # whole CPUs from Train's resource coordinator, then never starts a read task.
        # A bundle needs some resource; a MiB of memory is one no Train worker asks for.
        tune.PlacementGroupFactory([{"CPU": 0, "memory": 2**20}]),
    )
    if existing and tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        log.info("resuming the sweep at %s: finished trials are kept, unfinished ones continue "
                 "from their latest checkpoint", uri)
        tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False, storage_filesystem=fs)
    else:
        storage.write_bytes(storage.join(uri, SWEEP_STATE), json.dumps(state, indent=1).encode())
        metric = plan.main_metric
        tuner = tune.Tuner(
            trainable,
            param_space=sweep.tune_space(),
            tune_config=tune.TuneConfig(
                metric=metric, mode="max", search_alg=_search_alg(sweep, metric), scheduler=_scheduler(sweep, plan.cfg),
                num_samples=sweep.num_samples, trial_name_creator=lambda t: t.trial_id,
                trial_dirname_creator=lambda t: t.trial_id,
                # the grid's generator holds the limit itself (Tune would only warn about it)
                max_concurrent_trials=None if sweep.search == "grid" else sweep.max_concurrent,
                # a reused actor would have to end a stopped trial's fit() within Tune's 2 s
                # reset timeout, or the next trial fails; a new actor per trial costs its imports
                reuse_actors=False),
            run_config=tune.RunConfig(
                name=plan.cfg.run.name, storage_path=root, storage_filesystem=fs,
                # a failed trial is recorded with its reason and the sweep goes on; Ray Train
                # already retried it train.max_failures times
                failure_config=tune.FailureConfig(max_failures=0)),
        )
    grid = tuner.fit()
    return SweepResult(uri=uri, metric=plan.main_metric, grid=grid, plan=plan, unfinished=_unfinished(grid))


def _unfinished(grid: Any) -> frozenset[str]:
    """Ids of the trials Tune's saved experiment state has neither ended nor failed. The results an
    interrupted ``fit()`` returns do not tell: Tune marks every trial terminated after saving the
    state, so a trial cut short by Ctrl-C would pass for one ASHA stopped."""
    saved = tune.ExperimentAnalysis(grid.experiment_path, storage_filesystem=grid.filesystem)
    return frozenset(t.trial_id for t in saved.trials if t.status not in (Trial.TERMINATED, Trial.ERROR))


def best_config(result: SweepResult) -> tuple[Config, Any]:
    """(the best trial's full config, its Tune Result): the objective at each trial's last
    evaluation, the same metric the training job picks its best checkpoint by. The config's
    run.name is ``{sweep}-best`` under the sweep's storage.uri, so training it starts a new run."""
    try:
        best = result.grid.get_best_result(metric=result.metric, mode="max", scope="last", filter_nan_and_inf=True)
    except RuntimeError:
        best = None
    # a sweep of one trial gets that trial back whether or not it reported the objective
    if best is None or (best.metrics or {}).get(result.metric) is None:
        raise SweepError(f"no trial of {result.uri} reported {result.metric}; see the trials table for the "
                         "reasons")
    cfg = trial_config(result.plan.cfg, best.config)
    cfg.run.name = f"{result.plan.cfg.run.name}-best"
    return cfg, best


def best_config_yaml(cfg: Config, trial_id: str, metric: str, value: float) -> str:
    header = (f"# Best trial {trial_id} of sweep {cfg.run.name.removesuffix('-best')}: {metric} {value:.4f} at its last "
              "evaluation.\n# Train it: python jobs/train.py --config <this file>\n")
    return header + to_yaml(cfg)


def finish_sweep(result: SweepResult, sweep: Sweep) -> str:
    """Write the trials table, best_config.yaml and plots under the sweep's URI; returns the
    text the job prints (table, best trial, where everything is)."""
    from mpformer_ray.tune import report

    cfg, metric = result.plan.cfg, result.metric
    names = [p.name for p in sweep.params]
    table = report.trials_table(result.grid, metric, names, cfg.train.max_iters, result.unfinished)
    try:
        best_cfg, best = best_config(result)
    except SweepError as e:
        best_cfg, best, missing = None, None, str(e)
    best_yaml = (best_config_yaml(best_cfg, best.metrics.get("trial_id", "?"), metric, best.metrics[metric])
                 if best is not None else None)
    pngs = report.plots(table, report.learning_curves(result.grid, metric), metric, names)
    written = report.write_outputs(result.uri, table, best_yaml, pngs)
    lines = [f"\nsweep {result.uri}: {len(table)} trials, objective {metric} (higher is better)\n",
             report.table_text(table)]
    if result.unfinished:
        lines += ["", f"interrupted: {len(result.unfinished)} trial(s) unfinished; rerun the same command (or add "
                      "--resume) to continue them from their latest checkpoints"]
    if best is None:
        if not result.unfinished:
            raise SweepError(f"{missing}\n" + "\n".join(lines))
        return "\n".join(lines)  # interrupted before any evaluation: nothing to rank yet
    lines += ["", f"best trial:    {best.metrics.get('trial_id')}  {metric} {best.metrics[metric]:.4f}  "
                  + "  ".join(f"{n}={best.config.get(n)}" for n in names),
              f"best config:   {written['best_config.yaml']}  (python jobs/train.py --config <it>)",
              f"trials table:  {written['trials.csv']}",
              f"plots:         {storage.join(result.uri, 'plots')}/"]
    return "\n".join(lines)
