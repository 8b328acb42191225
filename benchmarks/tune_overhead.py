"""What Ray Tune costs on top of the training job: the same 4 trial configs run one after another
with ``jobs/train.py`` (each a job of its own, as a user without Tune would) and as one sweep with
``jobs/tune.py`` at 1 and 2 concurrent trials, all on one Ray head started for the benchmark
(token authentication, a temp dir of its own, ``--cpus`` logical CPUs; stopped by its session at
the end). Ray Data gets only whole CPUs that Train's workers leave on a node, split between the
trials there, so 2 concurrent trials of the tiny preset need 4 logical CPUs (on 2 cores they
share the cores: concurrency shows what Tune costs, not a speed-up).

Figures per mode: wall time, trials per hour, peak PSS of every process of the job (driver, Ray,
Train workers, Ray Data; see ``train_job.py``), and for the sweeps Tune's overhead per trial:
(sweep wall - the sum of the trials' own wall times, as Tune measured them) / trials at
concurrency 1 (goal: at most 5 % of a trial's wall time, or 5 s, whichever is larger). That figure
spreads the sweep's one-off costs (the driver's start, the trials table and plots at the end) over
only 4 trials, so the sweep at concurrency 1 is also split into its timeline: the driver's start to
the first trial's start, the gap between one trial's last report and the next trial's start (what
each further trial costs), and the last trial's last report to the end. Trial starts and reports
come from Tune's ``result.json`` (``timestamp`` is whole seconds: each point +-1 s).

    python benchmarks/tune_overhead.py                  # the tiny preset, 4 trials of 60 iterations
    python benchmarks/tune_overhead.py --iters 120 --json out.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_job import MemorySampler, _session_pids  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# the 4 trials: pilot off / on x 2 seeds, everything else the preset's
CONFIGS = [{"model.pilot.enabled": enabled, "train.seed": seed} for enabled in (False, True) for seed in (0, 1)]
SWEEP = """search: grid
scheduler: none
space:
  model.pilot.enabled: {grid: [false, true]}
  train.seed: {grid: [0, 1]}
