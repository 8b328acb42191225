"""Sweep files: which config fields a sweep searches, with which distributions, and how.

A sweep file is YAML (``configs/sweeps/*.yaml``)::

    search: optuna            # or grid; the CLI's --search overrides it
    scheduler: asha           # or none; the CLI's --scheduler overrides it
    num_samples: 8            # trials Optuna proposes (default 8); grid: repeats of the whole grid (default 1)
    max_concurrent: 1
    seed: 0                   # Optuna's sampler seed: same seed, same suggestions
    asha: {grace_period: 0.5, reduction_factor: 2}   # iterations, or a fraction (< 1) of train.max_iters
    space:                    # dotted config field -> one distribution
      model.pilot.noise_ratio: {uniform: [0.0, 0.4]}
      model.pilot.groups: {randint: [1, 3]}          # both ends included
      train.lr: {loguniform: [1.0e-4, 1.0e-3]}
      model.pilot.mask_noise: {choice: [point, shift]}
      train.seed: {grid: [0, 1, 2]}                  # --search grid only
    points_to_evaluate:       # optuna: whole points (every searched field), run first
      - {model.pilot.noise_ratio: 0.0, ...}

Everything is checked against the config schema before any trial starts: an unknown field,
an unknown distribution, a distribution that does not fit the field's type, or a value
outside what the field accepts is a :class:`SweepError` naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from mpformer_ray.config import CONFIG_DIR, Config, ConfigError, apply_overrides, field_type, find_yaml
from mpformer_ray.errors import UserError

SWEEP_DIR = CONFIG_DIR / "sweeps"
DEFAULT_SWEEP = "pilot"
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")
SEARCHES = ("optuna", "grid")
SCHEDULERS = ("asha", "none")


class SweepError(UserError, ValueError):
    """A sweep file is invalid; the message names the file, the field and the fix."""


@dataclass
class Param:
    """One searched field: ``kind`` in DISTRIBUTIONS; ``values`` = [low, high] for
    uniform / loguniform / randint (both ends included), else the listed values."""

    name: str
    kind: str
    values: list[Any]

    def tune_domain(self) -> Any:
        from ray import tune

        low_high = self.values[:2]
        return {
            "uniform": lambda: tune.uniform(*low_high),
            "loguniform": lambda: tune.loguniform(*low_high),
            "randint": lambda: tune.randint(low_high[0], low_high[1] + 1),  # Tune's upper end is exclusive
            "choice": lambda: tune.choice(self.values),
            "grid": lambda: tune.grid_search(self.values),
        }[self.kind]()


@dataclass
class Sweep:
    """A validated sweep file (see the module docstring)."""

    path: str
    params: list[Param]
    search: str = "optuna"
    scheduler: str = "asha"
    num_samples: int | None = None  # None: 8 for optuna, 1 (each grid point once) for grid
    max_concurrent: int = 1
    seed: int = 0
    grace_period: float = 0.5  # iterations, or a fraction (< 1) of train.max_iters
    reduction_factor: int = 2
    points_to_evaluate: list[dict[str, Any]] = field(default_factory=list)

    def tune_space(self) -> dict[str, Any]:
        """Tune param_space: flat ``{"model.pilot.groups": domain}`` (dots survive Tune's "/"-keyed
        flattening, so trial configs come back with the same keys)."""
        return {p.name: p.tune_domain() for p in self.params}

    def grace_iters(self, max_iters: int) -> int:
        """ASHA's grace period in training iterations."""
        return max(1, round(self.grace_period * max_iters)) if self.grace_period < 1 else int(self.grace_period)

    def check_options(self, cfg: Config) -> None:
        """Check the choices the CLI may have overridden against the space and the base config."""
        where = self.path
        if self.search not in SEARCHES:
            raise SweepError(f"{where}: search {self.search!r} is not one of {list(SEARCHES)}")
        if self.scheduler not in SCHEDULERS:
            raise SweepError(f"{where}: scheduler {self.scheduler!r} is not one of {list(SCHEDULERS)}")
        grid = [p.name for p in self.params if p.kind == "grid"]
        if self.search == "optuna" and grid:
            raise SweepError(f"{where}: space field(s) {grid} use 'grid', which only --search grid runs; "
                             "use choice / uniform / randint with optuna")
        if self.search == "grid" and self.points_to_evaluate:
            raise SweepError(f"{where}: points_to_evaluate is for --search optuna; a grid runs every point already")
        if self.num_samples is None:
            self.num_samples = 1 if self.search == "grid" else 8
        if self.num_samples < 1 or self.max_concurrent < 1:
            raise SweepError(f"{where}: num_samples and max_concurrent must be >= 1; got "
                             f"{self.num_samples} and {self.max_concurrent}")
        if self.scheduler == "asha":
            t = cfg.train
            if self.grace_period <= 0 or self.reduction_factor < 2:
                raise SweepError(f"{where}: asha.grace_period must be > 0 and asha.reduction_factor >= 2; got "
                                 f"{self.grace_period} and {self.reduction_factor}")
            grace = self.grace_iters(t.max_iters)
            if t.eval_period < 1 or t.eval_period >= t.max_iters or grace >= t.max_iters:
                raise SweepError(
                    f"{where}: ASHA compares trials at evaluations, but train.eval_period={t.eval_period} with "
                    f"train.max_iters={t.max_iters} and asha.grace_period={grace} iterations leaves it nothing to "
                    "compare before the end: set train.eval_period (and the grace period) below train.max_iters, "
                    "or run --scheduler none")


