"""Does mask piloting pay off? The report of an ablation sweep (issue 14).

Reads one or more finished sweeps of ``jobs/tune.py`` from their storage (local path or ``s3://``) as one
study and writes ``{--name}.md`` plus PNGs into ``--out`` (defaults ``pilot_study``, ``benchmarks/results/``):

- PQ, mask AP and mIoU at 25 / 50 / 100 % of the schedule, mean +/- std over seeds, per arm;
- every run's learning curves;
- per-layer mask consistency (IoU of layer k's and layer k+1's masks of the matched queries; see
  ``mpformer_ray/evaluation/consistency.py``) at the last evaluation, with and without the pilot;
- PQ, SQ and RQ of things and of stuff at the end;
- wall time and training images/s per arm (the pilot's training cost);
- a one-sided paired t-test over seeds (``scipy.stats.ttest_rel(on, off, alternative="greater")``) of each
  piloted arm against pilot off, and the issue's goal (+2 AP and +2 PQ, higher consistency) met or not;
- the benchmark: generator, its seed and size, and the schedule.

What it reads under the sweep's URI (``mpformer_ray/tune/sweep.py``): ``sweep.json`` (the base config and
the sweep file), ``trials.csv`` (``report.trials_table``: trial, status, searched fields) and each trial's
``<trial_id>/result.json`` (Tune's log of the evaluations the trial reported, one JSON object a line).
An arm is one set of effective pilot settings (the base config's ``model.pilot`` with the trial's searched
values), so a second sweep can add an arm: e.g. the best setting of an Optuna sweep, run over the seeds with
``configs/sweeps/seeds.yaml``. The sweeps must agree on everything else (data, model, schedule). The baseline
is the arm with ``model.pilot.enabled`` false. Trials that did not complete are listed and left out of the
statistics.

The study, sized for the 2-core machine: the ``tiny-medium`` preset as it is (the medium embedded benchmark,
128 px crops, 2 workers x batch 4, 1000 iterations = 8 epochs, evaluated every 250 on all 100 validation
images), one trial at a time. Pilot off and the released defaults over seeds 0-2 (about an hour); the third
arm is the best of a small Optuna search at half the schedule (by PQ, as every sweep ranks), then trained
over the same seeds (about 45 minutes more):

    python jobs/tune.py --config tiny-medium --space ablation --set run.name=pilot-ablation-medium
    python jobs/tune.py --config tiny-medium --space pilot-search --set train.max_iters=500 \
        train.eval_period=250 train.checkpoint_period=250 run.name=pilot-search-medium
    python jobs/tune.py --config runs/pilot-search-medium/best_config.yaml --space seeds --set \
        train.max_iters=1000 train.eval_period=250 train.checkpoint_period=250 run.name=pilot-best-medium
    python benchmarks/pilot_study.py runs/pilot-ablation-medium runs/pilot-best-medium

On the hard benchmark (``tiny-hard``) the tiny model stays at PQ 0 for longer than a CPU allows; its
600-iteration study is ``results/pilot_study_hard.md`` (``--name pilot_study_hard``).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from ray.tune import Result
from scipy import stats

from mpformer_ray import storage
from mpformer_ray.config import PilotConfig
from mpformer_ray.tune import report

ROOT = Path(__file__).resolve().parent.parent
METRICS = {"panoptic/PQ": "PQ", "segm/AP": "AP", "sem_seg/mIoU": "mIoU"}
FRACTIONS = (0.25, 0.5, 1.0)
PANOPTIC_PARTS = ("PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st")
SEED = "train.seed"
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
    uris: list[str]  # the sweeps
    config: dict  # the first sweep's base config (Config.to_dict()); the others agree but for model.pilot
    params: list[str]  # the fields any sweep searched
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


def _arm_label(pilot: dict) -> str:
    """The arm of a trial whose effective ``model.pilot`` settings are ``pilot``: "pilot off", "pilot on
    (released defaults)" or "pilot on (the settings that differ from them)"."""
    if not pilot["enabled"]:
        return "pilot off"
    released = dataclasses.asdict(PilotConfig())
    parts = [f"{k}={_short(v)}" for k, v in pilot.items() if k in released and v != released[k]]
    return f"pilot on ({', '.join(parts) or 'released defaults'})"


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _history(uri: str) -> list[dict]:
    """The evaluations in a trial's ``result.json``; a resumed trial logged some twice: the last one wins."""
    path = storage.join(uri, "result.json")
    if not storage.exists(path):
        return []
    rows = [json.loads(line) for line in storage.read_bytes(path).decode().splitlines() if line.strip()]
    by_iteration = {r["iteration"]: r for r in rows if "iteration" in r}
    return [by_iteration[i] for i in sorted(by_iteration)]


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted fields where the nested dicts ``a`` and ``b`` differ."""
    out = []
    for key in sorted(a.keys() | b.keys()):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}")
    return out


def load_study(uris: list[str]) -> Study:
    """The sweeps at ``uris`` as one study; a ValueError naming the file when one is not a finished sweep, or
    naming the fields when they differ in more than the pilot settings and the seed."""
    config, params, runs = None, [], []
    for uri in uris:
        for name in ("sweep.json", "trials.csv"):
            if not storage.exists(storage.join(uri, name)):
                raise ValueError(f"{storage.join(uri, name)} does not exist: not a finished sweep of jobs/tune.py "
                                 "(rerun the sweep's command to finish it; it reruns no finished trial)")
        state = json.loads(storage.read_bytes(storage.join(uri, "sweep.json")))
        if config is None:
            config = state["config"]
        searched = [p["name"] for p in state["sweep"]["params"]]
        clash = [f for f in _differences(config, state["config"])
                 if f != SEED and not f.startswith(("model.pilot.", "run.", "storage."))]
        if clash:
            raise ValueError(f"{storage.join(uri, 'sweep.json')}: its base config differs from {uris[0]}'s in "
                             f"{', '.join(clash)}; a study compares pilot settings with everything else equal")
        params += [p for p in searched if p not in params]
        table = pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(uri, "trials.csv"))))
        for row in table.to_dict("records"):
            values = {p: _plain(row[p]) for p in searched if p in row}
            pilot = dict(state["config"]["model"]["pilot"])
            pilot.update({k.removeprefix("model.pilot."): v for k, v in values.items() if k.startswith("model.pilot.")})
            trial_uri = storage.join(uri, str(row["trial"]))
            evals = _history(trial_uri)
            history = pd.DataFrame(evals).drop(columns=["config"], errors="ignore")
            last = evals[-1] if evals else {}
            result = Result(metrics={**last, "trial_id": str(row["trial"])}, checkpoint=None, error=None,
                            path=trial_uri, metrics_dataframe=history if evals else None)
            seed = values.get(SEED, state["config"]["train"]["seed"])
            runs.append(Run(str(row["trial"]), _arm_label(pilot), None if seed is None else int(seed),
                            str(row["status"]), history, result))
    baseline = "pilot off" if any(r.arm == "pilot off" for r in runs) else None
    return Study(list(uris), config, params, runs, baseline)


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

    from matplotlib.lines import Line2D

    colours, arm_of = _colours(study), {r.trial: r for r in study.runs}
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 3.6), squeeze=False)
    for ax, (metric, short) in zip(axes[0], METRICS.items()):
        for trial, curve in report.learning_curves([r.result for r in study.runs], metric).items():
            run = arm_of[trial]
            ax.plot(curve["iteration"], curve[metric], marker=".", color=colours[run.arm],
                    linestyle=styles[(run.seed or 0) % len(styles)])
        ax.set_xlabel("iteration")
        ax.set_ylabel(short)
    # one entry per arm and one per seed, below the plots: arm names are long, and a legend of every
    # run would hide the curves
    seeds = sorted({r.seed or 0 for r in study.runs})
    handles = ([Line2D([], [], color=c, label=arm) for arm, c in colours.items()]
               + [Line2D([], [], color="black", linestyle=styles[s % len(styles)], label=f"seed {s}") for s in seeds])
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8, frameon=False)
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
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    return report._png(fig)


def build_report(study: Study, name: str = "pilot_study") -> tuple[str, dict[str, bytes]]:
    """(markdown, {png file name: bytes}) for ``study``; the PNGs are named after ``name``."""
    cfg, max_iters = study.config, study.max_iters
    arms = study.arms()
    syn, data, train, model = cfg["data"]["synthetic"], cfg["data"], cfg["train"], cfg["model"]
    lines = ["# Does mask piloting pay off? (issue 14)", "",
             (f"{'Sweep' if len(study.uris) == 1 else 'Sweeps'} {', '.join(f'`{u}`' for u in study.uris)}: "
              f"{len(study.runs)} trials, searched fields {', '.join(f'`{p}`' for p in study.params)}; built by "
              "`benchmarks/pilot_study.py`."), "",
             "## Benchmark", ""]
    # the sweep job resolves the embedded benchmark to its records under the synthetic cache
    if not data["train"] or data["train"].startswith(os.path.expanduser(syn["root"])):
        lines.append(f"Embedded synthetic benchmark, variant `{syn['variant']}`: generator seed {syn['seed']}, "
                     f"{syn['num_train']} training and {syn['num_val']} validation images of "
                     f"{syn['image_size']} x {syn['image_size']} px.")
    if data["train"]:
        lines.append(f"Data: `{data['train']}` (train), `{data['val']}` (val).")
    released = PilotConfig()
    lines += ["", (f"Model `{model['backbone']}`, {model['dec_layers']} decoder layers, {model['num_queries']} queries, "
              f"{model['num_classes']} classes. Arms are named by their pilot settings; the released defaults are "
              f"groups {released.groups}, mask noise `{released.mask_noise}` {released.noise_ratio}, label noise "
              f"{released.label_noise}, layers `{released.layers}`, class loss {released.class_loss}."),
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

    if any("panoptic/PQ_th" in r.history for r in study.runs):
        lines += ["", "## Panoptic quality of things and stuff at the end (mean ± std over seeds)", "",
                  ("PQ = SQ x RQ per class, averaged over classes; a predicted segment exists only when its query's "
                   f"class score clears `model.test.object_mask_threshold` ({model['test']['object_mask_threshold']}), "
                   "a threshold AP does not apply (it ranks every detection)."), "",
                  "| arm | " + " | ".join(PANOPTIC_PARTS) + " |", "|" + "---|" * (1 + len(PANOPTIC_PARTS))]
        for arm in arms:
            runs = study.completed(arm)
            lines.append(f"| {arm} | " + " | ".join(_pm(*mean_std([value_at(r, f"panoptic/{p}", max_iters)[0]
                                                                   for r in runs])) for p in PANOPTIC_PARTS) + " |")

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
        all_met = True
        base_c = mean_std([value_at(r, "consistency/mean", max_iters)[0] for r in study.completed(study.baseline)])
        for arm in piloted:
            ap, pq = tests[(arm, "segm/AP")]["mean_diff"], tests[(arm, "panoptic/PQ")]["mean_diff"]
            arm_c = mean_std([value_at(r, "consistency/mean", max_iters)[0] for r in study.completed(arm)])
            higher = math.isfinite(arm_c[0]) and math.isfinite(base_c[0]) and arm_c[0] > base_c[0]
            met = ap >= GOAL_POINTS and pq >= GOAL_POINTS and higher
            all_met &= met
            lines.append(f"- {arm}: {'MET' if met else 'NOT MET'}: AP {ap:+.2f} (p {tests[(arm, 'segm/AP')]['p']:.3f}), "
                         f"PQ {pq:+.2f} (p {tests[(arm, 'panoptic/PQ')]['p']:.3f}), mean consistency "
                         f"{arm_c[0]:.3f} vs {base_c[0]:.3f}.")
        if not all_met:
            lines += ["", ("Checked because the goal is not met: our pilot against the released MP-Former code, rule "
                           "by rule (`benchmarks/results/pilot_fidelity.md`; the rules a test can restate are checked "
                           "by `tests/test_pilot.py`).")]

    pngs = {f"{name}_curves.png": curves_png(study)}
    lines += ["", "## Plots", "", f"![learning curves]({name}_curves.png)"]
    if pairs:
        pngs[f"{name}_consistency.png"] = consistency_png(study, consistency)
        lines.append(f"![per-layer consistency]({name}_consistency.png)")
    return "\n".join(lines) + "\n", pngs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", nargs="+", metavar="sweep",
                        help="a sweep's URI: {storage.uri}/{run.name} of jobs/tune.py (local or s3://); several "
                             "sweeps of the same benchmark and schedule make one study")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="directory for the report")
    parser.add_argument("--name", default="pilot_study", help="file name stem of the report and its PNGs")
    args = parser.parse_args(argv)
    try:
        study = load_study([storage.absolute(u) for u in args.sweeps])
    except ValueError as e:
        print(f"pilot_study: {e}", file=sys.stderr)
        return 2
    text, pngs = build_report(study, args.name)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.md").write_text(text)
    for name, data in pngs.items():
        (out / name).write_bytes(data)
    print(text)
    print(f"written: {out / (args.name + '.md')} and {', '.join(pngs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
