"""Distributed training: the plain loop, optimizer / schedule, checkpoints and Ray Train wiring."""

from mpformer_ray.train.checkpoint import (
    Checkpoint,
    CheckpointStore,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    run_uri,
    save_checkpoint,
)
from mpformer_ray.train.optim import build_optimizer, build_scheduler, param_groups, poly_warmup_factor
from mpformer_ray.train.trainer import PreflightError, TrainPlan, build_trainer, preflight, run_training


def __getattr__(name: str):
    # train_loop imports the model (torchvision, scipy): only those who train load it
    if name == "train_loop":
        from mpformer_ray.train.loop import train_loop

        return train_loop
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Checkpoint", "CheckpointStore", "PreflightError", "TrainPlan", "build_optimizer", "build_scheduler", "build_trainer",
    "latest_checkpoint", "load_checkpoint", "load_model", "param_groups", "poly_warmup_factor", "preflight",
    "run_training", "run_uri", "save_checkpoint", "train_loop",
]
