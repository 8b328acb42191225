"""Does mask piloting pay off? The report of an ablation sweep (issue 14).

Reads a finished sweep of ``jobs/tune.py`` from its storage (local path or ``s3://``) and writes
``pilot_study.md`` plus PNGs into ``--out`` (default ``benchmarks/results/``):

- PQ, mask AP and mIoU at 25 / 50 / 100 % of the schedule, mean +/- std over seeds, per arm;
- every run's learning curves;
- per-layer mask consistency (IoU of layer k's and layer k+1's masks of the matched queries; see
  ``mpformer_ray/evaluation/consistency.py``) at the last evaluation, with and without the pilot;
- wall time and training images/s per arm (the pilot's training cost);
- a one-sided paired t-test over seeds (``scipy.stats.ttest_rel(on, off, alternative="greater")``) of each
  piloted arm against pilot off, and the issue's goal (+2 AP and +2 PQ, higher consistency) met or not;
- the benchmark: generator, its seed and size, and the schedule.

What it reads under the sweep's URI (``mpformer_ray/tune/sweep.py``): ``sweep.json`` (the base config and
the sweep file), ``trials.csv`` (``report.trials_table``: trial, status, searched fields) and each trial's
``<trial_id>/result.json`` (Tune's log of the evaluations the trial reported, one JSON object a line).
An arm is one combination of the searched fields other than ``train.seed``; the baseline is the arm with
``model.pilot.enabled`` false. Trials that did not complete are listed and left out of the statistics.

The study, sized for the 2-core machine (benchmarks/results/pilot_fidelity.md, "Sizing the study"): the
``tiny-hard`` preset as it is (128 px crops, 2 workers x batch 4), pilot off / released defaults x 3 seeds,
600 iterations (4.8 epochs; the preset's 1500 would take about 90 minutes), evaluated every 150 on all 100
validation images, one trial at a time; about 42 minutes on an otherwise idle machine:

    python jobs/tune.py --config tiny-hard --space configs/sweeps/ablation.yaml \
        --set train.max_iters=600 train.eval_period=150 train.checkpoint_period=150 run.name=pilot-ablation
    python benchmarks/pilot_study.py runs/pilot-ablation
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from ray.tune import Result
from scipy import stats

from mpformer_ray import storage
from mpformer_ray.tune import report

ROOT = Path(__file__).resolve().parent.parent
METRICS = {"panoptic/PQ": "PQ", "segm/AP": "AP", "sem_seg/mIoU": "mIoU"}
FRACTIONS = (0.25, 0.5, 1.0)
SEED = "train.seed"
PILOT = "model.pilot.enabled"
GOAL_POINTS = 2.0  # the goal: at least +2 AP and +2 PQ over pilot off


@dataclass
class Run:
    """One trial: its id, arm, seed, status and evaluations (one row per evaluated iteration)."""

    trial: str
    arm: str
    seed: int | None
    status: str
    history: pd.DataFrame  # columns: iteration, the evaluation's metrics, time_total_s, ...
    result: Result  # as report's helpers read it


@dataclass
class Study:
    uri: str
    config: dict  # the sweep's base config (Config.to_dict())
    sweep: dict  # the sweep file as the sweep job read it
    params: list[str]  # the searched fields
    runs: list[Run]
    baseline: str | None  # the pilot-off arm

    @property
    def max_iters(self) -> int:
        return int(self.config["train"]["max_iters"])

    def arms(self) -> list[str]:
        """Arms in a fixed order: the baseline first, then as they first appear in the trials table."""
        names = list(dict.fromkeys(r.arm for r in self.runs))
        return sorted(names, key=lambda a: a != self.baseline)

    def completed(self, arm: str) -> list[Run]:
        return sorted((r for r in self.runs if r.arm == arm and r.status == report.COMPLETED),
                      key=lambda r: (r.seed is None, r.seed))


def _arm_label(values: dict) -> str:
    if PILOT in values and not values[PILOT]:
        return "pilot off"
    if list(values) == [PILOT]:
        return "pilot on"
    parts = [f"{k.removeprefix('model.pilot.')}={v}" for k, v in values.items() if k != PILOT]
    return "pilot on" + (f" ({', '.join(parts)})" if parts else "")


def _history(uri: str, endpoint: str | None) -> list[dict]:
    """The evaluations in a trial's ``result.json``; a resumed trial logged some twice: the last one wins."""
    path = storage.join(uri, "result.json")
    if not storage.exists(path, endpoint):
        return []
    rows = [json.loads(line) for line in storage.read_bytes(path, endpoint).decode().splitlines() if line.strip()]
    by_iteration = {r["iteration"]: r for r in rows if "iteration" in r}
    return [by_iteration[i] for i in sorted(by_iteration)]


