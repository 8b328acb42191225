"""Pilot queries: layout, self-attention mask, cross-attention masks and their noise, label noise."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mpformer_ray.model.pilot import PilotQueries, box_of, scale_noise, shift_noise

H = W = 64
Q = 5
SIZES = [(2, 2), (4, 4), (8, 8)]  # strides 32, 16, 8 of a 64 x 64 input


def random_targets(counts: list[int], seed: int = 0, num_classes: int = 7) -> list[dict[str, torch.Tensor]]:
    """Random rectangles (one per segment) with random labels."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for n in counts:
        masks = torch.zeros(n, H, W, dtype=torch.bool)
        for k in range(n):
            y0, x0 = torch.randint(0, H - 8, (2,), generator=g).tolist()
            h, w = torch.randint(3, 24, (2,), generator=g).tolist()
            masks[k, y0:y0 + h, x0:x0 + w] = True
        targets.append({"labels": torch.randint(0, num_classes, (n,), generator=g), "masks": masks})
    return targets


def make_pilot(groups: int = 3, noise: str = "none", ratio: float = 0.0, label_noise: float = 0.0,
               layers: int = 6, num_classes: int = 7) -> PilotQueries:
    return PilotQueries(num_classes=num_classes, hidden_dim=16, groups=groups, mask_noise=noise, noise_ratio=ratio,
                        label_noise=label_noise, piloted_layers=layers)


@pytest.mark.parametrize("counts", [[2, 0, 5], [0, 0]])
def test_layout_and_self_attention_mask(counts):
    g = 3
    targets = random_targets(counts)
    batch = make_pilot(groups=g)(targets, Q, (H, W))
    n_max = max(counts)
    p = g * n_max
    assert batch.content.shape == (len(counts), p, 16)
    assert batch.self_attn_mask.shape == (len(counts), Q + p, Q + p)
    for b, n in enumerate(counts):
        blocked = batch.self_attn_mask[b]
        # matching queries see each other and no pilot query
        assert not blocked[:Q, :Q].any()
        assert blocked[:Q, Q:].all()
        for gi in range(g):
            real = [Q + gi * n_max + j for j in range(n)]
            pad = [Q + gi * n_max + j for j in range(n, n_max)]
            others = [Q + k for k in range(p) if not gi * n_max <= k < (gi + 1) * n_max]
            assert batch.valid[b, [r - Q for r in real]].all() and not batch.valid[b, [x - Q for x in pad]].any()
            assert batch.target_index[b, [r - Q for r in real]].tolist() == list(range(n))
            assert torch.equal(batch.labels[b, [r - Q for r in real]], targets[b]["labels"])
            # a group (padding slots included, as in the released code) sees itself and the matching
            # queries, never another group
            own = real + pad
            assert not blocked[own][:, own].any()
            assert not blocked[own][:, :Q].any()
            assert blocked[own][:, others].all()
            for s in pad:
                assert not batch.content[b, s - Q].any()


def test_cross_attention_masks_without_noise_are_area_resized_gt():
    counts, g = [2, 0, 5], 3
    targets = random_targets(counts, seed=1)
    batch = make_pilot(groups=g, noise="none", layers=6)(targets, Q, (H, W))
    n_max = max(counts)
    for layer in range(6):
        size = SIZES[layer % 3]
        stride = H // size[0]
        got = batch.cross_attention_mask(layer, size)
        assert got.shape == (3, g * n_max, size[0] * size[1])
        for b, t in enumerate(targets):
            expected = F.max_pool2d(t["masks"].float()[:, None], stride)[:, 0].flatten(1) > 0  # [n, h*w]
            for gi in range(g):
                slots = got[b, gi * n_max: gi * n_max + counts[b]]
                assert torch.equal(slots, expected)
                assert not got[b, gi * n_max + counts[b]: (gi + 1) * n_max].any()


def test_only_the_first_k_layers_are_piloted():
    batch = make_pilot(layers=2)(random_targets([3]), Q, (H, W))
    assert batch.cross_attention_mask(0, SIZES[0]) is not None
    assert batch.cross_attention_mask(1, SIZES[1]) is not None
    assert batch.cross_attention_mask(2, SIZES[2]) is None
    assert batch.cross_attention_mask(5, SIZES[2]) is None


def test_point_noise_flips_about_ratio_times_area():
    torch.manual_seed(0)
    ratio, g = 0.3, 4
    targets = random_targets([6, 4], seed=2)
    clean = make_pilot(groups=g, noise="none")(targets, Q, (H, W)).cross_attention_mask(2, (8, 8))
    flips, expected = 0.0, 0.0
    draws = 200
    pilot = make_pilot(groups=g, noise="point", ratio=ratio)
    for _ in range(draws):
        noisy = pilot(targets, Q, (H, W)).cross_attention_mask(2, (8, 8))
        flips += (noisy ^ clean).sum().item()
        expected += ratio * clean.sum().item()
    assert flips == pytest.approx(expected, rel=0.05)
    # each layer draws its own point noise; groups draw independently
    batch = pilot(targets, Q, (H, W))
    assert not torch.equal(batch.cross_attention_mask(2, (8, 8)), batch.cross_attention_mask(2, (8, 8)))
    n_max = 6
    groups = batch.cross_attention_mask(2, (8, 8)).view(2, g, n_max, -1)
    assert not all(torch.equal(groups[:, 0], groups[:, k]) for k in range(1, g))