def _check_value(cfg: Config, name: str, value: Any, where: str) -> Any:
    """``value`` coerced to field ``name``'s type, and accepted by the config's validation."""
    try:
        trial = apply_overrides(cfg, {name: value})
    except ConfigError as e:
        raise SweepError(f"{where}: {name}: value {value!r} is not valid for this field: {e}") from None
    obj: Any = trial
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _parse_param(cfg: Config, name: str, spec: Any, where: str) -> Param:
    try:
        tp = field_type(name)
    except ConfigError as e:
        raise SweepError(f"{where}: space: {e}") from None
    if dataclasses.is_dataclass(tp):
        raise SweepError(f"{where}: space: {name} is a config section, not a field; name one of its fields")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SweepError(f"{where}: space: {name} must be one distribution such as {{uniform: [0.0, 0.5]}} "
                         f"or {{choice: [1, 2]}}; got {spec!r}. Distributions: {list(DISTRIBUTIONS)}")
    (kind, values), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise SweepError(f"{where}: space: {name}: unknown distribution {kind!r}; use one of {list(DISTRIBUTIONS)}")
    if not isinstance(values, list) or not values:
        raise SweepError(f"{where}: space: {name}: {kind} takes a non-empty list; got {values!r}")
    numeric = {"uniform": float, "loguniform": float, "randint": int}.get(kind)
    if numeric:
        if typing.get_origin(tp) is typing.Annotated:  # a registry's names: a str field, its values checked below
            tp = typing.get_args(tp)[0]
        accepted = typing.get_args(tp) or (tp,)
        if numeric not in accepted:
            raise SweepError(f"{where}: space: {name} is a field of type {getattr(tp, '__name__', tp)}; {kind} "
                             f"samples {numeric.__name__}s: use {{choice: [...]}} instead")
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise SweepError(f"{where}: space: {name}: {kind} takes [low, high] numbers; got {values!r}")
        if numeric is int and not all(isinstance(v, int) for v in values):
            raise SweepError(f"{where}: space: {name}: randint takes integer bounds; got {values!r}")
        low, high = values
        if not low < high:
            raise SweepError(f"{where}: space: {name}: {kind} needs low < high; got {values!r}")
        if kind == "loguniform" and low <= 0:
            raise SweepError(f"{where}: space: {name}: loguniform needs low > 0; got {values!r}")
    checked = [_check_value(cfg, name, v, f"{where}: space") for v in values]
    return Param(name, kind, checked if not numeric else [numeric(v) for v in values])


