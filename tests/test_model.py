"""The whole MP-Former: front door, zero inference cost of pilot training, losses, matching, post-processing
and learning on a tiny synthetic batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mpformer_ray.config import ConfigError, load_config, with_classes
from mpformer_ray.data.synthetic import SYNTHETIC_CLASSES
from mpformer_ray.model import MPFormer, build_model

torch.set_num_threads(1)
FAST = ["model.train_num_points=256"]
# distinct, saturated colours per class (images are "normalised", so roughly zero-mean)
COLOURS = np.array([[1.5, -1, -1], [-1, 1.5, -1], [-1, -1, 1.5], [1.5, 1.5, -1], [-1, 1.5, 1.5], [1.5, -1, 1.5]],
                   dtype=np.float32)


def tiny(*overrides: str) -> MPFormer:
    torch.manual_seed(0)
    return build_model(with_classes(load_config("tiny", [*FAST, *overrides]), SYNTHETIC_CLASSES))


def shapes_batch(counts: list[int], size: int = 64, seed: int = 0) -> tuple[torch.Tensor, list[dict]]:
    """Images with non-overlapping rectangles / ellipses, one distinct class (and colour) per shape."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, targets = [], []
    for n in counts:
        image = np.zeros((3, size, size), np.float32)
        occupied = np.zeros((size, size), bool)
        masks, labels = [], []
        for k, c in enumerate(rng.choice(len(COLOURS), n, replace=False)):
            while True:
                cy, cx = rng.integers(12, size - 12, 2)
                h, w = rng.integers(6, 12, 2)
                if k % 2:
                    mask = ((yy - cy) / h) ** 2 + ((xx - cx) / w) ** 2 <= 1
                else:
                    mask = (abs(yy - cy) <= h) & (abs(xx - cx) <= w)
                if not (mask & occupied).any():
                    break
            occupied |= mask
            image[:, mask] = COLOURS[c][:, None]
            masks.append(mask)
            labels.append(int(c))
        images.append(image)
        targets.append({"labels": torch.tensor(labels, dtype=torch.int64),
                        "masks": torch.from_numpy(np.stack(masks) if masks else np.zeros((0, size, size), bool))})
    return torch.from_numpy(np.stack(images)), targets


def test_zero_inference_cost():
    with_pilot = tiny("model.pilot.enabled=true")
    without = tiny("model.pilot.enabled=false")
    missing, unexpected = without.load_state_dict(with_pilot.state_dict(), strict=False)
    assert missing == [] and unexpected == ["pilot.label_embed.weight"]
    cfg = with_pilot.cfg
    assert with_pilot.num_parameters() == without.num_parameters() == without.num_parameters(False)
    assert with_pilot.num_parameters(False) - with_pilot.num_parameters() == cfg.num_classes * cfg.hidden_dim

    calls = []
    with_pilot.pilot.register_forward_hook(lambda *args: calls.append(1))
    images, targets = shapes_batch([2, 3])
    with_pilot.eval()
    without.eval()
    with torch.no_grad():
        a = with_pilot(images)
        b = without(images)
        raw = with_pilot.forward_raw(images, targets)
    assert calls == [] and raw.pilot is None
    for ra, rb in zip(a, b):
        assert torch.equal(ra["sem_seg"], rb["sem_seg"])
        assert torch.equal(ra["panoptic"][0], rb["panoptic"][0]) and ra["panoptic"][1] == rb["panoptic"][1]
        for key in ("masks", "scores", "labels"):
            assert torch.equal(ra["instances"][key], rb["instances"][key])
    with_pilot.train()
    with_pilot(images, targets)
    assert calls == [1]


