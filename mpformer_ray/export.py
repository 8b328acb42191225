"""ONNX export of the inference graph, and running an exported graph with the project's post-processing.

The graph (``InferenceGraph``) is the network and nothing else:

    input   "images"       float32 [B, 3, H, W]: RGB normalised with PIXEL_MEAN / PIXEL_STD
                           (``mpformer_ray.data.transforms.normalize``), zero-padded on the bottom / right
                           to multiples of ``model.size_divisibility`` (32)
    outputs "pred_logits"  float32 [B, Q, K+1]: the final decoder layer's class logits (last = no object)
            "pred_masks"   float32 [B, Q, H/4, W/4]: its mask logits

B, H and W are dynamic: one file serves every image size (an image is resized by the config's
``data.test_short_side`` / ``test_max_size`` first, so sizes vary with the aspect ratio). Opset 17
(``GridSample``, the deformable attention's sampling, needs 16). The resize, normalisation, padding and the
post-processing (``postprocess.query_inference``: semantic, panoptic and instance results at the image's
resolution) stay in Python, shared with ``jobs/predict.py``'s PyTorch path: ``OnnxModel`` offers the
model's inference interface (``forward_raw``, ``pad``, ``postprocess``) over ONNX Runtime, so
``mpformer_ray.predict.predict`` runs either. The file's metadata holds the checkpoint's config and
classes (``METADATA_*``), so predicting needs nothing else.

The export uses the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``); the level shapes of
the deformable attention follow the traced feature-map sizes (``ms_deform_attn``), which keeps H and W
dynamic. ``export_onnx`` checks the file before writing it: ONNX Runtime's outputs against PyTorch's at
the traced size and at another size and batch.
"""

from __future__ import annotations

import dataclasses
import io
import json
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpformer_ray import storage
from mpformer_ray.config import Config, apply_overrides, config_from_dict
from mpformer_ray.data.transforms import normalize
from mpformer_ray.errors import UserError
from mpformer_ray.model.postprocess import query_inference, thing_ids

OPSET = 17
FORMAT_VERSION = "1"
METADATA_FORMAT = "mpformer_ray.format"
METADATA_CONFIG = "mpformer_ray.config"  # Config.to_dict() as JSON
METADATA_CLASSES = "mpformer_ray.classes"  # the checkpoint's class list as JSON
INPUT, OUTPUTS = "images", ("pred_logits", "pred_masks")
TOLERANCE = 1e-3  # the largest |ONNX Runtime - PyTorch| export_onnx accepts, on either output


class ExportError(UserError, ValueError):
    """An ONNX file that is not an export of this project, or overrides it cannot honour."""


