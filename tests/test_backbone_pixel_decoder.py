"""Backbones, deformable attention and the pixel decoder (fast, CPU)."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from mpformer_ray.config import load_config, with_classes
from mpformer_ray.data.synthetic import SYNTHETIC_CLASSES
from mpformer_ray.model import build_model
from mpformer_ray.model.backbone import build_backbone, group_norm
from mpformer_ray.model.ms_deform_attn import MSDeformAttn, ms_deform_attn
from mpformer_ray.model.pixel_decoder import MSDeformAttnPixelDecoder
from mpformer_ray.model.position_encoding import PositionEmbeddingSine

torch.set_num_threads(1)


def _bilinear_zero_pad(img: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """img [D, h, w]; (x, y) in [0, 1] with align_corners=False; zeros outside. Returns [D]."""
    _, h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(img.shape[0], dtype=img.dtype)
    for yy in (y0, y0 + 1):
        for xx in (x0, x0 + 1):
            weight = (1 - abs(px - xx)) * (1 - abs(py - yy))
            if 0 <= xx < w and 0 <= yy < h:
                out += weight * img[:, yy, xx]
    return out


def _naive_ms_deform_attn(value, shapes, locations, weights):
    b, _, n_heads, head_dim = value.shape
    _, n_queries, _, n_levels, n_points, _ = locations.shape
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(b, n_queries, n_heads, head_dim, dtype=value.dtype)
    for bi in range(b):
        for q in range(n_queries):
            for hd in range(n_heads):
                for lvl, (h, w) in enumerate(shapes):
                    img = value[bi, starts[lvl]:starts[lvl] + h * w, hd].T.reshape(head_dim, h, w)
                    for p in range(n_points):
                        x, y = locations[bi, q, hd, lvl, p].tolist()
                        out[bi, q, hd] += weights[bi, q, hd, lvl, p] * _bilinear_zero_pad(img, x, y)
    return out.reshape(b, n_queries, n_heads * head_dim)


def test_ms_deform_attn_matches_naive_bilinear_reference():
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 7), (3, 4), (2, 3)]
    b, n_queries, n_heads, head_dim, n_points = 2, 6, 3, 4, 3
    s = sum(h * w for h, w in shapes)
    value = torch.randn(b, s, n_heads, head_dim, generator=g, dtype=torch.float64)
    # a spread from well outside to well inside, so border and out-of-map samples are exercised
    locations = torch.rand(b, n_queries, n_heads, len(shapes), n_points, 2, generator=g, dtype=torch.float64)
    locations = locations * 1.8 - 0.4
    locations[0, 0, 0, :, 0] = torch.tensor([0.0, 0.0], dtype=torch.float64)
    locations[0, 0, 0, :, 1] = torch.tensor([1.0, 0.999], dtype=torch.float64)
    locations[0, 0, 0, :, 2] = torch.tensor([-0.05, 1.04], dtype=torch.float64)
    weights = torch.rand(b, n_queries, n_heads, len(shapes), n_points, generator=g, dtype=torch.float64)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    level_start_index = torch.tensor([0, 35, 47], dtype=torch.long)
    got = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
    want = _naive_ms_deform_attn(value, shapes, locations, weights)
    assert got.shape == (b, n_queries, n_heads * head_dim) and got.dtype == torch.float64
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    # points more than half a pixel beyond the border read only zeros; make sure some exist on both sides
    assert (locations < -0.5 / 3).any() and (locations > 1 + 0.5 / 3).any()


def test_ms_deform_attn_module_under_bf16_autocast():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2)
    shapes = torch.tensor([[4, 6], [2, 3]])
    src = torch.randn(2, 30, 32)
    ref = torch.rand(2, 30, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(src, ref, src, shapes, torch.tensor([0, 24]))
    assert out.shape == (2, 30, 32) and torch.isfinite(out.float()).all()


def test_position_embedding_sine():
    pe = PositionEmbeddingSine(8)(torch.zeros(2, 3, 4, 5))
    assert pe.shape == (2, 16, 4, 5)
    # channel 0 is sin(2*pi*y/H) of the row index y = 1..H, constant along x
    rows = torch.sin(torch.arange(1, 5, dtype=torch.float32) / (4 + 1e-6) * 2 * math.pi)
    assert torch.allclose(pe[0, 0], rows[:, None].expand(4, 5), atol=1e-6)
    cols = torch.cos(torch.arange(1, 6) / (5 + 1e-6) * 2 * math.pi)  # channel F + 1 is cos of the column index
    assert torch.allclose(pe[1, 8 + 1], cols.expand(4, 5), atol=1e-6)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "swin_t"])
def test_backbone_strides_and_channels(backbone):
    cfg = load_config("tiny", [f"model.backbone={backbone}"]).model
    torch.manual_seed(0)
    net = build_backbone(cfg).eval()
    with torch.no_grad():
        feats = net(torch.randn(1, 3, 64, 96))
    assert list(feats) == ["res2", "res3", "res4", "res5"]
    for i, (name, f) in enumerate(feats.items()):
        stride = 4 * 2 ** i
        assert f.shape == (1, net.out_channels[name], 64 // stride, 96 // stride), name
    assert not any(n.startswith(("fc.", "head.")) for n, _ in net.named_parameters())


def test_backbone_norms():
    frozen = build_backbone(load_config("r50").model)
    assert isinstance(frozen.bn1, torchvision.ops.FrozenBatchNorm2d)
    assert all(p.requires_grad for p in frozen.parameters())  # no pretrained weights: nothing frozen
    group = build_backbone(load_config("tiny").model)
    assert isinstance(group.bn1, torch.nn.GroupNorm) and group.bn1.num_groups == 32


def test_r50_parameter_counts():
    cfg = load_config("r50").model
    backbone = build_backbone(cfg)
    n_backbone = sum(p.numel() for p in backbone.parameters())
    assert abs(n_backbone - 23.5e6) / 23.5e6 < 0.01, n_backbone
    n_decoder = sum(p.numel() for p in MSDeformAttnPixelDecoder(cfg, backbone.out_channels).parameters())
    assert 5.6e6 <= n_decoder <= 6.1e6, n_decoder


def test_pixel_decoder_shapes_and_gradients():
    torch.manual_seed(0)
    cfg = load_config("tiny").model
    in_channels = {"res2": 16, "res3": 24, "res4": 40, "res5": 48}
    decoder = MSDeformAttnPixelDecoder(cfg, in_channels)
    h, w = 128, 96
    feats = {f"res{i + 2}": torch.randn(2, c, h // 2 ** (i + 2), w // 2 ** (i + 2))
             for i, c in enumerate(in_channels.values())}
    # zero-initialised offset / weight projections would hide the query (and level_embed) path: perturb them
    with torch.no_grad():
        for layer in decoder.encoder.layers:
            layer.self_attn.sampling_offsets.weight.normal_(std=0.1)
            layer.self_attn.attention_weights.weight.normal_(std=0.1)
    mask_features, multi_scale = decoder(feats)
    assert mask_features.shape == (2, cfg.mask_dim, h // 4, w // 4)
    assert [tuple(x.shape) for x in multi_scale] == [(2, cfg.hidden_dim, h // s, w // s) for s in (32, 16, 8)]
    (mask_features.square().mean() + sum(x.square().mean() for x in multi_scale)).backward()
    no_grad = [n for n, p in decoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, no_grad


def test_group_norm_runs_in_fp32_under_bf16_autocast():
    # res5 of resnet18 at a 64x32 image: each of the 32 groups averages 16 channels x 2 pixels
    norm = group_norm(512)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.normal_(generator=g)
        norm.bias.normal_(generator=g)
    x = torch.randn(1, 512, 2, 1, generator=g).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    want = torch.nn.functional.group_norm(x.float(), 32, norm.weight, norm.bias, norm.eps)
    assert y.dtype == torch.float32 and torch.equal(y, want)


@pytest.mark.parametrize("hw", [(64, 32), (32, 32), (20, 90), (128, 96)])
def test_tiny_model_stays_finite_under_bf16_autocast(hw):
    """Every map of the backbone, pixel decoder and decoder stays finite under bf16 autocast, down to the
    1x1 / 2x1 res5 of the smallest inputs (padded to model.size_divisibility), for several initialisations."""
    cfg = with_classes(load_config("tiny"), SYNTHETIC_CLASSES)
    for seed in range(6):
        torch.manual_seed(seed)
        model = build_model(cfg).eval()
        images, _ = model.pad(torch.randn(1, 3, *hw))
        # oneDNN's bf16 convolutions on AMX CPUs (torch 2.14.1) return NaN in res5 once a second model has
        # been built in the process (same seed and input: finite on the first build, NaN on the next; always
        # finite with oneDNN off): a CPU-library defect, not the model arithmetic checked here
        with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False), torch.autocast("cpu", dtype=torch.bfloat16):
            feats = model.backbone(images)
            mask_features, multi_scale = model.pixel_decoder(feats)
            raw = model.decode_features(mask_features, multi_scale, None, tuple(images.shape[-2:]))
        maps = {**feats, "mask_features": mask_features, **{f"multi_scale[{i}]": m for i, m in enumerate(multi_scale)},
                "logits": raw.logits, **{f"masks[{i}]": m for i, m in enumerate(raw.masks)}}
        bad = [name for name, m in maps.items() if not torch.isfinite(m.float()).all()]
        assert not bad, f"seed {seed}, input {hw} (padded {tuple(images.shape[-2:])}): non-finite {bad}"


def test_load_pretrained_resnet18_from_local_file(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    cfg = load_config("tiny", [f"model.pretrained={path}", "model.backbone_norm=frozen"]).model
    backbone = build_backbone(cfg)
    assert torch.equal(backbone.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    assert torch.equal(backbone.layer1[0].bn1.running_var, reference.layer1[0].bn1.running_var)
    assert not backbone.conv1.weight.requires_grad and backbone.layer1[0].conv1.weight.requires_grad

    bad = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), bad)
    cfg = load_config("tiny", [f"model.pretrained={bad}", "model.backbone_norm=frozen"]).model
    with pytest.raises(ValueError, match=str(bad)):
        build_backbone(cfg)

    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in reference.state_dict().items() if not k.startswith("layer4.")}, partial)
    cfg = load_config("tiny", [f"model.pretrained={partial}", "model.backbone_norm=frozen"]).model
    with pytest.raises(ValueError, match=f"{partial}.*missing keys.*layer4"):
        build_backbone(cfg)


def test_load_pretrained_from_s3(moto_server):
    import io

    from mpformer_ray import storage

    reference = torchvision.models.resnet18(weights=None)
    buf = io.BytesIO()
    torch.save(reference.state_dict(), buf)
    uri = f"s3://{moto_server['bucket']}/weights/resnet18.pth"
    storage.write_bytes(uri, buf.getvalue())
    backbone = build_backbone(load_config("tiny", [f"model.pretrained={uri}", "model.backbone_norm=frozen"]).model)
    assert torch.equal(backbone.layer4[0].downsample[0].weight, reference.layer4[0].downsample[0].weight)
    missing = f"s3://{moto_server['bucket']}/weights/nothing.pth"
    with pytest.raises(storage.StorageError, match=missing):
        build_backbone(load_config("tiny", [f"model.pretrained={missing}", "model.backbone_norm=frozen"]).model)
