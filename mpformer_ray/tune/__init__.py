"""Hyperparameter sweeps with Ray Tune: sweep files (``space``), the Tune wiring whose trials
are runs of the training job (``sweep``), and the sweep's outputs (``report``)."""

from mpformer_ray.tune.space import DEFAULT_SWEEP, Param, Sweep, SweepError, load_sweep, trial_config
from mpformer_ray.tune.sweep import SweepResult, best_config, finish_sweep, run_sweep

__all__ = ["DEFAULT_SWEEP", "Param", "Sweep", "SweepError", "SweepResult", "best_config", "finish_sweep",
           "load_sweep", "run_sweep", "trial_config"]
