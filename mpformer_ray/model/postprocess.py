"""Turn one image's query predictions into semantic, panoptic and instance results (Mask2Former's inference).

The ``*_inference`` functions take ``mask_cls`` [Q, K+1] class logits (last = no object) and ``mask_pred``
[Q, h, w] mask logits already at the output resolution; ``resize_masks`` gets them there. That holds every
query's mask in float at the output resolution (Q x 4 bytes a pixel, and K x 4 more for "sem_seg"): fine
for the model's own outputs at the network's resolution, gigabytes for a photo.

``compact_inference`` gives the same results from the masks at the model's resolution while only a band
of output columns exists at full resolution: the semantic label map instead of the class scores, and the
instance masks as COCO RLEs (see its docstring). Prediction and evaluation use it.

``query_inference`` runs them over a batch's final queries as the config's ``model.test`` asks: the one
post-processing of ``MPFormer.postprocess`` and of an exported graph's outputs (``mpformer_ray.export``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_util
from torch import Tensor

from mpformer_ray.config import InferenceConfig, ModelConfig

# compact_inference's working set: the width-resized columns of one group (plus a quarter of that for
# the queries being width-resized), and one band at the output resolution (masks, their sigmoid and the
# class scores). Bigger groups mean fewer width passes, each resizing every query's full width again.
GROUP_BYTES = 128 << 20
BAND_BYTES = 32 << 20


def resize_masks(mask_pred: Tensor, padded_size: tuple[int, int], image_size: tuple[int, int],
                 output_size: tuple[int, int]) -> Tensor:
    """[Q, H/4, W/4] mask logits -> [Q, out_h, out_w]: upsampled to the padded input, cropped to the valid
    ``image_size`` region, then resized to ``output_size`` (all bilinear)."""
    # the decoder's masks are channels-last views; upsampling that layout is 7x slower on a CPU, and the
    # per-query work below wants each query's map contiguous
    masks = F.interpolate(mask_pred.contiguous()[None], size=padded_size, mode="bilinear", align_corners=False)
    masks = masks[:, :, : image_size[0], : image_size[1]]
    return F.interpolate(masks, size=output_size, mode="bilinear", align_corners=False)[0]


def semantic_inference(mask_cls: Tensor, mask_pred: Tensor) -> Tensor:
    """-> float [K, h, w]: per-class scores, sum over queries of p(class) x sigmoid(mask)."""
    probs = mask_cls.softmax(-1)[:, :-1]
    return torch.einsum("qk,qhw->khw", probs, mask_pred.sigmoid())


def panoptic_inference(mask_cls: Tensor, mask_pred: Tensor, thing_ids: set[int], object_mask_threshold: float,
                       overlap_threshold: float) -> tuple[Tensor, list[dict]]:
    """-> (int32 [h, w] segment-id map, 0 = void; segments [{"id", "category_id", "isthing", "score"}]).

    Queries predicting "no object" or scoring <= ``object_mask_threshold`` are dropped; each pixel goes to
    the query maximising score x mask probability; a query keeps its segment only when at least
    ``overlap_threshold`` of its own mask survives; stuff segments of one class are merged."""
    keep, kept_scores, kept_classes = _kept_queries(mask_cls, object_mask_threshold)
    h, w = mask_pred.shape[-2:]
    if not len(kept_scores):
        return torch.zeros((h, w), dtype=torch.int32, device=mask_pred.device), []
    kept = mask_pred[keep].sigmoid()
    owner = (kept_scores[:, None, None] * kept).argmax(0)
    owned = kept.gather(0, owner[None])[0] >= 0.5  # the pixel's owner covers it
    segment_of, segments = _segments(kept_scores, kept_classes, torch.bincount(owner[owned], minlength=len(kept)),
                                     (kept >= 0.5).flatten(1).sum(1), thing_ids, overlap_threshold)
    return torch.where(owned, segment_of.to(owner.device)[owner], 0), segments


def _kept_queries(mask_cls: Tensor, object_mask_threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """Panoptic inference's queries: (bool [Q] kept, their scores float [n], their classes int64 [n])."""
    scores, labels = mask_cls.softmax(-1).max(-1)
    keep = labels.ne(mask_cls.shape[-1] - 1) & (scores > object_mask_threshold)
    return keep, scores[keep], labels[keep]


