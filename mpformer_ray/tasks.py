"""Which segmentation tasks a split is evaluated on, and which metric ranks checkpoints and sweep trials.

Decided here only; the converters, the prepare step, the trainer, evaluation and the sweep all ask.

- A prepared split's manifest names its annotations (``task``: panoptic, instance or semantic). A panoptic
  split also supports instance AP and semantic mIoU, which Mask2Former reports for panoptic models from
  the same model's "instances" and "sem_seg" outputs.
- The model's post-processing switches (``model.test.{panoptic,instance,semantic}_on``) decide which of
  those outputs the model produces, so a switched-off task is not evaluated.
- The main metric is the most specific task's: PQ with panoptic, else mask AP, else mIoU.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mpformer_ray.config import ConfigError, InferenceConfig


@dataclass(frozen=True)
class Task:
    """One task; the model produces its output while ``model.test.<name>_on`` is true."""

    evaluated_on: tuple[str, ...]  # the tasks a split with this task's annotations can be evaluated on
    main_metric: str  # the evaluator's metric that ranks checkpoints and trials (higher is better)


# name -> task, most specific first: the main task of a set is the first of these in it. What a manifest's
# ``task`` and jobs/prepare_data.py --task accept.
TASKS: dict[str, Task] = {
    "panoptic": Task(("panoptic", "instance", "semantic"), "panoptic/PQ"),
    "instance": Task(("instance",), "segm/AP"),
    "semantic": Task(("semantic",), "sem_seg/mIoU"),
}


def check_task(task: str) -> str:
    """``task`` when it is one of TASKS (what jobs/prepare_data.py --task accepts), else a ValueError."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    return task


def tasks_for(manifest_task: str | None, test_cfg: InferenceConfig, where: str = "the split") -> list[str]:
    """The tasks a split whose manifest says ``manifest_task`` is evaluated on by a model post-processing
    with ``test_cfg``, most specific first (``main_metric`` takes the first).

    Raises ValueError naming ``where`` when the manifest's task is unknown, or when ``test_cfg`` switches
    off every task the split supports (naming the ``model.test.*_on`` fields to turn on)."""
    if manifest_task not in TASKS:
        raise ValueError(f"{where}: manifest task {manifest_task!r} is not one of {list(TASKS)}; "
                         "re-run jobs/prepare_data.py")
    supported = TASKS[manifest_task].evaluated_on
    tasks = [t for t in supported if getattr(test_cfg, f"{t}_on")]
    if not tasks:
        switches = ", ".join(f"model.test.{t}_on" for t in supported)
        raise ConfigError(f"{where}: a {manifest_task} split can be evaluated on {list(supported)}, "
                         f"but the config turns all of them off; set one of {switches} to true")
    return tasks


def main_task(tasks: Iterable[str]) -> str:
    """The most specific of ``tasks`` (a non-empty subset of TASKS)."""
    tasks = set(tasks)
    for task in TASKS:
        if task in tasks:
            return task
    raise ValueError(f"no main task among {sorted(tasks)}: expected some of {list(TASKS)}")


def main_metric(tasks: Iterable[str]) -> str:
    """The metric that ranks checkpoints and sweep trials: PQ with panoptic, else mask AP, else mIoU."""
    return TASKS[main_task(tasks)].main_metric
