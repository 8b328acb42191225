"""Every bad-state and bad-input case as a user meets it: the command, its exit status, the line it
prints, the time it takes, and whether anything already written was lost. Prints the markdown
table of benchmarks/RESULTS.md.

    python benchmarks/failure_cases.py [--json cases.json]

The cases run the real job scripts in subprocesses (a local Ray where training starts) on scratch
copies of one small real run: the tiny model at 64 px on synthetic data in the COCO layout,
checkpoints at iterations 2 and 4. "Nothing lost" is checked here by hashing the checkpoints the
case started with; the test named in the last column checks the same case in `make test`.
About 6 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mpformer_ray.data.coco import convert_coco  # noqa: E402
from mpformer_ray.data.synthetic import write_coco_layout  # noqa: E402

TINY = [
    "model.dec_layers=2", "model.enc_layers=1", "model.num_queries=8", "model.hidden_dim=32", "model.nheads=2",
    "model.dim_feedforward=64", "model.enc_dim_feedforward=64", "model.mask_dim=32", "model.train_num_points=256",
    "data.crop_size=[64,64]", "data.test_short_side=64", "data.test_max_size=64", "train.batch_size=2",
    "train.workers=1", "train.log_period=2", "train.checkpoint_period=2", "train.eval_period=0",
    "train.keep_checkpoints=5",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""}


@dataclass
class Case:
    name: str
    setup: Callable[[Path], list[str]]  # scratch dir -> the command's arguments after `python`
    expect: int  # exit status
    message: str  # regex of the line that tells the user what happened
    test: str  # the test in `make test` that checks the same case
    command: str  # what the user ran, shortened for the table
    damaged: tuple[str, ...] = ()  # checkpoints the case damages; every other one must survive byte for byte
    interrupt_after: str | None = None  # send SIGINT once this file exists (Ctrl-C)


def job(name: str, *args: str) -> list[str]:
    return [str(REPO / "jobs" / name), *args]


def train(work: Path, *sets: str) -> list[str]:
    return job("train.py", "--set", *TINY, f"data.train={work / 'records' / 'train'}",
               f"data.val={work / 'records' / 'val'}", f"storage.uri={work / 'runs'}", "run.name=base", *sets)


def ckpts(work: Path) -> Path:
    return work / "runs" / "base" / "checkpoints"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def silent_endpoint() -> str:
    """An HTTP endpoint that accepts connections and never answers (a hung S3 gateway)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in iter(int, 1)], daemon=True).start()
    return f"http://127.0.0.1:{server.getsockname()[1]}"


def _lost_pointer(work: Path) -> list[str]:
    (ckpts(work) / "latest.json").unlink()
    return train(work, "train.max_iters=6")


def _damaged_latest(work: Path) -> list[str]:
    truncate(ckpts(work) / "model_0000004.pth")
    return train(work, "train.max_iters=6")


def _damaged_pointer(work: Path) -> list[str]:
    truncate(ckpts(work) / "latest.json")
    return train(work, "train.max_iters=6")


def _no_intact(work: Path) -> list[str]:
    for path in ckpts(work).glob("model_*.pth"):
        truncate(path)
    return train(work, "train.max_iters=6")


def _damaged_manifest(work: Path) -> list[str]:
    truncate(work / "records" / "train" / "manifest.json")
    return train(work, "train.max_iters=6")


def _damaged_shard(work: Path) -> list[str]:
    truncate(work / "records" / "train" / "part-00001.parquet")
    return train(work, "train.max_iters=6")


def _silent_s3(work: Path) -> list[str]:
    return train(work, "storage.uri=s3://bucket/runs", f"storage.endpoint_url={silent_endpoint()}")


def _skipped_split(work: Path) -> list[str]:
    shutil.rmtree(work / "coco" / "annotations" / "panoptic_train2017")  # the PNG zip not unpacked
    return job("prepare_data.py", "--dataset", "coco", "--root", str(work / "coco"), "--split", "train",
               "--workers", "1", "--out", str(work / "records" / "again"))