def test_pilot_queries_do_not_change_matching_queries():
    model = tiny("model.pilot.groups=2", "model.pilot.mask_noise=point", "model.pilot.noise_ratio=0.2")
    model.train()
    images, targets = shapes_batch([2, 0])
    with torch.no_grad():
        mask_features, multi_scale = model.pixel_decoder(model.backbone(images))
        pilot = model.pilot(targets, model.cfg.num_queries, tuple(images.shape[-2:]))
        piloted = model.predictor(multi_scale, mask_features, pilot)
        plain = model.predictor(multi_scale, mask_features)
    assert all(m.shape == (2, 4, 16, 16) for m in piloted.pilot_masks())
    assert plain.pilot is None and plain.logits.shape[2] == model.cfg.num_queries
    torch.testing.assert_close(piloted.logits[:, :, : model.cfg.num_queries], plain.logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(piloted.query_masks(), plain.query_masks(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_r50_parameter_count():
    model = build_model(load_config("r50", ["model.num_classes=133"]))  # COCO panoptic's, as the paper counts
    assert abs(model.num_parameters() - 44.0e6) / 44.0e6 < 0.01, model.num_parameters()


def test_forward_raw_structure():
    model = tiny()
    cfg = model.cfg
    images, targets = shapes_batch([2, 3])
    model.train()
    raw = model.forward_raw(images, targets)
    num_preds, slots = cfg.dec_layers + 1, cfg.num_queries + 3
    assert raw.num_predictions == num_preds and raw.num_queries == cfg.num_queries
    assert raw.logits.shape == (num_preds, 2, slots, cfg.num_classes + 1)
    assert raw.embeds.shape == (num_preds, 2, slots, cfg.mask_dim)
    assert [tuple(m.shape) for m in raw.masks] == [(2, slots, 16, 16)] * num_preds
    assert raw.pred_logits.shape == (2, cfg.num_queries, cfg.num_classes + 1)
    assert raw.pred_masks.shape == (2, cfg.num_queries, 16, 16)
    assert torch.equal(raw.pred_masks, raw.masks[-1][:, : cfg.num_queries])
    assert [tuple(m.shape) for m in raw.pilot_masks()] == [(2, 3, 16, 16)] * num_preds
    assert raw.pilot.valid.tolist() == [[True, True, False], [True, True, True]]


def test_matcher_recovers_a_perfect_assignment():
    model = tiny()
    _, targets = shapes_batch([3, 0])
    q = model.cfg.num_queries
    k = model.cfg.num_classes
    order = torch.tensor([7, 2, 11])
    logits = torch.full((2, q, k + 1), -10.0)
    logits[..., k] = 10.0
    masks = torch.full((2, q, 64, 64), -10.0)
    for t, query in enumerate(order):
        logits[0, query, targets[0]["labels"][t]] = 10.0
        masks[0, query][targets[0]["masks"][t]] = 10.0
    (query_idx, target_idx), (empty_q, empty_t) = model.criterion.matcher(logits, masks, targets)
    assert torch.equal(query_idx[target_idx.argsort()], order)
    assert empty_q.numel() == 0 and empty_t.numel() == 0 and empty_q.dtype == torch.int64


def test_criterion_equals_a_per_prediction_reference():
    """The batched criterion (all predictions matched, sampled and reduced together) gives every loss key
    the value and the gradients of Mask2Former's per-prediction losses. Matching is forced by decisive
    class scores; the mask losses use uniform points (no importance sampling), so with many points they
    estimate the mean over the whole mask, which the reference computes on a dense grid."""
    from mpformer_ray.model.criterion import SetCriterion
    from mpformer_ray.model.matcher import HungarianMatcher
    from mpformer_ray.model.pilot import PilotQueries
    from mpformer_ray.model.point_sampling import point_sample
    from mpformer_ray.model.transformer_decoder import DecoderOutput

    g = torch.Generator().manual_seed(0)
    counts, k, q, d, groups, num_preds = [2, 0, 3], 5, 6, 4, 2, 3
    weights = {"ce": 2.0, "mask": 5.0, "dice": 5.0}
    matcher = HungarianMatcher(class_weight=100.0, mask_weight=1.0, dice_weight=1.0, num_points=256)
    criterion = SetCriterion(num_classes=k, matcher=matcher, class_weight=weights["ce"], mask_weight=weights["mask"],
                             dice_weight=weights["dice"], no_object_weight=0.1, num_points=100_000,
                             oversample_ratio=1.0, importance_sample_ratio=0.0)
    targets = [{"labels": torch.randperm(k, generator=g)[:n],
                "masks": torch.rand(n, 32, 32, generator=g) < 0.4} for n in counts]
    features = torch.randn(3, d, 8, 8, generator=g, requires_grad=True)
    n_max = max(counts)
    # the layout as the model builds it: slot s of image i reconstructs segment s % n_max when that exists
    pilot = PilotQueries(num_classes=k, hidden_dim=d, groups=groups, mask_noise="none", noise_ratio=0.0,
                         label_noise=0.0, piloted_layers=num_preds - 1)(targets, q, (32, 32))
    valid, target_index, pilot_labels = pilot.valid, pilot.target_index, pilot.labels
    assert target_index.tolist()[2] == [0, 1, 2, 0, 1, 2] and valid.tolist()[1] == [False] * 6

    def prediction(p: int, slots: int, assign: list[torch.Tensor] | None) -> dict:
        embed = ((1 + p) * torch.randn(3, slots, d, generator=g)).requires_grad_()
        logits = torch.randn(3, slots, k + 1, generator=g)
        if assign is not None:  # matching queries: assign[i][t] = the query that must match segment t
            logits[..., k] += 12
            for i, queries in enumerate(assign):
                logits[i, queries, k] -= 12
                logits[i, queries, targets[i]["labels"]] += 12
        logits.requires_grad_()
        return {"logits": logits, "embed": embed, "masks": torch.einsum("btd,bdhw->bthw", embed, features).detach()}

    assigns = [[torch.randperm(q, generator=g)[:n] for n in counts] for _ in range(num_preds)]
    matching = [prediction(p, q, assigns[p]) for p in range(num_preds)]
    pilots = [prediction(p, groups * n_max, None) for p in range(num_preds)]
    outputs = DecoderOutput(
        logits=torch.stack([torch.cat((m["logits"], pl["logits"]), 1) for m, pl in zip(matching, pilots)]),
        embeds=torch.stack([torch.cat((m["embed"], pl["embed"]), 1) for m, pl in zip(matching, pilots)]),
        masks=[torch.cat((m["masks"], pl["masks"]), 1) for m, pl in zip(matching, pilots)],
        mask_features=features, num_queries=q, pilot=pilot)
    inputs = [features] + [x for pred in matching + pilots for x in (pred["logits"], pred["embed"])]

    dense = torch.stack(torch.meshgrid(torch.arange(128) / 128 + 1 / 256, torch.arange(128) / 128 + 1 / 256,
                                       indexing="xy"), -1).view(1, -1, 2)

    def mask_terms(embed: torch.Tensor, i: int, queries: torch.Tensor, segments: torch.Tensor) -> tuple:
        src = torch.einsum("td,dhw->thw", embed[i, queries], features[i])[:, None]
        tgt = targets[i]["masks"][segments][:, None].float()
        logit = point_sample(src, dense.expand(len(src), -1, -1))[:, 0]
        label = point_sample(tgt, dense.expand(len(src), -1, -1))[:, 0]
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logit, label, reduction="none").mean(1).sum()
        prob = logit.sigmoid()
        dice = (1 - (2 * (prob * label).sum(1) + 1) / (prob.sum(1) + label.sum(1) + 1)).sum()
        return bce, dice

    want: dict[str, torch.Tensor] = {}
    suffixes = [f"_{p}" for p in range(num_preds - 1)] + [""]  # aux predictions first, as in outputs
    num_masks, num_pilots = sum(counts), groups * sum(counts)
    for p, suffix in enumerate(suffixes):
        logits, embed = matching[p]["logits"], matching[p]["embed"]
        classes = torch.full((3, q), k)
        bce = dice = 0
        for i, queries in enumerate(assigns[p]):
            classes[i, queries] = targets[i]["labels"]
            if len(queries):
                terms = mask_terms(embed, i, queries, torch.arange(len(queries)))
                bce, dice = bce + terms[0], dice + terms[1]
        want[f"loss_ce{suffix}"] = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), classes, criterion.empty_weight) * weights["ce"]
        want[f"loss_mask{suffix}"] = bce / num_masks * weights["mask"]
        want[f"loss_dice{suffix}"] = dice / num_masks * weights["dice"]
        logits, embed = pilots[p]["logits"], pilots[p]["embed"]
        # every pilot slot, padding on "no object" (the released criterion's weighted mean)
        want[f"loss_ce_pilot{suffix}"] = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), torch.where(valid, pilot_labels, k), criterion.empty_weight) * weights["ce"]
        bce = dice = 0
        for i in range(3):
            if valid[i].any():
                terms = mask_terms(embed, i, valid[i].nonzero()[:, 0], target_index[i][valid[i]])
                bce, dice = bce + terms[0], dice + terms[1]
        want[f"loss_mask_pilot{suffix}"] = bce / num_pilots * weights["mask"]
        want[f"loss_dice_pilot{suffix}"] = dice / num_pilots * weights["dice"]

    got = criterion(outputs, targets)
    assert got.keys() == want.keys()
    for key in want:
        tol = 1e-5 if key.startswith("loss_ce") else 0.02  # the mask terms are 100000-point estimates
        torch.testing.assert_close(got[key], want[key], rtol=tol, atol=1e-6, msg=key)
    got_grads = torch.autograd.grad(sum(got.values()), inputs)
    want_grads = torch.autograd.grad(sum(want.values()), inputs)
    for a, b in zip(got_grads, want_grads):
        assert (a - b).norm() <= 0.05 * b.norm(), ((a - b).norm(), b.norm())


