"""Whole-job figures of ``jobs/train.py``: peak memory of all its processes, throughput, data wait.

Each run starts ``jobs/train.py`` (local Ray, as ``make demo`` does) in its own session and samples
every process of that session (the driver, Ray's GCS / raylet / dashboard, the Train workers and the
Ray Data tasks) from ``/proc`` every ``--period`` seconds. Memory is PSS (proportional set size:
pages shared between processes, such as torch's libraries and the object store in ``/dev/shm``,
counted once in total), so the sum is the job's real footprint; summing RSS would count every shared
page once per process. Linux only (``/proc/<pid>/smaps_rollup``).

Throughput and data-wait come from the job's own progress lines (``... X img/s  data wait Y% ...``,
all workers together). "steady" is the median over log windows; the mean over all windows includes
the windows where Ray Data restarts its streaming split at an epoch boundary.

    python benchmarks/train_job.py                           # the default job (make demo), once
    python benchmarks/train_job.py --workers 1 2 --iters 96  # per-worker throughput, 1 vs 2 workers
    python benchmarks/train_job.py --set train.batch_size=2 --json out.json
"""

from __future__ import annotations

import argparse
import atexit
import collections
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROGRESS = re.compile(r"iter (\d+)/(\d+) .* ([\d.]+) img/s\s+data wait (\d+)%")
ROLES = (("gcs_server", "ray gcs"), ("raylet", "ray raylet"), ("dashboard", "ray dashboard"),
         ("RayTrainWorker", "train workers"), ("ray::", "ray workers (data, other)"))