def _segments(kept_scores: Tensor, kept_classes: Tensor, mask_areas: Tensor, original_areas: Tensor,
              thing_ids: set[int], overlap_threshold: float) -> tuple[Tensor, list[dict]]:
    """Panoptic inference's segments from each kept query's area of pixels it owns and covers
    (``mask_areas`` [n]) and of its whole mask (``original_areas`` [n]): (int32 [n] segment id of each
    kept query, 0 = dropped; segments). Stuff queries of one class share the first one's segment."""
    segment_of = torch.zeros(len(kept_scores), dtype=torch.int32)
    segments: list[dict] = []
    stuff_ids: dict[int, int] = {}
    for k in range(len(kept_scores)):
        category = int(kept_classes[k])
        isthing = category in thing_ids
        mask_area, original_area = int(mask_areas[k]), int(original_areas[k])
        if mask_area == 0 or original_area == 0 or mask_area / original_area < overlap_threshold:
            continue
        if not isthing and category in stuff_ids:
            segment_of[k] = stuff_ids[category]
            continue
        segment_id = len(segments) + 1
        if not isthing:
            stuff_ids[category] = segment_id
        segment_of[k] = segment_id
        segments.append({"id": segment_id, "category_id": category, "isthing": isthing,
                         "score": float(kept_scores[k])})
    return segment_of, segments


def instance_inference(mask_cls: Tensor, mask_pred: Tensor, thing_ids: set[int], max_detections: int
                       ) -> dict[str, Tensor]:
    """-> {"masks": bool [Q', h, w], "scores": float [Q'], "labels": int64 [Q']}, thing classes only.

    The top ``max_detections`` (query, class) pairs by class probability, restricted to thing classes,
    each scored by class probability x the mean mask probability inside its binary mask."""
    top_scores, top_labels, query_idx = _top_detections(mask_cls, thing_ids, max_detections)
    masks = mask_pred[query_idx]
    binary = masks > 0
    mask_scores = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    return {"masks": binary, "scores": top_scores * mask_scores, "labels": top_labels}


