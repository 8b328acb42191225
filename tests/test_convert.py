"""Converting Mask2Former checkpoints (Hugging Face and detectron2 format) and proving our model computes
Mask2Former's outputs with them: Hugging Face's Mask2FormerForUniversalSegmentation with seeded random
weights is the reference (fp32, eval mode, all compared outputs within 1e-4)."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from mpformer_ray import storage  # noqa: E402
from mpformer_ray.config import apply_overrides, config_from_dict, load_config  # noqa: E402
from mpformer_ray.convert import ConvertError, convert  # noqa: E402
from mpformer_ray.convert.reference import compare, hf_model  # noqa: E402
from mpformer_ray.model import build_model  # noqa: E402
from mpformer_ray.train import (  # noqa: E402
    CheckpointStore,
    PreflightError,
    latest_checkpoint,
    load_checkpoint,
    preflight,
    train_loop,
)
from mpformer_ray.train.checkpoint import Checkpoint, CheckpointError, initial_weights  # noqa: E402
from test_eval_predict import _job_main  # noqa: E402 (jobs/ by path: a module name could be taken)


torch.set_num_threads(2)
ATOL = 1e-4
# r50: the small input; Swin: every stage larger than the 7-window (the backbone docstring's caveat)
SIZES = {"resnet50": (64, 96), "swin_t": (256, 256)}


def our_model(checkpoint: Checkpoint) -> torch.nn.Module:
    model = build_model(config_from_dict(checkpoint.config))
    model.load_state_dict(checkpoint.model)
    return model.eval()


@pytest.fixture(scope="module", params=["resnet50", "swin_t"])
def hf(request, tmp_path_factory) -> dict:
    """An HF model (r50 head: 133 classes, 100 queries, 6 encoder / 9 decoder layers) saved with
    save_pretrained, an input, and HF's model itself."""
    backbone = request.param
    model = hf_model(backbone, seed=0)
    path = tmp_path_factory.mktemp(f"hf-{backbone}")
    model.save_pretrained(path)
    images = torch.randn(1, 3, *SIZES[backbone], generator=torch.Generator().manual_seed(1))
    # the tensors as saved: the hub's layout (in memory, newer transformers name some Swin ones differently)
    saved = load_file(path / "model.safetensors")
    return {"backbone": backbone, "model": model, "path": str(path), "images": images, "saved": saved}


def test_hf_checkpoint_computes_mask2former_outputs(hf):
    conversion = convert("hf", hf["path"], load_config("r50"))
    ckpt = conversion.checkpoint
    m = ckpt.config["model"]
    assert (m["backbone"], m["num_classes"], m["num_queries"], m["dec_layers"], m["enc_layers"]) == (
        hf["backbone"], 133, 100, 9, 6)
    assert ckpt.classes[0] == {"id": 0, "name": "LABEL_0", "isthing": True}
    # every HF tensor is used or skipped by name, for a reason
    used = {name for names in conversion.sources.values() for name in names}
    assert used | set(conversion.skipped) == set(hf["saved"]) and not used & set(conversion.skipped)
    assert all(conversion.skipped.values())  # every skipped tensor has a reason
    assert "criterion.empty_weight" in conversion.skipped
    assert "pilot.label_embed.weight" in conversion.initialised  # r50 preset trains with the pilot
    diffs = compare(hf["model"], our_model(ckpt), hf["images"])
    print(f"{hf['backbone']} HF max abs diff:", json.dumps(diffs))
    assert max(diffs.values()) < ATOL, diffs