def test_label_noise_rate():
    torch.manual_seed(0)
    k, rate = 7, 0.3
    pilot = make_pilot(groups=2, label_noise=rate, num_classes=k)
    targets = random_targets([5, 3, 4], seed=3, num_classes=k)
    changed, total = 0, 0
    for _ in range(300):
        batch = pilot(targets, Q, (H, W))
        # recover the class each content vector embeds
        dist = torch.cdist(batch.content[batch.valid], pilot.label_embed.weight)
        used = dist.argmin(-1)
        assert torch.allclose(dist.min(-1).values, torch.zeros(()), atol=1e-5)
        changed += (used != batch.labels[batch.valid]).sum().item()
        total += used.numel()
    # a random replacement keeps the true class with probability 1/K
    expected = rate * (k - 1) / k
    sigma = math.sqrt(expected * (1 - expected) / total)
    assert abs(changed / total - expected) < 4 * sigma


def test_shift_and_scale_noise_stay_within_ratio():
    torch.manual_seed(0)
    masks = torch.zeros(200, H, W, dtype=torch.bool)
    masks[:, 20:40, 16:32] = True  # box 16 wide, 20 high, centre (23.5, 29.5)
    ratio = 0.25
    shifted = shift_noise(masks, ratio)
    cx, cy, bw, bh = box_of(shifted)
    assert torch.equal(bw, torch.full_like(bw, 16.0)) and torch.equal(bh, torch.full_like(bh, 20.0))
    assert ((cx - 23.5).abs() <= ratio * 16 + 1).all() and ((cy - 29.5).abs() <= ratio * 20 + 1).all()
    assert (cx - 23.5).abs().max() > 1  # it does move
    scaled = scale_noise(masks, ratio)
    cx, cy, bw, bh = box_of(scaled)
    assert ((bw >= 16 * (1 - ratio) - 1) & (bw <= 16 * (1 + ratio) + 1)).all()
    assert ((cx - 23.5).abs() <= 1).all() and ((cy - 29.5).abs() <= 1).all()
    assert bw.unique().numel() > 3
    assert torch.equal(shift_noise(masks, 0.0), masks)


def test_pilot_config_is_validated():
    with pytest.raises(ValueError, match="mask_noise"):
        make_pilot(noise="blur")


def released_reference(targets: list[dict[str, torch.Tensor]], num_queries: int, groups: int,
                       sizes: list[tuple[int, int]], num_layers: int, label_enc: torch.Tensor) -> dict:
    """The released MP-Former's pilot rules (IDEA-Research/MP-Former, mask2former_transformer_decoder.py,
    MultiScaleMaskedTransformerDecoderMaskDN with DN_MODE=points, ALL_LY_DN=True, label and point noise 0),
    restated in its own layout: pilot slots FIRST (``pad_size`` = groups * max_num), then the matching queries.

    Returns content [B, pad_size, C]; self_blocked bool [pad_size + Q, pad_size + Q] (``tgt_mask``);
    cross_blocked: per decoder layer bool [B, pad_size, h * w] of the pilot rows after the "a fully masked row
    attends everywhere" step; ce_targets int64 [B, pad_size] (K = no object) of the ``dn_out`` class loss."""
    b = len(targets)
    num_boxes = [len(t["labels"]) for t in targets]
    max_num = single_pad = max(num_boxes)
    pad_size = groups * max_num
    known_bid = torch.cat([torch.full((n,), i) for i, n in enumerate(num_boxes)]).repeat(groups)
    per_image = torch.cat([torch.arange(n) for n in num_boxes])
    map_known = torch.cat([per_image + single_pad * i for i in range(groups)])
    labels = torch.cat([t["labels"] for t in targets]).repeat(groups)

    content = torch.zeros(b, pad_size, label_enc.shape[1])
    content[known_bid, map_known] = label_enc[labels]

    tgt_mask = torch.zeros(pad_size + num_queries, pad_size + num_queries, dtype=torch.bool)
    tgt_mask[pad_size:, :pad_size] = True
    for i in range(groups):
        tgt_mask[single_pad * i:single_pad * (i + 1), single_pad * (i + 1):pad_size] = True
        tgt_mask[single_pad * i:single_pad * (i + 1), :single_pad * i] = True

    cross = []
    for layer in range(num_layers):
        size = sizes[layer % 3]
        padding_mask = torch.ones(b, pad_size, size[0] * size[1], dtype=torch.bool)
        masks = torch.cat([F.interpolate(t["masks"].float()[:, None], size=size, mode="area").flatten(1) <= 1e-8
                           for t in targets if len(t["masks"])]).repeat(groups, 1)
        padding_mask[known_bid, map_known] = masks
        padding_mask[padding_mask.all(-1)] = False
        cross.append(padding_mask)

    ce_targets = torch.full((b, pad_size), label_enc.shape[0], dtype=torch.int64)
    ce_targets[known_bid, map_known] = labels
    return {"content": content, "self_blocked": tgt_mask, "cross_blocked": cross, "ce_targets": ce_targets}


