"""Turn one image's query predictions into semantic, panoptic and instance results (Mask2Former's inference).

All functions take ``mask_cls`` [Q, K+1] class logits (last = no object) and ``mask_pred`` [Q, h, w] mask
logits already at the output resolution; ``resize_masks`` gets them there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
    num_classes = mask_cls.shape[-1] - 1
    scores, labels = mask_cls.softmax(-1).max(-1)
    probs = mask_pred.sigmoid()
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], probs[keep]
    h, w = mask_pred.shape[-2:]
    panoptic = torch.zeros((h, w), dtype=torch.int32, device=mask_pred.device)
    segments: list[dict] = []
    if cur_masks.shape[0] == 0:
        return panoptic, segments
    owner = (cur_scores[:, None, None] * cur_masks).argmax(0)
    stuff_ids: dict[int, int] = {}
    for k in range(cur_classes.shape[0]):
        category = int(cur_classes[k])
        isthing = category in thing_ids
        mask = (owner == k) & (cur_masks[k] >= 0.5)
        mask_area = int(mask.sum())
        original_area = int((cur_masks[k] >= 0.5).sum())
        if mask_area == 0 or original_area == 0 or mask_area / original_area < overlap_threshold:
            continue
        if not isthing and category in stuff_ids:
            panoptic[mask] = stuff_ids[category]
            continue
        segment_id = len(segments) + 1
        if not isthing:
            stuff_ids[category] = segment_id
        panoptic[mask] = segment_id
        segments.append({"id": segment_id, "category_id": category, "isthing": isthing,
                         "score": float(cur_scores[k])})
    return panoptic, segments


def instance_inference(mask_cls: Tensor, mask_pred: Tensor, thing_ids: set[int], max_detections: int
                       ) -> dict[str, Tensor]:
    """-> {"masks": bool [Q', h, w], "scores": float [Q'], "labels": int64 [Q']}, thing classes only.

    The top ``max_detections`` (query, class) pairs by class probability, restricted to thing classes,
    each scored by class probability x the mean mask probability inside its binary mask."""
    num_queries, num_classes = mask_cls.shape[0], mask_cls.shape[-1] - 1
    scores = mask_cls.softmax(-1)[:, :-1]  # [Q, K]
    labels = torch.arange(num_classes, device=mask_cls.device).repeat(num_queries)
    flat = scores.flatten()
    topk = min(max_detections, flat.numel())
    top_scores, top_idx = flat.topk(topk, sorted=False)
    top_labels = labels[top_idx]
    query_idx = top_idx // num_classes
    is_thing = torch.as_tensor([int(c) in thing_ids for c in top_labels.tolist()], dtype=torch.bool,
                               device=mask_cls.device)
    top_scores, top_labels, query_idx = top_scores[is_thing], top_labels[is_thing], query_idx[is_thing]
    masks = mask_pred[query_idx]
    binary = masks > 0
    mask_scores = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    return {"masks": binary, "scores": top_scores * mask_scores, "labels": top_labels.to(torch.int64)}
