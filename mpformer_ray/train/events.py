"""A run's curves for TensorBoard, in ``{storage.uri}/{run.name}/tensorboard/`` (local or s3://).

Rank 0 writes TensorBoard event files with tensorboardX's synchronous event writer (Ray Tune ships
tensorboardX; its SummaryWriter's thread does not drain its queue on flush) into a local directory,
and copies them to the run directory through ``mpformer_ray.storage`` after every checkpoint and
when training stops, so the curves live beside the checkpoints, through the same
endpoint and credentials, and a lost worker loses at most what it wrote since its last checkpoint.
Each training attempt (a resume, a restart) writes a file of its own; TensorBoard draws them as one
run. Tags: ``train/<name>`` for the training windows (losses, lr, images/s, data wait), the
evaluation's own names (``panoptic/PQ``, ``segm/AP``, ``sem_seg/mIoU``, ``consistency/...``).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.summary import scalar

from mpformer_ray import storage

DIRNAME = "tensorboard"
_NOT_CURVES = {"iteration", "epoch", "eta_s", "num_images"}


class EventLog:
    """TensorBoard scalars of one training attempt, synced to ``{run_uri}/tensorboard/``."""

    def __init__(self, run_uri: str) -> None:
        self.uri = storage.join(run_uri, DIRNAME)
        self.local = Path(tempfile.mkdtemp(prefix="mpformer-tensorboard-"))
        # events.out.tfevents.<seconds>.<host>.<unique>: attempts within one second stay apart
        self.writer = EventsWriter(os.path.join(self.local, "events"), f".{uuid.uuid4().hex[:8]}")

    def add(self, step: int, metrics: dict[str, float], prefix: str = "") -> None:
        """Scalars ``{name: value}`` at iteration ``step``, tagged ``prefix + name``; counters and
        non-finite values (an empty AP size bucket) are left out."""
        for name, value in metrics.items():
            if name not in _NOT_CURVES and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.write_event(Event(wall_time=time.time(), step=step, summary=scalar(prefix + name, value)))

    def sync(self) -> None:
        """Copy the event files, as written so far, to the run directory."""
        self.writer.flush()
        for path in sorted(self.local.iterdir()):
            storage.write_bytes(storage.join(self.uri, path.name), path.read_bytes())

    def close(self) -> None:
        try:
            self.sync()
        finally:
            self.writer.close()
            shutil.rmtree(self.local, ignore_errors=True)
