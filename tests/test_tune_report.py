"""A sweep's outputs from Tune results: statuses, start order, integer columns, plots, files."""

from __future__ import annotations

import csv
import io

import pandas as pd
import pytest
from ray.tune import Result

from mpformer_ray import storage
from mpformer_ray.tune import report

METRIC = "sem_seg/mIoU"
PARAMS = ["train.lr", "model.pilot.groups"]


def _result(trial: str, started: float, evals: list[tuple[int, float]], config: dict, error=None) -> Result:
    history = pd.DataFrame([{"iteration": it, METRIC: v} for it, v in evals])
    last = {"iteration": evals[-1][0], METRIC: evals[-1][1]} if evals else {}
    metrics = {**last, "trial_id": trial, "config": config, "timestamp": started + 10.0, "time_total_s": 10.0}
    return Result(metrics=metrics, checkpoint=None, error=error, path=f"/sweeps/s/{trial}",
                  metrics_dataframe=history if evals else None)


def _grid() -> list[Result]:
    return [
        _result("bbb", 200.0, [(4, 10.0)], {"train.lr": 1e-7, "model.pilot.groups": 2}),
        _result("aaa", 100.0, [(4, 20.0), (8, 30.0)], {"train.lr": 3e-3, "model.pilot.groups": 1}),
        _result("ccc", 300.0, [], {"train.lr": 1e-4, "model.pilot.groups": 1},
                error=RuntimeError("Training failed.\nWorkerGroupError: worker 0 died at iteration 4")),
        # cut short by Ctrl-C: Tune hands it back like one ASHA stopped (its saved state tells)
        _result("ddd", 400.0, [(4, 12.0)], {"train.lr": 1e-3, "model.pilot.groups": 2}),
    ]


def test_table_orders_by_start_and_names_each_outcome():
    table = report.trials_table(_grid(), METRIC, PARAMS, max_iters=8, unfinished=frozenset({"ddd"}))
    assert list(table["trial"]) == ["aaa", "bbb", "ccc", "ddd"]
    assert list(table["status"]) == [report.COMPLETED, report.STOPPED, report.ERROR, report.UNFINISHED]
    assert table.loc[2, "error"] == "WorkerGroupError: worker 0 died at iteration 4"
    # integer fields stay integers next to a trial without results (no 8.0 in the CSV)
    rows = list(csv.DictReader(io.StringIO(table.to_csv(index=False))))
    assert [r["iteration"] for r in rows] == ["8", "4", "", "4"]
    assert [r["model.pilot.groups"] for r in rows] == ["1", "2", "1", "2"]


def test_plots_and_files_land_under_the_sweep(tmp_path):
    grid = _grid()
    table = report.trials_table(grid, METRIC, PARAMS, max_iters=8)
    curves = report.learning_curves(grid, METRIC)
    assert sorted(curves) == ["aaa", "bbb", "ddd"] and list(curves["aaa"]["iteration"]) == [4, 8]
    pngs = report.plots(table, curves, METRIC, PARAMS)
    written = report.write_outputs(str(tmp_path), table, "run: {name: s-best}\n", pngs)
    assert set(written) == {"trials.csv", "best_config.yaml", "metric_vs_params.png", "history.png",
                            "learning_curves.png"}
    for name, uri in written.items():
        data = storage.read_bytes(uri)
        assert data.startswith(b"\x89PNG") if name.endswith(".png") else data


class _OneTrialGrid:
    """What Ray 2.60's ResultGrid does with a sweep of one trial (ExperimentAnalysis.get_best_trial):
    it returns that trial whether or not it reported the metric."""

    def __init__(self, result: Result) -> None:
        self.result = result

    def get_best_result(self, **_) -> Result:
        return self.result


def test_best_config_needs_a_trial_that_reported_the_objective():
    from mpformer_ray.tune.space import SweepError
    from mpformer_ray.tune.sweep import SweepResult, best_config

    # a lone trial stopped (Ctrl-C, failure) before its first evaluation
    lone = _result("aaa", 100.0, [], {"train.lr": 1e-3, "model.pilot.groups": 1})
    result = SweepResult(uri="/sweeps/s", metric=METRIC, grid=_OneTrialGrid(lone), plan=None)
    with pytest.raises(SweepError, match=f"no trial of /sweeps/s reported {METRIC}"):
        best_config(result)
