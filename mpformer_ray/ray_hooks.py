"""Ray worker-process hooks (a sweep sets one); a module of its own because every Ray worker of the job
imports it at start-up, which must not pull in torch or Tune."""

from __future__ import annotations

import os

import ray


def export_ray_address() -> None:
    """``worker_process_setup_hook``: point this worker's state-API calls at its own cluster. Ray
    Train's placement-group cleaner asks the state API whether a stopped trial's controller is
    gone; without RAY_ADDRESS it may ask another Ray instance on the machine (or none), fail, and
    the trial's workers never release their CPUs."""
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
