"""ONNX export (jobs/export.py, mpformer_ray.export): ONNX Runtime matches PyTorch on the synthetic validation
images (tiny and r50 with random weights, a tiny checkpoint trained a few steps), predict --onnx runs the same
post-processing, and the export-friendly level shapes leave PyTorch's outputs unchanged."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")

from mpformer_ray.config import load_config  # noqa: E402
from mpformer_ray.data.synthetic import generate_scenes  # noqa: E402
from mpformer_ray.data.transforms import eval_transform, normalize  # noqa: E402
from mpformer_ray.export import ExportError, InferenceGraph, OnnxModel, export_onnx, load_onnx  # noqa: E402
from mpformer_ray.model import build_model  # noqa: E402
from mpformer_ray.model.ms_deform_attn import MSDeformAttn  # noqa: E402
from mpformer_ray.predict import load_image  # noqa: E402
from mpformer_ray.train.checkpoint import Checkpoint, save_checkpoint  # noqa: E402

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
CLASSES = [{"id": i, "name": f"class{i}", "isthing": i < 4, "source_id": i + 1} for i in range(6)]
SYNTHETIC = ["model.num_classes=6", "model.thing_classes=[0,1,2,3]"]
TOLERANCE = 1e-3


def _job_main(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _val_images(synthetic_coco: Path) -> list[Path]:
    images = sorted((synthetic_coco / "val2017").glob("*.jpg"))
    assert len(images) == 4
    return images


def _max_diffs(model, onnx_model: OnnxModel, cfg, paths: list[Path]) -> list[tuple[float, float]]:
    """|ONNX Runtime - PyTorch| (logits, masks) per image, each through predict's own preprocessing."""
    graph = InferenceGraph(model.eval())
    diffs = []
    for path in paths:
        resized, _ = eval_transform({"image": load_image(str(path))}, cfg.data)
        images = onnx_model.pad(normalize(torch.from_numpy(resized.copy())[None]))[0]
        with torch.no_grad():
            want = graph(images)
        got = onnx_model.forward_raw(images)
        diffs.append((float((got.pred_logits - want[0]).abs().max()), float((got.pred_masks - want[1]).abs().max())))
    return diffs


def test_tiny_random_weights_match_and_the_file_carries_config_and_classes(synthetic_coco, tmp_path):
    cfg = load_config("tiny", SYNTHETIC)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    report = export_onnx(model, cfg, CLASSES, str(tmp_path / "tiny.onnx"), size=(128, 96))
    assert set(report.max_abs_diff) == {"1x128x96", "2x192x64"}  # traced size, and another size at batch 2
    onnx_model, onnx_cfg, classes = load_onnx(str(tmp_path / "tiny.onnx"))
    assert classes == CLASSES and onnx_cfg.to_dict() == cfg.to_dict()
    diffs = _max_diffs(model, onnx_model, cfg, _val_images(synthetic_coco))
    assert max(max(d) for d in diffs) <= TOLERANCE, diffs


