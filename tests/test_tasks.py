"""One decision of the evaluated tasks and the main metric, shared by prepare, training and evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mpformer_ray.config import ConfigError, InferenceConfig, load_config, with_classes
from mpformer_ray.data.coco import convert_coco
from mpformer_ray.data.prepare import Source, prepare
from mpformer_ray.data.records import read_manifest
from mpformer_ray.evaluation.report import Evaluation
from mpformer_ray.evaluation.runner import evaluate_model
from mpformer_ray.model import build_model
from mpformer_ray.tasks import main_metric, tasks_for
from mpformer_ray.train import PreflightError, preflight, train_loop
from mpformer_ray.train.checkpoint import CheckpointStore

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def splits(synthetic_coco: Path, tmp_path_factory) -> dict[str, str]:
    """Records of the synthetic COCO layout: panoptic train and val, and the val split as semantic."""
    out = tmp_path_factory.mktemp("task_splits")
    uris = {}
    for name, split, task in (("train", "train", "panoptic"), ("val", "val", "panoptic"),
                              ("val_semantic", "val", "semantic")):
        uris[name] = str(out / name)
        convert_coco(str(synthetic_coco), split, uris[name], task=task, shard_size=8, num_workers=1, progress=False)
    return uris


def run_cfg(splits: dict, tmp_path: Path, *overrides: str):
    return load_config("tiny", [f"data.train={splits['train']}", f"data.val={splits['val']}",
                                f"storage.uri={tmp_path / 'runs'}", "run.name=tasks", "data.test_short_side=64",
                                "data.test_max_size=64", *overrides])


def test_tasks_follow_the_split_and_the_post_processing_switches():
    everything = InferenceConfig()
    assert tasks_for("panoptic", everything) == ["panoptic", "instance", "semantic"]
    assert tasks_for("instance", everything) == ["instance"]
    no_panoptic = InferenceConfig(panoptic_on=False)
    assert tasks_for("panoptic", no_panoptic) == ["instance", "semantic"]
    assert main_metric(tasks_for("panoptic", everything)) == "panoptic/PQ"
    assert main_metric(tasks_for("panoptic", no_panoptic)) == "segm/AP"
    assert main_metric(tasks_for("panoptic", InferenceConfig(panoptic_on=False, instance_on=False))) == "sem_seg/mIoU"
    with pytest.raises(ValueError, match=r"data\.val=x: .*semantic split.*model\.test\.semantic_on"):
        tasks_for("semantic", InferenceConfig(semantic_on=False), "data.val=x")
    with pytest.raises(ValueError, match=r"manifest task 'depth'.*prepare_data"):
        tasks_for("depth", everything)
    with pytest.raises(ValueError, match="task must be one of"):
        prepare("synthetic", Source(root="unused"), "unused", task="depth")


def test_main_metric_is_one_the_evaluation_gives_when_panoptic_is_off(splits, tmp_path):
    plan = preflight(run_cfg(splits, tmp_path, "model.test.panoptic_on=false"))
    assert plan.tasks == ["instance", "semantic"] and plan.main_metric == "segm/AP"
    torch.manual_seed(0)
    model = build_model(plan.cfg).eval()
    metrics = evaluate_model(model, plan.cfg.data.val, plan.cfg, plan.classes, max_images=2)
    assert plan.main_metric in metrics and "panoptic/PQ" not in metrics
    assert preflight(run_cfg(splits, tmp_path)).main_metric == "panoptic/PQ"


def test_validation_split_without_the_main_task_is_refused(splits, tmp_path):
    assert read_manifest(splits["val_semantic"])["task"] == "semantic"
    with pytest.raises(PreflightError, match=r"data\.val=.*val_semantic.*panoptic/PQ.*--task panoptic"):
        preflight(run_cfg(splits, tmp_path, f"data.val={splits['val_semantic']}"))
    # with the tasks data.val lacks switched off, the main metric is one it gives
    plan = preflight(run_cfg(splits, tmp_path, f"data.val={splits['val_semantic']}", "model.test.panoptic_on=false",
                             "model.test.instance_on=false"))
    assert plan.main_metric == "sem_seg/mIoU"


def test_an_evaluation_without_the_main_metric_is_an_error(splits, tmp_path):
    from mpformer_ray.data.pipeline import local_stream

    cfg = run_cfg(splits, tmp_path, "train.max_iters=1", "train.batch_size=1", "model.train_num_points=256",
                  "data.crop_size=[64,64]")
    classes = read_manifest(splits["train"])["classes"]
    cfg = with_classes(cfg, classes)
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match=r"gave no panoptic/PQ.*\['sem_seg/mIoU'\].*model\.test\.\*_on"):
        train_loop(build_model(cfg), lambda start: local_stream(splits["train"], cfg, 1, start), cfg,
                   lambda metrics: None, CheckpointStore(str(tmp_path / "runs" / "tasks"), None), classes=classes,
                   evaluate=lambda model: Evaluation({"sem_seg/mIoU": 50.0}), main_metric="panoptic/PQ")