def hf_to_detectron2(hf_state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Rename HF Mask2Former tensors to the released detectron2 code's names (facebookresearch/Mask2Former:
    detectron2's ResNet, D2SwinTransformer, MSDeformAttnPixelDecoder, MultiScaleMaskedTransformerDecoder)."""
    renames = [
        (r"model\.pixel_level_module\.encoder\.embedder\.embedder\.convolution\.", "backbone.stem.conv1."),
        (r"model\.pixel_level_module\.encoder\.embedder\.embedder\.normalization\.", "backbone.stem.conv1.norm."),
        (r"model\.pixel_level_module\.encoder\.encoder\.stages\.(\d)\.layers\.(\d+)\.shortcut\.convolution\.",
         lambda m: f"backbone.res{int(m[1]) + 2}.{m[2]}.shortcut."),
        (r"model\.pixel_level_module\.encoder\.encoder\.stages\.(\d)\.layers\.(\d+)\.shortcut\.normalization\.",
         lambda m: f"backbone.res{int(m[1]) + 2}.{m[2]}.shortcut.norm."),
        (r"model\.pixel_level_module\.encoder\.encoder\.stages\.(\d)\.layers\.(\d+)\.layer\.(\d)\.convolution\.",
         lambda m: f"backbone.res{int(m[1]) + 2}.{m[2]}.conv{int(m[3]) + 1}."),
        (r"model\.pixel_level_module\.encoder\.encoder\.stages\.(\d)\.layers\.(\d+)\.layer\.(\d)\.normalization\.",
         lambda m: f"backbone.res{int(m[1]) + 2}.{m[2]}.conv{int(m[3]) + 1}.norm."),
        (r"model\.pixel_level_module\.encoder\.embeddings\.patch_embeddings\.projection\.", "backbone.patch_embed.proj."),
        (r"model\.pixel_level_module\.encoder\.embeddings\.norm\.", "backbone.patch_embed.norm."),
        (r"model\.pixel_level_module\.encoder\.encoder\.layers\.", "backbone.layers."),
        (r"model\.pixel_level_module\.encoder\.hidden_states_norms\.stage(\d)\.",
         lambda m: f"backbone.norm{int(m[1]) - 1}."),
        (r"\.layernorm_before\.", ".norm1."), (r"\.layernorm_after\.", ".norm2."),
        (r"\.attention\.output\.dense\.", ".attn.proj."), (r"\.attention\.self\.relative", ".attn.relative"),
        (r"\.intermediate\.dense\.", ".mlp.fc1."), (r"(blocks\.\d+)\.output\.dense\.", r"\1.mlp.fc2."),
        (r"model\.pixel_level_module\.decoder\.input_projections\.", "sem_seg_head.pixel_decoder.input_proj."),
        (r"model\.pixel_level_module\.decoder\.level_embed", "sem_seg_head.pixel_decoder.transformer.level_embed"),
        (r"model\.pixel_level_module\.decoder\.encoder\.", "sem_seg_head.pixel_decoder.transformer.encoder."),
        (r"(transformer\.encoder\.layers\.\d+)\.self_attn_layer_norm\.", r"\1.norm1."),
        (r"(transformer\.encoder\.layers\.\d+)\.fc(\d)\.", r"\1.linear\2."),
        (r"(transformer\.encoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm2."),
        (r"model\.pixel_level_module\.decoder\.mask_projection\.", "sem_seg_head.pixel_decoder.mask_features."),
        (r"model\.pixel_level_module\.decoder\.(adapter|layer)_1\.0\.", r"sem_seg_head.pixel_decoder.\1_1."),
        (r"model\.pixel_level_module\.decoder\.(adapter|layer)_1\.1\.", r"sem_seg_head.pixel_decoder.\1_1.norm."),
        (r"model\.transformer_module\.queries_embedder\.", "sem_seg_head.predictor.query_embed."),
        (r"model\.transformer_module\.queries_features\.", "sem_seg_head.predictor.query_feat."),
        (r"model\.transformer_module\.level_embed\.", "sem_seg_head.predictor.level_embed."),
        (r"model\.transformer_module\.decoder\.layernorm\.", "sem_seg_head.predictor.decoder_norm."),
        (r"model\.transformer_module\.decoder\.mask_predictor\.mask_embedder\.(\d)\.0\.",
         r"sem_seg_head.predictor.mask_embed.layers.\1."),
        (r"model\.transformer_module\.decoder\.layers\.(\d+)\.self_attn\.",
         r"sem_seg_head.predictor.transformer_self_attention_layers.\1.self_attn."),
        (r"model\.transformer_module\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.",
         r"sem_seg_head.predictor.transformer_self_attention_layers.\1.norm."),
        (r"model\.transformer_module\.decoder\.layers\.(\d+)\.cross_attn\.",
         r"sem_seg_head.predictor.transformer_cross_attention_layers.\1.multihead_attn."),
        (r"model\.transformer_module\.decoder\.layers\.(\d+)\.cross_attn_layer_norm\.",
         r"sem_seg_head.predictor.transformer_cross_attention_layers.\1.norm."),
        (r"model\.transformer_module\.decoder\.layers\.(\d+)\.fc(\d)\.",
         r"sem_seg_head.predictor.transformer_ffn_layers.\1.linear\2."),
        (r"model\.transformer_module\.decoder\.layers\.(\d+)\.final_layer_norm\.",
         r"sem_seg_head.predictor.transformer_ffn_layers.\1.norm."),
        (r"^class_predictor\.", "sem_seg_head.predictor.class_embed."),
    ]
    out: dict[str, torch.Tensor] = {}
    merged: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in hf_state.items():
        if name.endswith("num_batches_tracked") or ".swin.layernorm." in name:
            continue  # detectron2 has no BatchNorm counter and no Swin classification norm
        qkv = re.search(r"(?:attention\.self\.(query|key|value)|self_attn\.(q|k|v)_proj)\.(weight|bias)$", name)
        if qkv:
            part = "qkv".index((qkv[1] or qkv[2])[0])
            name = name[: qkv.start()] + ("attention.self.qkv." if qkv[1] else "self_attn.in_proj_") + qkv[3]
        for pattern, repl in renames:
            name = re.sub(pattern, repl, name)
        name = name.replace(".attention.self.qkv.", ".attn.qkv.")
        if qkv:
            merged.setdefault(name, {})[part] = tensor
        else:
            out[name] = tensor
    for name, parts in merged.items():
        out[name] = torch.cat([parts[i] for i in range(3)], 0)
    return {k: v.numpy() for k, v in out.items()}


def test_detectron2_checkpoint_computes_mask2former_outputs(hf, tmp_path):
    state = hf_to_detectron2(hf["saved"])
    assert all(k.startswith(("backbone.", "sem_seg_head.", "criterion.")) for k in state), sorted(state)[:5]
    path = tmp_path / "model_final.pkl"
    path.write_bytes(pickle.dumps({"model": state, "__author__": "test", "matching_heuristics": True}))
    conversion = convert("detectron2", str(path), load_config("r50"))
    # the r50 preset leaves the classes to the data: the checkpoint's come from the source
    assert conversion.derived == ["model.num_classes: 133 (config had None)"] + (
        [] if hf["backbone"] == "resnet50" else ["model.backbone: 'swin_t' (config had 'resnet50')"])
    diffs = compare(hf["model"], our_model(conversion.checkpoint), hf["images"])
    print(f"{hf['backbone']} detectron2 max abs diff:", json.dumps(diffs))
    assert max(diffs.values()) < ATOL, diffs


def test_mp_former_checkpoint_without_query_embed_and_with_label_enc(hf, tmp_path):
    """MP-Former's released decoder: no query_embed (zeros compute the same), a label_enc for the pilot."""
    if hf["backbone"] != "resnet50":
        pytest.skip("one backbone suffices: the decoder is the same")
    state = hf_to_detectron2(hf["saved"])
    del state["sem_seg_head.predictor.query_embed.weight"]
    label_enc = np.random.default_rng(0).normal(size=(133, 256)).astype(np.float32)
    state["sem_seg_head.predictor.label_enc.weight"] = label_enc
    path = tmp_path / "mp_former.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()}, "iteration": 368750}, path)
    conversion = convert("detectron2", str(path), load_config("r50"))
    assert "zeros" in conversion.initialised["predictor.query_embed.weight"]
    assert torch.equal(conversion.checkpoint.model["pilot.label_embed.weight"], torch.from_numpy(label_enc))
    query_pos = hf["model"].model.transformer_module.queries_embedder.weight
    kept = query_pos.detach().clone()
    with torch.no_grad():
        query_pos.zero_()
    try:
        diffs = compare(hf["model"], our_model(conversion.checkpoint), hf["images"])
    finally:
        with torch.no_grad():
            query_pos.copy_(kept)
    assert max(diffs.values()) < ATOL, diffs
    # with the pilot off, the label embedding is reported skipped, not dropped silently
    off = convert("detectron2", str(path), load_config("r50", ["model.pilot.enabled=false"]))
    assert "model.pilot.enabled=false" in off.skipped["sem_seg_head.predictor.label_enc.weight"]


def test_mismatches_name_the_tensor_and_the_fix(hf, tmp_path):
    if hf["backbone"] != "resnet50":
        pytest.skip("the checks do not depend on the backbone")
    state = hf_to_detectron2(hf["saved"])
    bad = dict(state, **{"sem_seg_head.predictor.mystery.weight": np.zeros(3, np.float32)})
    (tmp_path / "unknown.pkl").write_bytes(pickle.dumps({"model": bad}))
    with pytest.raises(ConvertError, match=r"sem_seg_head\.predictor\.mystery\.weight.*Fix: check --from"):
        convert("detectron2", str(tmp_path / "unknown.pkl"), load_config("r50"))
    # the sampling offsets' size depends on heads x points, which a detectron2 file does not state
    with pytest.raises(ConvertError, match=r"transformer\.encoder\.layers\.0\.self_attn\.sampling_offsets\.weight "
                                           r"\(192, 256\) -> .*model\.enc_n_points"):
        (tmp_path / "ok.pkl").write_bytes(pickle.dumps({"model": state}))
        convert("detectron2", str(tmp_path / "ok.pkl"), load_config("r50", ["model.enc_n_points=2"]))
    # a pickle that builds anything but arrays is refused before it runs
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"model": {"x": print}}))
    with pytest.raises(ConvertError, match="refusing to build builtins.print"):
        convert("detectron2", str(tmp_path / "evil.pkl"), load_config("r50"))
    with pytest.raises(ConvertError, match="no config.json"):
        convert("hf", str(tmp_path), load_config("r50"))


