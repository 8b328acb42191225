"""Training checkpoints on local disk or S3, written so a crash never leaves a broken "latest".

Layout under a run directory ``{storage.uri}/{run.name}``::

    checkpoints/model_0000100.pth   torch.save of a dict of tensors / primitives only
    checkpoints/model_0000200.pth
    checkpoints/latest.json         {"latest": "model_0000200.pth", "iteration": 200, "best": ..., "metrics": ...}

The checkpoint object is written first and the small ``latest.json`` pointer last, so an
upload that dies half-way never becomes the latest. Retention keeps the newest
``keep`` checkpoints plus the best one by the task's main metric.

A checkpoint dict holds: ``model``, ``optimizer``, ``scheduler``, ``scaler`` (state dicts),
``iteration``, ``config`` (``Config.to_dict()``), ``data`` ({"epoch", "batches"} consumed),
``classes`` (the manifest's class list), ``best`` ({"metric", "value", "iteration"} or None),
``starts`` (iterations at which each training attempt began: resume history), ``metrics``
(those reported at that iteration; also copied into ``latest.json`` for the driver's summary).
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mpformer_ray import storage
from mpformer_ray.config import Config, config_from_dict

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.json"
_NAME = re.compile(r"^model_(\d{7,})\.pth$")


def run_uri(cfg: Config) -> str:
    """The run directory: ``{storage.uri}/{run.name}``."""
    return storage.join(cfg.storage.uri, cfg.run.name)


def checkpoint_name(iteration: int) -> str:
    return f"model_{iteration:07d}.pth"


def _retry(action: Callable[[], Any], uri: str, attempts: int, wait_s: float) -> Any:
    """Run a storage action, retrying transient failures loudly; the last failure is raised
    as a StorageError naming ``uri``."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except storage.StorageError as e:
            if attempt == attempts:
                raise storage.StorageError(
                    f"checkpoint write to {uri} failed after {attempts} attempts: {e}"
                ) from e
            log.warning("checkpoint write to %s failed (attempt %d/%d), retrying: %s", uri, attempt, attempts, e)
            time.sleep(wait_s * attempt)
    raise AssertionError("unreachable")


class CheckpointStore:
    """Saves, finds and prunes the checkpoints of one run (local path or s3:// URI).

    Only one process (rank 0) calls :meth:`save`; every rank may call :meth:`load_latest`.
    """

    def __init__(
        self,
        run_uri: str,
        endpoint_url: str | None = None,
        keep: int = 2,
        attempts: int = 3,
        retry_wait_s: float = 1.0,
    ) -> None:
        if keep < 1:
            raise ValueError(f"train.keep_checkpoints must be >= 1; got {keep}")
        self.run_uri = run_uri
        self.dir = storage.join(run_uri, CHECKPOINT_DIR)
        self.endpoint_url = endpoint_url
        self.keep = keep
        self.attempts = attempts
        self.retry_wait_s = retry_wait_s

    def pointer(self) -> dict | None:
        """The parsed ``latest.json``, or None before the first checkpoint."""
        uri = storage.join(self.dir, LATEST)
        if not storage.exists(uri, self.endpoint_url):
            return None
        return json.loads(storage.read_bytes(uri, self.endpoint_url))

    def latest(self) -> str | None:
        pointer = self.pointer()
        return storage.join(self.dir, pointer["latest"]) if pointer else None

    def load_latest(self) -> tuple[str, dict] | None:
        """(uri, checkpoint dict) of the latest checkpoint, or None for a fresh run."""
        uri = self.latest()
        return (uri, load_checkpoint(uri, self.endpoint_url)) if uri else None

    def save(self, state: dict, is_best: bool = False) -> str:
        """Write ``state`` (must hold ``iteration``), move the pointer to it, prune old ones.

        Raises StorageError naming the URI when the write keeps failing; the pointer then
        still names the previous complete checkpoint.
        """
        iteration = int(state["iteration"])
        name = checkpoint_name(iteration)
        uri = storage.join(self.dir, name)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = buffer.getvalue()
        _retry(lambda: storage.write_bytes(uri, payload, self.endpoint_url), uri, self.attempts, self.retry_wait_s)

        previous = self.pointer() or {}
        best = previous.get("best")
        if is_best:
            best = {"checkpoint": name, **(state.get("best") or {})}
        pointer = {"latest": name, "iteration": iteration, "best": best, "metrics": state.get("metrics", {})}
        pointer_uri = storage.join(self.dir, LATEST)
        data = json.dumps(pointer, indent=1).encode()
        _retry(lambda: storage.write_bytes(pointer_uri, data, self.endpoint_url), pointer_uri,
               self.attempts, self.retry_wait_s)
        self._prune(iteration, best["checkpoint"] if best else None)
        return uri

    def _prune(self, latest_iteration: int, best_name: str | None) -> None:
        """Keep the newest ``keep`` checkpoints up to the latest, plus the best; delete the rest
        (including leftovers above the latest from an attempt that crashed before its pointer)."""
        found = sorted(
            (int(m.group(1)), n) for n in storage.listdir(self.dir, self.endpoint_url) if (m := _NAME.match(n))
        )
        kept = {n for _, n in [f for f in found if f[0] <= latest_iteration][-self.keep:]}
        if best_name:
            kept.add(best_name)
        for _, n in found:
            if n not in kept:
                storage.delete(storage.join(self.dir, n), self.endpoint_url)


def save_checkpoint(state: dict, run_uri: str, endpoint_url: str | None = None, keep: int = 2,
                    is_best: bool = False) -> str:
    """Save ``state`` (see the module docstring) as the run's latest checkpoint; returns its URI."""
    return CheckpointStore(run_uri, endpoint_url, keep=keep).save(state, is_best=is_best)


def latest_checkpoint(run_uri: str, endpoint_url: str | None = None) -> str | None:
    """URI of the latest complete checkpoint of a run directory, or None."""
    return CheckpointStore(run_uri, endpoint_url).latest()


def load_checkpoint(uri: str, endpoint_url: str | None = None) -> dict:
    """Load a checkpoint file with ``torch.load(weights_only=True)`` onto the CPU."""
    data = storage.read_bytes(uri, endpoint_url)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def resolve_checkpoint(uri: str, endpoint_url: str | None = None) -> str:
    """A checkpoint file URI, or a run (or its ``checkpoints/``) directory -> its latest checkpoint."""
    if uri.endswith(".pth"):
        return uri
    runs = [uri]
    if uri.rstrip("/").endswith("/" + CHECKPOINT_DIR):
        runs.append(uri.rstrip("/")[: -len(CHECKPOINT_DIR) - 1])
    for run in runs:
        if found := latest_checkpoint(run, endpoint_url):
            return found
    raise storage.StorageError(
        f"no checkpoint under {uri}: expected {storage.join(uri, CHECKPOINT_DIR, LATEST)}; pass a .pth "
        f"checkpoint file or the run directory {{storage.uri}}/{{run.name}} of a run that saved one"
    )


def load_model(uri: str, device: str | torch.device = "cpu",
               endpoint_url: str | None = None) -> tuple[nn.Module, Config, list[dict]]:
    """(model in eval mode on ``device``, its Config, the dataset's classes) from a checkpoint
    file or a run directory (its latest checkpoint)."""
    from mpformer_ray.model import build_model  # only this function needs the model code

    ckpt = load_checkpoint(resolve_checkpoint(uri, endpoint_url), endpoint_url)
    cfg = config_from_dict(ckpt["config"])
    model = build_model(cfg)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg, ckpt["classes"]