@pytest.mark.parametrize("counts", [[2, 0, 5], [0, 0]])
def test_losses_with_images_without_segments(counts):
    model = tiny("model.pilot.groups=3")
    model.train()
    images, targets = shapes_batch(counts)
    losses = model(images, targets)
    dec = model.cfg.dec_layers
    names = {f"loss_{n}{s}" for n in ("ce", "mask", "dice") for s in ["", *(f"_{i}" for i in range(dec))]}
    assert {k for k in losses if "pilot" not in k} == names
    assert {k.replace("_pilot", "") for k in losses if "pilot" in k} == names
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    total = sum(losses.values())
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    label_grad = model.pilot.label_embed.weight.grad
    if sum(counts):
        assert label_grad is not None and label_grad.abs().sum() > 0
    else:
        assert all(v.item() == 0.0 for k, v in losses.items() if "pilot" in k)


def test_bf16_autocast_forward_backward():
    model = tiny("model.pilot.mask_noise=shift", "model.pilot.noise_ratio=0.2")
    model.train()
    images, targets = shapes_batch([2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    assert all(v.dtype == torch.float32 for v in losses.values())
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.pilot.label_embed.weight.grad.abs().sum() > 0


def test_postprocess_formats():
    model = tiny("model.test.max_detections=10", "model.test.object_mask_threshold=0.0",
                 "model.test.overlap_threshold=0.0")
    model.eval()
    images = torch.randn(2, 3, 60, 56)  # padded to 64 x 64 inside
    image_sizes = [(60, 50), (40, 56)]
    output_sizes = [(120, 100), (20, 28)]
    with torch.no_grad():
        results = model(images, image_sizes=image_sizes, output_sizes=output_sizes)
        default = model(images)
    k = model.cfg.num_classes
    things = set(model.cfg.thing_classes)
    for result, (h, w) in zip(results, output_sizes):
        assert result["sem_seg"].shape == (k, h, w) and result["sem_seg"].dtype == torch.float32
        segment_ids, segments = result["panoptic"]
        assert segment_ids.shape == (h, w) and segment_ids.dtype == torch.int32
        assert segments, "thresholds 0 keep at least one segment"
        assert set(segment_ids.unique().tolist()) <= {0} | {s["id"] for s in segments}
        for s in segments:
            assert set(s) == {"id", "category_id", "isthing", "score"}
            assert s["isthing"] == (s["category_id"] in things) and 0 <= s["score"] <= 1
        inst = result["instances"]
        n = inst["masks"].shape[0]
        assert 0 < n <= 10 and inst["masks"].shape == (n, h, w) and inst["masks"].dtype == torch.bool
        assert inst["scores"].shape == (n,) and inst["scores"].dtype == torch.float32
        assert inst["labels"].shape == (n,) and inst["labels"].dtype == torch.int64
        assert set(inst["labels"].tolist()) <= things
    assert default[0]["sem_seg"].shape == (k, 60, 56)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        amp = model(images[:1])[0]
    assert amp["sem_seg"].dtype == torch.float32 and amp["instances"]["scores"].dtype == torch.float32
    only_semantic = tiny("model.test.instance_on=false", "model.test.panoptic_on=false").eval()
    with torch.no_grad():
        assert set(only_semantic(images)[0]) == {"sem_seg"}


def test_a_model_needs_its_classes():
    """Presets leave the classes to the data; building a model without them names the fix."""
    with pytest.raises(ConfigError, match=r"model\.num_classes is not set.*with_classes.*--set model\.num_classes"):
        build_model(load_config("tiny"))
    with pytest.raises(ConfigError, match=r"model\.num_classes=7 but the data has 6 classes \(square, disk"):
        with_classes(load_config("tiny", ["model.num_classes=7"]), SYNTHETIC_CLASSES)
    filled = with_classes(load_config("tiny"), SYNTHETIC_CLASSES)
    assert (filled.model.num_classes, filled.model.thing_classes) == (6, [0, 1, 2, 3])
    assert with_classes(load_config("tiny", ["model.thing_classes=[1]"]), SYNTHETIC_CLASSES).model.thing_classes == [1]


def test_bad_targets_are_rejected():
    model = tiny().train()
    images, targets = shapes_batch([2])
    with pytest.raises(ValueError, match="masks"):
        model(images, [{"labels": targets[0]["labels"], "masks": targets[0]["masks"][:, :32]}])
    with pytest.raises(ValueError, match="num_classes"):
        model(images, [{"labels": torch.tensor([0, 99]), "masks": targets[0]["masks"]}])


@pytest.mark.slow
@pytest.mark.parametrize("pilot", [True, False])
def test_tiny_model_overfits_a_fixed_batch(pilot):
    model = tiny(f"model.pilot.enabled={str(pilot).lower()}").train()
    images, targets = shapes_batch([2, 3], seed=0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    history = []
    for _ in range(150):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append(loss.item())
    assert np.mean(history[-10:]) <= 0.2 * history[0], (history[0], history[-10:])

    model.eval()
    with torch.no_grad():
        raw = model.forward_raw(images)
    for b, (queries, segments) in enumerate(model.criterion.matcher(raw.pred_logits, raw.pred_masks, targets)):
        assert len(segments) == len(targets[b]["labels"])
        pred = torch.nn.functional.interpolate(raw.pred_masks[b:b + 1], size=(64, 64), mode="bilinear")[0]
        pred = pred[queries] > 0
        gt = targets[b]["masks"][segments]
        iou = (pred & gt).sum((1, 2)).float() / (pred | gt).sum((1, 2)).float()
        assert (iou > 0.8).all(), iou


@pytest.mark.parametrize("layers", ["all", 1])
def test_decoder_uses_ground_truth_masks_in_piloted_layers(layers):
    model = tiny(f"model.pilot.layers={layers}", "model.pilot.mask_noise=none", "model.pilot.groups=2").train()
    images, targets = shapes_batch([2, 3])
    seen = {}
    for i, layer in enumerate(model.predictor.cross_attention_layers):
        layer.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[2]))
    with torch.no_grad():
        model.forward_raw(images, targets)
    q, heads = model.cfg.num_queries, model.cfg.nheads
    for i, stride in enumerate([32, 16, 8]):
        blocked = seen[i][::heads, q:].view(2, 2, 3, -1)  # [B, group, slot, h*w]
        piloted = layers == "all" or i < layers
        for b, t in enumerate(targets):
            gt = torch.nn.functional.max_pool2d(t["masks"].float()[:, None], stride)[:, 0].flatten(1) > 0
            n = len(t["labels"])
            matches = all(torch.equal(blocked[b, g, :n], ~gt) for g in range(2))
            assert matches == piloted, (i, b)


def test_matcher_names_diverged_training_instead_of_scipys_error():
    from mpformer_ray.model.matcher import HungarianMatcher

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 4, generator=gen)
    logits[1, 3, 0] = float("nan")  # one non-finite prediction in the second image
    masks = torch.randn(2, 5, 8, 8, generator=gen)
    targets = [{"labels": torch.tensor([0, 2]), "masks": torch.rand(2, 16, 16, generator=gen) > 0.5}] * 2
    with pytest.raises(FloatingPointError, match="not finite.*lower train.lr"):
        HungarianMatcher(class_weight=2.0, mask_weight=5.0, dice_weight=5.0, num_points=64)(logits, masks, targets)


@pytest.mark.parametrize("overrides, counts", [
    ((), [2, 3]), ((), [0, 0]), (("model.pilot.enabled=false",), [2, 0]), (("model.pilot.layers=1",), [1, 2]),
])
def test_every_parameter_is_in_every_steps_graph(overrides, counts):
    """DistributedDataParallel runs without find_unused_parameters (an extra autograd traversal per step
    and a warning on every run): every trainable parameter must be part of every step's graph, also
    when no image has a segment (no pilot query, nothing matched) or the pilot is off."""
    model = tiny(*overrides).train()
    images, targets = shapes_batch(counts, seed=1)
    sum(model(images, targets).values()).backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