def _missing_data(work: Path) -> list[str]:
    return train(work, f"data.train={work / 'nowhere'}", "run.name=new")


def _nan(work: Path) -> list[str]:
    return train(work, "run.name=nan", "train.max_iters=20", "train.max_failures=3", "train.lr=1e30",
                 "train.clip_grad=0", "train.amp=off")


def _ctrl_c(work: Path) -> list[str]:
    return train(work, "train.max_iters=400")


def _evaluate_damaged(work: Path) -> list[str]:
    truncate(ckpts(work) / "model_0000004.pth")
    return job("evaluate.py", "--checkpoint", str(ckpts(work) / "model_0000004.pth"), "--device", "cpu")


def _predict_bad_image(work: Path) -> list[str]:
    good = next((work / "coco" / "val2017").glob("*.jpg"))
    (work / "broken.jpg").write_bytes(b"not a jpeg")
    return job("predict.py", "--checkpoint", str(work / "runs" / "base"), "--device", "cpu",
               "--out", str(work / "predictions"), str(work / "broken.jpg"), str(good))


RERUN = "jobs/train.py, same run.name, train.max_iters=6"
CASES = [
    Case("run dir with checkpoints but no latest.json", _lost_pointer, 0, r"no latest\.json.*",
         "test_checkpoint_recovery::test_lost_pointer_resumes_from_newest_checkpoint", RERUN),
    Case("latest checkpoint truncated", _damaged_latest, 0, r"model_0000004\.pth.*",
         "test_checkpoint_recovery::test_damaged_latest_checkpoint_falls_back_to_older_intact_one", RERUN,
         damaged=("model_0000004.pth",)),
    Case("latest.json truncated", _damaged_pointer, 0, r"latest\.json.*",
         "test_checkpoint_recovery::test_damaged_pointer_falls_back_to_newest_intact_checkpoint", RERUN),
    Case("no readable checkpoint in the run dir", _no_intact, 2, r"^error: .*",
         "test_checkpoint_recovery::test_no_readable_checkpoint_is_a_preflight_error_naming_the_directory", RERUN,
         damaged=("model_0000002.pth", "model_0000004.pth")),
    Case("checkpoint does not fit the config", lambda w: train(w, "model.hidden_dim=64", "train.max_iters=6"), 2,
         r"^error: .*", "test_checkpoint_recovery::test_checkpoint_that_does_not_fit_the_config_is_a_preflight_error",
         RERUN + ", model.hidden_dim=64"),
    Case("data.train does not exist (no run dir may be left)", _missing_data, 2, r"^error: .*",
         "test_checkpoint_recovery::test_failed_preflight_leaves_no_run_directory",
         "jobs/train.py --set data.train=<missing> run.name=new"),
    Case("manifest.json of data.train truncated", _damaged_manifest, 2, r"^error: .*",
         "test_records_coco::test_damaged_manifest_names_the_file_and_the_fix", RERUN),
    Case("Parquet shard of data.train truncated", _damaged_shard, 2, r"^error: .*",
         "test_records_coco::test_truncated_shard_names_the_file_and_the_fix", RERUN),
    Case("S3 endpoint accepts connections, never answers", _silent_s3, 2, r"^error: .*",
         "test_storage::test_training_preflight_on_a_silent_endpoint_fails_fast",
         "jobs/train.py --set storage.uri=s3://bucket/runs storage.endpoint_url=<silent>"),
    Case("COCO panoptic PNGs not unpacked (every image skipped)", _skipped_split, 2, r"^error: .*",
         "test_records_coco::test_prepare_data_job_refuses_a_mostly_skipped_split_unless_allowed",
         "jobs/prepare_data.py --dataset coco --split train --out <new>"),
    Case("training diverges (NaN)", _nan, 1, r"^error: .*",
         "test_train_e2e::test_non_finite_loss_fails_the_run_at_once",
         "jobs/train.py --set run.name=nan train.lr=1e30 train.clip_grad=0 train.max_failures=3"),
    Case("Ctrl-C during training (time: from SIGINT to exit)", _ctrl_c, 130, r"^interrupted.*",
         "test_train_e2e::test_killed_interrupted_and_failing_run_loses_nothing",
         "jobs/train.py, same run.name, then Ctrl-C", interrupt_after="model_0000006.pth"),
    Case("evaluate a truncated checkpoint", _evaluate_damaged, 2, r"^error: .*",
         "test_checkpoint_recovery::test_inference_jobs_name_the_damaged_or_unfitting_checkpoint",
         "jobs/evaluate.py --checkpoint <run>/checkpoints/model_0000004.pth", damaged=("model_0000004.pth",)),
    Case("predict with one unreadable image among good ones", _predict_bad_image, 2, r"^error: .*",
         "test_eval_predict::test_predict_job_writes_every_good_image_and_names_each_bad_one",
         "jobs/predict.py --checkpoint <run> broken.jpg good.jpg"),
]


