"""The one config system: presets, base chains, overrides, validation messages."""

import textwrap

import pytest

from mpformer_ray.config import ConfigError, config_from_dict, load_config, piloted_layers, to_yaml


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


@pytest.mark.parametrize("override, words", [
    ("model.pilot.bogus=1", ["bogus", "valid keys", "groups"]),
    ("nosuchsection.x=1", ["nosuchsection"]),
    ("model.pilot.mask_noise=blur", ["blur", "point", "shift"]),
    ("model.pilot.groups=two", ["model.pilot.groups", "integer"]),
    ("model.pilot.label_noise=1.5", ["label_noise", "[0, 1]"]),
    ("model.pilot.layers=99", ["model.pilot.layers", "dec_layers"]),
    ("model.pilot.layers=some", ["model.pilot.layers", "'all'"]),
    ("train.max_iters", ["section.field=value"]),
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


def test_round_trip_through_dict_and_yaml():
    cfg = load_config("r50", ["model.pilot.groups=3"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    assert "groups: 3" in to_yaml(cfg)
