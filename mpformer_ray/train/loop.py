"""The training loop: one plain function, runnable without Ray.

Ray Train's per-worker function (``trainer.py``) adapts Ray's pieces to this loop's
arguments: the DDP-wrapped model, the batches of the worker's Ray Data shard,
``ray.train.report`` as the reporter and a CheckpointStore. Tests call it directly with
``local_stream`` and a local directory.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from mpformer_ray import storage
from mpformer_ray.amp import resolve_amp
from mpformer_ray.config import Config, ConfigError
from mpformer_ray.evaluation.report import Evaluation, write_evaluation
from mpformer_ray.log import format_eta
from mpformer_ray.model.criterion import total_loss
from mpformer_ray.train.checkpoint import Checkpoint, CheckpointStore, images_done, initial_weights, load_checkpoint
from mpformer_ray.train.events import EventLog
from mpformer_ray.train.failure import FAULT_ENV
from mpformer_ray.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

# (images [B, 3, H, W] float normalised, targets: B x {"labels": int64 [n], "masks": bool [n, H, W]})
Batch = tuple[torch.Tensor, list[dict[str, torch.Tensor]]]
# images all ranks together trained on before this attempt -> this rank's (epoch, batch) from there on
Stream = Callable[[int], Iterable[tuple[int, Batch]]]
Reporter = Callable[[dict[str, float]], None]
Evaluate = Callable[[nn.Module], Evaluation]
# {run}/evaluations/iteration_NNNNNNN/: each evaluation's metrics.json, per_class.csv and, with semantic,
# confusion.csv (evaluation.report)
EVALUATIONS = "evaluations"


def summarize_losses(losses: dict[str, float]) -> dict[str, float]:
    """The compact view logged every period: total, and matching-query ce / mask / dice
    (summed over decoder layers), and the pilot queries' total."""
    pilot = {k: v for k, v in losses.items() if "pilot" in k}
    matching = {k: v for k, v in losses.items() if k not in pilot}
    summary = {"loss": sum(losses.values())}
    for part in ("ce", "mask", "dice"):
        summary[f"loss_{part}"] = sum(v for k, v in matching.items() if f"_{part}" in k)
    summary["loss_pilot"] = sum(pilot.values())
    return summary


def fault_marker(run_uri: str, iteration: int) -> str:
    """Storage object that records that the injected fault at ``iteration`` already happened."""
    return storage.join(run_uri, f"fault_injected_at_{iteration}")


def _fault_iteration(cfg: Config) -> int | None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    at, _, seed = spec.partition(",seed=")
    return int(at) if not seed or int(seed) == cfg.train.seed else None


def _maybe_inject_fault(cfg: Config, store: CheckpointStore, iteration: int, rank: int) -> None:
    if rank != 0 or iteration != _fault_iteration(cfg):
        return
    marker = fault_marker(store.run_uri, iteration)
    if storage.exists(marker):
        return
    storage.write_bytes(marker, b"1")
    log.warning("%s=%s: killing this worker (fault injection)", FAULT_ENV, os.environ[FAULT_ENV])
    logging.shutdown()
    os._exit(1)


def _to_device(batch: Batch, device: torch.device) -> Batch:
    images, targets = batch
    return (images.to(device, non_blocking=True),
            [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets])


class _Window:
    """Running sums over one log period: losses, wall time, time spent waiting for data."""

    def __init__(self) -> None:
        self.iters, self.wall, self.wait = 0, 0.0, 0.0
        self.losses: dict[str, float] = {}

    def add(self, losses: dict[str, torch.Tensor], wall: float, wait: float) -> None:
        self.iters += 1
        self.wall += wall
        self.wait += wait
        for k, v in losses.items():
            self.losses[k] = self.losses.get(k, 0.0) + float(v)

    def metrics(self, images_per_iter: int, remaining: int) -> dict[str, float]:
        n = max(self.iters, 1)
        out = summarize_losses({k: v / n for k, v in self.losses.items()})
        out["images_per_s"] = images_per_iter * self.iters / max(self.wall, 1e-9)
        out["data_wait"] = self.wait / max(self.wall, 1e-9)
        out["eta_s"] = remaining * self.wall / n
        return out


