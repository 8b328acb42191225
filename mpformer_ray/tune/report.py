"""A finished sweep's outputs: the trials table (printed and ``trials.csv``), the best trial's
config (``best_config.yaml``) and plots (``plots/*.png``), all written under the sweep's URI."""

from __future__ import annotations

import io
import math
from typing import Any

import pandas as pd

from mpformer_ray import storage

COMPLETED, STOPPED, ERROR, NO_RESULT = "completed", "stopped early (ASHA)", "error", "no evaluation"
UNFINISHED = "unfinished (rerun to continue)"


def _started(metrics: dict) -> float:
    """When the trial started (Unix time), from its last result; trials that never reported last."""
    if "timestamp" in metrics and "time_total_s" in metrics:
        return metrics["timestamp"] - metrics["time_total_s"]
    return math.inf


def _error_line(error: BaseException | None) -> str:
    if error is None:
        return ""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # Train's and Tune's wrappers put the worker's own exception last
    return (lines[-1] if lines else type(error).__name__)[:200]


def trials_table(grid: Any, metric: str, params: list[str], max_iters: int,
                 unfinished: frozenset[str] = frozenset()) -> pd.DataFrame:
    """One row per trial, in the order they started: trial, status, the searched fields, the last
    evaluated iteration, the objective there, wall time (s), and the error's last line.
    ``unfinished``: ids of the trials an interrupted sweep left running or waiting."""
    rows = []
    for result in grid:
        m = result.metrics or {}
        iteration = m.get("iteration")
        trial = m.get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1]
        if result.error is not None:
            status = ERROR
        elif trial in unfinished:
            status = UNFINISHED
        elif iteration is None:
            status = NO_RESULT
        elif iteration < max_iters:
            status = STOPPED
        else:
            status = COMPLETED
        rows.append({
            "trial": trial,
            "status": status,
            **{p: (result.config or {}).get(p) for p in params},
            "iteration": iteration,
            metric: m.get(metric),
            "time_s": round(m["time_total_s"], 1) if "time_total_s" in m else None,
            "error": _error_line(result.error),
            "_started": _started(m),
        })
    if not rows:
        return pd.DataFrame(rows)
    table = pd.DataFrame(rows).sort_values("_started", kind="stable", ignore_index=True).drop(columns="_started")
    # a trial without results must not turn the other trials' 8 into 8.0
    table["iteration"] = table["iteration"].astype("Int64")
    for name in params:
        values = [r[name] for r in rows if r[name] is not None]
        if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            table[name] = table[name].astype("Int64")
    return table


def table_text(table: pd.DataFrame) -> str:
    """The trials table as the job prints it: every column, one line per trial."""
    with pd.option_context("display.max_columns", None, "display.width", 200, "display.max_colwidth", 60):
        return table.to_string(index=False)


def learning_curves(grid: Any, metric: str) -> dict[str, pd.DataFrame]:
    """trial id -> its evaluations (columns ``iteration`` and ``metric``) in order."""
    curves = {}
    for result in grid:
        frame = result.metrics_dataframe
        if frame is None or metric not in frame or "iteration" not in frame:
            continue
        trial = result.metrics.get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1]
        curves[trial] = frame[["iteration", metric]].dropna().sort_values("iteration")
    return curves


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def plots(table: pd.DataFrame, curves: dict[str, pd.DataFrame], metric: str, params: list[str]) -> dict[str, bytes]:
    """PNG bytes by file name: the objective against each searched field, the optimisation
    history (each trial and the running best, in the order they started), and every trial's learning
    curve with ASHA's stops marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on cluster nodes
    import matplotlib.pyplot as plt

    done = table[table[metric].notna()] if metric in table else table.iloc[0:0]
    out = {}

    fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.4), squeeze=False)
    for ax, name in zip(axes[0], params):
        values = done[name]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            ax.scatter(values, done[metric])
        else:
            labels = sorted({str(v) for v in table[name]})
            ax.scatter([labels.index(str(v)) for v in values], done[metric])
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(name)
        ax.set_ylabel(metric)
    fig.suptitle(f"{metric} at each trial's last evaluation")
    out["metric_vs_params.png"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    order = list(range(len(table)))
    values = [v if v is not None and not (isinstance(v, float) and math.isnan(v)) else None
              for v in (table[metric] if metric in table else [None] * len(table))]
    ax.scatter([i for i, v in zip(order, values) if v is not None], [v for v in values if v is not None], label="trial")
    best, running = None, []
    for v in values:
        best = v if v is not None and (best is None or v > best) else best
        running.append(best)
    ax.step(order, [math.nan if b is None else b for b in running], where="post", color="C1", label="best so far")
    ax.set_xlabel("trial (in the order they started)")
    ax.set_ylabel(metric)
    ax.legend()
    ax.set_title("optimisation history")
    out["history.png"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    status = dict(zip(table["trial"], table["status"])) if len(table) else {}
    for trial in table["trial"] if len(table) else []:
        if trial not in curves:
            continue
        curve = curves[trial]
        line, = ax.plot(curve["iteration"], curve[metric], marker=".", label=trial)
        if status.get(trial) == STOPPED and len(curve):
            ax.plot(curve["iteration"].iloc[-1], curve[metric].iloc[-1], "x", color=line.get_color(),
                    markersize=10, markeredgewidth=2)
    ax.set_xlabel("iteration")
    ax.set_ylabel(metric)
    ax.set_title("learning curves (x: stopped early by ASHA)")
    if curves:
        ax.legend(fontsize=7)
    out["learning_curves.png"] = _png(fig)
    return out


def write_outputs(uri: str, table: pd.DataFrame, best_yaml: str | None,
                  pngs: dict[str, bytes]) -> dict[str, str]:
    """Write the table, the best config and the plots under ``uri``; returns name -> URI."""
    written = {"trials.csv": storage.join(uri, "trials.csv")}
    storage.write_bytes(written["trials.csv"], table.to_csv(index=False).encode())
    if best_yaml is not None:
        written["best_config.yaml"] = storage.join(uri, "best_config.yaml")
        storage.write_bytes(written["best_config.yaml"], best_yaml.encode())
    for name, data in pngs.items():
        written[name] = storage.join(uri, "plots", name)
        storage.write_bytes(written[name], data)
    return written