def _session_pids(sid: int) -> list[int]:
    """Pids of live processes in session ``sid`` (a local Ray keeps the driver's session)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # the command name in field 2 may hold spaces; fields after ")" are fixed
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid:
            pids.append(int(entry))
    return pids


def _pss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:  # the process ended between listing and reading
        return None
    return None


def _role(pid: int, driver: int) -> str:
    if pid == driver:
        return "driver"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "other"
    for needle, role in ROLES:
        if needle in cmd:
            return role
    return "other"


class MemorySampler(threading.Thread):
    """Samples the PSS of every process in one session; keeps the peak total and its breakdown."""

    def __init__(self, sid: int, period: float):
        super().__init__(daemon=True)
        self.sid, self.period = sid, period
        self.stop = threading.Event()
        self.peak_kib, self.peak_breakdown, self.peak_at, self.samples = 0, {}, 0.0, 0
        self.role_peak_kib: dict[str, int] = {}
        self.t0 = time.perf_counter()

    def run(self) -> None:
        while not self.stop.is_set():
            by_role: dict[str, int] = {}
            for pid in _session_pids(self.sid):
                kib = _pss_kib(pid)
                if kib:
                    role = _role(pid, self.sid)
                    by_role[role] = by_role.get(role, 0) + kib
            total = sum(by_role.values())
            self.samples += 1
            for role, kib in by_role.items():
                self.role_peak_kib[role] = max(self.role_peak_kib.get(role, 0), kib)
            if total > self.peak_kib:
                self.peak_kib, self.peak_breakdown = total, by_role
                self.peak_at = time.perf_counter() - self.t0
            self.stop.wait(self.period)


def run_job(overrides: list[str], period: float, log_path: Path) -> dict:
    """Run jobs/train.py with ``overrides`` in a new session; returns its figures."""
    cmd = [sys.executable, str(ROOT / "jobs" / "train.py")] + [a for o in overrides for a in ("--set", o)]
    print("$ " + " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, cwd=ROOT)
        sampler = MemorySampler(proc.pid, period)
        sampler.start()
        windows, tail = [], collections.deque(maxlen=40)
        for line in proc.stdout:
            log.write(line)
            tail.append(line)
            m = PROGRESS.search(line)
            if m:
                windows.append({"iter": int(m[1]), "images_per_s": float(m[3]), "data_wait": int(m[4]) / 100})
                print(f"  iter {m[1]}/{m[2]}  {m[3]} img/s  data wait {m[4]}%  "
                      f"(peak PSS so far {sampler.peak_kib / 2**20:.2f} GiB)", flush=True)
        rc = proc.wait()
        wall = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
    if rc:
        sys.stderr.write("".join(tail))
        raise SystemExit(f"jobs/train.py exited with {rc}; full output in {log_path}")
    rates = [w["images_per_s"] for w in windows]
    waits = [w["data_wait"] for w in windows]
    gib = 2**20
    return {
        "overrides": overrides,
        "wall_s": wall,
        "log_windows": windows,
        "images_per_s_median": statistics.median(rates) if rates else None,
        "images_per_s_mean": statistics.fmean(rates) if rates else None,
        "data_wait_mean": statistics.fmean(waits) if waits else None,
        "data_wait_median": statistics.median(waits) if waits else None,
        "peak_pss_gib": sampler.peak_kib / gib,
        "peak_at_s": sampler.peak_at,
        "peak_breakdown_gib": {k: v / gib for k, v in sorted(sampler.peak_breakdown.items())},
        "role_peak_pss_gib": {k: v / gib for k, v in sorted(sampler.role_peak_kib.items())},
        "memory_samples": sampler.samples,
        "log": str(log_path),
    }


def print_run(name: str, r: dict) -> None:
    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    print(f"\n{name}: wall {r['wall_s'] / 60:.1f} min, {len(r['log_windows'])} log windows, "
          f"{r['memory_samples']} memory samples")
    print(f"  images/s (all workers)  median {fmt(r['images_per_s_median'], '.2f')}  "
          f"mean {fmt(r['images_per_s_mean'], '.2f')}")
    print(f"  data wait               median {fmt(r['data_wait_median'], '.0%')}  mean {fmt(r['data_wait_mean'], '.0%')}")
    print(f"  peak PSS, all processes {r['peak_pss_gib']:.2f} GiB at {r['peak_at_s']:.0f} s: "
          + ", ".join(f"{k} {v:.2f}" for k, v in r["peak_breakdown_gib"].items()))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="*", default=None,
                   help="compare these worker counts on short runs (N workers share --cpus CPUs); "
                        "default: one run of the default job")
    p.add_argument("--iters", type=int, default=96, help="train.max_iters of the --workers runs")
    p.add_argument("--cpus", type=float, default=1.0,
                   help="CPUs shared by the Train workers in --workers runs (the rest is left to Ray Data)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every run (repeatable)")
    p.add_argument("--period", type=float, default=1.0, help="memory sampling period, seconds")
    p.add_argument("--workdir", default=None, help="checkpoints and logs (default: a temp dir whose checkpoints are removed at exit)")
    p.add_argument("--json", default=None, help="write all figures to this JSON file")
    args = p.parse_args(argv)
    if not Path("/proc/self/smaps_rollup").exists():
        p.error("needs Linux /proc/<pid>/smaps_rollup to measure PSS")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mpformer-train-job-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if not args.workdir:  # the checkpoints (~250 MiB a run) are a by-product here; the logs stay
        atexit.register(shutil.rmtree, workdir / "runs", True)
    storage = [f"storage.uri={workdir / 'runs'}"]

    runs: dict[str, dict] = {}
    if not args.workers:
        runs["default"] = run_job(storage + ["run.name=bench-default"] + args.overrides, args.period,
                                  workdir / "default.log")
        print_run("default", runs["default"])
    else:
        for n in args.workers:
            over = storage + [f"run.name=bench-w{n}", f"train.workers={n}", f"train.cpus_per_worker={args.cpus / n:g}",
                              f"train.max_iters={args.iters}", "train.eval_period=0",
                              f"train.checkpoint_period={args.iters}"] + args.overrides
            runs[f"workers={n}"] = r = run_job(over, args.period, workdir / f"workers-{n}.log")
            r["workers"] = n
            r["images_per_s_per_worker_median"] = (r["images_per_s_median"] or 0) / n
            print_run(f"workers={n}", r)
        print(f"\n{'workers':>8}{'img/s total (median)':>22}{'img/s per worker':>18}{'data wait (median)':>20}"
              f"{'peak PSS GiB':>14}")
        for r in runs.values():
            print(f"{r['workers']:>8}{r['images_per_s_median']:>22.2f}{r['images_per_s_per_worker_median']:>18.2f}"
                  f"{r['data_wait_median']:>20.0%}{r['peak_pss_gib']:>14.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "runs": runs}, indent=2))
        print(f"\nfigures written to {args.json}")


if __name__ == "__main__":
    main()
