"""The one config system: presets, base chains, overrides, validation messages, the jobs' --config / --set."""

import argparse
import importlib.util
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import pytest
import yaml

from mpformer_ray.config import (DEFAULT_PRESET, ConfigError, Registry, add_config_arguments, apply_overrides,
                                 config_from_dict, field_type, load_config, piloted_layers, to_yaml)

JOBS = Path(__file__).resolve().parent.parent / "jobs"


def test_presets_load_with_paper_values():
    r50 = load_config("r50")
    assert (r50.model.backbone, r50.model.hidden_dim, r50.model.dec_layers, r50.model.num_queries) == (
        "resnet50", 256, 9, 100)
    assert (r50.model.enc_layers, r50.model.nheads, r50.model.dim_feedforward) == (6, 8, 2048)
    tiny = load_config("tiny")
    assert tiny.model.backbone == "resnet18" and tiny.model.hidden_dim < 256


def test_overrides_are_typed_and_nested():
    cfg = load_config("tiny", ["model.pilot.groups=3", "model.pilot.layers=2", "model.pilot.mask_noise=shift",
                               "train.lr=1e-3", "model.thing_classes=[0, 2]", "storage.endpoint_url=null"])
    assert cfg.model.pilot.groups == 3 and piloted_layers(cfg.model) == 2
    assert cfg.model.pilot.mask_noise == "shift" and cfg.train.lr == 1e-3
    assert cfg.model.thing_classes == [0, 2] and cfg.storage.endpoint_url is None
    assert piloted_layers(load_config("tiny").model) == load_config("tiny").model.dec_layers


def test_choices_spelled_like_yaml_booleans_mean_the_choice(tmp_path):
    # YAML reads `off` as false: `train.amp=off` (the documented way to turn mixed precision off)
    # and `amp: off` in a file must give the choice "off", not an error
    assert load_config("tiny", ["train.amp=off"]).train.amp == "off"
    path = tmp_path / "amp.yaml"
    path.write_text("base: tiny\ntrain:\n  amp: off\n")
    assert load_config(str(path)).train.amp == "off"
    with pytest.raises(ConfigError, match="train.amp"):
        load_config("tiny", ["train.amp=on"])  # no choice is spelled "on"


def test_mapping_fields_take_a_yaml_mapping():
    cfg = load_config("tiny", ["train.worker_resources={trainer: 1, accelerator_type:H100: 0.001}"])
    assert cfg.train.worker_resources == {"trainer": 1.0, "accelerator_type:H100": 0.001}
    assert load_config("tiny").train.worker_resources == {}
    with pytest.raises(ConfigError, match="train.worker_resources: expected a mapping"):
        load_config("tiny", ["train.worker_resources=4"])
    with pytest.raises(ConfigError, match="train.worker_resources.trainer: expected a number"):
        load_config("tiny", ["train.worker_resources={trainer: many}"])


@pytest.mark.parametrize("override, words", [
    ("model.pilot.bogus=1", ["bogus", "valid keys", "groups"]),
    ("nosuchsection.x=1", ["nosuchsection"]),
    ("model.pilot.mask_noise=blur", ["blur", "point", "shift"]),
    ("model.pilot.groups=two", ["model.pilot.groups", "integer"]),
    ("model.pilot.label_noise=1.5", ["label_noise", "[0, 1]"]),
    ("model.pilot.layers=99", ["model.pilot.layers", "dec_layers"]),
    ("model.pilot.layers=some", ["model.pilot.layers", "'all'"]),
    ("train.max_iters", ["section.field=value"]),
    # rules about one config's values run wherever a config is built, not only in the training job's preflight
    ("train.log_period=0", ["train.log_period must be >= 1; got 0"]),
    ("train.cpus_per_worker=0", ["train.cpus_per_worker must be > 0"]),
    ("train.amp=fp16", ["train.amp=fp16 needs a GPU"]),
    ("train.worker_resources={CPU: 1}", ["train.worker_resources.CPU: set it through train.cpus_per_worker"]),
])
def test_bad_overrides_name_the_field(override, words):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    for w in words:
        assert w in str(e.value)


