"""Ray worker-process hooks (every job sets one); a module of its own because every Ray worker of the
job imports it at start-up, which must not pull in torch or Tune."""

from __future__ import annotations

import os

import ray

# how often Ray Train's controller polls its workers (Ray's default: 2 s). The end of a run is noticed
# at the next poll, so the default kept every training job, and each sweep trial, about 1-2 s longer
# than its work; a poll is one small RPC per worker.
TRAIN_POLL_INTERVAL_S = "0.5"


def setup_worker() -> None:
    """``worker_process_setup_hook`` of the training and sweep jobs.

    - Point this worker's state-API calls at its own cluster: Ray Train's placement-group cleaner asks
      the state API whether a stopped trial's controller is gone; without RAY_ADDRESS it may ask
      another Ray instance on the machine (or none), fail, and the trial's workers never release
      their CPUs.
    - Ray Train's poll interval, unless the user set RAY_TRAIN_HEALTH_CHECK_INTERVAL_S.
    """
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_INTERVAL_S)