def load_study(uri: str, endpoint_url: str | None = None) -> Study:
    """The ablation sweep at ``uri``; a ValueError naming the file when it is not a finished sweep."""
    endpoint = storage.endpoint_for(endpoint_url)
    for name in ("sweep.json", "trials.csv"):
        if not storage.exists(storage.join(uri, name), endpoint):
            raise ValueError(f"{storage.join(uri, name)} does not exist: not a finished sweep of jobs/tune.py "
                             "(rerun the sweep's command to finish it; it reruns no finished trial)")
    state = json.loads(storage.read_bytes(storage.join(uri, "sweep.json"), endpoint))
    params = [p["name"] for p in state["sweep"]["params"]]
    table = pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(uri, "trials.csv"), endpoint)))
    baseline = None
    runs = []
    for row in table.to_dict("records"):
        values = {p: _plain(row[p]) for p in params if p in row}
        arm_values = {p: v for p, v in values.items() if p != SEED}
        arm = _arm_label(arm_values)
        if arm_values.get(PILOT) is False:
            baseline = arm
        trial_uri = storage.join(uri, str(row["trial"]))
        evals = _history(trial_uri, endpoint)
        history = pd.DataFrame(evals).drop(columns=["config"], errors="ignore")
        last = evals[-1] if evals else {}
        result = Result(metrics={**last, "trial_id": str(row["trial"])}, checkpoint=None, error=None, path=trial_uri,
                        metrics_dataframe=history if evals else None)
        seed = values.get(SEED, state["config"]["train"]["seed"])
        runs.append(Run(str(row["trial"]), arm, None if seed is None else int(seed), str(row["status"]), history,
                        result))
    return Study(uri, state["config"], state["sweep"], params, runs, baseline)


def _plain(value):
    """A trials.csv cell as the sweep's value: numpy scalars to Python, 'True' / 'False' to bool."""
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, str) and value in ("True", "False"):
        return value == "True"
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return int(value) if float(value).is_integer() else float(value)
    return value


def value_at(run: Run, metric: str, iteration: int) -> tuple[float, int | None]:
    """``metric`` at the last evaluation at or before ``iteration``: (value, that iteration); nan, None if none."""
    h = run.history
    if metric not in h or "iteration" not in h:
        return math.nan, None
    done = h[(h["iteration"] <= iteration) & h[metric].notna()]
    if done.empty:
        return math.nan, None
    last = done.iloc[-1]
    return float(last[metric]), int(last["iteration"])


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; nan for fewer than 2 values) of the finite values."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan


def _pm(mean: float, std: float, digits: int = 1) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if math.isfinite(std) else f"{mean:.{digits}f}"


def paired_test(study: Study, arm: str, metric: str, iteration: int) -> dict:
    """One-sided paired t-test over the seeds both ``arm`` and the baseline completed: H1 = ``arm`` is higher.

    Returns {"seeds", "diffs" (arm - baseline per seed), "mean_diff", "t", "p"}; t and p are nan with fewer
    than 2 pairs or when every difference is the same."""
    base = {r.seed: value_at(r, metric, iteration)[0] for r in study.completed(study.baseline)}
    on = {r.seed: value_at(r, metric, iteration)[0] for r in study.completed(arm)}
    seeds = sorted(s for s in base.keys() & on.keys() if math.isfinite(base[s]) and math.isfinite(on[s]))
    a, b = [on[s] for s in seeds], [base[s] for s in seeds]
    diffs = [x - y for x, y in zip(a, b)]
    t = p = math.nan
    if len(seeds) >= 2 and len(set(diffs)) > 1:
        res = stats.ttest_rel(a, b, alternative="greater")
        t, p = float(res.statistic), float(res.pvalue)
    return {"seeds": seeds, "diffs": diffs, "mean_diff": float(np.mean(diffs)) if diffs else math.nan, "t": t, "p": p}


