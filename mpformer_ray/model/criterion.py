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
queries' mask embeddings and the mask features, the only path the mask losses train.

All predictions (the L of the matching queries and the L of the pilot slots) are handled together: one
matcher call, one cross-entropy per query kind, and per image one matrix product and one point-sampling
pass covering every supervised mask. On a GPU the step is bound by the host issuing kernels, and the
per-prediction version issued each of these 2L times and waited for the device L times.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mpformer_ray.model.matcher import HungarianMatcher
from mpformer_ray.model.point_sampling import point_sample, uncertain_point_coords


def global_count(n: int, device: torch.device) -> float:
    """The average over ranks of a per-rank count (as Mask2Former normalises), at least 1."""
    if not (dist.is_available() and dist.is_initialized()):
        return max(float(n), 1.0)
    count = torch.as_tensor(float(n), device=device)
    dist.all_reduce(count)
    return max(count.item() / dist.get_world_size(), 1.0)


def group_ranks(keys: np.ndarray) -> np.ndarray:
    """For each entry, how many earlier entries have the same key: [3, 1, 3, 3] -> [0, 0, 1, 2]."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    ranks = np.empty_like(order)
    ranks[order] = np.arange(len(keys)) - np.repeat(starts, np.diff(np.r_[starts, len(keys)]))
    return ranks


def sample_targets(masks: Tensor, target_idx: np.ndarray, coords: Tensor) -> Tensor:
    """Row r's target mask ``masks[target_idx[r]]`` sampled at ``coords[r]``, without a float copy per row.

    masks bool [n, H, W]; target_idx int [R] (host); coords [R, P, 2] -> [R, P] in [0, 1].

    Rows sharing a segment (the same segment supervises every prediction and every pilot group) are
    sampled from one float copy of it: its rows' points are packed side by side into one grid.
    """
    r, p, _ = coords.shape
    ranks = group_ranks(target_idx)
    per_segment = int(ranks.max()) + 1
    seg = torch.as_tensor(target_idx, device=coords.device)
    rank = torch.as_tensor(ranks, device=coords.device)
    grid = coords.new_zeros(masks.shape[0], per_segment, p, 2)
    grid[seg, rank] = coords
    sampled = point_sample(masks[:, None].float(), grid.view(masks.shape[0], -1, 2))  # [n, 1, per_segment * P]
    return sampled.view(masks.shape[0], per_segment, p)[seg, rank]


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

    def forward(self, outputs: dict, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """outputs: the decoder's dict (``pred_logits``, ``pred_masks``, ``mask_embed``, ``aux_outputs``,
        ``mask_features``, optional ``pilot`` with ``labels`` / ``target_index`` / ``valid``); targets: B
        dicts {"labels" [n], "masks" bool [n, H, W]}.

        Returns weighted scalar losses: loss_{ce,mask,dice}, loss_{ce,mask,dice}_{i} for aux prediction i,
        and with pilot outputs loss_{ce,mask,dice}_pilot[_{i}].
        """
        device = outputs["pred_logits"].device
        matching = [outputs, *outputs["aux_outputs"]]
        suffixes = ["", *(f"_{i}" for i in range(len(matching) - 1))]
        groups = suffixes + ([f"_pilot{s}" for s in suffixes] if "pilot" in outputs else [])
        losses: dict[str, Tensor] = {}
        with torch.autocast(device.type, enabled=False):
            logits = torch.stack([p["pred_logits"] for p in matching]).float()  # [L, B, Q, K+1]
            indices = self.matcher.match_all(logits, torch.stack([p["pred_masks"] for p in matching]), targets)
            num_masks = global_count(sum(len(t["labels"]) for t in targets), device)
            for suffix, loss in zip(suffixes, self.matching_class_losses(logits, indices, targets)):
                losses[f"loss_ce{suffix}"] = loss * self.weights["ce"]
            # rows[i]: image i's supervised masks as (query kind, prediction, query indices [m], segment
            # indices [m], loss group, normaliser); kind 0 = matching queries (group = prediction), 1 = pilot
            # slots (group = L + prediction)
            embeds = [torch.stack([p["mask_embed"] for p in matching]).float()]
            rows: list[list[tuple]] = [[] for _ in targets]
            for p, per_image in enumerate(indices):
                for i, (queries, segments) in enumerate(per_image):
                    rows[i].append((0, p, queries.numpy(), segments.numpy(), p, num_masks))
            if "pilot" in outputs:
                pilot = outputs["pilot"]
                predictions = [pilot, *pilot["aux_outputs"]]
                valid, target_index = torch.stack((pilot["valid"].long(), pilot["target_index"])).cpu().numpy()
                batch_idx, slot_idx = valid.nonzero()
                num_pilots = global_count(len(batch_idx), device)
                if self.pilot_class_loss:
                    pilot_logits = torch.stack([p["pred_logits"] for p in predictions]).float()
                    pilot_losses = self.pilot_class_losses(pilot_logits, pilot["labels"], batch_idx, slot_idx, num_pilots)
                    for suffix, loss in zip(suffixes, pilot_losses):
                        losses[f"loss_ce_pilot{suffix}"] = loss * self.weights["ce"]
                embeds.append(torch.stack([p["mask_embed"] for p in predictions]).float())
                for i in range(len(targets)):
                    slots = slot_idx[batch_idx == i]
                    rows[i] += [(1, p, slots, target_index[i, slots], len(matching) + p, num_pilots)
                                for p in range(len(predictions))]
            loss_mask, loss_dice = self.mask_losses(outputs["mask_features"].float(), embeds, rows, targets,
                                                    len(groups))
        for g, suffix in enumerate(groups):
            losses[f"loss_mask{suffix}"] = loss_mask[g] * self.weights["mask"]
            losses[f"loss_dice{suffix}"] = loss_dice[g] * self.weights["dice"]
        return losses

    def matching_class_losses(self, logits: Tensor, indices: list[list[tuple[Tensor, Tensor]]],
                              targets: list[dict[str, Tensor]]) -> Tensor:
        """Cross-entropy over all queries of each prediction (unmatched -> no object), the weighted mean
        of F.cross_entropy: logits [L, B, Q, K+1] -> unweighted losses [L]."""
        num_preds, b, q = logits.shape[:3]
        pred_idx, batch_idx, query_idx, labels = [], [], [], []
        for i, target in enumerate(targets):
            segments = torch.cat([indices[p][i][1] for p in range(num_preds)])
            if len(segments):
                labels.append(target["labels"][segments.to(target["labels"].device)].to(logits.device))
            for p in range(num_preds):
                matched = indices[p][i][0]
                pred_idx.append(torch.full_like(matched, p))
                batch_idx.append(torch.full_like(matched, i))
                query_idx.append(matched)
        classes = torch.full((num_preds, b, q), self.num_classes, dtype=torch.int64, device=logits.device)
        where = torch.stack([torch.cat(pred_idx), torch.cat(batch_idx), torch.cat(query_idx)]).to(logits.device)
        if labels:
            classes[where[0], where[1], where[2]] = torch.cat(labels)
        nll = F.cross_entropy(logits.flatten(0, 2), classes.flatten(), self.empty_weight, reduction="none")
        return nll.view(num_preds, -1).sum(1) / self.empty_weight[classes].view(num_preds, -1).sum(1)

    def pilot_class_losses(self, logits: Tensor, labels: Tensor, batch_idx: np.ndarray, slot_idx: np.ndarray,
                           num_pilots: float) -> Tensor:
        """Cross-entropy of every real pilot slot (image ``batch_idx[n]``, slot ``slot_idx[n]``) on its true
        label: logits [L, B, P, K+1], labels [B, P] -> [L], each summed over slots / num_pilots."""
        where = torch.as_tensor(np.stack((batch_idx, slot_idx)), device=logits.device)
        picked = logits[:, where[0], where[1]]  # [L, N, K+1]
        picked_labels = labels[where[0], where[1]].repeat(logits.shape[0])
        nll = F.cross_entropy(picked.flatten(0, 1), picked_labels, reduction="none")
        return nll.view(logits.shape[0], -1).sum(1) / num_pilots

    def mask_losses(self, mask_features: Tensor, embeds: list[Tensor], rows: list[list[tuple]],
                    targets: list[dict[str, Tensor]], num_groups: int) -> tuple[Tensor, Tensor]:
        """BCE and dice of every supervised mask on importance-sampled points, summed per loss group.

        mask_features [B, D, H/4, W/4]; embeds: [L, B, T_k, D] per query kind k; rows: per image the
        (kind, prediction, query indices [m], segment indices [m], group, normaliser) of its supervised
        masks -> (BCE [num_groups], dice [num_groups]), each mask's loss divided by its normaliser.
        """
        features = mask_features.flatten(2).unbind(0)  # unbind: no [B, D, H*W] zero-filled gradient per image
        h, w = mask_features.shape[-2:]
        # starting from zero-weighted inputs keeps every parameter in the graph when nothing is supervised
        # (DistributedDataParallel expects the same parameters to get gradients on every rank)
        anchor = mask_features.sum() * 0.0 + sum(e.sum() for e in embeds) * 0.0
        bce_all, dice_all = anchor.expand(num_groups), anchor.expand(num_groups)
        for i, image_rows in enumerate(rows):
            if not sum(len(r[2]) for r in image_rows):
                continue
            picked = [embeds[kind][p, i, torch.as_tensor(q, device=mask_features.device)]
                      for kind, p, q, _, _, _ in image_rows]
            src = torch.mm(torch.cat(picked), features[i]).view(-1, 1, h, w)  # [m_i, 1, H/4, W/4]
            segments = np.concatenate([r[3] for r in image_rows])
            group = torch.as_tensor(np.concatenate([np.full(len(r[2]), r[4]) for r in image_rows]),
                                    device=src.device)
            scale = torch.as_tensor(np.concatenate([np.full(len(r[2]), 1.0 / r[5]) for r in image_rows]),
                                    dtype=src.dtype, device=src.device)
            with torch.no_grad():
                coords = uncertain_point_coords(src, self.num_points, self.oversample_ratio,
                                                self.importance_sample_ratio)
                labels = sample_targets(targets[i]["masks"].to(src.device), segments, coords)
            logits = point_sample(src, coords)[:, 0]  # [m_i, P]
            bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1)
            probs = logits.sigmoid()
            dice = 1 - (2 * (probs * labels).sum(-1) + 1) / (probs.sum(-1) + labels.sum(-1) + 1)
            bce_all = bce_all.index_add(0, group, bce * scale)
            dice_all = dice_all.index_add(0, group, dice * scale)
        return bce_all, dice_all