def digests(work: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(ckpts(work).glob("model_*.pth"))}


def run_case(case: Case, base: Path) -> dict:
    work = Path(tempfile.mkdtemp(prefix="case-"))
    try:
        shutil.copytree(base, work, dirs_exist_ok=True)
        before = digests(work)
        argv = [sys.executable, *case.setup(work)]
        start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=work, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        if case.interrupt_after:
            while not (ckpts(work) / case.interrupt_after).exists() and proc.poll() is None:
                time.sleep(0.2)
            start = time.perf_counter()  # the time that counts: from Ctrl-C to the exit
            os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=600)
        seconds = time.perf_counter() - start
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in out.splitlines()]
        message = next((m.group(0) for line in lines if (m := re.search(case.message, line))), "(no such line)")
        after = digests(work)
        kept = all(after.get(name) == digest for name, digest in before.items() if name not in case.damaged)
        if case.name.startswith("data.train does not exist"):
            kept = kept and not (work / "runs" / "new").exists()
        if case.name.startswith("predict"):
            kept = kept and any((work / "predictions").glob("*_overlay.png"))  # the good image was written
        return {"case": case.name, "command": case.command, "exit": proc.returncode, "expected": case.expect,
                "seconds": round(seconds, 1), "message": message.replace(str(work), "<run>")[:300], "kept": kept,
                "test": case.test}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def prepare(base: Path) -> None:
    """The synthetic COCO layout, its records, and a 4-iteration run with checkpoints at 2 and 4."""
    for split, num in (("train", 12), ("val", 4)):
        write_coco_layout(base / "coco", split, num=num, size=64, seed=0)
        convert_coco(str(base / "coco"), split, str(base / "records" / split), task="panoptic", shard_size=4,
                     num_workers=1, progress=False)
    proc = subprocess.run([sys.executable, *train(base, "train.max_iters=4")], cwd=base, env=ENV,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"the base run failed:\n{proc.stderr[-3000:]}")
    pointer = (ckpts(base) / "latest.json").read_text()
    json.loads(pointer, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"bare {c} in latest.json")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="failure-cases-"))
    try:
        prepare(base)
        rows = []
        for case in CASES:
            rows.append(run_case(case, base))
            print(f"{case.name}: exit {rows[-1]['exit']} in {rows[-1]['seconds']} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print("| case | command | exit (expected) | time (s) | what it says | nothing lost | test |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        kept = "yes" if r["kept"] else "**no**"
        message = r["message"].replace("|", "\\|")
        print(f"| {r['case']} | `{r['command']}` | {r['exit']} ({r['expected']}) | {r['seconds']} | {message} "
              f"| {kept} | `{r['test']}` |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if any(r["exit"] != r["expected"] or r["kept"] is False for r in rows):
        raise SystemExit("some case did not behave as expected (see the table)")


if __name__ == "__main__":
    main()