def consistency_pairs(study: Study) -> list[str]:
    names = {c for r in study.runs for c in r.history.columns if c.startswith("consistency/layer_")}
    return sorted(names, key=lambda c: int(c.split("_")[-2]))


def run_cost(study: Study, run: Run) -> dict:
    """Wall time (Tune's time_total_s at the last evaluation: start-up, training, evaluations), the
    evaluations' share, images/s over the trial = images trained / (wall - evaluation seconds), and the
    training loop's own images/s of its last log window (steady state; reported with the final evaluation)."""
    h = run.history
    if h.empty or "time_total_s" not in h:
        return {"wall_s": math.nan, "eval_s": math.nan, "images_per_s": math.nan, "loop_images_per_s": math.nan}
    t = study.config["train"]
    wall = float(h["time_total_s"].iloc[-1])
    evals = float(h["eval_seconds"].sum()) if "eval_seconds" in h else 0.0
    images = int(h["iteration"].iloc[-1]) * t["batch_size"] * t["workers"]
    loop = float(h["images_per_s"].iloc[-1]) if "images_per_s" in h else math.nan
    return {"wall_s": wall, "eval_s": evals, "images_per_s": images / max(wall - evals, 1e-9),
            "loop_images_per_s": loop}


def _colours(study: Study) -> dict[str, str]:
    return {arm: f"C{i}" for i, arm in enumerate(study.arms())}


