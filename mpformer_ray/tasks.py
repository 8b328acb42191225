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

from mpformer_ray.config import InferenceConfig

# most specific first: the main task of a set is the first of these in it
TASKS = ("panoptic", "instance", "semantic")
# the tasks a split with the manifest's annotations can be evaluated on
SUPPORTED = {"panoptic": ("panoptic", "instance", "semantic"), "instance": ("instance",), "semantic": ("semantic",)}
# task -> the evaluator's metric that ranks checkpoints and trials (higher is better)
MAIN_METRICS = {"panoptic": "panoptic/PQ", "instance": "segm/AP", "semantic": "sem_seg/mIoU"}


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
    if manifest_task not in SUPPORTED:
        raise ValueError(f"{where}: manifest task {manifest_task!r} is not one of {list(TASKS)}; "
                         "re-run jobs/prepare_data.py")
    enabled = {"panoptic": test_cfg.panoptic_on, "instance": test_cfg.instance_on, "semantic": test_cfg.semantic_on}
    tasks = [t for t in SUPPORTED[manifest_task] if enabled[t]]
    if not tasks:
        switches = ", ".join(f"model.test.{t}_on" for t in SUPPORTED[manifest_task])
        raise ValueError(f"{where}: a {manifest_task} split can be evaluated on {list(SUPPORTED[manifest_task])}, "
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
    return MAIN_METRICS[main_task(tasks)]
