"""Prediction on image files: overlays for people, raw outputs in standard formats for programs.

Per input image ``NAME.ext`` (``write_predictions``), depending on the tasks the config enables:

    NAME_overlay.png       the image with predicted segments blended in colour, class names and scores
    NAME_sem_seg.png       uint8 [H, W] label map (argmax of the semantic scores; contiguous class ids)
    NAME_panoptic.png      COCO panoptic id map, id = R + 256 G + 256^2 B (0 = void)
    NAME_panoptic.json     COCO panoptic annotation: {"image_id", "file_name", "segments_info":
                           [{"id", "category_id", "train_id", "name", "isthing", "score", "area", "bbox"}]}
    NAME_instances.json    COCO results list: [{"image_id", "category_id", "segmentation" (RLE), "score"}]

``category_id`` in the JSON files is the dataset's own id (the manifest's ``source_id``), so the
files load into COCO tools next to the original annotations; ``train_id`` / the label map use
the contiguous ids 0..K-1 the model predicts.
"""

from __future__ import annotations

import colorsys
import io
import json
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
from pycocotools import mask as mask_util
from torch import nn

from mpformer_ray import storage
from mpformer_ray.config import Config, apply_overrides
from mpformer_ray.data.transforms import eval_transform, normalize

_GOLDEN = 0.618033988749895  # hue step that keeps consecutive colours far apart