def curves_png(study: Study) -> bytes:
    """Every run's PQ / AP / mIoU against iteration, coloured by arm (report.learning_curves per metric)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours, arm_of = _colours(study), {r.trial: r for r in study.runs}
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 3.6), squeeze=False)
    for ax, (metric, short) in zip(axes[0], METRICS.items()):
        for trial, curve in report.learning_curves([r.result for r in study.runs], metric).items():
            run = arm_of[trial]
            ax.plot(curve["iteration"], curve[metric], marker=".", color=colours[run.arm],
                    linestyle=["-", "--", ":", "-."][(run.seed or 0) % 4], label=f"{run.arm}, seed {run.seed}")
        ax.set_xlabel("iteration")
        ax.set_ylabel(short)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("learning curves (colour: arm, line style: seed)")
    return report._png(fig)


def consistency_png(study: Study, table: dict[str, list[tuple[float, float]]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = consistency_pairs(study)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for arm, colour in _colours(study).items():
        means = [m for m, _ in table[arm]]
        stds = [0.0 if not math.isfinite(s) else s for _, s in table[arm]]
        ax.errorbar(range(len(pairs)), means, yerr=stds, marker="o", capsize=3, color=colour, label=arm)
    ax.set_xticks(range(len(pairs)), [p.removeprefix("consistency/layer_").replace("_", "→") for p in pairs])
    ax.set_xlabel("decoder prediction pair (0 = query init)")
    ax.set_ylabel("mask IoU, layer k vs k+1")
    ax.set_title("per-layer mask consistency at the last evaluation (mean ± std over seeds)")
    ax.legend(fontsize=8)
    return report._png(fig)


def build_report(study: Study) -> tuple[str, dict[str, bytes]]:
    """(markdown, {png name: bytes}) for ``study``."""
    cfg, max_iters = study.config, study.max_iters
    arms = study.arms()
    syn, data, train, model = cfg["data"]["synthetic"], cfg["data"], cfg["train"], cfg["model"]
    lines = ["# Does mask piloting pay off? (issue 14)", "",
             (f"Sweep `{study.uri}`: {len(study.runs)} trials, searched fields "
             f"{', '.join(f'`{p}`' for p in study.params)}; built by `benchmarks/pilot_study.py`."), "",
             "## Benchmark", ""]
    if data["train"]:
        lines.append(f"Data: `{data['train']}` (train), `{data['val']}` (val).")
    else:
        lines.append(f"Embedded synthetic benchmark, variant `{syn['variant']}`: generator seed {syn['seed']}, "
                     f"{syn['num_train']} training and {syn['num_val']} validation images of "
                     f"{syn['image_size']} x {syn['image_size']} px.")
    lines += ["", (f"Model `{model['backbone']}`, {model['dec_layers']} decoder layers, {model['num_queries']} queries, "
              f"{model['num_classes']} classes; pilot settings of the piloted arm: groups {model['pilot']['groups']}, "
              f"mask noise `{model['pilot']['mask_noise']}` {model['pilot']['noise_ratio']}, label noise "
              f"{model['pilot']['label_noise']}, layers `{model['pilot']['layers']}`, class loss "
              f"{model['pilot']['class_loss']}."),
              (f"Schedule: {max_iters} iterations, {train['workers']} workers x batch {train['batch_size']}, crop "
              f"{data['crop_size']}, lr {train['lr']}, evaluation every {train['eval_period']} iterations on "
              f"{train['eval_max_images'] or 'all'} validation images."), ""]

    lines += ["## Trials", "", "| trial | arm | seed | status | last evaluated iteration |", "|---|---|---|---|---|"]
    for r in study.runs:
        last = int(r.history["iteration"].iloc[-1]) if "iteration" in r.history else "-"
        lines.append(f"| {r.trial} | {r.arm} | {r.seed} | {r.status} | {last} |")
    left_out = [r for r in study.runs if r.status != report.COMPLETED]
    if left_out:
        lines += ["", f"Left out of the statistics (not completed): {', '.join(r.trial for r in left_out)}."]

    lines += ["", "## Accuracy over the schedule (mean ± std over seeds)", ""]
    iterations = [max(1, round(f * max_iters)) for f in FRACTIONS]
    header = "| arm | seeds | " + " | ".join(f"{short} @{round(100 * f)}%" for short in METRICS.values()
                                              for f in FRACTIONS) + " |"
    lines += [header, "|" + "---|" * (2 + len(METRICS) * len(FRACTIONS))]
    used: set[int] = set()
    for arm in arms:
        runs = study.completed(arm)
        cells = []
        for metric in METRICS:
            for it in iterations:
                found = [value_at(r, metric, it) for r in runs]
                used |= {i for _, i in found if i is not None}
                cells.append(_pm(*mean_std([v for v, _ in found])))
        lines.append(f"| {arm} | {len(runs)} | " + " | ".join(cells) + " |")
    off_schedule = sorted(used - set(iterations))
    lines += ["", f"Iterations {iterations} of {max_iters}; each value is the last evaluation at or before that "
              "iteration" + (f" (evaluations used off those points: {off_schedule})." if off_schedule else ".")]

    piloted = [a for a in arms if a != study.baseline]
    tests: dict[tuple[str, str], dict] = {}
    if study.baseline is not None and piloted:
        lines += ["", f"## Paired test over seeds: piloted arm > `{study.baseline}` at the end", "",
                  "One-sided paired t-test, `scipy.stats.ttest_rel(on, off, alternative=\"greater\")`, pairs by seed.",
                  "", "| arm | metric | seeds | per-seed difference (on - off) | mean difference | t | p |",
                  "|---|---|---|---|---|---|---|"]
        for arm in piloted:
            for metric, short in METRICS.items():
                test = tests[(arm, metric)] = paired_test(study, arm, metric, max_iters)
                diffs = ", ".join(f"{d:+.2f}" for d in test["diffs"]) or "-"
                lines.append(f"| {arm} | {short} | {test['seeds']} | {diffs} | {test['mean_diff']:+.2f} | "
                             f"{test['t']:.2f} | {test['p']:.3f} |")

    pairs = consistency_pairs(study)
    consistency: dict[str, list[tuple[float, float]]] = {}
    if pairs:
        lines += ["", "## Per-layer mask consistency at the last evaluation (mean ± std over seeds)", "",
                  ("IoU of the binary masks that prediction k and prediction k+1 give the queries matched at the final "
                  "layer (0 = the query-init prediction); higher = consecutive layers agree more."), "",
                  "| arm | " + " | ".join(p.removeprefix("consistency/layer_").replace("_", "→") for p in pairs)
                  + " | mean |", "|" + "---|" * (len(pairs) + 2)]
        for arm in arms:
            runs = study.completed(arm)
            consistency[arm] = [mean_std([value_at(r, p, max_iters)[0] for r in runs]) for p in pairs]
            overall = mean_std([value_at(r, "consistency/mean", max_iters)[0] for r in runs])
            lines.append(f"| {arm} | " + " | ".join(_pm(m, s, 3) for m, s in consistency[arm]) + f" | "
                         f"{_pm(*overall, 3)} |")

    lines += ["", "## Training cost per arm (mean ± std over seeds)", "",
              ("Wall time is Tune's `time_total_s` at a trial's last evaluation (worker start-up, training and "
              "evaluations); images/s over the trial divides the images trained by the wall time less the "
              "evaluations' `eval_seconds` (start-up included); the loop's images/s is the training loop's own "
              "figure for its last log window (steady state)."), "",
              "| arm | wall s | of which evaluation s | images/s over the trial | loop images/s, last window |",
              "|---|---|---|---|---|"]
    for arm in arms:
        costs = [run_cost(study, r) for r in study.completed(arm)]
        lines.append(f"| {arm} | {_pm(*mean_std([c['wall_s'] for c in costs]), 0)} | "
                     f"{_pm(*mean_std([c['eval_s'] for c in costs]), 0)} | "
                     f"{_pm(*mean_std([c['images_per_s'] for c in costs]), 2)} | "
                     f"{_pm(*mean_std([c['loop_images_per_s'] for c in costs]), 2)} |")

    if study.baseline is not None and piloted:
        lines += ["", "## Goal (issue 14)", "",
                  (f"At least +{GOAL_POINTS:g} AP and +{GOAL_POINTS:g} PQ over pilot off at equal iterations, averaged "
                  "over the seeds, and higher layer-to-layer consistency."), ""]
        for arm in piloted:
            ap, pq = tests[(arm, "segm/AP")]["mean_diff"], tests[(arm, "panoptic/PQ")]["mean_diff"]
            base_c = mean_std([value_at(r, "consistency/mean", max_iters)[0] for r in study.completed(study.baseline)])
            arm_c = mean_std([value_at(r, "consistency/mean", max_iters)[0] for r in study.completed(arm)])
            higher = math.isfinite(arm_c[0]) and math.isfinite(base_c[0]) and arm_c[0] > base_c[0]
            met = ap >= GOAL_POINTS and pq >= GOAL_POINTS and higher
            lines.append(f"- {arm}: {'MET' if met else 'NOT MET'}: AP {ap:+.2f} (p {tests[(arm, 'segm/AP')]['p']:.3f}), "
                         f"PQ {pq:+.2f} (p {tests[(arm, 'panoptic/PQ')]['p']:.3f}), mean consistency "
                         f"{arm_c[0]:.3f} vs {base_c[0]:.3f}.")

    pngs = {"pilot_study_curves.png": curves_png(study)}
    lines += ["", "## Plots", "", "![learning curves](pilot_study_curves.png)"]
    if pairs:
        pngs["pilot_study_consistency.png"] = consistency_png(study, consistency)
        lines.append("![per-layer consistency](pilot_study_consistency.png)")
    return "\n".join(lines) + "\n", pngs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="the sweep's URI: {storage.uri}/{run.name} of jobs/tune.py (local or s3://)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="directory for the report")
    parser.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    args = parser.parse_args(argv)
    try:
        study = load_study(storage.absolute(args.sweep), args.endpoint_url)
    except ValueError as e:
        print(f"pilot_study: {e}", file=sys.stderr)
        return 2
    text, pngs = build_report(study)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pilot_study.md").write_text(text)
    for name, data in pngs.items():
        (out / name).write_bytes(data)
    print(text)
    print(f"written: {out / 'pilot_study.md'} and {', '.join(pngs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
