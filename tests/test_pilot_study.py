"""benchmarks/pilot_study.py builds its report from a sweep's files: sweep.json and trials.csv as the sweep job
writes them, and each trial's result.json as Tune logs the evaluations (one JSON object a line)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
from ray.tune import Result
from scipy import stats

from mpformer_ray.config import load_config
from mpformer_ray.tune import report
from mpformer_ray.tune.space import load_sweep

ROOT = Path(__file__).resolve().parent.parent
# by path, not through sys.path: benchmarks/ and jobs/ both hold scripts whose names could clash
_spec = importlib.util.spec_from_file_location("pilot_study", ROOT / "benchmarks" / "pilot_study.py")
pilot_study = sys.modules["pilot_study"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up there
_spec.loader.exec_module(pilot_study)

MAX_ITERS = 40
# final PQ / AP / mIoU per (pilot, seed); at 25 % every value is 10 lower, at 50 % 5 lower
FINAL = {(False, 0): (10.0, 20.0, 30.0), (False, 1): (12.0, 21.0, 31.0), (False, 2): (14.0, 22.0, 32.0),
         (True, 0): (13.0, 21.0, 33.0), (True, 1): (14.0, 22.5, 33.0), (True, 2): (18.0, 22.0, 36.0)}
CONSISTENCY = {False: (0.70, 0.80, 0.90), True: (0.80, 0.85, 0.95)}


# a third arm from a second sweep (configs/sweeps/seeds.yaml over a base config with 2 pilot groups)
FINAL_G2 = {(True, 0): (16.0, 24.0, 35.0), (True, 1): (15.0, 23.0, 34.0), (True, 2): (20.0, 25.0, 38.0)}


def _evaluation(trial: str, final: tuple, pilot: bool, seed: int, iteration: int, started: float,
                searched: dict) -> dict:
    """One line of Tune's result.json for an evaluation report of the training job."""
    pq, ap, miou = (v - {10: 10, 20: 5, 30: 5, 40: 0}[iteration] for v in final)
    layers = {f"consistency/layer_{i}_{i + 1}": c + 0.01 * seed for i, c in enumerate(CONSISTENCY[pilot])}
    wall = 100.0 * iteration / MAX_ITERS + (20.0 if pilot else 0.0)
    parts = {f"panoptic/{p}_{kind}": pq + offset for p, offset in (("PQ", 0), ("SQ", 40), ("RQ", 5))
             for kind in ("th", "st")}
    return {"iteration": iteration, "panoptic/PQ": pq, **parts, "segm/AP": ap, "sem_seg/mIoU": miou, **layers,
            "consistency/mean": sum(layers.values()) / 3, "eval_seconds": 5.0, "num_images": 60.0,
            **({"images_per_s": 7.0 if pilot else 9.0 + seed} if iteration == MAX_ITERS else {}),
            "timestamp": started + wall, "time_this_iter_s": 25.0, "time_total_s": wall, "training_iteration":
            iteration // 10, "trial_id": trial, "date": "2026-12-02_12-00-00", "done": False, "pid": 1,
            "hostname": "h", "node_ip": "127.0.0.1", "time_since_restore": wall, "iterations_since_restore":
            iteration // 10, "config": searched}


def _config(*overrides: str):
    return load_config("tiny-hard", [f"train.max_iters={MAX_ITERS}", "train.eval_period=10",
                                     "train.eval_max_images=60", *overrides])


def _write_sweep(uri: Path, cfg, sweep_file: str, finals: dict, prefix: str, failed: dict | None = None) -> Path:
    """A finished sweep of ``sweep_file`` over ``cfg`` at ``uri``, one trial per (pilot, seed) of ``finals``,
    written as the sweep job writes it; ``failed``: the searched values of one more trial that errored."""
    sweep = load_sweep(str(ROOT / "configs" / "sweeps" / sweep_file), cfg)
    names = [p.name for p in sweep.params]
    uri.mkdir()
    # as sweep._sweep_state writes it
    state = {"sweep": dataclasses.asdict(sweep) | {"path": os.path.basename(sweep.path)}, "config": cfg.to_dict()}
    (uri / "sweep.json").write_text(json.dumps(state, indent=1))
    results = []
    for n, ((pilot, seed), final) in enumerate(finals.items()):
        trial = f"{prefix}_{n:05d}"
        (uri / trial).mkdir()
        searched = {k: v for k, v in {"model.pilot.enabled": pilot, "train.seed": seed}.items() if k in names}
        evals = [_evaluation(trial, final, pilot, seed, it, 1000.0 * n, searched) for it in (10, 20, 30, 40)]
        if (pilot, seed) == (True, 1):  # a restarted trial logs the evaluations since its checkpoint again
            evals.insert(1, {**evals[1], "panoptic/PQ": -1.0})
        (uri / trial / "result.json").write_text("".join(json.dumps(e) + "\n" for e in evals))
        results.append(Result(metrics=evals[-1], checkpoint=None, error=None, path=str(uri / trial),
                              metrics_dataframe=pd.DataFrame(evals)))
    if failed is not None:
        results.append(Result(metrics={"trial_id": f"{prefix}_{len(finals):05d}", "config": failed}, checkpoint=None,
                              error=RuntimeError("worker died"), path=str(uri / f"{prefix}_{len(finals):05d}"),
                              metrics_dataframe=None))
    table = report.trials_table(results, "panoptic/PQ", names, MAX_ITERS)
    report.write_outputs(str(uri), table, None, {})
    return uri


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    return _write_sweep(tmp_path / "pilot-ablation", _config(), "ablation.yaml", FINAL, "run",
                        failed={"model.pilot.enabled": True, "train.seed": 3})


def test_report_numbers(sweep_dir: Path, tmp_path: Path):
    out = tmp_path / "report"
    assert pilot_study.main([str(sweep_dir), "--out", str(out)]) == 0
    text = (out / "pilot_study.md").read_text()
    assert (out / "pilot_study_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "pilot_study_consistency.png").read_bytes()[:4] == b"\x89PNG"

    # the benchmark, from the sweep's base config
    assert "variant `hard`: generator seed 0, 1000 training and 100 validation images of 128 x 128 px" in text
    assert "Left out of the statistics (not completed): run_00006." in text
    # mean ± sample std over 3 seeds: PQ @25 % (10 below the end), 50 % and 100 %
    row = next(line for line in text.splitlines() if line.startswith("| pilot off | 3 |"))
    assert row.split(" | ")[2:5] == ["2.0 ± 2.0", "7.0 ± 2.0", "12.0 ± 2.0"]
    row = next(line for line in text.splitlines() if line.startswith("| pilot on (released defaults) | 3 |"))
    assert row.split(" | ")[2:5] == ["5.0 ± 2.6", "10.0 ± 2.6", "15.0 ± 2.6"]
    # the paired test, against scipy on the same numbers
    want = stats.ttest_rel([13.0, 14.0, 18.0], [10.0, 12.0, 14.0], alternative="greater")
    line = next(line for line in text.splitlines() if line.startswith("| pilot on (released defaults) | PQ |"))
    assert f"+3.00, +2.00, +4.00 | +3.00 | {want.statistic:.2f} | {want.pvalue:.3f} |" in line
    line = next(line for line in text.splitlines() if line.startswith("| pilot on (released defaults) | AP |"))
    assert "| +1.00, +1.50, +0.00 | +0.83 |" in line
    # things and stuff at the end (here PQ_th = PQ_st = PQ, SQ 40 and RQ 5 above)
    line = next(line for line in text.splitlines() if line.startswith("| pilot off | 12.0 ± 2.0 | 52.0"))
    assert line == "| pilot off | " + " | ".join(["12.0 ± 2.0", "52.0 ± 2.0", "17.0 ± 2.0"] * 2) + " |"
    # consistency per layer pair and wall / throughput per arm
    line = next(line for line in text.splitlines() if line.startswith("| pilot on (released defaults) | 0.8"))
    assert line.split(" | ")[1:4] == ["0.810 ± 0.010", "0.860 ± 0.010", "0.960 ± 0.010"]
    line = next(line for line in text.splitlines() if line.startswith("| pilot off | 100 "))
    # 40 iterations x 2 workers x batch 4 in 100 s minus 4 evaluations of 5 s
    assert line == f"| pilot off | 100 ± 0 | 20 ± 0 | {320 / 80:.2f} ± 0.00 | 10.00 ± 1.00 |"
    assert "- pilot on (released defaults): NOT MET: AP +0.83" in text
    assert "Checked because the goal is not met" in text and "pilot_fidelity.md" in text
    assert not math.isnan(want.pvalue)


def test_a_second_sweep_adds_an_arm(sweep_dir: Path, tmp_path: Path):
    best = _write_sweep(tmp_path / "best-over-seeds", _config("model.pilot.groups=2", "model.pilot.label_noise=0.35",
                                                              "run.name=best"), "seeds.yaml", FINAL_G2, "best")
    out = tmp_path / "report"
    assert pilot_study.main([str(sweep_dir), str(best), "--out", str(out), "--name", "study"]) == 0
    text = (out / "study.md").read_text()
    assert {p.name for p in out.iterdir()} == {"study.md", "study_curves.png", "study_consistency.png"}
    assert "![learning curves](study_curves.png)" in text
    arm = "pilot on (groups=2, label_noise=0.35)"
    assert sum(line.startswith("| best_0000") and f"| {arm} |" in line for line in text.splitlines()) == 3
    row = next(line for line in text.splitlines() if line.startswith(f"| {arm} | 3 |"))
    assert row.split(" | ")[4] == "17.0 ± 2.6"  # PQ at the end: 16, 15, 20
    want = stats.ttest_rel([16.0, 15.0, 20.0], [10.0, 12.0, 14.0], alternative="greater")
    line = next(line for line in text.splitlines() if line.startswith(f"| {arm} | PQ |"))
    assert f"+6.00, +3.00, +6.00 | +5.00 | {want.statistic:.2f} | {want.pvalue:.3f} |" in line
    assert f"- {arm}: MET: AP +3.00" in text  # AP 24, 23, 25 against 20, 21, 22; consistency as pilot on's
    assert "- pilot on (released defaults): NOT MET" in text


def test_sweeps_of_different_schedules_are_refused(sweep_dir: Path, tmp_path: Path, capsys):
    other = _write_sweep(tmp_path / "longer", _config("train.max_iters=80", "model.pilot.groups=2"), "seeds.yaml",
                         FINAL_G2, "long")
    assert pilot_study.main([str(sweep_dir), str(other), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "longer/sweep.json: its base config differs" in err and "train.max_iters" in err
    assert "model.pilot" not in err


def test_not_a_sweep(tmp_path: Path, capsys):
    assert pilot_study.main([str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "sweep.json does not exist" in capsys.readouterr().err
