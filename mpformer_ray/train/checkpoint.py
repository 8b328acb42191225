"""Training checkpoints on local disk or S3, written so a crash never leaves a broken "latest".

Layout under a run directory ``{storage.uri}/{run.name}``::

    checkpoints/model_0000100.pth   torch.save of a dict of tensors / primitives only
    checkpoints/model_0000200.pth
    checkpoints/latest.json         {"latest": "model_0000200.pth", "iteration": 200, "best": ..., "metrics": ...,
                                     "data": ..., "job": ...}

The checkpoint object is written first and the small ``latest.json`` pointer last, so an
upload that dies half-way never becomes the latest. Retention keeps the newest
``keep`` checkpoints plus the best one by the task's main metric.

What a run resumes from is decided once, on the driver (``check_resume``), from what is really
there: the checkpoint ``latest.json`` names, else (pointer lost or damaged, or naming a missing or
damaged file) the newest intact ``model_*.pth``, with a warning. A run never starts at iteration 0
over checkpoints it did not write.

A checkpoint dict holds: ``model``, ``optimizer``, ``scheduler``, ``scaler`` (state dicts),
``iteration``, ``config`` (``Config.to_dict()``), ``data`` ({"images": trained on by all ranks, the
position in the data stream; "epoch": the last batch's}, also in ``latest.json``),
``classes`` (the manifest's class list), ``best`` ({"metric", "value", "iteration"} or None),
``starts`` (iterations at which each training attempt began: resume history), ``metrics``
(those reported at that iteration; also copied into ``latest.json`` for the driver's summary).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
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


class CheckpointError(ValueError):
    """A checkpoint or ``latest.json`` is unreadable or does not fit the config; the message names
    the file and the fix."""


def run_uri(cfg: Config) -> str:
    """The run directory: ``{storage.uri}/{run.name}``."""
    return storage.join(cfg.storage.uri, cfg.run.name)


def checkpoint_name(iteration: int) -> str:
    return f"model_{iteration:07d}.pth"


def _iteration(name: str) -> int:
    return int(_NAME.match(name).group(1))


def _finite(value: Any) -> Any:
    """``value`` with NaN / infinite floats as None: ``json.dumps`` writes them as bare ``NaN``,
    which is not JSON (an empty AP size bucket is NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


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

    Only one process (rank 0) calls :meth:`save`. ``job`` identifies one training job (one
    ``jobs/train.py`` run); its saves record it in ``latest.json`` so that workers Ray restarts
    resume from the job's own newest checkpoint (:meth:`job_latest`).
    """

    def __init__(
        self,
        run_uri: str,
        endpoint_url: str | None = None,
        keep: int = 2,
        attempts: int = 3,
        retry_wait_s: float = 1.0,
        job: str | None = None,
    ) -> None:
        if keep < 1:
            raise ValueError(f"train.keep_checkpoints must be >= 1; got {keep}")
        self.run_uri = run_uri
        self.dir = storage.join(run_uri, CHECKPOINT_DIR)
        self.endpoint_url = endpoint_url
        self.keep = keep
        self.attempts = attempts
        self.retry_wait_s = retry_wait_s
        self.job = job

    def pointer(self) -> dict | None:
        """The parsed ``latest.json`` (older ones may hold bare NaN, which Python reads), or None
        when there is none; CheckpointError naming it when it is damaged."""
        uri = storage.join(self.dir, LATEST)
        if not storage.exists(uri, self.endpoint_url):
            return None
        # An S3 read that overlaps the writer's next save comes back torn (storage.read_bytes); the
        # save itself is atomic, so a pointer that does not parse is read again before it counts as
        # damaged. Local pointers are replaced by a rename and never tear.
        attempts = self.attempts if storage.is_s3(uri) else 1
        for attempt in range(attempts):
            try:
                pointer = json.loads(storage.read_bytes(uri, self.endpoint_url))
                break
            except ValueError as e:
                if attempt + 1 == attempts:
                    raise CheckpointError(f"{uri} is damaged ({e})") from None
                time.sleep(self.retry_wait_s)
        if not isinstance(pointer, dict) or not _NAME.match(str(pointer.get("latest"))):
            raise CheckpointError(f"{uri} is damaged (no \"latest\": \"model_NNNNNNN.pth\" entry)")
        return pointer

    def latest(self) -> str | None:
        pointer = self.pointer()
        return storage.join(self.dir, pointer["latest"]) if pointer else None

    def names(self) -> list[str]:
        """The ``model_*.pth`` names in the checkpoint directory, oldest first."""
        return sorted((n for n in storage.listdir(self.dir, self.endpoint_url) if _NAME.match(n)), key=_iteration)

    def job_pointer(self) -> dict | None:
        """``latest.json`` when this store's job wrote it, else None: a worker group Ray restarts
        resumes there, not at the checkpoint the driver chose when the job began."""
        try:
            pointer = self.pointer()
        except CheckpointError:  # pointer writes are atomic: a damaged one is not this job's
            return None
        return pointer if pointer and pointer.get("job") == self.job else None

    def job_latest(self) -> str | None:
        """The checkpoint ``job_pointer`` names, else None."""
        pointer = self.job_pointer()
        return storage.join(self.dir, pointer["latest"]) if pointer else None

    def find_resume(self) -> tuple[str, dict] | None:
        """(uri, checkpoint dict) to resume from: the one ``latest.json`` names, else the newest
        intact ``model_*.pth`` (logging a warning that names what was passed over); None when
        there is no checkpoint. CheckpointError naming the directory when none is readable;
        StorageError (not a fallback) when storage cannot be reached."""
        names = self.names()
        try:
            pointer = self.pointer()
            problem = None if pointer or not names else f"{self.dir} holds checkpoints but no {LATEST}"
        except CheckpointError as e:
            pointer, problem = None, str(e)
        if pointer:
            uri = storage.join(self.dir, pointer["latest"])
            try:
                return uri, self._load(uri)
            except CheckpointError as e:
                problem = f"{LATEST} names a checkpoint that cannot be used: {e}"
                names = [n for n in names if n != pointer["latest"]]
        skipped = []
        for name in reversed(names):
            uri = storage.join(self.dir, name)
            try:
                ckpt = self._load(uri)
            except CheckpointError as e:
                skipped.append(str(e))
                continue
            log.warning("%s; resuming from %s, the newest intact checkpoint there%s", problem, uri,
                        f" (also passed over: {'; '.join(skipped)})" if skipped else "")
            return uri, ckpt
        if problem is None:
            return None
        raise CheckpointError(
            f"nothing to resume from in {self.dir}: {'; '.join([problem, *skipped])}. Fix: restore the "
            "checkpoints, or set another run.name to start a new run")

    def _load(self, uri: str) -> dict:
        """load_checkpoint, a missing file being a CheckpointError too."""
        if not storage.exists(uri, self.endpoint_url):
            raise CheckpointError(f"{uri} does not exist")
        return load_checkpoint(uri, self.endpoint_url)

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

        try:
            previous = self.pointer() or {}
        except CheckpointError:  # the driver resumed past a damaged pointer (find_resume); this replaces it
            previous = {}
        best = previous.get("best")
        if is_best:
            best = {"checkpoint": name, **(state.get("best") or {})}
        elif not previous and state.get("best"):
            # a run resumed without its pointer: the running best names its checkpoint, because every
            # evaluation is checkpointed, and retention must keep that file
            best = {"checkpoint": checkpoint_name(state["best"]["iteration"]), **state["best"]}
        pointer = {"latest": name, "iteration": iteration, "best": best, "metrics": state.get("metrics", {}),
                   "data": state.get("data", {}), "job": self.job}
        pointer_uri = storage.join(self.dir, LATEST)
        data = json.dumps(_finite(pointer), indent=1, allow_nan=False).encode()
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
    """Load a checkpoint file with ``torch.load(weights_only=True)`` onto the CPU; CheckpointError
    naming ``uri`` when it is damaged or not a training checkpoint."""
    data = storage.read_bytes(uri, endpoint_url)
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # damaged bytes fail in many ways: RuntimeError, UnpicklingError, EOFError, ...
        # the first sentence: torch follows it with a paragraph of advice that does not apply here
        reason = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{uri} cannot be loaded ({reason}): the file is truncated or damaged") from None
    if not isinstance(ckpt, dict) or not {"model", "iteration"} <= ckpt.keys():
        raise CheckpointError(f"{uri} is not a training checkpoint (a dict with model weights and an iteration, "
                              "as jobs/train.py saves)")
    return ckpt


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
    for run in runs:
        if names := CheckpointStore(run, endpoint_url).names():
            raise CheckpointError(f"{storage.join(run, CHECKPOINT_DIR)} has checkpoints but no {LATEST}: pass one "
                                  f"of its files, e.g. the newest {storage.join(run, CHECKPOINT_DIR, names[-1])}")
    raise storage.StorageError(
        f"no checkpoint under {uri}: expected {storage.join(uri, CHECKPOINT_DIR, LATEST)}; pass a .pth "
        f"checkpoint file or the run directory {{storage.uri}}/{{run.name}} of a run that saved one"
    )


def _flatten(tree: dict, prefix: str) -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def model_mismatch(weights: dict[str, torch.Tensor], saved_model: dict, cfg: Config) -> list[str]:
    """Why ``weights``, saved with model config ``saved_model`` (``Config.to_dict()["model"]``), do not
    fit the model ``cfg`` builds: the ``model.*`` fields that differ ("model.hidden_dim: checkpoint
    32, config 64"), else the first parameters whose shapes differ; empty when they fit."""
    from mpformer_ray.model import build_model  # the model code is needed only here and in load_model

    shapes_only = copy.deepcopy(cfg)
    shapes_only.model.pretrained = None  # backbone weights do not change shapes; skip reading them
    with torch.device("meta"):  # shapes without allocating or initialising any weights
        expected = {k: tuple(v.shape) for k, v in build_model(shapes_only).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in weights.items()}
    if found == expected:
        return []
    saved = _flatten(saved_model, "model.")
    fields = [f"{k}: checkpoint {saved.get(k)}, config {v}"
              for k, v in _flatten(cfg.to_dict()["model"], "model.").items() if saved.get(k) != v]
    return fields or [f"parameter {k}: checkpoint {found.get(k)}, model {expected.get(k)}"
                      for k in sorted(found.keys() | expected.keys()) if found.get(k) != expected.get(k)][:3]


def initial_weights(cfg: Config, endpoint_url: str | None = None) -> dict[str, torch.Tensor]:
    """The model weights a new run of ``cfg`` starts from: those of the checkpoint ``model.weights`` names (a
    converted one, see ``jobs/convert_checkpoint.py``, or any training checkpoint), without the entries the
    run's own config decides (``criterion.*``: loss weights). A checkpoint without the pilot's label embedding
    (converted Mask2Former weights, or pilot training off) leaves it as the new model initialises it.
    CheckpointError naming the file, the parameters that do not fit and the fix."""
    from mpformer_ray.model import build_model

    uri = cfg.model.weights
    ckpt = load_checkpoint(uri, endpoint_url)
    shapes_only = copy.deepcopy(cfg)
    shapes_only.model.pretrained = None
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(shapes_only).state_dict().items()}
    weights = {k: v for k, v in ckpt["model"].items() if not k.startswith("criterion.")}
    optional = ("criterion.", "pilot.")
    problems = [f"{k}: checkpoint {tuple(v.shape)}, model {expected[k]}" for k, v in weights.items()
                if k in expected and tuple(v.shape) != expected[k]]
    problems += [f"{k}: not in the model" for k in weights if k not in expected and not k.startswith(optional)]
    problems += [f"{k}: not in the checkpoint" for k in expected if k not in weights and not k.startswith(optional)]
    if problems:
        saved = _flatten(ckpt.get("config", {}).get("model", {}), "model.")
        # the fields that size parameters (loss, inference and pilot settings do not)
        sizing = ("backbone", "backbone_norm", "num_classes", "num_queries", "hidden_dim", "dim_feedforward",
                  "dec_layers", "enc_layers", "enc_dim_feedforward", "enc_n_points", "mask_dim", "swin_window")
        fields = [f"model.{k}: checkpoint {saved[f'model.{k}']}, config {getattr(cfg.model, k)}" for k in sizing
                  if f"model.{k}" in saved and saved[f"model.{k}"] != getattr(cfg.model, k)]
        raise CheckpointError(
            f"model.weights={uri} does not fit the model of this config ({'; '.join(problems[:5])}"
            f"{' ...' if len(problems) > 5 else ''}). Fix: set the model.* fields the checkpoint was made with"
            f"{' (' + '; '.join(fields[:6]) + ')' if fields else ''}")
    return {k: v for k, v in weights.items() if k in expected}


def images_done(saved: dict, cfg: Config) -> int:
    """Images all ranks trained on up to a checkpoint (``saved``: the checkpoint or its ``latest.json``
    entry). Checkpoints that predate the count: their iterations x ``cfg``'s images per iteration."""
    images = saved.get("data", {}).get("images")
    return int(images) if images is not None else saved["iteration"] * cfg.train.batch_size * cfg.train.workers


def check_resume(cfg: Config, classes: list[dict], endpoint_url: str | None = None) -> tuple[str, int] | None:
    """The checkpoint a training run of ``cfg`` resumes from and its ``images_done`` (None: a new run),
    checked on the driver before any worker starts: readable (see ``CheckpointStore.find_resume``) and
    fitting ``cfg``'s model and the dataset's ``classes``. CheckpointError naming the file, what
    differs and the fix."""
    found = CheckpointStore(run_uri(cfg), endpoint_url).find_resume()
    if not found:
        return None
    uri, ckpt = found
    problems = model_mismatch(ckpt["model"], ckpt.get("config", {}).get("model", {}), cfg)
    saved_names, names = [c["name"] for c in ckpt.get("classes", [])], [c["name"] for c in classes]
    if saved_names != names:
        problems.append(f"classes: checkpoint {saved_names}, data.train {names}")
    if problems:
        raise CheckpointError(
            f"{uri} does not fit this config ({'; '.join(problems)}). Fix: set another run.name to train this "
            "config from scratch, or set those fields back to resume this run")
    return uri, images_done(ckpt, cfg)


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
