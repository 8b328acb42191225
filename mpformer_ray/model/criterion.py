"""Training losses: Mask2Former's SetCriterion plus MP-Former's direct supervision of pilot queries.

Matching queries: Hungarian matching per prediction (final layer, query init and every other layer), then
cross-entropy over all queries (unmatched ones -> "no object", down-weighted by ``no_object_weight``) and
sigmoid BCE + dice on importance-sampled points of the matched masks, divided by the number of
ground-truth segments in the whole (distributed) batch.

Pilot queries, as the released criterion (``dn_out`` branch): no matching. BCE + dice supervise every real
pilot slot against its own source segment, divided by the number of real pilot slots in the whole
(distributed) batch (ground-truth segments x G). The cross-entropy (only when ``class_loss``) runs over
every pilot slot: real slots on their segment's true (un-noised) label, padding slots on "no object", the
weighted mean with ``no_object_weight``, like the matching queries' cross-entropy.

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

from mpformer_ray.config import ModelConfig
from mpformer_ray.model.matcher import HungarianMatcher
from mpformer_ray.model.point_sampling import point_sample, uncertain_point_coords
from mpformer_ray.model.transfer import to_device
from mpformer_ray.model.transformer_decoder import DecoderOutput


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


def sample_targets(masks: Tensor, segments: np.ndarray, coords: Tensor) -> Tensor:
    """Row r's target mask ``masks[segments[r]]`` sampled at ``coords[r]``, without a float copy per row.

    masks bool [n, H, W]; segments int [R] (host); coords [R, P, 2] -> [R, P] in [0, 1].

    Rows sharing a segment (the same segment supervises every prediction and every pilot group) are
    sampled from one float copy of it: its rows' points are packed side by side into one grid.
    """
    p = coords.shape[1]
    ranks = group_ranks(segments)
    per_segment = int(ranks.max()) + 1
    seg, rank = to_device(np.stack((segments, ranks)), coords.device)
    grid = coords.new_zeros(masks.shape[0], per_segment, p, 2)
    grid[seg, rank] = coords
    sampled = point_sample(masks[:, None].float(), grid.view(masks.shape[0], -1, 2))  # [n, 1, per_segment * P]
    return sampled.view(masks.shape[0], per_segment, p)[seg, rank]


def total_loss(losses: dict[str, Tensor]) -> Tensor:
    """The sum of all loss terms, as one stack and one sum: Python's ``sum`` would add (and backpropagate)
    one term at a time, 60 host-issued ops per step with the pilot on."""
    return torch.stack(list(losses.values())).sum()


class SetCriterion(nn.Module):
    """Weighted Mask2Former + pilot losses for the decoder outputs of one batch."""

    def __init__(self, *, num_classes: int, matcher: HungarianMatcher, class_weight: float, mask_weight: float,
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

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> SetCriterion:
        """The losses of ``cfg`` with its matcher (``HungarianMatcher.from_config``)."""
        return cls(num_classes=cfg.num_classes, matcher=HungarianMatcher.from_config(cfg),
                   class_weight=cfg.class_weight, mask_weight=cfg.mask_weight, dice_weight=cfg.dice_weight,
                   no_object_weight=cfg.no_object_weight, num_points=cfg.train_num_points,
                   oversample_ratio=cfg.oversample_ratio, importance_sample_ratio=cfg.importance_sample_ratio,
                   pilot_class_loss=cfg.pilot.class_loss)

    def forward(self, outputs: DecoderOutput, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """outputs: the decoder's (pilot slots supervised when ``outputs.pilot`` is set); targets: B dicts
        {"labels" [n], "masks" bool [n, H, W]}.

        Returns weighted scalar losses: loss_{ce,mask,dice} for the final prediction, loss_{ce,mask,dice}_{i}
        for aux prediction i (query init = 0), and with pilot outputs loss_{ce,mask,dice}_pilot[_{i}].
        """
        device = outputs.logits.device
        num_preds, num_queries = outputs.num_predictions, outputs.num_queries
        suffixes = [*(f"_{i}" for i in range(num_preds - 1)), ""]
        num_masks = global_count(sum(len(t["labels"]) for t in targets), device)
        # loss groups of the mask losses, (suffix, normaliser): group g < L is prediction g's matching
        # queries, group L + g its pilot slots
        groups = [(s, num_masks) for s in suffixes]
        class_names, class_scales = [f"loss_ce{s}" for s in suffixes], [self.weights["ce"]] * num_preds
        with torch.autocast(device.type, enabled=False):
            logits, embeds = outputs.logits.float(), outputs.embeds.float()
            indices = self.matcher.match_all(logits[:, :, :num_queries], outputs.query_masks(), targets)
            # (prediction, image, query, segment) of every match
            matches = np.concatenate([np.stack(np.broadcast_arrays(p, i, queries.numpy(), segments.numpy()))
                                      for p, per_image in enumerate(indices)
                                      for i, (queries, segments) in enumerate(per_image)], axis=1)
            class_losses = [self.matching_class_losses(logits[:, :, :num_queries], matches, targets)]
            # supervised[i]: image i's supervised masks as int [4, m] rows (prediction, query, segment, group)
            supervised: list[list[np.ndarray]] = []
            for i in range(len(targets)):
                pred, _, query, segment = matches[:, matches[1] == i]
                supervised.append([np.stack((pred, query, segment, pred))])
            pilot = outputs.pilot
            if pilot is not None:
                # -1 marks padding slots; PilotQueries keeps target_index on the host, so no device wait here
                target_index = pilot.target_index.cpu().numpy()
                batch_idx, slot_idx = np.nonzero(target_index >= 0)
                num_pilots = global_count(len(batch_idx), device)
                groups += [(f"_pilot{s}", num_pilots) for s in suffixes]
                if self.pilot_class_loss:
                    class_losses.append(self.pilot_class_losses(logits, pilot.labels, pilot.valid, num_queries))
                    class_names += [f"loss_ce_pilot{s}" for s in suffixes]
                    class_scales += [self.weights["ce"]] * num_preds
                for i in range(len(targets)):
                    slots = slot_idx[batch_idx == i]
                    supervised[i] += [np.stack(np.broadcast_arrays(p, num_queries + slots, target_index[i, slots],
                                                                   num_preds + p)) for p in range(num_preds)]
            loss_mask, loss_dice = self.mask_losses(outputs.mask_features.float(), embeds,
                                                    [np.concatenate(rows, axis=1) for rows in supervised],
                                                    targets, len(groups))
            # one weighting multiply and one unbind for all keys: a tensor op per loss key (and its backward)
            # is host time on a GPU
            names = class_names + [f"loss_mask{s}" for s, _ in groups] + [f"loss_dice{s}" for s, _ in groups]
            scales = (class_scales + [self.weights["mask"] / n for _, n in groups]
                      + [self.weights["dice"] / n for _, n in groups])
            values = torch.cat([*class_losses, loss_mask, loss_dice]) * to_device(np.array(scales, np.float32), device)
        return dict(zip(names, values.unbind()))

    def matching_class_losses(self, logits: Tensor, matches: np.ndarray, targets: list[dict[str, Tensor]]
                              ) -> Tensor:
        """Cross-entropy over all queries of each prediction (unmatched -> no object), the weighted mean
        of F.cross_entropy: logits [L, B, Q, K+1]; matches int [4, M] (prediction, image, query, segment),
        copied to the device in one transfer -> unweighted losses [L]."""
        num_preds, b, q = logits.shape[:3]
        classes = torch.full((num_preds, b, q), self.num_classes, dtype=torch.int64, device=logits.device)
        if matches.shape[1]:
            where = to_device(matches, logits.device)
            all_labels = torch.cat([t["labels"].to(logits.device) for t in targets])
            first = to_device(np.cumsum([0] + [len(t["labels"]) for t in targets[:-1]]), logits.device)
            classes[where[0], where[1], where[2]] = all_labels[first[where[1]] + where[3]]
        nll = F.cross_entropy(logits.flatten(0, 2), classes.flatten(), self.empty_weight, reduction="none")
        return nll.view(num_preds, -1).sum(1) / self.empty_weight[classes].view(num_preds, -1).sum(1)

    def pilot_class_losses(self, logits: Tensor, labels: Tensor, valid: Tensor, num_queries: int) -> Tensor:
        """Cross-entropy of every pilot slot, real ones on their true label, padding on "no object"; the
        weighted mean over the batch's slots: logits [L, B, Q + P, K+1] (pilot slots after the Q matching
        queries), labels / valid [B, P] -> unweighted losses [L] (zero when the batch has no slot)."""
        pilot_logits = logits[:, :, num_queries:]
        num_preds = logits.shape[0]
        if pilot_logits.shape[2] == 0:
            return logits.new_zeros(num_preds)
        classes = torch.where(valid, labels, self.num_classes).expand(num_preds, -1, -1)
        nll = F.cross_entropy(pilot_logits.flatten(0, 2), classes.flatten(), self.empty_weight, reduction="none")
        return nll.view(num_preds, -1).sum(1) / self.empty_weight[classes].view(num_preds, -1).sum(1)

    def mask_losses(self, mask_features: Tensor, embeds: Tensor, supervised: list[np.ndarray],
                    targets: list[dict[str, Tensor]], num_groups: int) -> tuple[Tensor, Tensor]:
        """BCE and dice of every supervised mask on importance-sampled points, summed per loss group.

        mask_features [B, D, H/4, W/4]; embeds [L, B, T, D]; supervised: per image int [4, m_i], rows
        (prediction, query, segment, group) -> (BCE [num_groups], dice [num_groups]), unnormalised sums.
        """
        features = mask_features.flatten(2).unbind(0)  # unbind: no [B, D, H*W] zero-filled gradient per image
        h, w = mask_features.shape[-2:]
        # starting from zero-weighted inputs keeps every parameter in the graph when nothing is supervised
        # (DistributedDataParallel expects the same parameters to get gradients on every rank)
        anchor = (mask_features.sum() + embeds.sum()) * 0.0
        bce_all, dice_all = anchor.expand(num_groups), anchor.expand(num_groups)
        for i, rows in enumerate(supervised):
            if rows.shape[1] == 0:
                continue
            pred, query, _, group = to_device(rows, mask_features.device)
            src = torch.mm(embeds[pred, i, query], features[i]).view(-1, 1, h, w)  # [m_i, 1, H/4, W/4]
            with torch.no_grad():
                coords = uncertain_point_coords(src, self.num_points, self.oversample_ratio,
                                                self.importance_sample_ratio)
                labels = sample_targets(targets[i]["masks"].to(src.device), rows[2], coords)
            logits = point_sample(src, coords)[:, 0]  # [m_i, P]
            bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1)
            probs = logits.sigmoid()
            dice = 1 - (2 * (probs * labels).sum(-1) + 1) / (probs.sum(-1) + labels.sum(-1) + 1)
            bce_all = bce_all.index_add(0, group, bce)
            dice_all = dice_all.index_add(0, group, dice)
        return bce_all, dice_all