@dataclass
class _Optimization:
    """What one training step updates: the model (``core`` without its DDP wrapper), the optimizer, the
    schedule and the fp16 gradient scaler; ``amp``: the autocast dtype, None for fp32."""

    model: nn.Module
    core: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp: torch.dtype | None

    @classmethod
    def build(cls, model: nn.Module, cfg: Config, device: torch.device) -> _Optimization:
        core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        optimizer = build_optimizer(core, cfg.train)
        amp = resolve_amp(cfg.train.amp, device)
        return cls(model, core, optimizer, build_scheduler(optimizer, cfg.train),
                   torch.amp.GradScaler(device.type, enabled=amp == torch.float16), amp)

    def step(self, images: torch.Tensor, targets: list[dict], it: int, clip_grad: float) -> dict[str, torch.Tensor]:
        """Forward, backward and update on one batch; returns the weighted losses."""
        with torch.autocast(images.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            losses = self.model(images, targets)
        loss = total_loss(losses)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at iteration {it} ({ {k: float(v) for k, v in losses.items()} }); "
                "lower train.lr, raise train.warmup_iters, or set train.amp=off")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            # one norm over the whole model (detectron2's "full_model" clipping)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return losses

    def load(self, ckpt: Checkpoint) -> None:
        self.core.load_state_dict(ckpt.model)
        self.optimizer.load_state_dict(ckpt.optimizer)
        self.scheduler.load_state_dict(ckpt.scheduler)
        self.scaler.load_state_dict(ckpt.scaler)

    def state(self) -> dict:
        """The Checkpoint fields this holds."""
        return {"model": self.core.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}


@dataclass
class _Progress:
    """Where a run stands: the next iteration, the data position (images all ranks trained on), the
    best evaluation so far, the iterations each attempt began at, and the last checkpoint's metrics."""

    start: int = 0
    images: int = 0
    best: dict | None = None
    starts: list[int] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)


def _start(opt: _Optimization, cfg: Config, store: CheckpointStore, resume_from: str | None, rank: int) -> _Progress:
    """Load ``resume_from`` (everything) or ``model.weights`` (the model only) and say where training starts."""
    progress = _Progress()
    if resume_from:
        ckpt = load_checkpoint(resume_from)
        opt.load(ckpt)
        progress = _Progress(ckpt.iteration, images_done(ckpt.data, ckpt.iteration, cfg), ckpt.best,
                             list(ckpt.starts), dict(ckpt.metrics))
        if rank == 0:
            log.info("resuming from %s at iteration %d (image %d of the data stream)", resume_from,
                     progress.start, progress.images)
    elif cfg.model.weights:
        # a new run starting from given weights (e.g. converted Mask2Former ones); a resumed run has its own
        opt.core.load_state_dict(initial_weights(cfg), strict=False)
        if rank == 0:
            log.info("starting from the weights of %s", cfg.model.weights)
    progress.starts.append(progress.start)
    return progress


def _evaluate(opt: _Optimization, evaluate: Evaluate, done: int, main_metric: str | None,
              progress: _Progress, rank: int, run_uri: str) -> tuple[dict[str, float], bool]:
    """Evaluate the model at iteration ``done``; returns (its metrics, whether it is the best so far by
    ``main_metric``, which then becomes ``progress.best``). Rank 0 writes the evaluation's metrics and
    per-class table into the run directory (``EVALUATIONS``)."""
    opt.core.eval()
    with torch.no_grad():
        evaluation = evaluate(opt.core)
    opt.model.train()
    results = evaluation.metrics
    if rank == 0:
        log.info("evaluation at iteration %d: %s", done, "  ".join(f"{k} {v:.4g}" for k, v in results.items()))
        # the confusion picture is jobs/evaluate.py's: a training run writes its numbers only
        write_evaluation(storage.join(run_uri, EVALUATIONS, f"iteration_{done:07d}"), evaluation, png=False)
    if main_metric and main_metric not in results:
        raise ConfigError(
            f"the evaluation at iteration {done} gave no {main_metric}, the metric this run picks its best "
            f"checkpoint by; it gave {sorted(results)}. Fix: evaluate on a data.val split with that "
            "task's annotations and keep its model.test.*_on switch on")
    value = results.get(main_metric) if main_metric else None
    if value is None or not math.isfinite(value) or (progress.best and value <= progress.best["value"]):
        return results, False
    progress.best = {"metric": main_metric, "value": float(value), "iteration": done}
    return results, True


