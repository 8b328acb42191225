"""Train MP-Former on Ray Train.

    python jobs/train.py                                   # tiny preset on the synthetic dataset
    python jobs/train.py --config r50 --set data.train=s3://bucket/coco/train ...
    ray job submit --working-dir . -- python jobs/train.py --config configs/my.yaml

Rerunning with the same run.name resumes from the run's latest checkpoint. Ctrl-C stops training,
says where the latest checkpoint is and exits with status 130. Bad input exits with status 2 before
any worker starts; a run that fails (an error no restart fixes, or more than train.max_failures
worker failures) exits with status 1, naming each worker's error and the latest checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# the repository root, for `ray job submit --working-dir .` on an image without the package installed
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mpformer_ray import storage  # noqa: E402
from mpformer_ray.cli import job  # noqa: E402
from mpformer_ray.config import Config, add_config_arguments, load_config  # noqa: E402
from mpformer_ray.train import latest_checkpoint, run_training  # noqa: E402
from mpformer_ray.train.checkpoint import CheckpointError, CheckpointStore, run_uri  # noqa: E402
from mpformer_ray.train.failure import failure_message  # noqa: E402
from ray.train import TrainingFailedError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--address", default=None,
                        help="Ray address (default: RAY_ADDRESS, else start a local Ray)")
    return parser.parse_args(argv)


def results_table(metrics: dict) -> str:
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in sorted(metrics.items())]
    width = max((len(k) for k, _ in rows), default=6)
    return "\n".join([f"{'metric':<{width}}  value", f"{'-' * width}  -----"] + [f"{k:<{width}}  {v}" for k, v in rows])


def resume_line(cfg: Config | None, what: str = "interrupted") -> str:
    """The line printed when training stops early (``what``: "interrupted", "failed"): where the run
    can resume from."""
    if cfg is None:
        return f"{what} before the config was loaded"
    # the run directory preflight uses (a relative local storage.uri means this working directory)
    storage.configure(cfg.storage)
    store = CheckpointStore(storage.absolute(run_uri(cfg)))
    try:
        latest = store.latest()
    except (CheckpointError, storage.StorageError) as e:
        return f"{what}; the latest checkpoint cannot be read: {e}"
    if latest is None:
        return f"{what} before the first checkpoint in {store.dir}; rerun the same command to start again"
    return f"{what}; latest checkpoint: {latest}; rerun the same command to resume"


@job
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        plan, _ = run_training(cfg, address=args.address)
    # Ctrl-C before training starts is a KeyboardInterrupt; during training, Ray Train's own SIGINT
    # handler aborts the workers and ends the driver's wait with SystemExit (status 0 or 1: replaced)
    except (KeyboardInterrupt, SystemExit):
        print(resume_line(cfg), file=sys.stderr)
        return 130
    except TrainingFailedError as e:
        print(f"error: training failed: {failure_message(e)}\n{resume_line(cfg, 'failed')}", file=sys.stderr)
        return 1
    store = CheckpointStore(plan.run_uri)
    pointer = store.pointer() or {}
    print("\nfinal metrics")
    print(results_table(pointer.get("metrics", {})))
    print(f"\ncheckpoints:  {store.dir}")
    print(f"latest:       {latest_checkpoint(plan.run_uri)}")
    if pointer.get("best"):
        best = pointer["best"]
        print(f"best:         {storage.join(store.dir, best['checkpoint'])} ({best['metric']} {best['value']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