def _parse_point(cfg: Config, params: list[Param], point: Any, where: str) -> dict[str, Any]:
    names = [p.name for p in params]
    if not isinstance(point, dict) or set(point) != set(names):
        got = sorted(point) if isinstance(point, dict) else point
        raise SweepError(f"{where}: a point must give every searched field {names} (Optuna evaluates whole "
                         f"points); got {got}")
    out = {}
    for p in params:
        value = _check_value(cfg, p.name, point[p.name], where)
        inside = (p.values[0] <= value <= p.values[1]) if p.kind in ("uniform", "loguniform", "randint") \
            else value in p.values
        if not inside:
            raise SweepError(f"{where}: {p.name}={value!r} lies outside its distribution {{{p.kind}: {p.values}}}")
        out[p.name] = value
    return out


def load_sweep(name_or_path: str, cfg: Config, **options: Any) -> Sweep:
    """Parse and validate a sweep file against ``cfg`` (the base config every trial starts from).

    ``options`` (search, scheduler, num_samples, max_concurrent; None = the file's value)
    override the file's top-level choices, as the CLI does.
    """
    try:
        path = find_yaml(name_or_path, SWEEP_DIR, "sweep", "sweep")
    except ConfigError as e:
        raise SweepError(str(e)) from None
    where = str(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SweepError(f"{where}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SweepError(f"{where}: top level must be a mapping; see configs/sweeps/pilot.yaml")
    known = {"search", "scheduler", "num_samples", "max_concurrent", "seed", "asha", "space", "points_to_evaluate"}
    if unknown := sorted(set(data) - known):
        raise SweepError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(known)}")
    space = data.get("space")
    if not isinstance(space, dict) or not space:
        raise SweepError(f"{where}: 'space' must map at least one config field to a distribution, e.g. "
                         "model.pilot.noise_ratio: {uniform: [0.0, 0.4]}")
    params = [_parse_param(cfg, str(name), spec, where) for name, spec in space.items()]
    asha = data.get("asha") or {}
    if not isinstance(asha, dict) or set(asha) - {"grace_period", "reduction_factor"}:
        raise SweepError(f"{where}: asha takes grace_period and reduction_factor; got {asha!r}")
    grace = asha.get("grace_period", 0.5)
    if not isinstance(grace, (int, float)) or isinstance(grace, bool) or grace <= 0 or (grace > 1 and grace % 1):
        raise SweepError(f"{where}: asha.grace_period must be a number of iterations (>= 1) or a fraction of "
                         f"train.max_iters in (0, 1); got {grace!r}")
    ints = {"max_concurrent": data.get("max_concurrent", 1),
            "seed": data.get("seed", 0), "asha.reduction_factor": asha.get("reduction_factor", 2)}
    num_samples = data.get("num_samples")
    for key, value in {**ints, "num_samples": 1 if num_samples is None else num_samples}.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise SweepError(f"{where}: {key} must be an integer; got {value!r}")
    points = data.get("points_to_evaluate") or []
    if not isinstance(points, list):
        raise SweepError(f"{where}: points_to_evaluate must be a list of points")
    sweep = Sweep(
        path=where,
        params=params,
        search=data.get("search", "optuna"),
        scheduler=data.get("scheduler", "asha"),
        num_samples=num_samples,
        max_concurrent=ints["max_concurrent"],
        seed=ints["seed"],
        grace_period=grace,
        reduction_factor=ints["asha.reduction_factor"],
        points_to_evaluate=[_parse_point(cfg, params, p, f"{where}: points_to_evaluate[{i}]")
                            for i, p in enumerate(points)],
    )
    for key, value in options.items():
        if value is not None:
            setattr(sweep, key, value)
    sweep.check_options(cfg)
    return sweep


def trial_config(cfg: Config, params: dict[str, Any]) -> Config:
    """The base config with one trial's sampled ``{dotted field: value}`` applied (re-validated)."""
    clean = {k: (v.item() if hasattr(v, "item") else v) for k, v in params.items()}  # numpy scalars from Tune
    for k, v in clean.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"sweep sampled {k}={v}")
    return apply_overrides(cfg, clean)