def train_loop(
    model: nn.Module,
    stream: Stream,
    cfg: Config,
    reporter: Reporter,
    store: CheckpointStore,
    *,
    classes: list[dict],
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    evaluate: Evaluate | None = None,
    main_metric: str | None = None,
    resume_from: str | None = None,
) -> dict[str, float]:
    """Train ``model`` for ``cfg.train.max_iters`` iterations, from ``resume_from``, else from the weights
    ``model.weights`` names (optimizer and schedule new), else from the model as built.

    Args:
        model: the MP-Former, possibly DDP-wrapped; ``model(images, targets)`` returns a dict
            of already-weighted scalar losses.
        stream: ``images already trained on -> iterable of (epoch, (images [B, 3, H, W], targets))`` for
            this rank, from that position of the data stream on (``pipeline.Units``); it may end
            only after ``train.max_iters``.
        reporter: called with the metrics of every log period / evaluation (all ranks call it
            the same number of times: Ray's ``report`` is a barrier).
        store: where checkpoints go (rank 0 writes).
        classes: the dataset's class list (manifest ``classes``), saved in checkpoints.
        evaluate: ``model -> Evaluation`` (``evaluation.runner.evaluate_split``), called on every rank every
            ``train.eval_period`` iterations and at the end; None skips evaluation. Rank 0 writes each
            evaluation's files (``EVALUATIONS``) to ``{run}/evaluations/iteration_NNNNNNN/``.
        main_metric: key of ``evaluate``'s result that selects the best checkpoint (higher is better;
            ``mpformer_ray.tasks.main_metric``); an evaluation without it is a ConfigError.
        resume_from: the checkpoint every rank starts from, decided once for all of them (the
            driver's ``check_resume``, or ``store.job_latest()`` after a restart); None starts at
            iteration 0.

    Returns:
        The last reported metrics (final training window plus the final evaluation).
    """
    t = cfg.train
    device = torch.device(device)
    opt = _Optimization.build(model, cfg, device)
    progress = _start(opt, cfg, store, resume_from, rank)
    if progress.start >= t.max_iters:
        if rank == 0:
            log.info("run already finished (iteration %d >= train.max_iters %d): raise train.max_iters to "
                     "continue it, or set another run.name (or delete %s) to train from scratch",
                     progress.start, t.max_iters, store.run_uri)
        return progress.metrics

    # rank 0's curves for TensorBoard, copied beside the checkpoints (also when training stops early)
    events = EventLog(store.run_uri) if rank == 0 else None
    try:
        images_per_iter = t.batch_size * world_size
        batches = iter(stream(progress.images))
        window, last = _Window(), {}
        model.train()
        tick = time.perf_counter()
        for it in range(progress.start, t.max_iters):
            try:
                epoch, batch = next(batches)
            except StopIteration:
                raise RuntimeError(f"the training data ended at iteration {it} of {t.max_iters}") from None
            progress.images += images_per_iter
            images, targets = _to_device(batch, device)
            got_data = time.perf_counter()
            losses = opt.step(images, targets, it, t.clip_grad)
            done = it + 1
            window.add({k: v.detach() for k, v in losses.items()}, time.perf_counter() - tick, got_data - tick)
            _maybe_inject_fault(cfg, store, done, rank)

            metrics: dict[str, float] = {}
            if done % t.log_period == 0 or done == t.max_iters:
                # loss values are this rank's (rank 0's in the log); averaging them across ranks
                # would cost an all-reduce per log line for no training benefit
                metrics = {"iteration": done, "epoch": epoch, "lr": max(g["lr"] for g in opt.optimizer.param_groups),
                           **window.metrics(images_per_iter, t.max_iters - done)}
                if rank == 0:
                    log.info(
                        "iter %d/%d  loss %.3f (ce %.3f mask %.3f dice %.3f pilot %.3f)  lr %.2e  %.1f img/s  "
                        "data wait %.0f%%  eta %s", done, t.max_iters, metrics["loss"], metrics["loss_ce"],
                        metrics["loss_mask"], metrics["loss_dice"], metrics["loss_pilot"], metrics["lr"],
                        metrics["images_per_s"], 100 * metrics["data_wait"], format_eta(metrics["eta_s"]))
                if events:
                    events.add(done, metrics, prefix="train/")
                window = _Window()

            is_best = False
            evaluating = evaluate is not None and (done == t.max_iters or (t.eval_period > 0 and done % t.eval_period == 0))
            if evaluating:
                results, is_best = _evaluate(opt, evaluate, done, main_metric, progress, rank, store.run_uri)
                metrics.update({"iteration": done, **results})
                if events:
                    events.add(done, results)

            # checkpoint after every evaluation too, so the best-by-metric model is always on storage
            if rank == 0 and (done % t.checkpoint_period == 0 or evaluating or done == t.max_iters):
                ckpt = Checkpoint(**opt.state(), iteration=done, metrics={"iteration": done, **metrics},
                                  config=cfg.to_dict(), data={"epoch": epoch, "images": progress.images},
                                  classes=classes, best=progress.best, starts=progress.starts)
                log.info("saved checkpoint %s", store.save(ckpt, is_best=is_best))
                if events:
                    events.sync()
            if metrics:
                reporter(metrics)
                last = metrics
            tick = time.perf_counter()  # logging, evaluation and checkpoints are not training throughput
        return last
    finally:
        if events:
            events.close()