def test_decoder_matches_the_released_pilot_rules():
    """For a fixed batch (one image without segments), the pilot queries the model feeds its decoder layers
    (content, self-attention mask, every layer's cross-attention mask) and its pilot class loss equal an
    independent restatement of the released code's rules, after moving its pilot slots behind the matching
    queries."""
    from mpformer_ray.config import load_config, with_classes
    from mpformer_ray.data.synthetic import SYNTHETIC_CLASSES
    from mpformer_ray.model import build_model

    torch.manual_seed(0)
    g = 2
    cfg = with_classes(load_config("tiny", [
        "model.train_num_points=64", f"model.pilot.groups={g}", "model.pilot.mask_noise=point",
        "model.pilot.noise_ratio=0.0", "model.pilot.label_noise=0.0", "model.pilot.layers=all"]), SYNTHETIC_CLASSES)
    model = build_model(cfg).train()
    targets = random_targets([2, 0, 3], seed=4, num_classes=cfg.model.num_classes)
    images = torch.randn(3, 3, H, W, generator=torch.Generator().manual_seed(5))
    q, heads, layers = cfg.model.num_queries, cfg.model.nheads, cfg.model.dec_layers
    seen: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(model.predictor.cross_attention_layers):
        layer.register_forward_pre_hook(lambda mod, args, i=i: seen.update({f"tgt{i}": args[0], f"cross{i}": args[2]}))
    for i, layer in enumerate(model.predictor.self_attention_layers):
        layer.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(f"self{i}", args[1]))
    with torch.no_grad():
        out = model.forward_raw(images, targets)
        losses = model.criterion(out, targets)
        ref = released_reference(targets, q, g, SIZES, layers, model.pilot.label_embed.weight)

    pad_size = ref["content"].shape[1]
    # our index k -> the released index: matching queries come after its pad_size pilot slots
    order = torch.cat((torch.arange(q) + pad_size, torch.arange(pad_size)))
    torch.testing.assert_close(seen["tgt0"][:, q:], ref["content"], rtol=0, atol=0)
    for i in range(layers):
        self_blocked = torch.isinf(seen[f"self{i}"]).view(3, heads, q + pad_size, q + pad_size)
        assert torch.equal(self_blocked, ref["self_blocked"][order][:, order].expand(3, heads, -1, -1)), i
        cross_blocked = seen[f"cross{i}"].view(3, heads, q + pad_size, -1)[:, :, q:]
        assert torch.equal(cross_blocked, ref["cross_blocked"][i][:, None].expand(-1, heads, -1, -1)), i
    for suffix, logits in zip([f"_{i}" for i in range(layers)] + [""], out.logits[:, :, q:], strict=True):
        want = F.cross_entropy(logits.transpose(1, 2), ref["ce_targets"], model.criterion.empty_weight)
        torch.testing.assert_close(losses[f"loss_ce_pilot{suffix}"], want * cfg.model.class_weight)


def test_a_registered_noise_kind_is_a_config_choice_and_is_dispatched(monkeypatch):
    """MASK_NOISE is the one list of kinds: a kind registered there loads from a config and both of its
    steps run (``source`` once per forward, ``layer`` at each piloted layer); unregistered, it is refused."""
    from mpformer_ray.config import ConfigError, load_config, with_classes
    from mpformer_ray.data.synthetic import SYNTHETIC_CLASSES
    from mpformer_ray.model.pilot import MASK_NOISE, MaskNoise

    blank = MaskNoise(source=lambda masks, ratio: torch.zeros_like(masks), layer=lambda masks, ratio: ~masks)
    monkeypatch.setitem(MASK_NOISE, "blank", blank)
    cfg = with_classes(load_config("tiny", ["model.pilot.mask_noise=blank", "model.pilot.noise_ratio=0.5"]),
                       SYNTHETIC_CLASSES)
    batch = PilotQueries.from_config(cfg.model)(random_targets([2, 3]), Q, (H, W))
    assert batch.masks.shape[1] > 0 and not batch.masks.any()
    assert batch.cross_attention_mask(0, SIZES[0]).all()
    monkeypatch.undo()
    with pytest.raises(ConfigError, match=r"model\.pilot\.mask_noise: 'blank' is not one of \['none', 'point'"):
        load_config("tiny", ["model.pilot.mask_noise=blank"])


def test_readme_lists_the_registered_noise_kinds():
    from mpformer_ray.model.pilot import MASK_NOISE

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    row = re.search(r"`mask_noise` \(([^)]*)\)", readme)
    assert row is not None and re.findall(r"`(\w+)`", row.group(1)) == list(MASK_NOISE)