"""


def _start_head(work: Path, cpus: int) -> tuple[subprocess.Popen, dict]:
    """``ray start --head --block`` with token authentication; (process, environment for its clients)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "OMP_NUM_THREADS": "1"}
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus", str(cpus),
         "--port", str(port), "--disable-usage-stats", "--include-dashboard", "true", "--dashboard-port", "0",
         "--temp-dir", str(work / "ray")],
        env=env, stdout=open(work / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    deadline = time.time() + 120
    while subprocess.run([sys.executable, "-c", "import ray; ray.init(address='auto', logging_level='ERROR')"],
                         env=env, capture_output=True).returncode:
        if head.poll() is not None or time.time() > deadline:
            raise SystemExit(f"the Ray head did not come up; see {work / 'head.log'}")
        time.sleep(2)
    return head, env


def _stop_head(head: subprocess.Popen) -> None:
    os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops its processes on SIGTERM
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    for pid in _session_pids(head.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _run(cmd: list[str], env: dict, log_path: Path, period: float, session: int) -> dict:
    """Run the job ``cmd`` against the head; wall time, and the peak PSS of the job's driver plus the
    head's session (Ray's processes, Train workers, Ray Data tasks) while it runs."""
    print("$ " + " ".join(cmd[1:]), flush=True)
    started = time.time()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        samplers = [MemorySampler(proc.pid, period), MemorySampler(session, period)]
        for sampler in samplers:
            sampler.start()
        rc = proc.wait()
        for sampler in samplers:
            sampler.stop.set()
            sampler.join()
    wall = time.perf_counter() - t0
    if rc:
        raise SystemExit(f"{cmd[1]} exited with {rc}; output in {log_path}")
    # the driver is its own session's only process here; the peaks of the two need not coincide,
    # so their sum bounds the job's peak from above
    return {"wall_s": wall, "peak_pss_gib": sum(s.peak_kib for s in samplers) / 2**20,
            "started": started, "ended": started + wall}


def timeline(sweep_dir: Path, started: float, ended: float) -> dict:
    """Where a sweep of trials run one at a time spends its wall time outside them: seconds from the
    driver's start to the first trial's start, between one trial's last report and the next one's
    start, and from the last report to the driver's end (from each trial's ``result.json``)."""
    spans = []
    for path in sweep_dir.glob("*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            spans.append((rows[0]["timestamp"] - rows[0]["time_this_iter_s"], rows[-1]["timestamp"]))
    spans.sort()
    return {"before_first_s": spans[0][0] - started,
            "between_s": [nxt[0] - prev[1] for prev, nxt in zip(spans, spans[1:])],
            "after_last_s": ended - spans[-1][1]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="preset every trial starts from (default: %(default)s)")
    p.add_argument("--iters", type=int, default=60, help="train.max_iters of every trial")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="extra config overrides for every run")
    p.add_argument("--cpus", type=int, default=4, help="logical CPUs of the benchmark's Ray head (default: %(default)s)")
    p.add_argument("--period", type=float, default=1.0, help="memory sampling period, seconds")
    p.add_argument("--json", default=None, help="write all figures to this JSON file")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tob-", dir="/tmp"))  # short: Ray's unix socket paths
    common = [f"train.max_iters={args.iters}", f"train.eval_period={args.iters // 2}",
              f"train.checkpoint_period={args.iters}", f"storage.uri={work / 'runs'}", *args.overrides]
    head, env = _start_head(work, args.cpus)
    try:
        seq = []
        for i, config in enumerate(CONFIGS):
            sets = common + [f"{k}={str(v).lower()}" for k, v in config.items()] + [f"run.name=seq-{i}"]
            seq.append(_run([sys.executable, str(ROOT / "jobs" / "train.py"), "--config", args.config,
                             "--set", *sets], env, work / f"seq-{i}.log", args.period, head.pid))
        space = work / "sweep.yaml"
        space.write_text(SWEEP)
        sweeps = {}
        for concurrent in (1, 2):
            name = f"sweep-c{concurrent}"
            sweeps[concurrent] = r = _run(
                [sys.executable, str(ROOT / "jobs" / "tune.py"), "--config", args.config, "--space", str(space),
                 "--max-concurrent", str(concurrent), "--set", *common, f"run.name={name}"],
                env, work / f"{name}.log", args.period, head.pid)
            with open(work / "runs" / name / "trials.csv") as f:
                rows = list(csv.DictReader(f))
            assert len(rows) == len(CONFIGS) and all(r_["status"] == "completed" for r_ in rows), rows
            r["trial_s"] = [float(r_["time_s"]) for r_ in rows]
            if concurrent == 1:
                r["timeline"] = timeline(work / "runs" / name, r["started"], r["ended"])
    finally:
        _stop_head(head)
        for by_product in ("runs", "ray"):  # checkpoints and Ray's session files; the logs stay
            shutil.rmtree(work / by_product, ignore_errors=True)

    n = len(CONFIGS)
    seq_wall = sum(r["wall_s"] for r in seq)
    one = sweeps[1]
    overhead = (one["wall_s"] - sum(one["trial_s"])) / n
    trial_wall = statistics.median(one["trial_s"])
    goal = max(0.05 * trial_wall, 5.0)
    print(f"\nlogs in {work}")
    print(f"\n{'mode':<28}{'wall s':>9}{'trials/hour':>13}{'peak PSS GiB':>14}")
    print(f"{'jobs/train.py x4, in turn':<28}{seq_wall:>9.0f}{n * 3600 / seq_wall:>13.1f}"
          f"{max(r['peak_pss_gib'] for r in seq):>14.2f}")
    for c, r in sweeps.items():
        print(f"{f'jobs/tune.py, {c} at once':<28}{r['wall_s']:>9.0f}{n * 3600 / r['wall_s']:>13.1f}"
              f"{r['peak_pss_gib']:>14.2f}")
    print(f"\njobs/train.py per run (median): {statistics.median(r['wall_s'] for r in seq):.1f} s; a sweep trial "
          f"(median, Tune's time_total_s): {trial_wall:.1f} s")
    print(f"Tune overhead per trial at 1 at once: {overhead:.1f} s = {overhead / trial_wall:.1%} of a trial "
          f"(goal <= {goal:.1f} s: {'met' if overhead <= goal else 'NOT met'})")
    line = one["timeline"]
    between = statistics.mean(line["between_s"])
    print(f"  of which one-off: driver start to the first trial {line['before_first_s']:.1f} s, last trial's last "
          f"report to the end {line['after_last_s']:.1f} s; between trials (last report to the next start) "
          + " / ".join(f"{g:.1f}" for g in line["between_s"])
          + f" s, mean {between:.1f} s (goal <= {goal:.1f} s: {'met' if between <= goal else 'NOT met'})")
    print(f"sweep (1 at once) / jobs in turn: {one['wall_s'] / seq_wall:.2f}x wall")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "sequential": seq, "sweeps": sweeps,
                                               "overhead_per_trial_s": overhead,
                                               "between_trials_mean_s": between}, indent=2))
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
