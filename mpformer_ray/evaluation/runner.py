"""Run a model over a validation split: PQ / AP / mIoU plus MP-Former's per-layer mask consistency.

One function, ``evaluate_split`` (metrics, per-class table, confusion matrix), used by ``jobs/evaluate.py``
and by every training worker at each evaluation period; ``evaluate_model`` gives its metrics alone.
Images are evaluated one at a time at the test resolution (``data.test_short_side`` /
``data.test_max_size``), and predictions are resized back to the original resolution inside the
model, so metrics compare against the untouched ground truth.

Distributed use: rank r of W evaluates images r, r + W, r + 2W, ... (after the first
``max_images``); when ``torch.distributed`` is initialised the per-rank metric states are
gathered with ``all_gather_object`` and every rank returns the same merged metrics.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mpformer_ray.amp import resolve_amp
from mpformer_ray.config import Config
from mpformer_ray.data.records import DataError, decode_row, read_manifest, shard_rows
from mpformer_ray.data.transforms import eval_transform, normalize
from mpformer_ray.evaluation.consistency import MaskConsistency
from mpformer_ray.evaluation.evaluator import Evaluator
from mpformer_ray.evaluation.report import Evaluation
from mpformer_ray.log import format_eta
from mpformer_ray.model.transformer_decoder import DecoderOutput
from mpformer_ray.tasks import tasks_for

log = logging.getLogger(__name__)

PROGRESS_EVERY = 50  # images between progress lines (rank 0)


def shard_records(uri: str, rank: int, world_size: int, max_images: int = 0) -> Iterator[dict]:
    """Decoded records ``rank, rank + world_size, ...`` of the split's first ``max_images``
    (all when 0). Rows other ranks take are skipped before decoding, so each image is decoded
    by one rank only."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}); got {rank}")
    manifest = read_manifest(uri)
    index = 0
    for shard in manifest["shards"]:
        for row in shard_rows(uri, shard["file"]):
            if 0 < max_images <= index:
                return
            if index % world_size == rank:
                yield decode_row(row)
            index += 1


def _gt_targets(record: dict, resized_hw: tuple[int, int], padded_hw: tuple[int, int], mask_hw: tuple[int, int],
                device: torch.device) -> list[dict[str, torch.Tensor]]:
    """The record's non-crowd segments as a one-image matcher target at the model's mask resolution.

    The masks are resized to the network input size (``resized_hw``), padded like the image to
    ``padded_hw``, then reduced to ``mask_hw`` (nearest), so each mask cell lines up with the
    predicted mask cell it is compared with."""
    segments = [s for s in record["segments"] if not s["iscrowd"]]
    labels = torch.tensor([s["category_id"] for s in segments], dtype=torch.int64, device=device)
    if not segments:
        return [{"labels": labels, "masks": torch.zeros((0, *mask_hw), dtype=torch.bool, device=device)}]
    masks = torch.from_numpy(np.stack([s["mask"] for s in segments])).to(device)[None].float()
    masks = F.interpolate(masks, size=resized_hw, mode="nearest")
    masks = F.pad(masks, (0, padded_hw[1] - resized_hw[1], 0, padded_hw[0] - resized_hw[0]))
    masks = F.interpolate(masks, size=mask_hw, mode="nearest")[0] > 0.5
    return [{"labels": labels, "masks": masks}]


def _consistency_update(model: nn.Module, raw: DecoderOutput, record: dict, resized_hw: tuple[int, int],
                        padded_hw: tuple[int, int], meter: MaskConsistency) -> None:
    """Match the final prediction's queries to the image's ground truth and feed every prediction's
    masks of the matched queries to ``meter``.

    raw: ``model.forward_raw`` of the one image, resized to ``resized_hw`` and padded to ``padded_hw``."""
    mask_hw = tuple(raw.pred_masks.shape[-2:])
    device = raw.pred_masks.device
    targets = _gt_targets(record, resized_hw, padded_hw, mask_hw, device)
    if len(targets[0]["labels"]) == 0:
        return
    # the matcher samples random points: seed them per image, in a forked RNG, so the diagnostic is
    # reproducible (and equal however the images are split over ranks) and training's RNG stream
    # is left untouched by an evaluation in the middle of it
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(int(record["image_id"]))
        query_idx, _ = model.criterion.matcher(raw.pred_logits, raw.pred_masks, targets)[0]
    meter.update([m[0].float() for m in raw.query_masks()], query_idx)


@dataclass
class _Progress:
    """Progress lines of rank 0 over its ``own`` share of the ``total`` images."""

    rank: int
    world_size: int
    total: int
    start: float
    done: int = 0

    @property
    def own(self) -> int:
        return len(range(self.rank, self.total, self.world_size))

    def tick(self) -> None:
        self.done += 1
        own = self.own
        if self.rank == 0 and (self.done % PROGRESS_EVERY == 0 or self.done == own):
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            log.info("evaluation: %d/%d images on rank 0 (%.1f images/s, eta %s, %d ranks, %d images in all)",
                     self.done, own, rate, format_eta((own - self.done) / max(rate, 1e-9)), self.world_size,
                     self.total)