def test_yaml_file_with_base_and_unknown_key(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text(textwrap.dedent("""
        base: tiny
        model:
          pilot: {groups: 2}
        run: {name: mine}
    """))
    cfg = load_config(str(good))
    assert cfg.model.pilot.groups == 2 and cfg.model.backbone == "resnet18" and cfg.run.name == "mine"
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'hidden'"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config("nope")


def test_a_config_built_directly_is_validated_too():
    from mpformer_ray.config import Config, TrainConfig

    with pytest.raises(ConfigError, match="train.log_period must be >= 1"):
        Config(train=TrainConfig(log_period=0))
    with pytest.raises(ConfigError, match="unknown key.*fail_at_iter"):  # fault injection is the harness's
        load_config("tiny", ["train.fail_at_iter=3"])


def test_round_trip_through_dict_and_yaml():
    cfg = load_config("r50", ["model.pilot.groups=3"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    assert "groups: 3" in to_yaml(cfg)


def test_apply_overrides_copies_and_validates():
    cfg = load_config("tiny")
    new = apply_overrides(cfg, ["model.test.panoptic_on=false", "train.lr=0.01"])
    assert not new.model.test.panoptic_on and new.train.lr == 0.01
    assert cfg.model.test.panoptic_on and cfg.train.lr == 0.001  # the original is left as it was
    assert apply_overrides(cfg, []) == cfg
    with pytest.raises(ConfigError, match="model.pilot.layers.*dec_layers"):
        apply_overrides(cfg, ["model.pilot.layers=99"])


def test_config_arguments_take_several_pairs_per_set_and_repeated_sets(capsys):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    assert vars(parser.parse_args([])) == {"config": DEFAULT_PRESET, "overrides": []}
    args = parser.parse_args(["--config", "r50", "--set", "model.pilot.groups=3", "train.lr=1e-3",
                              "--set", "run.name=x"])
    assert args.overrides == ["model.pilot.groups=3", "train.lr=1e-3", "run.name=x"]
    cfg = load_config(args.config, args.overrides)
    assert (cfg.model.backbone, cfg.model.pilot.groups, cfg.train.lr, cfg.run.name) == ("resnet50", 3, 1e-3, "x")
    with pytest.raises(SystemExit):
        parser.parse_args(["--set", "train.max_iters=5", "photo.jpg"])
    assert "photo.jpg" in capsys.readouterr().err


def _parse_args(job: str):
    """``parse_args`` of jobs/JOB.py."""
    spec = importlib.util.spec_from_file_location(f"job_{job}_args", JOBS / f"{job}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args


@pytest.mark.parametrize("job, required", [("train", []), ("evaluate", ["--checkpoint", "c.pth"]),
                                           ("predict", ["--checkpoint", "c.pth", "a.png"])])
def test_every_job_takes_several_pairs_after_one_set(job, required):
    parse_args = _parse_args(job)
    args = parse_args([*required, "--set", "model.test.panoptic_on=false", "data.test_short_side=64",
                       "--set", "train.seed=1"])
    assert args.overrides == ["model.test.panoptic_on=false", "data.test_short_side=64", "train.seed=1"]
    if job == "predict":  # positionals after the pairs need --
        args = parse_args(["--checkpoint", "c.pth", "--set", "train.seed=1", "--", "a.png", "b.png"])
        assert args.overrides == ["train.seed=1"] and args.images == ["a.png", "b.png"]


@pytest.mark.parametrize("field, bad, registry", [
    ("model.pilot.mask_noise", "blur", "mpformer_ray.model.pilot:MASK_NOISE"),
    ("model.backbone", "vgg16", "mpformer_ray.model.backbone:BACKBONES"),
    ("model.backbone_norm", "batch", "mpformer_ray.model.backbone:NORMS"),
])
def test_registry_fields_refuse_an_unknown_name_listing_the_registered_ones(tmp_path, field, bad, registry):
    names = list(Registry(registry).load())
    assert typing.get_args(field_type(field)) == (str, Registry(registry))
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [f"{field}={bad}"])
    assert f"{field}: {bad!r} is not one of {names}" in str(e.value)
    section, key = field.rsplit(".", 1)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"base": "tiny", **_nested(section, {key: bad})}))
    with pytest.raises(ConfigError, match=rf"bad\.yaml: {field}: '{bad}' is not one of"):
        load_config(str(path))
    load_config("tiny", [f"{field}={names[-1]}"])  # every registered name is accepted


def _nested(dotted: str, leaf: dict) -> dict:
    for part in reversed(dotted.split(".")):
        leaf = {part: leaf}
    return leaf


def test_loading_the_config_module_imports_no_torch():
    # Ray drivers import it; the registries it names are imported only when a value is checked
    code = "import sys, mpformer_ray.config; print('torch' in sys.modules, 'mpformer_ray.model' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=JOBS.parent).stdout
    assert out.split() == ["False", "False"]