def resolve_device(device: str) -> torch.device:
    """``auto`` -> the first CUDA GPU when there is one, else the CPU; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_for_inference(checkpoint: str, overrides: list[str] | None = None, device: str | torch.device = "cpu") -> tuple[nn.Module, Config, list[dict]]:
    """(model in eval mode on ``device``, its config with ``overrides``, the dataset's classes) from a
    checkpoint file or run directory (local or s3://). Overrides of ``model.*`` (e.g. the
    post-processing thresholds ``model.test.*``) rebuild the model around the saved weights."""
    from mpformer_ray.model import build_model
    from mpformer_ray.train.checkpoint import CheckpointError, load_model, model_mismatch

    storage.check_reachable(checkpoint)  # seconds, where loading would wait minutes on a silent endpoint
    model, cfg, classes = load_model(checkpoint, device)
    new = apply_overrides(cfg, overrides or [])
    if new.model != cfg.model:
        if problems := model_mismatch(model.state_dict(), cfg.to_dict()["model"], new):
            raise CheckpointError(f"{checkpoint}: the overrides change the model's shapes ({'; '.join(problems)}), so "
                                  "its weights do not fit. Fix: override only fields that keep them, e.g. model.test.*")
        rebuilt = build_model(new)
        rebuilt.load_state_dict(model.state_dict())
        model = rebuilt.to(device).eval()
    return model, new, classes


def load_image(uri: str) -> np.ndarray:
    """An image file (local or s3://) -> uint8 [H, W, 3] RGB, EXIF orientation applied."""
    return decode_image(storage.read_bytes(uri), uri)


def decode_image(data: bytes, uri: str) -> np.ndarray:
    """The bytes of an image file (``uri`` names it in errors) -> uint8 [H, W, 3] RGB, EXIF orientation
    applied; ValueError naming ``uri`` when Pillow cannot decode them."""
    try:
        image = Image.open(io.BytesIO(data))
        image = ImageOps.exif_transpose(image).convert("RGB")
    except UnidentifiedImageError:  # its message is the repr of our in-memory buffer
        raise ValueError(f"{uri}: cannot decode as an image (not an image format Pillow reads); give a PNG or "
                         "JPEG file") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{uri}: cannot decode as an image ({e}); give a PNG or JPEG file") from None
    return np.asarray(image)


def image_id_for(name: str, index: int) -> int:
    """COCO-style image id: the digits of a name like ``000000397133.jpg``, else ``index``."""
    stem = re.sub(r"\.[^.]*$", "", name.rsplit("/", 1)[-1])
    return int(stem) if stem.isdigit() else index


@torch.no_grad()
def predict(model: nn.Module, image: np.ndarray, cfg: Config, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Run the model in eval mode on one uint8 [H, W, 3] image.

    Returns the model's eval results at the image's own resolution in ``compact_inference``'s form, on
    the CPU: any of "sem_seg_labels" int32 [H, W] (argmax of the class scores), "panoptic" (int32 [H, W]
    id map, [{"id", "category_id", "isthing", "score"}]), "instances" {"rles": [COCO RLE], "scores":
    float [Q], "labels": int64 [Q]}. Memory at the image's resolution stays a few bytes a pixel, however
    many queries and classes the model has. ``model`` is an ``MPFormer`` or an exported graph
    (``mpformer_ray.export.OnnxModel``): both give their queries to the same post-processing.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"predict: image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    resized, original_hw = eval_transform({"image": image}, cfg.data)
    return predict_resized(model, [resized], [original_hw], device)[0]


@torch.no_grad()
def predict_resized(model: nn.Module, resized: list[np.ndarray], original_hws: list[tuple[int, int]],
                    device: str | torch.device = "cpu") -> list[dict[str, Any]]:
    """``predict`` for B images already resized by ``eval_transform``, all of one size (uint8 [h, w, 3]),
    in one forward pass; ``original_hws``: the (H, W) each one's results are resized back to.

    A batch's values differ from one image at a time by float rounding (about 1e-6 of the mask logits:
    the kernels sum in another order), which can flip a pixel whose scores tie that closely."""
    model.eval()
    batch = normalize(torch.from_numpy(np.stack(resized)).to(device))  # np.stack copies: PIL's arrays are read-only
    resized_hw = tuple(resized[0].shape[:2])
    raw = model.forward_raw(batch)
    padded_hw = tuple(model.pad(batch)[0].shape[-2:])
    results = model.postprocess(raw, resized_hw, padded_hw, [resized_hw] * len(resized), list(original_hws),
                                compact=True)
    for result in results:
        if "panoptic" in result:
            id_map, segments = result["panoptic"]
            result["panoptic"] = (id_map, [{k: _plain(v) for k, v in s.items()} for s in segments])
    return results


def _plain(value: Any) -> Any:
    """A tensor scalar or numpy scalar -> the Python number JSON can hold."""
    if isinstance(value, (torch.Tensor, np.generic)):
        return value.item()
    return value


def _class(classes: list[dict], train_id: int) -> dict:
    if not 0 <= train_id < len(classes):
        raise ValueError(f"predicted class {train_id} is outside the model's {len(classes)} classes; the checkpoint's "
                         "class list does not match its model")
    return classes[train_id]


def _source_id(cls: dict) -> int:
    return int(cls.get("source_id", cls["id"]))


def semantic_map(prediction: dict) -> np.ndarray:
    """"sem_seg_labels" int [H, W] -> uint8 [H, W] label map."""
    labels = np.asarray(prediction["sem_seg_labels"])
    if labels.max(initial=0) > 255:
        raise ValueError(f"class {labels.max()} does not fit a uint8 label map (255 at most)")
    return labels.astype(np.uint8)


def encode_panoptic_ids(id_map: np.ndarray) -> np.ndarray:
    """int [H, W] segment ids -> uint8 [H, W, 3] RGB with id = R + 256 G + 256^2 B (COCO panoptic)."""
    ids = np.asarray(id_map)
    if ids.min(initial=0) < 0 or ids.max(initial=0) >= 256 ** 3:
        raise ValueError("panoptic segment ids must lie in [0, 256^3)")
    rgb = np.empty((*ids.shape, 3), dtype=np.uint8)  # byte by byte: no int64 copies of a photo-sized map
    for channel in range(3):
        rgb[..., channel] = (ids >> (8 * channel)) & 255
    return rgb


def decode_panoptic_ids(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] COCO panoptic PNG -> int64 [H, W] segment ids."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 ** 2 * rgb[..., 2]


def _box(mask: np.ndarray) -> list[int]:
    """bool [H, W] with some pixel set -> COCO [x, y, width, height]."""
    ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)]


def panoptic_annotation(prediction: dict, classes: list[dict], image_id: int, file_name: str) -> dict:
    """COCO panoptic annotation for the predicted id map (segments with no pixels left out)."""
    id_map, segments = prediction["panoptic"]
    id_map = np.asarray(id_map)
    area = np.bincount(id_map.ravel(), minlength=max((int(s["id"]) for s in segments), default=0) + 1)
    info = []
    for seg in segments:
        sid = int(seg["id"])
        if area[sid] == 0:
            continue
        cls = _class(classes, int(seg["category_id"]))
        info.append({
            "id": sid, "category_id": _source_id(cls), "train_id": int(cls["id"]), "name": cls["name"],
            "isthing": bool(cls["isthing"]), "score": float(seg.get("score", 1.0)), "area": int(area[sid]),
            "bbox": _box(id_map == sid),
        })
    return {"image_id": int(image_id), "file_name": file_name, "segments_info": info}


def instance_results(prediction: dict, classes: list[dict], image_id: int, score_threshold: float = 0.0) -> list[dict]:
    """COCO detection results (``COCO.loadRes`` format) for the predicted instances with
    score >= ``score_threshold`` and a non-empty mask."""
    inst = prediction["instances"]
    scores = inst["scores"].float().numpy()
    labels = inst["labels"].numpy()
    results = []
    for rle, score, label in zip(inst["rles"], scores, labels):
        if score < score_threshold or not mask_util.area(rle):
            continue
        results.append({
            "image_id": int(image_id), "category_id": _source_id(_class(classes, int(label))),
            "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "score": float(score),
        })
    return results


def _colour(index: int) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb((index * _GOLDEN) % 1.0, 0.75, 0.95)
    return np.array([r, g, b]) * 255


def _overlay_segments(prediction: dict, classes: list[dict], score_threshold: float) -> Iterator[tuple]:
    """(bool [H, W] mask, colour index, label text) per segment to draw, lowest score first; one mask at a
    time, so a photo with a hundred segments never holds a hundred masks."""
    if "panoptic" in prediction:
        id_map, segments = prediction["panoptic"]
        id_map = np.asarray(id_map)
        for seg in sorted(segments, key=lambda s: float(s.get("score", 1.0))):
            mask = id_map == int(seg["id"])
            if mask.any():
                cls = _class(classes, int(seg["category_id"]))
                # things get one colour per segment, stuff one colour per class
                colour = int(seg["id"]) if cls["isthing"] else 1000 + int(cls["id"])
                yield mask, colour, f"{cls['name']} {float(seg.get('score', 1.0)):.2f}"
    elif "instances" in prediction:
        inst = prediction["instances"]
        scores = inst["scores"].float().numpy()
        order = [i for i in np.argsort(scores) if scores[i] >= score_threshold]
        for k, i in enumerate(order):
            mask = mask_util.decode(inst["rles"][i]).astype(bool)
            if mask.any():
                yield mask, k, f"{_class(classes, int(inst['labels'][i]))['name']} {scores[i]:.2f}"
    else:
        labels = semantic_map(prediction)
        for c in np.flatnonzero(np.bincount(labels.ravel(), minlength=256)):
            yield labels == c, 1000 + int(c), _class(classes, int(c))["name"]


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def render_overlay(image: np.ndarray, prediction: dict, classes: list[dict], score_threshold: float = 0.5,
                   alpha: float = 0.5) -> Image.Image:
    """The image with each predicted segment blended in colour (outlined), and its class name and
    score written at the segment's centre. Panoptic segments when predicted, else instances with
    score >= ``score_threshold``, else the semantic label map."""
    canvas = image.astype(np.float32)
    labels = []  # (centre x, centre y, text), drawn over every segment's colour
    for mask, colour_index, text in _overlay_segments(prediction, classes, score_threshold):
        colour = _colour(colour_index)
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * colour
        canvas[_boundary(mask)] = colour
        rows, cols = mask.sum(1), mask.sum(0)  # the centre from the projections: no pixel coordinate lists
        labels.append((float(cols @ np.arange(len(cols)) / cols.sum()),
                       float(rows @ np.arange(len(rows)) / rows.sum()), text))
    out = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    del canvas
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for x, y, text in labels:
        left, top, right, bottom = draw.textbbox((x, y), text, font=font, anchor="mm")
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=(0, 0, 0))
        draw.text((x, y), text, fill=(255, 255, 255), font=font, anchor="mm")
    return out


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_predictions(out_uri: str, name: str, image: np.ndarray, prediction: dict, classes: list[dict],
                      image_id: int, *, score_threshold: float = 0.5) -> dict[str, str]:
    """Write the overlay and raw outputs of one image (see the module docstring) under
    ``out_uri`` (local directory or s3://); returns {kind: written URI}."""
    stem = re.sub(r"\.[^.]*$", "", name.rsplit("/", 1)[-1])
    written: dict[str, str] = {}

    def put(kind: str, suffix: str, data: bytes) -> None:
        uri = storage.join(out_uri, f"{stem}_{suffix}")
        storage.write_bytes(uri, data)
        written[kind] = uri

    put("overlay", "overlay.png", _png(np.asarray(render_overlay(image, prediction, classes, score_threshold))))
    if "sem_seg_labels" in prediction:
        put("sem_seg", "sem_seg.png", _png(semantic_map(prediction)))
    if "panoptic" in prediction:
        png_name = f"{stem}_panoptic.png"
        put("panoptic_png", "panoptic.png", _png(encode_panoptic_ids(np.asarray(prediction["panoptic"][0]))))
        annotation = panoptic_annotation(prediction, classes, image_id, png_name)
        put("panoptic_json", "panoptic.json", json.dumps(annotation, indent=1).encode())
    if "instances" in prediction:
        results = instance_results(prediction, classes, image_id)
        put("instances_json", "instances.json", json.dumps(results).encode())
    return written
