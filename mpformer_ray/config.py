"""One typed config system for model, data, training and storage.

A config is a tree of dataclasses. It is built from a preset name (``tiny``,
``r50``, ... resolved to ``configs/<name>.yaml``) or a YAML path, then dotted
overrides (``model.pilot.groups=3``) are applied. Unknown keys anywhere are an
error that names the key, the file and the valid choices.

YAML presets may say ``base: other_preset`` to start from another preset.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml

from mpformer_ray.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_PRESET = "tiny"


class ConfigError(UserError, ValueError):
    """A config file or override is invalid; the message names the field and the fix."""


T = TypeVar("T")


def registered(registry: Mapping[str, T], name: str, where: str) -> T:
    """``registry[name]``; an unknown name is a ConfigError naming ``where`` and the known names."""
    if name not in registry:
        raise ConfigError(f"{where}: {name!r} is not one of {list(registry)}")
    return registry[name]


@dataclass(frozen=True)
class Registry:
    """Marks a str field (``Annotated[str, Registry("module:NAME")]``) whose values are the names of the
    registry dict ``NAME`` in ``module``, the one the code dispatches on. Imported when a value is checked,
    not here: the registries sit next to their implementations (torch), and this module stays light."""

    path: str

    def load(self) -> Mapping[str, Any]:
        module, name = self.path.split(":")
        return getattr(importlib.import_module(module), name)


@dataclass
class PilotConfig:
    """Mask-piloted training (training only; inference never builds pilot queries)."""

    enabled: bool = True
    groups: int = 1
    mask_noise: Annotated[str, Registry("mpformer_ray.model.pilot:MASK_NOISE")] = "point"
    noise_ratio: float = 0.0
    label_noise: float = 0.2
    layers: str | int = "all"  # "all" or the number of leading decoder layers piloted
    class_loss: bool = True


@dataclass
class InferenceConfig:
    """Post-processing (Mask2Former's defaults)."""

    semantic_on: bool = True
    instance_on: bool = True
    panoptic_on: bool = True
    object_mask_threshold: float = 0.8
    overlap_threshold: float = 0.8
    max_detections: int = 100


@dataclass
class ModelConfig:
    backbone: Annotated[str, Registry("mpformer_ray.model.backbone:BACKBONES")] = "resnet50"
    pretrained: str | None = None  # local path or s3:// URI of a torchvision state dict
    backbone_norm: Annotated[str, Registry("mpformer_ray.model.backbone:NORMS")] = "frozen"  # "group": from scratch
    # detectron2's MSRA-style ResNets stride in the bottleneck's 1x1 conv; torchvision's (and Mask2Former's) in the 3x3
    resnet_stride_in_1x1: bool = False
    swin_window: int = 7  # Swin attention window; Mask2Former's Swin-B/L IN-21k 384 checkpoints use 12
    # local path or s3:// URI of a project checkpoint (e.g. from jobs/convert_checkpoint.py) whose model weights
    # a new run starts from; resuming a run (same run.name) takes its own checkpoint instead
    weights: str | None = None
    # the dataset's classes: None (the presets' choice) = taken from the training split's manifest by the
    # training job's preflight (``with_classes``); a value set here must agree with the data
    num_classes: int | None = None
    thing_classes: list[int] | None = None  # contiguous ids of "thing" classes; None = the data's (else all)
    num_queries: int = 100
    hidden_dim: int = 256
    nheads: int = 8
    dim_feedforward: int = 2048
    dec_layers: int = 9
    enc_layers: int = 6
    enc_dim_feedforward: int = 1024
    enc_n_points: int = 4
    mask_dim: int = 256
    dropout: float = 0.0
    size_divisibility: int = 32
    # criterion
    train_num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    pilot: PilotConfig = field(default_factory=PilotConfig)
    test: InferenceConfig = field(default_factory=InferenceConfig)


@dataclass
class SyntheticConfig:
    """The embedded default dataset, generated on first use in the real COCO layout."""

    # "easy": 6 colour-coded classes (learns in minutes); "hard": 20 classes told apart by shape and
    # texture, crowded, occluded, thin and small objects; "medium": the hard scenes with a colour cue
    # (thing classes 2k and 2k+1 share a hue, every stuff class has its own)
    variant: Literal["easy", "medium", "hard"] = "easy"
    root: str = "~/.cache/mpformer-ray/synthetic"
    num_train: int = 256
    num_val: int = 32
    image_size: int = 128
    seed: int = 0


@dataclass
class DataConfig:
    train: str = ""  # URI of prepared records (directory holding manifest.json); "" = synthetic
    val: str = ""
    augmentation: Literal["lsj", "resize_crop", "none"] = "lsj"
    crop_size: list[int] = field(default_factory=lambda: [1024, 1024])  # [H, W]
    min_scale: float = 0.1
    max_scale: float = 2.0
    flip: bool = True
    cat_max_ratio: float = 1.0  # resize_crop: retry crops where one class covers more
    test_short_side: int = 800
    test_max_size: int = 1333
    cpus_per_task: float = 0.25  # Ray Data decode/augment task CPU request
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class TrainConfig:
    max_iters: int = 90000
    batch_size: int = 2  # per worker
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    # more resources each Train worker asks for: custom node resources that place workers on chosen nodes
    # (`ray start --resources='{"trainer": 1}'` with {trainer: 1}), accelerator types ({"accelerator_type:H100": 0.001})
    worker_resources: dict[str, float] = field(default_factory=dict)
    lr: float = 1e-4
    weight_decay: float = 0.05
    backbone_lr_mult: float = 0.1
    warmup_iters: int = 0
    poly_power: float = 0.9
    clip_grad: float = 0.01
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    log_period: int = 20
    eval_period: int = 5000  # 0 = only at the end
    eval_max_images: int = 0  # 0 = the whole validation split
    checkpoint_period: int = 5000
    keep_checkpoints: int = 2
    max_failures: int = 3
    seed: int = 0


@dataclass
class StorageConfig:
    uri: str = "./runs"  # local directory or s3://bucket/prefix
    # how to reach S3, set once per process (mpformer_ray.storage.configure) for every reader and writer
    endpoint_url: str | None = None  # else AWS_ENDPOINT_URL, else AWS's default
    region: str | None = None  # else AWS_REGION, else AWS_DEFAULT_REGION, else us-east-1
    # local paths (storage.uri, data.*, model.pretrained, model.weights) are refused on a multi-node cluster, where
    # each node has its own disk; true says they are on storage every node mounts (NFS, one machine's fake nodes)
    shared_local_paths: bool = False


@dataclass
class RunConfig:
    name: str = "mpformer"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_YAML_BOOLS = {True: {"y", "yes", "true", "on"}, False: {"n", "no", "false", "off"}}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp`` (converting YAML scalars where exact)."""
    origin = typing.get_origin(tp)
    if origin in (Literal, Annotated):
        # Annotated[str, Registry(...)]: the names in the registry the code dispatches on, as they are now
        choices = typing.get_args(tp) if origin is Literal else tuple(typing.get_args(tp)[1].load())
        if isinstance(value, bool):
            # YAML reads off / on / yes / no as booleans: `train.amp=off` means the choice "off"
            spelled = [c for c in choices if isinstance(c, str) and c.lower() in _YAML_BOOLS[value]]
            value = spelled[0] if len(spelled) == 1 else value
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        args = typing.get_args(tp)
        # try the exact type first so "all" stays a str and 3 stays an int
        for arg in sorted(args, key=lambda a: a is type(None) or a is str):
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} matches none of {[_type_name(a) for a in args]}")
    if tp is type(None):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping such as {{name: 1}}, got {value!r}")
        return {_coerce(k, key_tp, f"{where} key {k!r}"): _coerce(v, value_tp, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of fields, got {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {tp}")


def _build(cls: type, data: dict[str, Any], where: str, base: Any = None) -> Any:
    hints = typing.get_type_hints(cls, include_extras=True)  # keeps a field's Registry
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(repr(u) for u in unknown)}; valid keys are {names}"
        )
    obj = base if base is not None else cls()
    for key, value in data.items():
        sub = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            _build(hints[key], value, sub, base=getattr(obj, key))
        else:
            setattr(obj, key, _coerce(value, hints[key], sub))
    return obj


def find_yaml(name_or_path: str, directory: Path, file_word: str, name_word: str) -> Path:
    """A ``.yaml`` / ``.yml`` path as given, else ``directory/<name>.yaml``; a ConfigError names the
    missing file, or the unknown name and the names there (``file_word`` / ``name_word`` say what
    is looked for: "config" / "preset", "sweep" / "sweep")."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise ConfigError(f"{file_word} file {path} does not exist")
        return path
    named = directory / f"{name_or_path}.yaml"
    if not named.exists():
        available = sorted(p.stem for p in directory.glob("*.yaml"))
        raise ConfigError(f"unknown {name_word} {name_or_path!r}; choose one of {available} or give a .yaml path")
    return named


def _load_yaml_chain(name_or_path: str, seen: tuple[str, ...] = ()) -> list[tuple[Path, dict]]:
    path = find_yaml(name_or_path, CONFIG_DIR, "config", "preset")
    if str(path) in seen:
        raise ConfigError(f"{path}: 'base' presets form a cycle: {' -> '.join(seen)}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    chain = _load_yaml_chain(base, seen + (str(path),)) if base else []
    return chain + [(path, data)]


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=c"`` -> (["a", "b"], YAML-parsed c)."""
    key, raw = text.split("=", 1) if "=" in text else ("", "")
    if not all(part.strip().isidentifier() for part in key.split(".")):
        raise ConfigError(f"override {text!r} must look like section.field=value (e.g. train.max_iters=100)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def load_config(preset: str | Path = DEFAULT_PRESET, overrides: list[str] | None = None) -> Config:
    """Build a Config from a preset name or YAML path plus dotted ``key=value`` overrides."""
    cfg = Config()
    for path, data in _load_yaml_chain(str(preset)):
        try:
            _build(Config, data, "", base=cfg)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    return apply_overrides(cfg, overrides or [])


def apply_overrides(cfg: Config, overrides: list[str] | dict[str, Any]) -> Config:
    """A copy of ``cfg`` (``cfg`` itself is left as it is) with dotted overrides applied in order, then
    validated as a whole; a ConfigError names the override and the field. ``overrides`` are
    ``key=value`` strings (values parsed as YAML, as ``--set`` gives them) or a
    ``{dotted key: Python value}`` mapping (as a sweep's trials get them)."""
    cfg = copy.deepcopy(cfg)
    if isinstance(overrides, dict):
        pairs = [(f"{k}={v!r}", k.split("."), v) for k, v in overrides.items()]
    else:
        pairs = [(text, *parse_override(text)) for text in overrides]
    for text, keys, value in pairs:
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        try:
            _build(Config, nested, "", base=cfg)
        except ConfigError as e:
            raise ConfigError(f"override {text!r}: {e}") from None
    validate(cfg)
    return cfg


def _override_argument(text: str) -> str:
    """argparse ``type`` of ``--set``: a bad pair is a usage error at parse time. A positional argument
    written right after the pairs reads as one more pair, hence the hint."""
    try:
        parse_override(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(f"{e}; arguments that are not KEY=VALUE go before --set, or after --")
    return text


def add_override_argument(parser: argparse.ArgumentParser, of: str = "the config") -> None:
    """``--set KEY=VALUE [KEY=VALUE ...]`` into ``args.overrides`` (a list, empty by default): several
    pairs after one ``--set`` (detectron2 / Hydra style) and repeated ``--set`` both work."""
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        type=_override_argument,
                        help=f"override fields of {of}, e.g. --set train.max_iters=100 model.pilot.groups=3 "
                             "(repeatable)")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The config arguments every job that builds a config takes: ``--config`` (preset name or YAML path,
    default DEFAULT_PRESET) into ``args.config`` and ``--set`` overrides into ``args.overrides``; pass them
    to ``load_config(args.config, args.overrides)``."""
    parser.add_argument("--config", default=DEFAULT_PRESET, help="preset name or YAML path (default: %(default)s)")
    add_override_argument(parser)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config saved with ``Config.to_dict()`` (e.g. inside a checkpoint)."""
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Every rule about a config's values that a field's type cannot express, in one place: it runs
    whenever a config is built (``Config(...)``, ``load_config``, ``apply_overrides``,
    ``config_from_dict``). Checks against the outside world (data, storage, cluster) are the training
    job's preflight."""
    m, p = cfg.model, cfg.model.pilot
    problems = []
    if m.num_classes is not None and m.num_classes < 1:
        problems.append("model.num_classes must be >= 1 (or null: the training data's)")
    if m.num_queries < 1:
        problems.append("model.num_queries must be >= 1")
    if m.hidden_dim % m.nheads:
        problems.append(f"model.hidden_dim ({m.hidden_dim}) must be divisible by model.nheads ({m.nheads})")
    if m.dec_layers < 1:
        problems.append("model.dec_layers must be >= 1")
    if m.swin_window < 1:
        problems.append(f"model.swin_window must be >= 1; got {m.swin_window}")
    if m.thing_classes is not None and any(not 0 <= c < (m.num_classes or math.inf) for c in m.thing_classes):
        problems.append(f"model.thing_classes must lie in [0, {m.num_classes or 'model.num_classes'}); "
                        f"got {m.thing_classes}")
    if p.groups < 1:
        problems.append("model.pilot.groups must be >= 1 (disable with model.pilot.enabled=false)")
    if not 0.0 <= p.label_noise <= 1.0:
        problems.append(f"model.pilot.label_noise must lie in [0, 1]; got {p.label_noise}")
    if p.noise_ratio < 0.0:
        problems.append(f"model.pilot.noise_ratio must be >= 0; got {p.noise_ratio}")
    if isinstance(p.layers, str) and p.layers != "all":
        problems.append(f"model.pilot.layers must be 'all' or an integer; got {p.layers!r}")
    if isinstance(p.layers, int) and not 1 <= p.layers <= m.dec_layers:
        problems.append(f"model.pilot.layers must lie in [1, {m.dec_layers}] (model.dec_layers); got {p.layers}")
    t = cfg.train
    problems += [f"train.{name} must be >= 1; got {getattr(t, name)}"
                 for name in ("batch_size", "workers", "max_iters", "log_period", "checkpoint_period",
                              "keep_checkpoints") if getattr(t, name) < 1]
    problems += [f"train.{name} must be >= 0; got {getattr(t, name)}"
                 for name in ("eval_period", "eval_max_images", "max_failures", "warmup_iters") if getattr(t, name) < 0]
    if t.cpus_per_worker <= 0:
        problems.append(f"train.cpus_per_worker must be > 0; got {t.cpus_per_worker}")
    problems += [f"train.worker_resources.{name} must be > 0; got {amount:g}"
                 for name, amount in t.worker_resources.items() if amount <= 0]
    problems += [f"train.worker_resources.{name}: set it through train.{instead}"
                 for name, instead in (("CPU", "cpus_per_worker"), ("GPU", "use_gpu")) if name in t.worker_resources]
    if t.amp == "fp16" and not t.use_gpu:
        problems.append("train.amp=fp16 needs a GPU (train.use_gpu=true); use train.amp=off or bf16 on CPU")
    if len(cfg.data.crop_size) != 2:
        problems.append(f"data.crop_size must be [height, width]; got {cfg.data.crop_size}")
    if not cfg.run.name or "/" in cfg.run.name:
        problems.append(f"run.name must be a non-empty name without '/'; got {cfg.run.name!r}")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def with_classes(cfg: Config, classes: list[dict], where: str = "the data") -> Config:
    """A copy of ``cfg`` whose model predicts the dataset's ``classes`` (a manifest's ``classes`` list:
    contiguous ids with ``isthing``): ``model.num_classes`` and ``model.thing_classes`` filled where unset.
    A value the config already sets that disagrees with them is a ConfigError naming both and ``where`` the
    classes come from. The training job applies it to its training split; code that builds a model without
    one (a test, a benchmark) applies it to the classes of the data it means."""
    m = cfg.model
    if m.num_classes is not None and m.num_classes != len(classes):
        raise ConfigError(f"model.num_classes={m.num_classes} but {where} has {len(classes)} classes "
                          f"({', '.join(c['name'] for c in classes[:8])}{', ...' if len(classes) > 8 else ''}); "
                          f"leave model.num_classes unset (null) to take them from the data, or set "
                          f"--set model.num_classes={len(classes)}")
    cfg = copy.deepcopy(cfg)
    cfg.model.num_classes = len(classes)
    if cfg.model.thing_classes is None:
        cfg.model.thing_classes = [i for i, c in enumerate(classes) if c.get("isthing", True)]
    try:
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"with the {len(classes)} classes of {where}: {e}") from None
    return cfg


def piloted_layers(cfg: ModelConfig) -> int:
    """Number of leading decoder layers whose pilot queries get ground-truth attention masks."""
    return cfg.dec_layers if cfg.pilot.layers == "all" else int(cfg.pilot.layers)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested mapping (e.g. ``Config.to_dict()``) as ``{"model.pilot.groups": 1, ...}``; empty mappings are values."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def field_type(dotted: str) -> Any:
    """The annotation of config field ``dotted`` (``"model.pilot.groups"`` -> ``int``; a registry's field
    -> ``Annotated[str, Registry(...)]``); a ConfigError names the first unknown part and the valid keys there."""
    cls: Any = Config
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"{'.'.join(parts[:i])} is a field, not a section: {dotted!r} names nothing")
        hints = typing.get_type_hints(cls, include_extras=True)
        if part not in hints:
            where = ".".join(parts[:i]) or "the config"
            raise ConfigError(f"unknown field {dotted!r}: {where} has no key {part!r}; valid keys are "
                              f"{[f.name for f in dataclasses.fields(cls)]}")
        cls = hints[part]
    return cls