TINY = ["model.train_num_points=256", "data.crop_size=[64,64]", "data.test_short_side=64", "data.test_max_size=64",
        "data.synthetic.num_train=8", "data.synthetic.num_val=4", "data.synthetic.image_size=64",
        "train.batch_size=2", "train.workers=1", "train.eval_period=0", "train.max_iters=3",
        "train.checkpoint_period=3", "train.log_period=3", "run.name=from-m2f"]


def small_hf(path: Path) -> None:
    """A small HF Mask2Former (ResNet-18, the tiny preset's 6 classes) saved with save_pretrained."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig

    from mpformer_ray.convert.reference import randomise

    backbone = ResNetConfig(depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], layer_type="basic",
                            embedding_size=64, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, num_labels=6, num_queries=16, hidden_dim=64, feature_size=64,
                               mask_feature_size=64, num_attention_heads=4, dim_feedforward=128,
                               encoder_feedforward_dim=128, encoder_layers=1, decoder_layers=3)
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(config)
    randomise(model, 0)
    model.save_pretrained(path)


def test_converted_checkpoint_trains_with_the_pilot_and_evaluates(tmp_path, capsys):

    from mpformer_ray.data.pipeline import local_stream
    from mpformer_ray.data.synthetic import ensure_synthetic

    small_hf(tmp_path / "hf")
    cfg = load_config("tiny", TINY + [f"data.synthetic.root={tmp_path / 'synthetic'}",
                                      f"storage.uri={tmp_path / 'runs'}"])
    train_uri, val_uri = ensure_synthetic(cfg.data.synthetic)
    out = tmp_path / "m2f-r18.pth"
    overrides = [f"data.train={train_uri}", f"data.val={val_uri}", *TINY[:-1]]
    assert _job_main("convert_checkpoint")(["--from", "hf", "--src", str(tmp_path / "hf"), "--config", "tiny",
                                    "--out", str(out), "--classes", train_uri, "--set", *overrides]) == 0
    printed = capsys.readouterr().out
    assert "from the source: model.dec_layers: 2 (config had 3)" in printed
    assert "skipped: criterion.empty_weight:" in printed and f"wrote {out}" in printed
    converted = torch.load(out, weights_only=True)  # plain torch.load, as a user would

    # the converted checkpoint evaluates as it is
    assert _job_main("evaluate")(["--checkpoint", str(out), "--max-images", "2", "--device", "cpu"]) == 0
    assert "panoptic/PQ" in json.loads(capsys.readouterr().out)

    # a new run starts from it (pilot on: its label embedding is new) and trains
    run_cfg = config_from_dict(converted["config"])
    run_cfg.model.weights = str(out)
    assert run_cfg.model.pilot.enabled
    store = CheckpointStore(str(tmp_path / "runs" / "from-m2f"), keep=2)
    classes = json.loads(storage.read_bytes(storage.join(train_uri, "manifest.json")))["classes"]
    model = build_model(run_cfg)
    reports: list[dict] = []
    train_loop(model, lambda start: local_stream(train_uri, run_cfg, 2, start), run_cfg,
               reports.append, store, classes=classes)
    assert reports and all(np.isfinite(r["loss"]) for r in reports) and reports[-1]["loss_pilot"] > 0
    trained = load_checkpoint(latest_checkpoint(store.run_uri))
    assert trained.iteration == 3
    fresh = build_model(run_cfg).state_dict()
    key = "predictor.class_embed.weight"
    # three small AdamW steps from the converted weights, far from a fresh initialisation
    moved = (trained.model[key] - converted["model"][key]).abs().max()
    assert 0 < moved < 0.01 < (fresh[key] - converted["model"][key]).abs().max()
    assert _job_main("evaluate")(["--checkpoint", store.run_uri, "--max-images", "2", "--device", "cpu"]) == 0
    capsys.readouterr()

    # weights that do not fit the run's model are refused with the parameter and the fields to set, by the
    # training job's checks before any worker starts
    other = apply_overrides(run_cfg, ["model.num_queries=8", "run.name=misfit"])
    with pytest.raises(CheckpointError, match=r"predictor\.query_feat\.weight: checkpoint \(16, 64\), model "
                                              r"\(8, 64\).*model\.num_queries: checkpoint 16, config 8"):
        initial_weights(other)
    with pytest.raises(PreflightError, match=r"model\.weights: .*model\.num_queries: checkpoint 16, config 8"):
        preflight(other)
    assert preflight(apply_overrides(run_cfg, ["run.name=fits"])).resume_from is None


def test_convert_from_and_to_s3(moto_server, tmp_path, capsys):

    small_hf(tmp_path / "hf")
    src = f"s3://{moto_server['bucket']}/released/m2f-r18"
    for name in ("config.json", "model.safetensors"):
        storage.write_bytes(storage.join(src, name), (tmp_path / "hf" / name).read_bytes())
    out = f"s3://{moto_server['bucket']}/weights/m2f-r18.pth"
    assert _job_main("convert_checkpoint")(["--from", "hf", "--src", src, "--config", "tiny", "--out", out]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    cfg = config_from_dict(load_checkpoint(out).config)
    cfg.model.weights = out
    assert "predictor.class_embed.weight" in initial_weights(cfg)
    assert _job_main("convert_checkpoint")(["--from", "hf", "--src", src + "-missing", "--config", "tiny", "--out", out]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_resnet_with_the_stride_in_the_bottleneck_1x1_matches():
    """detectron2's MSRA-style ResNets (HF: downsample_in_bottleneck) stride in the 1x1 conv, not the 3x3:
    model.resnet_stride_in_1x1 computes that."""
    from transformers import ResNetBackbone as HFResNet
    from transformers import ResNetConfig

    from mpformer_ray.convert import hf as hf_format
    from mpformer_ray.convert.mapping import apply_rules
    from mpformer_ray.convert.reference import BACKBONES, STAGES, randomise
    from mpformer_ray.model.backbone import ResNetBackbone

    torch.manual_seed(0)
    reference = HFResNet(ResNetConfig(**BACKBONES["resnet50"][1], out_features=STAGES, downsample_in_bottleneck=True))
    randomise(reference, 0)
    source = {f"model.pixel_level_module.encoder.{k}": v for k, v in reference.state_dict().items()}
    mapped = apply_rules(source, hf_format.RULES, "hf resnet50")
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference.eval()(images).feature_maps
        for stride_in_1x1 in (True, False):
            ours = ResNetBackbone("resnet50", "frozen", stride_in_1x1=stride_in_1x1).eval()
            ours.load_state_dict({k.removeprefix("backbone."): v for k, v in mapped.state.items()})
            # relative: random BatchNorm statistics let a bare ResNet's activations grow to 1e4 by res5
            diff = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours(images).values(), expected))
            assert (diff < 1e-5) == stride_in_1x1, diff
