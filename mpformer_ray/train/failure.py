"""Which worker failures a restart can fix, and how a failed run is told to the user.

Ray Train restarts every worker from the latest checkpoint, up to ``train.max_failures`` times,
after any worker error. That helps after a lost node or a killed process. It cannot help when the
error comes from what the run reads (a damaged checkpoint or shard, a config the data does not
fit), nor after a non-finite loss, which a resume replays (same checkpoint, same batches). Those
end the run at the first failure, with the worker's message, instead of after ``max_failures``
identical attempts of a minute each.
"""

from __future__ import annotations

import ray.train

from mpformer_ray.config import ConfigError
from mpformer_ray.data.records import DataError
from mpformer_ray.train.checkpoint import CheckpointError

NOT_RETRYABLE = (ConfigError, DataError, CheckpointError, FloatingPointError)

# the test harness's fault injection, not a config field: "ITER" or "ITER,seed=S". Rank 0 of a run (of the
# runs with train.seed S) dies once at iteration ITER (train.loop), to exercise recovery; init_ray passes it on
FAULT_ENV = "MPFORMER_FAULT_AT_ITER"


class RunFailed(RuntimeError):
    """A worker failed in a way no restart can fix; the message is the worker's error.

    Not a ``UserError``: it reaches the driver only inside Ray Train's ``TrainingFailedError``, a failed
    run (status 1, with the latest checkpoint), and its cause may be a diverged loss rather than input."""


def worker_error(error: BaseException) -> BaseException:
    """The exception the train function raised on a worker: Ray Train hands it to the controller
    and the driver wrapped with its traceback text (``UserExceptionWithTraceback._base_exc``)."""
    return getattr(error, "_base_exc", error)


class FailFast(ray.train.UserCallback):
    """Ends the run at a worker error in ``NOT_RETRYABLE``: raised from this controller callback, the
    error fails the controller, and Ray Train's failure policy does not retry controller errors."""

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        for rank, error in sorted(worker_exceptions.items()):
            cause = worker_error(error)
            if isinstance(cause, NOT_RETRYABLE):
                raise RunFailed(f"worker {rank}: {type(cause).__name__}: {cause} (not retried: a restart from "
                                "the latest checkpoint would fail the same way)")


def failure_message(error: ray.train.TrainingFailedError) -> str:
    """What ``fit()``'s error says in a line per failed worker, without Ray's wrapping and tracebacks
    (those are in the job's log above)."""
    if isinstance(error, ray.train.ControllerError):
        return str(error.controller_failure)
    if isinstance(error, ray.train.WorkerGroupError):
        lines = []
        for rank, e in sorted(error.worker_failures.items()):
            cause = worker_error(e)
            last = [line for line in str(cause).splitlines() if line.strip()][-1:]
            lines.append(f"worker {rank}: {type(cause).__name__}: {last[0].strip() if last else ''}")
        return "\n".join(lines)
    return str(error)
