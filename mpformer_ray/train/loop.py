"""The training loop: one plain function, runnable without Ray.

Ray Train's per-worker function (``trainer.py``) adapts Ray's pieces to this loop's
arguments: the DDP-wrapped model, a per-epoch batch iterator over the worker's Ray
Data shard, ``ray.train.report`` as the reporter and a CheckpointStore. Tests call it
directly with ``local_batches`` and a local directory.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from mpformer_ray import storage
from mpformer_ray.amp import resolve_amp
from mpformer_ray.config import Config, ConfigError
from mpformer_ray.model.criterion import total_loss
from mpformer_ray.train.checkpoint import CheckpointStore, initial_weights, load_checkpoint
from mpformer_ray.train.events import EventLog
from mpformer_ray.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

# (images [B, 3, H, W] float normalised, targets: B x {"labels": int64 [n], "masks": bool [n, H, W]})
Batch = tuple[torch.Tensor, list[dict[str, torch.Tensor]]]
EpochBatches = Callable[[int], Iterable[Batch]]
Reporter = Callable[[dict[str, float]], None]
Evaluate = Callable[[nn.Module], dict[str, float]]


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


def _maybe_inject_fault(cfg: Config, store: CheckpointStore, iteration: int, rank: int) -> None:
    """``train.fail_at_iter``: rank 0 dies once (marked in storage) to exercise recovery."""
    if rank != 0 or iteration != cfg.train.fail_at_iter:
        return
    marker = fault_marker(store.run_uri, iteration)
    if storage.exists(marker, store.endpoint_url):
        return
    storage.write_bytes(marker, b"1", store.endpoint_url)
    log.warning("train.fail_at_iter=%d: killing this worker (fault injection)", iteration)
    logging.shutdown()
    os._exit(1)


def _batches(epoch_batches: EpochBatches, epoch: int, skip: int) -> Iterator[tuple[int, int, Batch]]:
    """Endless (epoch, batches consumed in that epoch, batch), starting after ``skip`` batches
    of ``epoch`` (the data position saved in a checkpoint)."""
    while True:
        seen = 0
        for batch in epoch_batches(epoch):
            seen += 1
            if seen > skip:
                yield epoch, seen, batch
        if seen == 0:
            raise RuntimeError(f"the training data yielded no batches in epoch {epoch}: give data.train at "
                               "least train.workers x train.batch_size images")
        epoch, skip = epoch + 1, 0


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


def _format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train_loop(
    model: nn.Module,
    epoch_batches: EpochBatches,
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
        epoch_batches: ``epoch -> iterable of (images [B, 3, H, W], targets)`` for this rank.
        reporter: called with the metrics of every log period / evaluation (all ranks call it
            the same number of times: Ray's ``report`` is a barrier).
        store: where checkpoints go (rank 0 writes).
        classes: the dataset's class list (manifest ``classes``), saved in checkpoints.
        evaluate: ``model -> metrics``, called on every rank every ``train.eval_period``
            iterations and at the end; None skips evaluation.
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
    core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    optimizer = build_optimizer(core, t)
    scheduler = build_scheduler(optimizer, t)
    amp_dtype = resolve_amp(t.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start, epoch, skip, best, starts = 0, 0, 0, None, []
    if resume_from:
        ckpt = load_checkpoint(resume_from, store.endpoint_url)
        core.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start, best, starts = ckpt["iteration"], ckpt["best"], list(ckpt["starts"])
        epoch, skip = ckpt["data"]["epoch"], ckpt["data"]["batches"]
        if rank == 0:
            log.info("resuming from %s at iteration %d (epoch %d, %d batches in)", resume_from, start, epoch, skip)
    elif cfg.model.weights:
        # a new run starting from given weights (e.g. converted Mask2Former ones); a resumed run has its own
        core.load_state_dict(initial_weights(cfg, store.endpoint_url), strict=False)
        if rank == 0:
            log.info("starting from the weights of %s", cfg.model.weights)
    starts.append(start)
    if start >= t.max_iters:
        if rank == 0:
            log.info("run already finished (iteration %d >= train.max_iters %d): raise train.max_iters to "
                     "continue it, or set another run.name (or delete %s) to train from scratch",
                     start, t.max_iters, store.run_uri)
        return dict(ckpt["metrics"])

    # rank 0's curves for TensorBoard, copied beside the checkpoints (also when training stops early)
    events = EventLog(store.run_uri, store.endpoint_url) if rank == 0 else None
    try:
        images_per_iter = t.batch_size * world_size
        batches = _batches(epoch_batches, epoch, skip)
        window, last = _Window(), {}
        model.train()
        tick = time.perf_counter()
        for it in range(start, t.max_iters):
            epoch, consumed, batch = next(batches)
            images, targets = _to_device(batch, device)
            got_data = time.perf_counter()

            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                losses = model(images, targets)
            loss = total_loss(losses)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss.item()} at iteration {it} ({ {k: float(v) for k, v in losses.items()} }); "
                    "lower train.lr, raise train.warmup_iters, or set train.amp=off")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if t.clip_grad > 0:
                scaler.unscale_(optimizer)
                # one norm over the whole model (detectron2's "full_model" clipping)
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()

            done = it + 1
            now = time.perf_counter()
            window.add({k: v.detach() for k, v in losses.items()}, now - tick, got_data - tick)
            _maybe_inject_fault(cfg, store, done, rank)

            metrics: dict[str, float] = {}
            if done % t.log_period == 0 or done == t.max_iters:
                # loss values are this rank's (rank 0's in the log); averaging them across ranks
                # would cost an all-reduce per log line for no training benefit
                metrics = {"iteration": done, "epoch": epoch, "lr": max(g["lr"] for g in optimizer.param_groups),
                           **window.metrics(images_per_iter, t.max_iters - done)}
                if rank == 0:
                    log.info(
                        "iter %d/%d  loss %.3f (ce %.3f mask %.3f dice %.3f pilot %.3f)  lr %.2e  %.1f img/s  "
                        "data wait %.0f%%  eta %s", done, t.max_iters, metrics["loss"], metrics["loss_ce"],
                        metrics["loss_mask"], metrics["loss_dice"], metrics["loss_pilot"], metrics["lr"],
                        metrics["images_per_s"], 100 * metrics["data_wait"], _format_eta(metrics["eta_s"]))
                if events:
                    events.add(done, metrics, prefix="train/")
                window = _Window()

            is_best = False
            evaluating = evaluate is not None and (done == t.max_iters or (t.eval_period > 0 and done % t.eval_period == 0))
            if evaluating:
                core.eval()
                with torch.no_grad():
                    results = evaluate(core)
                model.train()
                metrics.update({"iteration": done, **results})
                if events:
                    events.add(done, results)
                if rank == 0:
                    log.info("evaluation at iteration %d: %s", done,
                             "  ".join(f"{k} {v:.4g}" for k, v in results.items()))
                if main_metric and main_metric not in results:
                    raise ConfigError(
                        f"the evaluation at iteration {done} gave no {main_metric}, the metric this run picks its best "
                        f"checkpoint by; it gave {sorted(results)}. Fix: evaluate on a data.val split with that "
                        "task's annotations and keep its model.test.*_on switch on")
                value = results.get(main_metric) if main_metric else None
                if value is not None and math.isfinite(value) and (best is None or value > best["value"]):
                    best, is_best = {"metric": main_metric, "value": float(value), "iteration": done}, True

            # checkpoint after every evaluation too, so the best-by-metric model is always on storage
            if rank == 0 and (done % t.checkpoint_period == 0 or evaluating or done == t.max_iters):
                state = {
                    "metrics": {"iteration": done, **metrics},
                    "model": core.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "iteration": done,
                    "config": cfg.to_dict(),
                    "data": {"epoch": epoch, "batches": consumed},
                    "classes": classes,
                    "best": best,
                    "starts": starts,
                }
                uri = store.save(state, is_best=is_best)
                log.info("saved checkpoint %s", uri)
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