def _top_detections(mask_cls: Tensor, thing_ids: set[int], max_detections: int) -> tuple[Tensor, Tensor, Tensor]:
    """Instance inference's (query, class) pairs: (scores float [D], labels int64 [D], query indices [D])."""
    num_queries, num_classes = mask_cls.shape[0], mask_cls.shape[-1] - 1
    scores = mask_cls.softmax(-1)[:, :-1]  # [Q, K]
    labels = torch.arange(num_classes, device=mask_cls.device).repeat(num_queries)
    top_scores, top_idx = scores.flatten().topk(min(max_detections, scores.numel()), sorted=False)
    top_labels = labels[top_idx]
    is_thing = torch.as_tensor([int(c) in thing_ids for c in top_labels.tolist()], dtype=torch.bool,
                               device=mask_cls.device)
    return top_scores[is_thing], top_labels[is_thing].to(torch.int64), (top_idx // num_classes)[is_thing]

def _bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def column_bands(mask_pred: Tensor, padded_size: tuple[int, int], image_size: tuple[int, int],
                 output_size: tuple[int, int], band: int, group_bytes: int = GROUP_BYTES
                 ) -> Iterator[tuple[int, int, Tensor]]:
    """[Q, H/4, W/4] mask logits -> (x0, x1, float [Q, x1 - x0, out_h]) for consecutive column ranges of
    the output: ``resize_masks(...)[:, :, x0:x1]`` transposed, equal to it bit for bit.

    Bilinear resizing is separable, and torch computes each value from per-row and per-column weights
    that do not depend on what else is in the tensor: resizing the width first (rows independent), then
    the height of the transposed result (its rows are the output's columns) gives resize_masks's values
    while only ``group_bytes`` of width-resized columns and one band exist at a time. Bands are ``band``
    columns wide (a multiple of 8), all but the last."""
    num_queries = mask_pred.shape[0]
    (ih, iw), (oh, ow) = image_size, output_size
    # the first resize of resize_masks as it is: to the padded input, cropped to the image
    low = _bilinear(mask_pred.contiguous()[None], padded_size)[:, :, :ih, :iw]
    group = max(band, group_bytes // (4 * num_queries * ih) // band * band)
    chunk = max(1, group_bytes // 4 // (4 * ih * ow))  # queries per width pass
    for g0 in range(0, ow, group):
        g1 = min(ow, g0 + group)
        columns = torch.empty((num_queries, g1 - g0, ih), dtype=low.dtype, device=low.device)
        for q0 in range(0, num_queries, chunk):
            wide = _bilinear(low[:, q0:q0 + chunk], (ih, ow))[0]  # [chunk, ih, ow]
            columns[q0:q0 + chunk] = wide[:, :, g0:g1].transpose(1, 2)
            del wide
        for b0 in range(g0, g1, band):
            b1 = min(g1, b0 + band)
            yield b0, b1, _bilinear(columns[None, :, b0 - g0:b1 - g0], (b1 - b0, oh))[0]


@torch.no_grad()
def compact_inference(mask_cls: Tensor, mask_pred: Tensor, padded_size: tuple[int, int], image_size: tuple[int, int],
                      output_size: tuple[int, int], thing_ids: set[int], *, semantic: bool = True,
                      panoptic: bool = True, instance: bool = True, object_mask_threshold: float = 0.8,
                      overlap_threshold: float = 0.8, max_detections: int = 100,
                      group_bytes: int = GROUP_BYTES, band_bytes: int = BAND_BYTES) -> dict:
    """The three inferences of one image from ``mask_pred`` [Q, H/4, W/4] at the model's resolution
    (``resize_masks``'s arguments), in compact form, on the CPU:

        "sem_seg_labels": int32 [out_h, out_w], the argmax of semantic_inference's class scores
        "panoptic":       panoptic_inference's (int32 [out_h, out_w] id map, segments)
        "instances":      {"rles": [COCO RLE of each of instance_inference's masks (counts as bytes)],
                           "scores": float [D], "labels": int64 [D]}

    Equal to those functions on ``resize_masks``'s output (masks, ids, labels bit for bit; instance
    scores to float32 rounding, the mean being summed band by band), holding at the output resolution
    only these results and one band of columns (``column_bands``): a few bytes a pixel plus the bits of
    the instance masks, instead of (Q + K) x 4 bytes. Pixels run column by column inside, as COCO's RLE
    does, so a band's instance bits append to its masks' streams."""
    oh, ow = output_size
    num_queries, num_classes = mask_cls.shape[0], mask_cls.shape[-1] - 1
    mask_cls = mask_cls.float()
    class_probs = mask_cls.softmax(-1)
    if panoptic:
        keep, kept_scores, kept_classes = _kept_queries(mask_cls, object_mask_threshold)
        # per pixel (column-major [ow, oh]): the kept query maximising score x mask probability, and
        # whether that query's own mask covers the pixel; per kept query: its mask's area
        owner = torch.zeros((ow, oh), dtype=torch.int32)
        owned = torch.zeros((ow, oh), dtype=torch.bool)
        own_area = torch.zeros(int(keep.sum()), dtype=torch.int64)
    if semantic:
        labels_map = torch.zeros((ow, oh), dtype=torch.int32)
    if instance:
        det_scores, det_labels, det_queries = _top_detections(mask_cls, thing_ids, max_detections)
        det_sums = torch.zeros(len(det_queries), dtype=torch.float64)
        det_areas = torch.zeros(len(det_queries), dtype=torch.int64)
        det_bits: list[np.ndarray] = []
    # a band's masks, their sigmoid and its class scores fit band_bytes; whole bytes of instance bits
    band = max(8, band_bytes // (4 * oh * (2 * num_queries + num_classes)) // 8 * 8)
    for x0, x1, logits in column_bands(mask_pred.float(), padded_size, image_size, output_size, band, group_bytes):
        probs = logits.sigmoid()  # [Q, x1 - x0, oh]
        if semantic:
            band_scores = torch.einsum("qk,qhw->khw", class_probs[:, :-1], probs)
            labels_map[x0:x1] = band_scores.argmax(0).cpu()
            del band_scores
        if panoptic and len(kept_scores):
            kept = probs[keep]
            band_owner = (kept_scores[:, None, None] * kept).argmax(0)
            owner[x0:x1] = band_owner.cpu()
            owned[x0:x1] = (kept.gather(0, band_owner[None])[0] >= 0.5).cpu()
            own_area += (kept >= 0.5).flatten(1).sum(1).cpu()
            del kept
        if instance and len(det_queries):
            binary = logits[det_queries] > 0
            det_sums += (probs[det_queries] * binary).flatten(1).sum(1, dtype=torch.float64).cpu()
            det_areas += binary.flatten(1).sum(1).cpu()
            det_bits.append(np.packbits(binary.flatten(1).cpu().numpy(), axis=1))
            del binary
    result: dict = {}
    if semantic:
        result["sem_seg_labels"] = labels_map.T.contiguous()
    if panoptic:
        segment_of, segments = _segments(kept_scores, kept_classes, torch.bincount(owner[owned].long(), minlength=len(
            kept_scores)), own_area, thing_ids, overlap_threshold)
        ids = torch.where(owned, segment_of[owner], 0) if len(kept_scores) else owner  # owner: zeros then
        result["panoptic"] = (ids.T.contiguous(), segments)
    if instance:
        bits = np.concatenate(det_bits, axis=1) if det_bits else np.zeros((0, 0), np.uint8)
        rles = []
        for row in bits:
            # column-major pixels: the C-order [ow, oh] array is the mask [oh, ow] in Fortran order
            stream = np.unpackbits(row, count=ow * oh).reshape(ow, oh)
            rles.append(mask_util.encode(stream.T))
        mask_scores = det_sums.float() / (det_areas.float() + 1e-6)
        result["instances"] = {"rles": rles, "scores": (det_scores.cpu() * mask_scores),
                               "labels": det_labels.cpu()}
    return result



def thing_ids(cfg: ModelConfig) -> set[int]:
    """The contiguous ids of the "thing" classes: ``model.thing_classes``, else every class."""
    return set(range(cfg.num_classes) if cfg.thing_classes is None else cfg.thing_classes)


def query_inference(logits: Tensor, masks: Tensor, test: InferenceConfig, things: set[int],
                    input_size: tuple[int, int], padded: tuple[int, int], image_sizes: list[tuple[int, int]] | None,
                    output_sizes: list[tuple[int, int]] | None, compact: bool = False) -> list[dict]:
    """The final queries of B images of ``input_size`` (padded to ``padded``): ``logits`` [B, Q, K+1],
    ``masks`` [B, Q, H/4, W/4] of the padded size -> one result dict per image with the tasks ``test``
    enables, each cropped to its valid ``image_sizes`` region (default: the whole input) and resized to
    ``output_sizes`` (default: that region); with ``compact`` in ``compact_inference``'s form, on the CPU."""
    b = logits.shape[0]
    image_sizes = image_sizes or [tuple(input_size)] * b
    output_sizes = output_sizes or image_sizes
    if len(image_sizes) != b or len(output_sizes) != b:
        raise ValueError(f"MPFormer: image_sizes / output_sizes need one (h, w) per image ({b})")
    results = []
    device = logits.device
    for i in range(b):
        with torch.autocast(device.type, enabled=False):  # float32 results even under AMP
            mask_cls = logits[i].float()
            if compact:
                results.append(compact_inference(
                    mask_cls, masks[i], padded, image_sizes[i], output_sizes[i], things,
                    semantic=test.semantic_on, panoptic=test.panoptic_on, instance=test.instance_on,
                    object_mask_threshold=test.object_mask_threshold, overlap_threshold=test.overlap_threshold,
                    max_detections=test.max_detections))
                continue
            mask_pred = resize_masks(masks[i].float(), padded, image_sizes[i], output_sizes[i])
            result: dict = {}
            if test.semantic_on:
                result["sem_seg"] = semantic_inference(mask_cls, mask_pred)
            if test.panoptic_on:
                result["panoptic"] = panoptic_inference(mask_cls, mask_pred, things, test.object_mask_threshold,
                                                        test.overlap_threshold)
            if test.instance_on:
                result["instances"] = instance_inference(mask_cls, mask_pred, things, test.max_detections)
        results.append(result)
    return results