class InferenceGraph(nn.Module):
    """What is exported: padded, normalised images [B, 3, H, W] -> (class logits [B, Q, K+1], mask logits
    [B, Q, H/4, W/4]) of the final decoder layer; no pilot queries, no post-processing."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        mask_features, multi_scale = self.model.pixel_decoder(self.model.backbone(images))
        out = self.model.decode_features(mask_features, multi_scale, None, tuple(images.shape[-2:]))
        return out.pred_logits, out.pred_masks


@dataclass
class ExportReport:
    """Where the file went, its size, and ONNX Runtime's largest deviation from PyTorch per output at each
    checked input shape {"BxHxW": {"pred_logits": float, "pred_masks": float}}."""

    uri: str
    bytes: int
    max_abs_diff: dict[str, dict[str, float]]


def _example(shape: tuple[int, int, int], seed: int) -> Tensor:
    """A normalised image batch [B, 3, H, W]: smooth random colours, like a photo more than noise is."""
    g = torch.Generator().manual_seed(seed)
    b, h, w = shape
    small = torch.rand(b, 3, max(1, h // 16), max(1, w // 16), generator=g) * 255
    return normalize(F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False))


def _session(data: bytes, device: str | torch.device = "cpu", threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(data, options, providers=providers)


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise UserError(f"ONNX export and inference need the optional packages onnx and onnxruntime ({e}); "
                        "install them with: pip install -e '.[export]'") from None


@torch.no_grad()
def export_onnx(model: nn.Module, cfg: Config, classes: list[dict], out_uri: str,
                size: tuple[int, int] = (256, 320), verify_size: tuple[int, int] | None = None) -> ExportReport:
    """Export ``model`` (an MPFormer on the CPU) to ``out_uri`` (local or s3://) as an ONNX file with dynamic
    batch, height and width, traced at ``size`` (H, W; multiples of ``model.size_divisibility``), with
    ``cfg`` and ``classes`` in its metadata. Before writing, ONNX Runtime runs the file on one image of
    ``size`` and on two of ``verify_size`` (default: another size): RuntimeError when an output differs from
    PyTorch's by more than TOLERANCE."""
    _require_onnx()
    import onnx

    d = cfg.model.size_divisibility
    if any(v % d or v <= 0 for v in size):
        raise ExportError(f"export size {size[0]}x{size[1]}: both sides must be positive multiples of "
                          f"model.size_divisibility ({d})")
    verify_size = verify_size or (size[0] + 2 * d, max(d, size[1] - d))
    graph = InferenceGraph(model.eval()).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # the tracer warns about every shape check and every tensor built from a size; whether the graph
        # really follows the input's size is checked below, at a size other than the traced one
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(graph, (_example((1, *size), 0),), buffer, dynamo=False, opset_version=OPSET,
                          input_names=[INPUT], output_names=list(OUTPUTS),
                          dynamic_axes={INPUT: {0: "batch", 2: "height", 3: "width"},
                                        OUTPUTS[0]: {0: "batch"},
                                        OUTPUTS[1]: {0: "batch", 2: "mask_height", 3: "mask_width"}})
    proto = onnx.load_from_string(buffer.getvalue())
    proto.doc_string = (f"MP-Former ({cfg.model.backbone}, {cfg.model.num_queries} queries, {cfg.model.num_classes} "
                        "classes). Input images: float32 [B, 3, H, W], normalised, padded to multiples of "
                        f"{d}. Outputs: pred_logits [B, Q, K+1], pred_masks [B, Q, H/4, W/4] (logits).")
    for key, value in {METADATA_FORMAT: FORMAT_VERSION, METADATA_CONFIG: json.dumps(cfg.to_dict()),
                       METADATA_CLASSES: json.dumps(classes)}.items():
        proto.metadata_props.add(key=key, value=value)
    data = proto.SerializeToString()

    session = _session(data)
    diffs = {}
    for seed, shape in enumerate([(1, *size), (2, *verify_size)]):
        images = _example(shape, seed + 1)
        want = graph(images)
        got = session.run(list(OUTPUTS), {INPUT: images.numpy()})
        diffs["x".join(map(str, shape))] = {name: float(np.abs(g - w.numpy()).max())
                                            for name, g, w in zip(OUTPUTS, got, want)}
    worst = max(v for shape in diffs.values() for v in shape.values())
    if worst > TOLERANCE:
        raise RuntimeError(f"the exported graph's outputs differ from PyTorch's by up to {worst:.2e} (more than "
                           f"{TOLERANCE:g}): {diffs}; nothing written")
    storage.write_bytes(out_uri, data)
    return ExportReport(uri=out_uri, bytes=len(data), max_abs_diff=diffs)


@dataclass
class QueryOutputs:
    """An exported graph's outputs, named as ``DecoderOutput``'s final prediction: pred_logits [B, Q, K+1],
    pred_masks [B, Q, H/4, W/4]."""

    pred_logits: Tensor
    pred_masks: Tensor


class OnnxModel:
    """An exported graph under ONNX Runtime with ``MPFormer``'s inference interface: ``forward_raw``,
    ``pad`` and ``postprocess`` take and give what the model's do, so ``predict`` runs it unchanged.
    ``cfg`` and ``classes`` come from the file's metadata."""

    def __init__(self, uri: str, overrides: list[str] | None = None, device: str | torch.device = "cpu",
                 threads: int | None = None):
        _require_onnx()
        storage.check_reachable(uri)
        data = storage.read_bytes(uri)
        try:
            self.session = _session(data, device, threads)
        except Exception as e:  # onnxruntime raises its own Fail / InvalidProtobuf for damaged files
            raise ExportError(f"{uri} is not a loadable ONNX file ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); export it again with "
                              "jobs/export.py") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get(METADATA_FORMAT) != FORMAT_VERSION:
            raise ExportError(f"{uri} is an ONNX file without this project's metadata (format "
                              f"{meta.get(METADATA_FORMAT)!r}, this code reads {FORMAT_VERSION!r}); export the "
                              "checkpoint with jobs/export.py")
        saved = config_from_dict(json.loads(meta[METADATA_CONFIG]))
        self.cfg = apply_overrides(saved, overrides or [])
        changed = [f.name for f in dataclasses.fields(saved.model) if f.name != "test"
                   and getattr(saved.model, f.name) != getattr(self.cfg.model, f.name)]
        if changed:
            raise ExportError(f"{uri}: an exported graph is fixed; the overrides change "
                              f"model.{', model.'.join(changed)}. "
                              "Override only the post-processing (model.test.*) and data.test_*, or export again")
        self.classes = json.loads(meta[METADATA_CLASSES])
        self.thing_ids = thing_ids(self.cfg.model)
        self.training = False

    def eval(self) -> OnnxModel:
        return self

    def pad(self, images: Tensor, targets: None = None) -> tuple[Tensor, None]:
        """Zero-pad images [B, 3, H, W] on the bottom / right to ``size_divisibility``, as ``MPFormer.pad``."""
        d = self.cfg.model.size_divisibility
        h, w = images.shape[-2:]
        return F.pad(images, (0, (-w) % d, 0, (-h) % d)), None

    def forward_raw(self, images: Tensor) -> QueryOutputs:
        """Normalised images [B, 3, H, W] -> the graph's outputs as CPU tensors."""
        logits, masks = self.session.run(list(OUTPUTS), {INPUT: self.pad(images)[0].cpu().numpy()})
        return QueryOutputs(torch.from_numpy(logits), torch.from_numpy(masks))

    def postprocess(self, outputs: QueryOutputs, input_size: tuple[int, int], padded: tuple[int, int],
                    image_sizes: list[tuple[int, int]] | None, output_sizes: list[tuple[int, int]] | None,
                    compact: bool = False) -> list[dict]:
        """``MPFormer.postprocess`` on the graph's outputs: the same function, with this file's config."""
        return query_inference(outputs.pred_logits, outputs.pred_masks, self.cfg.model.test, self.thing_ids,
                               input_size, padded, image_sizes, output_sizes, compact)


def load_onnx(uri: str, overrides: list[str] | None = None, device: str | torch.device = "cpu",
              threads: int | None = None) -> tuple[OnnxModel, Config, list[dict]]:
    """(OnnxModel, its config with ``overrides``, its classes): ``load_for_inference`` for an exported file."""
    model = OnnxModel(uri, overrides, device, threads)
    return model, model.cfg, model.classes
