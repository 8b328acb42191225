"""Training losses: Mask2Former's SetCriterion plus MP-Former's direct supervision of pilot queries.

Matching queries: Hungarian matching per prediction (final layer, query init and every other layer), then
cross-entropy over all queries (unmatched ones -> "no object", down-weighted by ``no_object_weight``) and
sigmoid BCE + dice on importance-sampled points of the matched masks, divided by the number of
ground-truth segments in the whole (distributed) batch.

Pilot queries: every real pilot slot is supervised against its own source segment, no matching, with the
same losses (cross-entropy on the true label only when ``class_loss``), divided by the number of real
pilot queries in the whole batch.

Every loss comes back already multiplied by its weight (class / mask / dice), computed in float32.
The decoder's full mask logits carry no gradient; the supervised masks are recomputed here from their
queries' mask embeddings and the mask features (``masks_for``), the only path the mask losses train.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mpformer_ray.model.matcher import HungarianMatcher
from mpformer_ray.model.point_sampling import point_sample, uncertain_point_coords


def sigmoid_ce_loss(logits: Tensor, labels: Tensor, num_masks: float) -> Tensor:
    """logits, labels: [N, P] -> mean BCE over points, summed over masks, / num_masks."""
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1).sum() / num_masks


def dice_loss(logits: Tensor, labels: Tensor, num_masks: float) -> Tensor:
    """logits, labels: [N, P] -> dice loss summed over masks, / num_masks."""
    probs = logits.sigmoid()
    numerator = 2 * (probs * labels).sum(-1)
    denominator = probs.sum(-1) + labels.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def global_count(n: int, device: torch.device) -> float:
    """The average over ranks of a per-rank count (as Mask2Former normalises), at least 1."""
    count = torch.as_tensor(float(n), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return max(count.item(), 1.0)


def masks_for(mask_features: Tensor, selections: list[tuple[Tensor, Tensor, Tensor]]) -> list[Tensor]:
    """Mask logits of selected queries, with gradient, for several predictions at once.

    mask_features [B, D, H, W]; selections: (embed [B, T, D], batch_idx [N], query_idx [N]) per prediction
    -> per selection [N, H, W] (row n = query query_idx[n] of image batch_idx[n]).

    Every selection's rows of one image go through one matrix product, so the backward pass writes one
    [D, H * W] gradient per image rather than one per decoder layer (that write, not the arithmetic,
    dominates with a handful of supervised queries per layer).
    """
    b, _, h, w = mask_features.shape
    rows: list[list[Tensor]] = [[] for _ in range(b)]
    plans = []
    for embed, batch_idx, query_idx in selections:
        order = torch.argsort(batch_idx, stable=True)
        for i, picked in enumerate(order.split(torch.bincount(batch_idx, minlength=b).tolist())):
            rows[i].append(embed[i, query_idx[picked]])
        plans.append(order)
    features = mask_features.flatten(2).unbind(0)  # unbind: no [B, D, H*W] zero-filled gradient per image
    per_image = [torch.mm(torch.cat(r), f).split([x.shape[0] for x in r]) for r, f in zip(rows, features)]
    return [torch.cat([per_image[i][s] for i in range(b)]).view(-1, h, w)[torch.argsort(order)]
            for s, order in enumerate(plans)]


class SetCriterion(nn.Module):
    """Weighted Mask2Former + pilot losses for the decoder outputs of one batch."""

    def __init__(self, num_classes: int, matcher: HungarianMatcher, class_weight: float, mask_weight: float,
                 dice_weight: float, no_object_weight: float, num_points: int, oversample_ratio: float,
                 importance_sample_ratio: float, pilot_class_loss: bool = True):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weights = {"ce": class_weight, "mask": mask_weight, "dice": dice_weight}
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.pilot_class_loss = pilot_class_loss
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.register_buffer("empty_weight", empty_weight)

    def mask_losses(self, src: Tensor, tgt: Tensor, num_masks: float) -> tuple[Tensor, Tensor]:
        """src: mask logits [N, h, w]; tgt: bool/float masks [N, H, W] -> (BCE, dice) on sampled points."""
        if src.shape[0] == 0:
            zero = src.sum() * 0.0
            return zero, zero
        src = src[:, None]
        with torch.no_grad():
            coords = uncertain_point_coords(src, self.num_points, self.oversample_ratio,
                                            self.importance_sample_ratio)
            labels = point_sample(tgt[:, None].to(src.dtype), coords)[:, 0]
        logits = point_sample(src, coords)[:, 0]
        return sigmoid_ce_loss(logits, labels, num_masks), dice_loss(logits, labels, num_masks)

    def match(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]
              ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor], Tensor]:
        """One prediction of the matching queries -> (unweighted cross-entropy over all queries,
        selection (embed, batch_idx, query_idx) of the matched queries, their target masks [N, H, W])."""
        logits, masks = outputs["pred_logits"].float(), outputs["pred_masks"].float()
        indices = self.matcher({"pred_logits": logits, "pred_masks": masks}, targets)
        batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]).to(logits.device)
        query_idx = torch.cat([q for q, _ in indices]).to(logits.device)
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        classes[batch_idx, query_idx] = torch.cat(
            [t["labels"].to(logits.device)[tgt] for t, (_, tgt) in zip(targets, indices)])
        loss_ce = F.cross_entropy(logits.transpose(1, 2), classes, self.empty_weight)
        tgt_masks = torch.cat([t["masks"].to(logits.device)[tgt] for t, (_, tgt) in zip(targets, indices)])
        return loss_ce, (outputs["mask_embed"].float(), batch_idx, query_idx), tgt_masks

    def pilot_select(self, outputs: dict[str, Tensor], layout: dict[str, Tensor], targets: list[dict[str, Tensor]],
                     num_pilots: float) -> tuple[Tensor | None, tuple[Tensor, Tensor, Tensor], Tensor]:
        """One prediction of the pilot slots -> (unweighted cross-entropy on the true labels, or None
        without ``class_loss``; selection of the real slots; their source segments' masks [N, H, W])."""
        logits = outputs["pred_logits"].float()
        batch_idx, slot_idx = layout["valid"].nonzero(as_tuple=True)
        src_idx = layout["target_index"][batch_idx, slot_idx]
        tgt_masks = torch.cat([targets[b]["masks"][src_idx[batch_idx == b].to(targets[b]["masks"].device)]
                               for b in range(len(targets))]).to(logits.device)
        loss_ce = None
        if self.pilot_class_loss:
            labels = layout["labels"][batch_idx, slot_idx]
            loss_ce = F.cross_entropy(logits[batch_idx, slot_idx], labels, reduction="sum") / num_pilots
        return loss_ce, (outputs["mask_embed"].float(), batch_idx, slot_idx), tgt_masks

    def forward(self, outputs: dict, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """outputs: the decoder's dict (``pred_logits``, ``pred_masks``, ``mask_embed``, ``aux_outputs``,
        ``mask_features``, optional ``pilot`` with ``labels`` / ``target_index`` / ``valid``); targets: B
        dicts {"labels" [n], "masks" bool [n, H, W]}.

        Returns weighted scalar losses: loss_{ce,mask,dice}, loss_{ce,mask,dice}_{i} for aux prediction i,
        and with pilot outputs loss_{ce,mask,dice}_pilot[_{i}].
        """
        device = outputs["pred_logits"].device
        losses: dict[str, Tensor] = {}
        with torch.autocast(device.type, enabled=False):
            # (loss-name suffix, normaliser, selection, target masks) of every supervised prediction
            supervised = []
            num_masks = global_count(sum(len(t["labels"]) for t in targets), device)
            predictions = [("", outputs)] + [(f"_{i}", aux) for i, aux in enumerate(outputs["aux_outputs"])]
            for suffix, pred in predictions:
                loss_ce, selection, tgt_masks = self.match(pred, targets)
                losses[f"loss_ce{suffix}"] = loss_ce * self.weights["ce"]
                supervised.append((suffix, num_masks, selection, tgt_masks))
            if "pilot" in outputs:
                pilot = outputs["pilot"]
                layout = {k: pilot[k] for k in ("labels", "target_index", "valid")}
                num_pilots = global_count(int(layout["valid"].sum()), device)
                predictions = [("", pilot)] + [(f"_{i}", aux) for i, aux in enumerate(pilot["aux_outputs"])]
                for suffix, pred in predictions:
                    loss_ce, selection, tgt_masks = self.pilot_select(pred, layout, targets, num_pilots)
                    if loss_ce is not None:
                        losses[f"loss_ce_pilot{suffix}"] = loss_ce * self.weights["ce"]
                    supervised.append((f"_pilot{suffix}", num_pilots, selection, tgt_masks))
            srcs = masks_for(outputs["mask_features"].float(), [sel for _, _, sel, _ in supervised])
            for (suffix, norm, _, tgt_masks), src in zip(supervised, srcs):
                loss_mask, loss_dice = self.mask_losses(src, tgt_masks, norm)
                losses[f"loss_mask{suffix}"] = loss_mask * self.weights["mask"]
                losses[f"loss_dice{suffix}"] = loss_dice * self.weights["dice"]
        return losses
