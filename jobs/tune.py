"""Sweep MP-Former's pilot hyperparameters with Ray Tune (Optuna search, ASHA early stopping).

    python jobs/tune.py                                    # a small sweep of the tiny preset on the synthetic data
    python jobs/tune.py --config r50 --space configs/sweeps/pilot.yaml --num-samples 32 --max-concurrent 4 \\
        --set data.train=s3://bucket/coco/train data.val=s3://bucket/coco/val storage.uri=s3://bucket/sweeps run.name=pilot-coco
    python jobs/tune.py --space ablation                    # grid: pilot off / on x 3 seeds

The sweep lives in {storage.uri}/{run.name}/ (without --set run.name=..., the config's
run.name + "-sweep"). Each trial is a run of the training job (jobs/train.py's TorchTrainer) under
{storage.uri}/{run.name}/<trial id>/. Rerunning the same command, or --resume, continues an
interrupted sweep; for a finished one it reruns nothing and prints the results again.
At the end: the trials table (printed, and trials.csv), best_config.yaml (train it with
jobs/train.py --config) and plots/*.png, all under {storage.uri}/{run.name}/. After Ctrl-C the
same, with the trials left unfinished marked so, and exit status 130; 2 for bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# the repository root, for `ray job submit --working-dir .` on an image without the package installed
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mpformer_ray.cli import job  # noqa: E402
from mpformer_ray.config import add_config_arguments, load_config  # noqa: E402
from mpformer_ray.tune import DEFAULT_SWEEP, finish_sweep, load_sweep, run_sweep  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--space", default=DEFAULT_SWEEP,
                        help="sweep file: a name in configs/sweeps/ or a YAML path (default: %(default)s)")
    parser.add_argument("--search", choices=["optuna", "grid"], default=None, help="default: the sweep file's")
    parser.add_argument("--scheduler", choices=["asha", "none"], default=None, help="default: the sweep file's")
    parser.add_argument("--num-samples", type=int, default=None, help="trials to run (default: the sweep file's)")
    parser.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: the sweep file's)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the sweep {storage.uri}/{run.name} (an error if there is none); "
                             "rerunning without it continues too")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else start a local Ray)")
    return parser.parse_args(argv)


@job
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if not any(o.split("=", 1)[0].strip() == "run.name" for o in args.overrides):
            # a preset's run.name names its training run; the sweep gets a directory of its own
            cfg.run.name += "-sweep"
        sweep = load_sweep(args.space, cfg, search=args.search, scheduler=args.scheduler,
                           num_samples=args.num_samples, max_concurrent=args.max_concurrent)
        result = run_sweep(cfg, sweep, resume=args.resume, address=args.address)
        summary = finish_sweep(result, sweep)
    # Ctrl-C before Tune takes over SIGINT, or a second one while it winds down: what Tune last saved
    # (trials' checkpoints, its state every few seconds) is what a rerun continues from
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to start or continue the sweep (finished trials are kept)",
              file=sys.stderr)
        return 130
    print(summary)
    # as jobs/train.py: a sweep stopped by Ctrl-C is not a success
    return 130 if result.unfinished else 0


if __name__ == "__main__":
    sys.exit(main())
