"""What one evaluation leaves behind, and its files.

``Evaluation``: the flat metrics (``Evaluator.evaluate``), one row per class (``Evaluator.per_class``) and,
when the semantic task was evaluated, the confusion matrix. ``write_evaluation`` puts them in a directory
(local or s3://), as ``jobs/evaluate.py --out DIR`` and every evaluation of a training run
(``{run}/evaluations/iteration_NNNNNNN/``) do:

    metrics.json     the metrics (NaN, an undefined metric, as null)
    per_class.csv    class_id, name, type (thing / stuff), then PQ, SQ, RQ, AP, IoU, Acc as evaluated, in
                     percent; an empty cell is a class the metric leaves out of its mean (never seen / no
                     ground truth), so the mean of each column's filled cells is the aggregate metric
    confusion.csv    semantic only: rows = ground truth, columns = prediction, each row normalised to sum 1
                     (an empty row: the class has no ground-truth pixel), class names as headers
    confusion.png    the same as a picture (``png=True``)
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field

import numpy as np

from mpformer_ray import storage

FIXED_COLUMNS = ("class_id", "name", "type")


@dataclass
class Evaluation:
    """One evaluation's results."""

    metrics: dict[str, float]
    per_class: list[dict] = field(default_factory=list)  # {"class_id", "name", "type", "PQ": ..., ...} per class
    confusion: np.ndarray | None = None  # int64 [K, K] pixel counts, rows = ground truth (semantic only)


def _cell(value: object) -> str:
    """A CSV cell: floats as Python's shortest exact repr (they read back to the same number), NaN empty."""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def per_class_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = list(rows[0]) if rows else list(FIXED_COLUMNS)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row[c]) for c in columns])
    return buffer.getvalue()


def normalised_confusion(confusion: np.ndarray) -> np.ndarray:
    """Row-normalised float [K, K] (each ground-truth class's pixels split over the predictions); NaN rows
    for classes without ground-truth pixels."""
    totals = confusion.sum(axis=1, keepdims=True).astype(np.float64)
    return np.where(totals > 0, confusion / np.where(totals > 0, totals, 1), np.nan)


def confusion_csv(confusion: np.ndarray, names: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["truth \\ prediction", *names])
    for name, row in zip(names, normalised_confusion(confusion)):
        writer.writerow([name, *(_cell(float(v)) for v in row)])
    return buffer.getvalue()


def confusion_png(confusion: np.ndarray, names: list[str]) -> bytes:
    """The row-normalised confusion matrix as a heat map with the class names on both axes (values written
    in the cells up to 30 classes)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    matrix = normalised_confusion(confusion)
    k = len(names)
    side = min(4 + 0.35 * k, 40)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(np.nan_to_num(matrix, nan=0.0), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), names, rotation=90, fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title("confusion (rows normalised)")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if not math.isnan(matrix[i, j]) and matrix[i, j] >= 0.005:
                    ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if matrix[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def format_table(rows: list[dict]) -> str:
    """The per-class rows as an aligned text table (values with one decimal, '-' where undefined)."""
    if not rows:
        return ""
    columns = list(rows[0])
    text = [[str(c) for c in columns]]
    for row in rows:
        text.append([("-" if math.isnan(v) else f"{v:.1f}") if isinstance(v, float) else str(v)
                     for v in (row[c] for c in columns)])
    widths = [max(len(line[i]) for line in text) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(w) if i == 1 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(line, widths))).rstrip() for line in text)


def metrics_json(metrics: dict[str, float]) -> str:
    """JSON has no NaN: an undefined metric (e.g. AP on a split without things) is null."""
    return json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()},
                      indent=1, sort_keys=True)


def write_evaluation(uri: str, evaluation: Evaluation, png: bool = True) -> list[str]:
    """Write the module docstring's files into directory ``uri`` (local or s3://); returns their URIs."""
    files = {"metrics.json": metrics_json(evaluation.metrics).encode(),
             "per_class.csv": per_class_csv(evaluation.per_class).encode()}
    if evaluation.confusion is not None:
        names = [row["name"] for row in evaluation.per_class]
        files["confusion.csv"] = confusion_csv(evaluation.confusion, names).encode()
        if png:
            files["confusion.png"] = confusion_png(evaluation.confusion, names)
    written = []
    for name, data in files.items():
        storage.write_bytes(storage.join(uri, name), data)
        written.append(storage.join(uri, name))
    return written
