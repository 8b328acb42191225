"""Sweep files: the shipped ones load against their presets, bad ones fail before any trial
starts with a message naming the file and the field, and trial configs apply sampled values."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpformer_ray.config import ConfigError, load_config
from mpformer_ray.tune.space import SWEEP_DIR, SweepError, load_sweep, trial_config

SHIPPED = sorted(p.stem for p in SWEEP_DIR.glob("*.yaml"))


@pytest.mark.parametrize("preset", ["tiny", "r50"])
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_sweeps_load(name, preset):
    cfg = load_config(preset)
    sweep = load_sweep(name, cfg)
    assert sweep.params
    for point in sweep.points_to_evaluate:
        trial_config(cfg, point)  # every point is a valid config


def test_default_sweep_searches_the_papers_three_and_starts_from_released_defaults_and_off():
    cfg = load_config("tiny")
    sweep = load_sweep("pilot", cfg)
    names = {p.name for p in sweep.params}
    assert {"model.pilot.noise_ratio", "model.pilot.groups", "model.pilot.label_noise"} <= names
    assert sweep.search == "optuna" and sweep.scheduler == "asha"
    points = sweep.points_to_evaluate
    released = {"model.pilot.enabled": True, "model.pilot.noise_ratio": 0.0, "model.pilot.groups": 1,
                "model.pilot.label_noise": 0.2}
    assert released in points
    assert any(p["model.pilot.enabled"] is False for p in points)
    assert sweep.grace_iters(cfg.train.max_iters) == cfg.train.max_iters // 2


def test_ablation_is_a_grid_of_pilot_off_and_on_by_three_seeds():
    sweep = load_sweep("ablation", load_config("tiny"))
    assert sweep.search == "grid" and sweep.scheduler == "none"
    grid = {p.name: p.values for p in sweep.params}
    assert grid == {"model.pilot.enabled": [False, True], "train.seed": [0, 1, 2]}


def test_trial_config_applies_sampled_values_and_revalidates():
    cfg = load_config("tiny")
    trial = trial_config(cfg, {"model.pilot.groups": 3, "train.lr": 3e-4, "model.pilot.mask_noise": "shift"})
    assert (trial.model.pilot.groups, trial.train.lr, trial.model.pilot.mask_noise) == (3, 3e-4, "shift")
    assert cfg.model.pilot.groups == 1  # the base is not changed
    with pytest.raises(ConfigError, match="model.pilot.layers"):
        trial_config(cfg, {"model.pilot.layers": 99})


BAD = [
    ("space: {model.pilot.noise_ration: {uniform: [0.0, 0.4]}}", "model.pilot.noise_ration"),
    ("space: {model.pilot: {uniform: [0.0, 0.4]}}", "model.pilot is a config section"),
    ("space: {model.pilot.noise_ratio: {normal: [0.0, 0.4]}}", "unknown distribution 'normal'"),
    ("space: {model.pilot.noise_ratio: [0.0, 0.4]}", "model.pilot.noise_ratio must be one distribution"),
    ("space: {model.pilot.noise_ratio: {uniform: [0.4, 0.0]}}", "needs low < high"),
    ("space: {model.pilot.noise_ratio: {uniform: [0.0]}}", "takes \\[low, high\\]"),
    ("space: {model.pilot.label_noise: {uniform: [0.0, 1.5]}}", "model.pilot.label_noise.*must lie in \\[0, 1\\]"),
    ("space: {model.pilot.groups: {uniform: [1, 3]}}", "model.pilot.groups is a field of type int"),
    ("space: {model.pilot.groups: {randint: [0, 3]}}", "model.pilot.groups.*must be >= 1"),
    ("space: {model.pilot.mask_noise: {choice: [point, blur]}}", "model.pilot.mask_noise.*'blur'"),
    ("space: {model.pilot.layers: {choice: [all, 12]}}", "model.pilot.layers.*\\[1, 3\\]"),
    ("space: {train.lr: {loguniform: [0.0, 0.001]}}", "loguniform needs low > 0"),
    ("space: {}", "'space' must map at least one config field"),
    ("search: optuna\nspace: {train.seed: {grid: [0, 1]}}", "only --search grid runs"),
    ("space: {train.lr: {uniform: [0.0001, 0.001]}}\npoints_to_evaluate: [{train.lr: 0.01}]",
     "train.lr=0.01 lies outside"),
    ("space: {train.lr: {uniform: [0.0001, 0.001]}}\npoints_to_evaluate: [{model.pilot.groups: 2}]",
     "a point must give every searched field"),
    ("space: {train.lr: {uniform: [0.0001, 0.001]}}\nasha: {grace_period: 300}", "asha.grace_period=300"),
    ("space: {train.lr: {uniform: [0.0001, 0.001]}}\nsamples: 3", "unknown key\\(s\\) \\['samples'\\]"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m for _, m in BAD])
def test_bad_sweep_files_name_the_file_and_field(tmp_path: Path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SweepError, match=message) as info:
        load_sweep(str(path), load_config("tiny"))
    assert str(path) in str(info.value)


def test_cli_options_override_the_file_and_are_checked():
    cfg = load_config("tiny")
    sweep = load_sweep("pilot", cfg, num_samples=2, scheduler="none", max_concurrent=None)
    assert (sweep.num_samples, sweep.scheduler, sweep.max_concurrent) == (2, "none", 1)
    with pytest.raises(SweepError, match="only --search grid runs"):
        load_sweep("ablation", cfg, search="optuna")
    with pytest.raises(SweepError, match="train.eval_period=0"):
        load_sweep("pilot", load_config("tiny", ["train.eval_period=0"]))
    with pytest.raises(SweepError, match="unknown sweep 'nope'"):
        load_sweep("nope", cfg)


def test_a_sweep_resumes_only_unchanged(tmp_path):
    import json

    from mpformer_ray.tune.sweep import SWEEP_STATE, _check_same_sweep, _sweep_state

    cfg = load_config("tiny")
    sweep = load_sweep("pilot", cfg)
    state = _sweep_state(sweep, cfg)
    (tmp_path / SWEEP_STATE).write_text(json.dumps(state))
    _check_same_sweep(str(tmp_path), _sweep_state(load_sweep("pilot", cfg, max_concurrent=3), cfg))
    # a field a later version added (with its default) is no change
    older = json.loads(json.dumps(state))
    del older["config"]["train"]["lr"]
    (tmp_path / SWEEP_STATE).write_text(json.dumps(older))
    _check_same_sweep(str(tmp_path), state)
    (tmp_path / SWEEP_STATE).write_text(json.dumps(state))
    changed = load_config("tiny", ["train.max_iters=10", "train.eval_period=5"])
    with pytest.raises(SweepError, match="differs in: train.eval_period, train.max_iters"):
        _check_same_sweep(str(tmp_path), _sweep_state(load_sweep("pilot", changed), changed))
    with pytest.raises(SweepError, match="differs in: sweep num_samples"):
        _check_same_sweep(str(tmp_path), _sweep_state(load_sweep("pilot", cfg, num_samples=9), cfg))


def test_concurrent_trials_must_each_leave_ray_data_a_whole_cpu():
    from mpformer_ray.tune.sweep import concurrency_problem

    tiny = load_config("tiny")  # 2 workers x 0.5 CPU a trial
    assert concurrency_problem(2, tiny, 1) is None
    assert "Fix: --max-concurrent 1" in concurrency_problem(2, tiny, 2)  # 1 CPU left, 1 // 2 = 0 each
    assert concurrency_problem(4, tiny, 2) is None  # 2 left, 1 each
    assert "Fix: --max-concurrent 2" in concurrency_problem(5, tiny, 3)
    one = load_config("tiny", ["train.workers=1", "train.cpus_per_worker=1.5"])
    assert "cannot run even one trial" in concurrency_problem(2, one, 2)


def test_grid_runs_each_point_once_unless_told_and_optuna_defaults_to_eight(tmp_path):
    cfg = load_config("tiny")
    assert load_sweep("ablation", cfg).num_samples == 1
    assert load_sweep("pilot", cfg).num_samples == 4  # the file's
    path = tmp_path / "s.yaml"
    path.write_text("space: {train.lr: {uniform: [0.0001, 0.001]}}")
    assert load_sweep(str(path), cfg).num_samples == 8
    path.write_text("num_samples: 0\nspace: {train.lr: {uniform: [0.0001, 0.001]}}")
    with pytest.raises(SweepError, match="num_samples and max_concurrent must be >= 1"):
        load_sweep(str(path), cfg)


def test_resume_without_a_sweep_or_on_a_training_run_is_refused_before_anything_is_written(tmp_path):
    from mpformer_ray.tune.sweep import run_sweep

    cfg = load_config("tiny", [f"storage.uri={tmp_path / 'runs'}", "run.name=s"])
    sweep = load_sweep("pilot", cfg)
    with pytest.raises(SweepError, match="no sweep to resume at .*runs/s"):
        run_sweep(cfg, sweep, resume=True)
    assert not (tmp_path / "runs").exists()
    (tmp_path / "runs" / "s" / "checkpoints").mkdir(parents=True)
    with pytest.raises(SweepError, match="holds a training run"):
        run_sweep(cfg, sweep)


def test_choice_values_are_checked_against_the_registry_as_it_is(tmp_path, monkeypatch):
    """A sweep's choices for a registry's field are its names: a kind registered in MASK_NOISE is a valid
    choice, and only while it is registered."""
    from mpformer_ray.model.pilot import MASK_NOISE, MaskNoise

    path = tmp_path / "kinds.yaml"
    path.write_text("scheduler: none\nspace: {model.pilot.mask_noise: {choice: [point, blank]}}\n")
    cfg = load_config("tiny")
    with pytest.raises(SweepError, match=r"model\.pilot\.mask_noise.*'blank' is not one of \['none', 'point'"):
        load_sweep(str(path), cfg)
    monkeypatch.setitem(MASK_NOISE, "blank", MaskNoise())
    assert load_sweep(str(path), cfg).params[0].values == ["point", "blank"]
    path.write_text("space: {model.pilot.mask_noise: {uniform: [0.0, 1.0]}}\n")
    with pytest.raises(SweepError, match="model.pilot.mask_noise is a field of type str"):
        load_sweep(str(path), cfg)