@pytest.mark.slow  # r50 traced and run on the CPU: about half a minute
def test_r50_random_weights_match(synthetic_coco, tmp_path):
    cfg = load_config("r50", SYNTHETIC + ["data.test_short_side=64", "data.test_max_size=96"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    export_onnx(model, cfg, CLASSES, str(tmp_path / "r50.onnx"), size=(64, 96), verify_size=(96, 64))
    diffs = _max_diffs(model, OnnxModel(str(tmp_path / "r50.onnx")), cfg, _val_images(synthetic_coco)[:2])
    assert max(max(d) for d in diffs) <= TOLERANCE, diffs


def _trained_checkpoint(run: Path, steps: int = 6) -> tuple[str, object]:
    """A tiny model after a few AdamW steps on synthetic scenes (no Ray): weights away from their init,
    the deformable attention's sampling offsets included."""
    cfg = load_config("tiny", SYNTHETIC + ["model.test.object_mask_threshold=0.3", "model.test.overlap_threshold=0.5"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scenes = list(generate_scenes(2 * steps, 64, 64, seed=3))
    for step in range(steps):
        batch = scenes[2 * step: 2 * step + 2]
        images = normalize(torch.from_numpy(np.stack([s["image"] for s in batch])))
        targets = [{"labels": torch.tensor([seg["class_id"] for seg in s["segments"]], dtype=torch.int64),
                    "masks": torch.from_numpy(np.stack([seg["mask"] for seg in s["segments"]])
                                              if s["segments"] else np.zeros((0, 64, 64), bool))} for s in batch]
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    offsets = model.pixel_decoder.encoder.layers[0].self_attn.sampling_offsets.weight
    assert offsets.abs().sum() > 0  # trained away from the zero init
    ckpt = save_checkpoint(Checkpoint(iteration=steps, model=model.state_dict(), config=cfg.to_dict(), classes=CLASSES),
                           str(run))
    return ckpt, cfg


def test_trained_checkpoint_exports_and_predict_onnx_runs_the_same_postprocessing(synthetic_coco, tmp_path, capsys):
    ckpt, cfg = _trained_checkpoint(tmp_path / "run")
    out = tmp_path / "trained.onnx"
    assert _job_main("export")(["--checkpoint", ckpt, "--format", "onnx", "--out", str(out), "--size", "128x128"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert max(v for shape in report["max_abs_diff"].values() for v in shape.values()) <= TOLERANCE
    model = build_model(cfg)
    model.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    images = _val_images(synthetic_coco)
    diffs = _max_diffs(model, OnnxModel(str(out)), cfg, images)
    assert max(max(d) for d in diffs) <= TOLERANCE, diffs

    # predict's single-image path on both: the same files, label maps equal but for pixels on a tie
    predict = _job_main("predict")
    argv = ["--device", "cpu", *map(str, images[:2])]
    assert predict(["--checkpoint", ckpt, "--out", str(tmp_path / "torch"), *argv]) == 0
    assert predict(["--onnx", str(out), "--out", str(tmp_path / "onnx"), *argv]) == 0
    torch_files = sorted(p.name for p in (tmp_path / "torch").iterdir())
    assert torch_files == sorted(p.name for p in (tmp_path / "onnx").iterdir()) and len(torch_files) == 2 * 5
    for image in images[:2]:
        stem = image.stem
        a, b = (np.asarray(Image.open(tmp_path / d / f"{stem}_sem_seg.png")) for d in ("torch", "onnx"))
        assert (a == b).mean() >= 0.99
        pan = [json.loads((tmp_path / d / f"{stem}_panoptic.json").read_text()) for d in ("torch", "onnx")]
        categories = [[s["category_id"] for s in p["segments_info"]] for p in pan]
        assert categories[0] == categories[1]
        inst = [json.loads((tmp_path / d / f"{stem}_instances.json").read_text()) for d in ("torch", "onnx")]
        assert len(inst[0]) == len(inst[1])
        assert np.allclose([r["score"] for r in inst[0]], [r["score"] for r in inst[1]], atol=1e-3)


def test_onnx_errors_name_the_file_and_the_fix(tmp_path):
    cfg = load_config("tiny", SYNTHETIC + ["model.dec_layers=1", "model.enc_layers=1", "model.num_queries=4"])
    torch.manual_seed(0)
    path = str(tmp_path / "small.onnx")
    export_onnx(build_model(cfg), cfg, CLASSES, path, size=(64, 64))
    assert OnnxModel(path, ["model.test.object_mask_threshold=0.5"]).cfg.model.test.object_mask_threshold == 0.5
    with pytest.raises(ExportError, match=r"model\.num_queries"):
        OnnxModel(path, ["model.num_queries=8"])
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ExportError, match="not a loadable ONNX file"):
        OnnxModel(str(tmp_path / "junk.onnx"))
    with pytest.raises(ExportError, match="multiples of"):
        export_onnx(build_model(cfg), cfg, CLASSES, str(tmp_path / "x.onnx"), size=(60, 64))


def test_level_shapes_as_pairs_or_tensor_give_identical_attention():
    """The pixel decoder passes the maps' (h, w) pairs (traceable) where it passed an int64 tensor: the same
    bits. (Against the code before the change, checked once: tiny and r50 eval outputs, the compact
    post-processing and training losses were bit-identical.)"""
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2)
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.5)
    shapes = [(6, 5), (3, 3), (2, 2)]
    s = sum(h * w for h, w in shapes)
    src, ref = torch.randn(2, s, 32), torch.rand(2, s, 3, 2)
    with torch.no_grad():
        pairs = attn(src, ref, src, shapes, None)
        tensor = attn(src, ref, src, torch.tensor(shapes), torch.tensor([0, 30, 39]))
    assert torch.equal(pairs, tensor)
