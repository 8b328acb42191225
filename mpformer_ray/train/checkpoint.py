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

A checkpoint's contents are one ``Checkpoint``, saved as ``torch.save`` of ``Checkpoint.to_dict()``
(tensors and primitives only, so it loads with ``weights_only=True``) and read back by
``load_checkpoint``, which checks its format version.
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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mpformer_ray import storage
from mpformer_ray.config import Config, config_from_dict, flatten
from mpformer_ray.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.json"
_NAME = re.compile(r"^model_(\d{7,})\.pth$")


class CheckpointError(UserError, ValueError):
    """A checkpoint or ``latest.json`` is unreadable or does not fit the config; the message names
    the file and the fix."""


FORMAT_VERSION = 1  # of Checkpoint.to_dict(); files without "format" are version 0, the same keys


@dataclass
class Checkpoint:
    """What a checkpoint holds. Written by the training loop (rank 0) and ``jobs/convert_checkpoint.py``."""

    iteration: int
    model: dict[str, torch.Tensor]  # state dict
    optimizer: dict = field(default_factory=dict)  # state dicts; empty in a converted checkpoint
    scheduler: dict = field(default_factory=dict)
    scaler: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # Config.to_dict()
    classes: list[dict] = field(default_factory=list)  # the manifest's class list
    # {"images": trained on by all ranks, the position in the data stream; "epoch": the last batch's}
    data: dict = field(default_factory=dict)
    best: dict | None = None  # {"metric", "value", "iteration"} of the best evaluation so far
    starts: list[int] = field(default_factory=list)  # iterations at which each training attempt began
    metrics: dict = field(default_factory=dict)  # those reported at this iteration
    converted_from: dict | None = None  # {"format", "source", "skipped", "initialised"} of a conversion

    def to_dict(self) -> dict:
        return {"format": FORMAT_VERSION, **{f: getattr(self, f) for f in self.__dataclass_fields__}}

    @classmethod
    def from_dict(cls, data: Any, uri: str) -> Checkpoint:
        """CheckpointError naming ``uri`` when ``data`` is not a checkpoint of a format this code reads."""
        if not isinstance(data, dict) or not {"model", "iteration"} <= data.keys():
            raise CheckpointError(f"{uri} is not a training checkpoint (a dict with model weights and an iteration, "
                                  "as jobs/train.py saves)")
        version = data.get("format", 0)
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{uri} has checkpoint format {version}, newer than this mpformer-ray reads "
                                  f"({FORMAT_VERSION}); upgrade mpformer-ray")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if unknown := sorted(set(data) - set(known) - {"format"}):
            log.warning("%s: ignoring entries this version does not know: %s", uri, ", ".join(map(str, unknown)))
        return cls(**known)


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
        keep: int = 2,
        attempts: int = 3,
        retry_wait_s: float = 1.0,
        job: str | None = None,
    ) -> None:
        self.run_uri = run_uri
        self.dir = storage.join(run_uri, CHECKPOINT_DIR)
        self.keep = keep
        self.attempts = attempts
        self.retry_wait_s = retry_wait_s
        self.job = job

    def pointer(self) -> dict | None:
        """The parsed ``latest.json`` (older ones may hold bare NaN, which Python reads), or None
        when there is none; CheckpointError naming it when it is damaged."""
        uri = storage.join(self.dir, LATEST)
        if not storage.exists(uri):
            return None
        # An S3 read that overlaps the writer's next save comes back torn (storage.read_bytes); the
        # save itself is atomic, so a pointer that does not parse is read again before it counts as
        # damaged. Local pointers are replaced by a rename and never tear.
        attempts = self.attempts if storage.is_s3(uri) else 1
        for attempt in range(attempts):
            try:
                pointer = json.loads(storage.read_bytes(uri))
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
        return sorted((n for n in storage.listdir(self.dir) if _NAME.match(n)), key=_iteration)

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

    def find_resume(self) -> tuple[str, Checkpoint] | None:
        """(uri, checkpoint) to resume from: the one ``latest.json`` names, else the newest
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

    def _load(self, uri: str) -> Checkpoint:
        """load_checkpoint, a missing file being a CheckpointError too."""
        if not storage.exists(uri):
            raise CheckpointError(f"{uri} does not exist")
        return load_checkpoint(uri)

    def save(self, ckpt: Checkpoint, is_best: bool = False) -> str:
        """Write ``ckpt``, move the pointer to it, prune old ones.

        Raises StorageError naming the URI when the write keeps failing; the pointer then
        still names the previous complete checkpoint.
        """
        name = checkpoint_name(ckpt.iteration)
        uri = storage.join(self.dir, name)
        buffer = io.BytesIO()
        torch.save(ckpt.to_dict(), buffer)
        payload = buffer.getvalue()
        _retry(lambda: storage.write_bytes(uri, payload), uri, self.attempts, self.retry_wait_s)

        try:
            previous = self.pointer() or {}
        except CheckpointError:  # the driver resumed past a damaged pointer (find_resume); this replaces it
            previous = {}
        best = previous.get("best")
        if is_best:
            best = {"checkpoint": name, **(ckpt.best or {})}
        elif not previous and ckpt.best:
            # a run resumed without its pointer: the running best names its checkpoint, because every
            # evaluation is checkpointed, and retention must keep that file
            best = {"checkpoint": checkpoint_name(ckpt.best["iteration"]), **ckpt.best}
        pointer = {"latest": name, "iteration": ckpt.iteration, "best": best, "metrics": ckpt.metrics,
                   "data": ckpt.data, "job": self.job}
        pointer_uri = storage.join(self.dir, LATEST)
        data = json.dumps(_finite(pointer), indent=1, allow_nan=False).encode()
        _retry(lambda: storage.write_bytes(pointer_uri, data), pointer_uri,
               self.attempts, self.retry_wait_s)
        self._prune(ckpt.iteration, best["checkpoint"] if best else None)
        return uri

    def _prune(self, latest_iteration: int, best_name: str | None) -> None:
        """Keep the newest ``keep`` checkpoints up to the latest, plus the best; delete the rest
        (including leftovers above the latest from an attempt that crashed before its pointer)."""
        found = sorted(
            (int(m.group(1)), n) for n in storage.listdir(self.dir) if (m := _NAME.match(n))
        )
        kept = {n for _, n in [f for f in found if f[0] <= latest_iteration][-self.keep:]}
        if best_name:
            kept.add(best_name)
        for _, n in found:
            if n not in kept:
                storage.delete(storage.join(self.dir, n))


def save_checkpoint(ckpt: Checkpoint, run_uri: str, keep: int = 2, is_best: bool = False) -> str:
    """Save ``ckpt`` as the run's latest checkpoint; returns its URI."""
    return CheckpointStore(run_uri, keep=keep).save(ckpt, is_best=is_best)