def _process(core: nn.Module, records: Iterator[dict], cfg: Config, device: torch.device, evaluator: Evaluator,
             consistency: MaskConsistency, progress: _Progress) -> None:
    """Predict every record (one image at a time, under ``train.amp``) into ``evaluator`` and ``consistency``."""
    amp_dtype = resolve_amp(cfg.train.amp, device)
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        for record in records:
            image, original_hw = eval_transform(record, cfg.data)
            resized_hw = tuple(image.shape[:2])
            images = normalize(torch.tensor(image)[None].to(device))  # a copy: PIL's arrays are read-only
            # one decoder pass serves both the metrics (post-processed, as model(images, ...) would)
            # and the consistency diagnostic (every layer's raw masks)
            raw = core.forward_raw(images)
            padded_hw = tuple(core.pad(images)[0].shape[-2:])
            # compact: label map and RLEs, no per-query or per-class float maps at the original resolution
            prediction = core.postprocess(raw, resized_hw, padded_hw, [resized_hw], [original_hw], compact=True)[0]
            evaluator.process(record, prediction)
            _consistency_update(core, raw, record, resized_hw, padded_hw, consistency)
            progress.tick()


def _merge_ranks(evaluator: Evaluator, consistency: MaskConsistency, seconds: float, world_size: int) -> float:
    """Merge every rank's evaluator and consistency state into this rank's; returns the slowest rank's
    seconds, so that every rank reports the same numbers."""
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (evaluator.state(), consistency.state(), seconds))
        others = [g for i, g in enumerate(gathered) if i != dist.get_rank()]
        evaluator.merge([g[0] for g in others])
        consistency.merge([g[1] for g in others])
        seconds = max(g[2] for g in gathered)
    return seconds


def evaluate_model(model: nn.Module, val_uri: str, cfg: Config, classes: list[dict], **kwargs) -> dict[str, float]:
    """The metrics of ``evaluate_split`` (same arguments)."""
    return evaluate_split(model, val_uri, cfg, classes, **kwargs).metrics


def evaluate_split(
    model: nn.Module,
    val_uri: str,
    cfg: Config,
    classes: list[dict],
    *,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    max_images: int = 0,
) -> Evaluation:
    """Evaluate ``model`` on the prepared split at ``val_uri``.

    Args:
        model: an MP-Former (or its DDP wrapper) already on ``device``; its eval output per image is
            {"sem_seg", "panoptic", "instances"} at ``output_sizes``.
        val_uri: prepared split directory (local or s3://) holding ``manifest.json``.
        cfg: the model's config (``data.test_*`` resize, ``model.size_divisibility``,
            ``model.dec_layers``, ``model.test.*_on``, ``train.amp``).
        classes: the manifest's class list (contiguous ids 0..K-1 with "isthing").
        rank, world_size: this process's share of the images (see the module docstring).
        max_images: evaluate only the split's first ``max_images`` images (0 = all).

    Returns:
        The same on every rank: flat ``metrics``, the Evaluator's ("panoptic/PQ", "segm/AP",
        "sem_seg/mIoU", ... in percent, "num_images") and the consistency diagnostic
        ("consistency/layer_{i}_{i+1}", "consistency/mean", IoU in [0, 1]) and "eval_seconds"
        (wall time of the slowest rank); ``per_class`` (``Evaluator.per_class``) and ``confusion``
        (semantic, else None).
    """
    core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    device = torch.device(device)
    manifest = read_manifest(val_uri)
    if [c["name"] for c in manifest["classes"]] != [c["name"] for c in classes]:
        raise DataError(f"{val_uri}: its classes {[c['name'] for c in manifest['classes']]} differ from the "
                         f"model's {[c['name'] for c in classes]}; evaluate on a split of the dataset it was "
                         "trained on")
    evaluator = Evaluator(classes, set(tasks_for(manifest.get("task"), cfg.model.test, val_uri)))
    consistency = MaskConsistency(cfg.model.dec_layers)
    total = manifest["num_images"] if max_images <= 0 else min(max_images, manifest["num_images"])

    was_training = core.training
    core.eval()
    start = time.perf_counter()
    try:
        images = shard_records(val_uri, rank, world_size, max_images)
        _process(core, images, cfg, device, evaluator, consistency, _Progress(rank, world_size, total, start))
    finally:
        core.train(was_training)
    seconds = _merge_ranks(evaluator, consistency, time.perf_counter() - start, world_size)

    metrics = evaluator.evaluate()
    metrics.update(consistency.compute())
    metrics["eval_seconds"] = seconds
    if rank == 0:
        log.info("evaluation done: %s", "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                                  if not math.isnan(v)))
    return Evaluation(metrics, evaluator.per_class(), evaluator.confusion())