def latest_checkpoint(run_uri: str) -> str | None:
    """URI of the latest complete checkpoint of a run directory, or None."""
    return CheckpointStore(run_uri).latest()


def load_checkpoint(uri: str) -> Checkpoint:
    """Load a checkpoint file with ``torch.load(weights_only=True)`` onto the CPU; CheckpointError
    naming ``uri`` when it is damaged or not a training checkpoint."""
    data = storage.read_bytes(uri)
    try:
        raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # damaged bytes fail in many ways: RuntimeError, UnpicklingError, EOFError, ...
        # the first sentence: torch follows it with a paragraph of advice that does not apply here
        reason = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{uri} cannot be loaded ({reason}): the file is truncated or damaged") from None
    return Checkpoint.from_dict(raw, uri)


def resolve_checkpoint(uri: str) -> str:
    """A checkpoint file URI, or a run (or its ``checkpoints/``) directory -> its latest checkpoint."""
    if uri.endswith(".pth"):
        return uri
    runs = [uri]
    if uri.rstrip("/").endswith("/" + CHECKPOINT_DIR):
        runs.append(uri.rstrip("/")[: -len(CHECKPOINT_DIR) - 1])
    for run in runs:
        if found := latest_checkpoint(run):
            return found
    for run in runs:
        if names := CheckpointStore(run).names():
            raise CheckpointError(f"{storage.join(run, CHECKPOINT_DIR)} has checkpoints but no {LATEST}: pass one "
                                  f"of its files, e.g. the newest {storage.join(run, CHECKPOINT_DIR, names[-1])}")
    raise storage.StorageError(
        f"no checkpoint under {uri}: expected {storage.join(uri, CHECKPOINT_DIR, LATEST)}; pass a .pth "
        f"checkpoint file or the run directory {{storage.uri}}/{{run.name}} of a run that saved one"
    )


def _parameter_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """The state dict shapes of the model ``cfg`` builds, on the meta device: nothing allocated or initialised."""
    from mpformer_ray.model import build_model  # the model code is needed only where checkpoints meet configs

    shapes_only = copy.deepcopy(cfg)
    shapes_only.model.pretrained = None  # backbone weights do not change shapes; skip reading them
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build_model(shapes_only).state_dict().items()}


def _sizing_fields(saved_model: dict, cfg: Config, expected: dict[str, tuple[int, ...]]) -> list[str]:
    """The ``model.*`` fields whose checkpoint value (``saved_model``: ``Config.to_dict()["model"]``) differs
    from ``cfg``'s and, alone set back to it, changes parameter shapes: "model.hidden_dim: checkpoint 32,
    config 64"."""
    saved, current = flatten(saved_model, "model."), flatten(cfg.to_dict()["model"], "model.")
    fields = []
    for key, value in current.items():
        if key not in saved or saved[key] == value:
            continue
        try:
            trial = copy.deepcopy(cfg)
            section, name = trial.model, key.split(".")[1:]
            for part in name[:-1]:
                section = getattr(section, part)
            setattr(section, name[-1], saved[key])
            changes = _parameter_shapes(trial) != expected
        except Exception:  # a value this code cannot build a model from (an old or unknown one) counts as sizing
            changes = True
        if changes:
            fields.append(f"{key}: checkpoint {saved[key]}, config {value}")
    return fields


def model_mismatch(weights: dict[str, torch.Tensor], saved_model: dict, cfg: Config) -> list[str]:
    """Why ``weights``, saved with model config ``saved_model`` (``Config.to_dict()["model"]``), do not
    fit the model ``cfg`` builds: the ``model.*`` fields that size parameters and differ ("model.hidden_dim:
    checkpoint 32, config 64"), else the first parameters whose shapes differ; empty when they fit."""
    expected = _parameter_shapes(cfg)
    found = {k: tuple(v.shape) for k, v in weights.items()}
    if found == expected:
        return []
    return _sizing_fields(saved_model, cfg, expected) or [
        f"parameter {k}: checkpoint {found.get(k)}, model {expected.get(k)}"
        for k in sorted(found.keys() | expected.keys()) if found.get(k) != expected.get(k)][:3]


def initial_weights(cfg: Config) -> dict[str, torch.Tensor]:
    """The model weights a new run of ``cfg`` starts from: those of the checkpoint ``model.weights`` names (a
    converted one, see ``jobs/convert_checkpoint.py``, or any training checkpoint), without the entries the
    run's own config decides (``criterion.*``: loss weights). A checkpoint without the pilot's label embedding
    (converted Mask2Former weights, or pilot training off) leaves it as the new model initialises it.
    CheckpointError naming the file, the parameters that do not fit and the fix."""
    uri = cfg.model.weights
    ckpt = load_checkpoint(uri)
    expected = _parameter_shapes(cfg)
    weights = {k: v for k, v in ckpt.model.items() if not k.startswith("criterion.")}
    optional = ("criterion.", "pilot.")
    problems = [f"{k}: checkpoint {tuple(v.shape)}, model {expected[k]}" for k, v in weights.items()
                if k in expected and tuple(v.shape) != expected[k]]
    problems += [f"{k}: not in the model" for k in weights if k not in expected and not k.startswith(optional)]
    problems += [f"{k}: not in the checkpoint" for k in expected if k not in weights and not k.startswith(optional)]
    if problems:
        fields = _sizing_fields(ckpt.config.get("model", {}), cfg, expected)
        raise CheckpointError(
            f"model.weights={uri} does not fit the model of this config ({'; '.join(problems[:5])}"
            f"{' ...' if len(problems) > 5 else ''}). Fix: set the model.* fields the checkpoint was made with"
            f"{' (' + '; '.join(fields[:6]) + ')' if fields else ''}")
    return {k: v for k, v in weights.items() if k in expected}


def images_done(data: dict, iteration: int, cfg: Config) -> int:
    """Images all ranks trained on up to a checkpoint (``data``: its ``data`` entry, also in ``latest.json``).
    Checkpoints that predate the count: ``iteration`` x ``cfg``'s images per iteration."""
    images = data.get("images")
    return int(images) if images is not None else iteration * cfg.train.batch_size * cfg.train.workers


def check_resume(cfg: Config, classes: list[dict]) -> tuple[str, int] | None:
    """The checkpoint a training run of ``cfg`` resumes from and its ``images_done`` (None: a new run),
    checked on the driver before any worker starts: readable (see ``CheckpointStore.find_resume``) and
    fitting ``cfg``'s model and the dataset's ``classes``. CheckpointError naming the file, what
    differs and the fix."""
    found = CheckpointStore(run_uri(cfg)).find_resume()
    if not found:
        return None
    uri, ckpt = found
    problems = model_mismatch(ckpt.model, ckpt.config.get("model", {}), cfg)
    saved_names, names = [c["name"] for c in ckpt.classes], [c["name"] for c in classes]
    if saved_names != names:
        problems.append(f"classes: checkpoint {saved_names}, data.train {names}")
    if problems:
        raise CheckpointError(
            f"{uri} does not fit this config ({'; '.join(problems)}). Fix: set another run.name to train this "
            "config from scratch, or set those fields back to resume this run")
    return uri, images_done(ckpt.data, ckpt.iteration, cfg)


def load_model(uri: str, device: str | torch.device = "cpu") -> tuple[nn.Module, Config, list[dict]]:
    """(model in eval mode on ``device``, its Config, the dataset's classes) from a checkpoint
    file or a run directory (its latest checkpoint)."""
    from mpformer_ray.model import build_model  # only this function needs the model code

    ckpt = load_checkpoint(resolve_checkpoint(uri))
    cfg = config_from_dict(ckpt.config)
    model = build_model(cfg)
    model.load_state_dict(ckpt.model)
    return model.to(device).eval(), cfg, ckpt.classes
