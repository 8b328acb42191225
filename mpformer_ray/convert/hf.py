"""Hugging Face ``Mask2FormerForUniversalSegmentation`` checkpoints: a ``save_pretrained`` directory.

``config.json`` says the architecture (classes, queries, layers, widths, the backbone); ``model.safetensors``
or ``pytorch_model.bin`` (read with ``weights_only=True``) hold the tensors. Tensor names follow the layout
``save_pretrained`` writes and the hub's released checkpoints use; the names newer transformers versions use
in memory for Swin (``attention.q_proj``, ``swin.`` prefix) are accepted too.
"""

from __future__ import annotations

import io
import json
from typing import Any

import torch
from torch import Tensor

from mpformer_ray import storage
from mpformer_ray.convert.mapping import ConvertError, Part, Rule, Skip

_BB = r"(?:model\.)?pixel_level_module\.encoder\.(?:swin\.|model\.)?"
_PD = r"(?:model\.)?pixel_level_module\.decoder\."
_TM = r"(?:model\.)?transformer_module\."
_WB = r"(weight|bias)"
_BN = r"(weight|bias|running_mean|running_var)"
_BLOCK = _BB + r"encoder\.layers\.(\d+)\.blocks\.(\d+)\."
_OUR_BLOCK = "backbone.features.{1*2+1}.{2}."
_DEC = _TM + r"decoder\.layers\.(\d+)\."

RULES: list[Rule] = [
    # ResNet (transformers' ResNetBackbone): stem, then stages of blocks with layer.0/1/2 convs and a shortcut
    (_BB + r"embedder\.embedder\.convolution\.weight", "backbone.conv1.weight"),
    (_BB + r"embedder\.embedder\.normalization\." + _BN, "backbone.bn1.{1}"),
    (_BB + r".*num_batches_tracked", Skip("BatchNorm update counter (frozen BatchNorm does not use it)")),
    (_BB + r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.weight",
     "backbone.layer{1+1}.{2}.downsample.0.weight"),
    (_BB + r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\." + _BN,
     "backbone.layer{1+1}.{2}.downsample.1.{3}"),
    (_BB + r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.weight",
     "backbone.layer{1+1}.{2}.conv{3+1}.weight"),
    (_BB + r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\." + _BN,
     "backbone.layer{1+1}.{2}.bn{3+1}.{4}"),
    # Swin (transformers' SwinBackbone) -> torchvision's features.{0: patch embed, 2i+1: stage i, 2i+2: merge}
    (_BB + r"embeddings\.patch_embeddings\.projection\." + _WB, "backbone.features.0.0.{1}"),
    (_BB + r"embeddings\.norm\." + _WB, "backbone.features.0.2.{1}"),
    (_BLOCK + r"layernorm_before\." + _WB, _OUR_BLOCK + "norm1.{3}"),
    (_BLOCK + r"layernorm_after\." + _WB, _OUR_BLOCK + "norm2.{3}"),
    (_BLOCK + r"attention\.(?:self\.query|q_proj)\." + _WB, Part(_OUR_BLOCK + "attn.qkv.{3}", 0, 3)),
    (_BLOCK + r"attention\.(?:self\.key|k_proj)\." + _WB, Part(_OUR_BLOCK + "attn.qkv.{3}", 1, 3)),
    (_BLOCK + r"attention\.(?:self\.value|v_proj)\." + _WB, Part(_OUR_BLOCK + "attn.qkv.{3}", 2, 3)),
    (_BLOCK + r"attention\.(?:output\.dense|o_proj)\." + _WB, _OUR_BLOCK + "attn.proj.{3}"),
    (_BLOCK + r"attention\.(?:self|relative_position_bias)\.relative_position_bias_table",
     _OUR_BLOCK + "attn.relative_position_bias_table"),
    (_BLOCK + r"attention\.(?:self|relative_position_bias)\.relative_position_index",
     Skip("index buffer, a function of the window size (rebuilt by the model)")),
    (_BLOCK + r"(?:intermediate\.dense|mlp\.fc1)\." + _WB, _OUR_BLOCK + "mlp.0.{3}"),
    (_BLOCK + r"(?:output\.dense|mlp\.fc2)\." + _WB, _OUR_BLOCK + "mlp.3.{3}"),
    (_BB + r"encoder\.layers\.(\d+)\.downsample\.reduction\.weight", "backbone.features.{1*2+2}.reduction.weight"),
    (_BB + r"encoder\.layers\.(\d+)\.downsample\.norm\." + _WB, "backbone.features.{1*2+2}.norm.{2}"),
    (_BB + r"hidden_states_norms\.stage(\d+)\." + _WB, "backbone.out_norms.{1-1}.{2}"),
    (_BB + r"layernorm\." + _WB, Skip("Swin's classification norm after the last stage (Mask2Former uses "
                                      "the per-stage norms)")),
    # pixel decoder
    (_PD + r"level_embed", "pixel_decoder.encoder.level_embed"),
    (_PD + r"input_projections\.(\d+)\.(\d+)\." + _WB, "pixel_decoder.input_proj.{1}.{2}.{3}"),
    (_PD + r"encoder\.layers\.(\d+)\.self_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\." + _WB,
     "pixel_decoder.encoder.layers.{1}.self_attn.{2}.{3}"),
    (_PD + r"encoder\.layers\.(\d+)\.self_attn_layer_norm\." + _WB, "pixel_decoder.encoder.layers.{1}.norm1.{2}"),
    (_PD + r"encoder\.layers\.(\d+)\.fc1\." + _WB, "pixel_decoder.encoder.layers.{1}.linear1.{2}"),
    (_PD + r"encoder\.layers\.(\d+)\.fc2\." + _WB, "pixel_decoder.encoder.layers.{1}.linear2.{2}"),
    (_PD + r"encoder\.layers\.(\d+)\.final_layer_norm\." + _WB, "pixel_decoder.encoder.layers.{1}.norm2.{2}"),
    (_PD + r"mask_projection\." + _WB, "pixel_decoder.mask_features.{1}"),
    (_PD + r"adapter_1\.(\d+)\." + _WB, "pixel_decoder.lateral_convs.0.{1}.{2}"),
    (_PD + r"layer_1\.(\d+)\." + _WB, "pixel_decoder.output_convs.0.{1}.{2}"),
    # transformer decoder
    (_TM + r"queries_embedder\.weight", "predictor.query_embed.weight"),
    (_TM + r"queries_features\.weight", "predictor.query_feat.weight"),
    (_TM + r"level_embed\.weight", "predictor.level_embed.weight"),
    (_TM + r"input_projections\.(\d+)\." + _WB, "predictor.input_proj.{1}.{2}"),
    (_DEC + r"self_attn\.q_proj\." + _WB, Part("predictor.self_attention_layers.{1}.attn.in_proj_{2}", 0, 3)),
    (_DEC + r"self_attn\.k_proj\." + _WB, Part("predictor.self_attention_layers.{1}.attn.in_proj_{2}", 1, 3)),
    (_DEC + r"self_attn\.v_proj\." + _WB, Part("predictor.self_attention_layers.{1}.attn.in_proj_{2}", 2, 3)),
    (_DEC + r"self_attn\.out_proj\." + _WB, "predictor.self_attention_layers.{1}.attn.out_proj.{2}"),
    (_DEC + r"self_attn_layer_norm\." + _WB, "predictor.self_attention_layers.{1}.norm.{2}"),
    (_DEC + r"cross_attn\.in_proj_" + _WB, "predictor.cross_attention_layers.{1}.attn.in_proj_{2}"),
    (_DEC + r"cross_attn\.out_proj\." + _WB, "predictor.cross_attention_layers.{1}.attn.out_proj.{2}"),
    (_DEC + r"cross_attn_layer_norm\." + _WB, "predictor.cross_attention_layers.{1}.norm.{2}"),
    (_DEC + r"fc1\." + _WB, "predictor.ffn_layers.{1}.linear1.{2}"),
    (_DEC + r"fc2\." + _WB, "predictor.ffn_layers.{1}.linear2.{2}"),
    (_DEC + r"final_layer_norm\." + _WB, "predictor.ffn_layers.{1}.norm.{2}"),
    (_TM + r"decoder\.layernorm\." + _WB, "predictor.decoder_norm.{1}"),
    (_TM + r"decoder\.mask_predictor\.mask_embedder\.(\d+)\.0\." + _WB, "predictor.mask_embed.layers.{1}.{2}"),
    (r"class_predictor\." + _WB, "predictor.class_embed.{1}"),
    (r"criterion\.empty_weight", Skip("loss weight, set by model.no_object_weight")),
]

_RESNET_DEPTHS = {(2, 2, 2, 2): "resnet18", (3, 4, 6, 3): "resnet50", (3, 4, 23, 3): "resnet101"}
_SWIN_SHAPES = {(96, (2, 2, 6, 2)): "swin_t", (96, (2, 2, 18, 2)): "swin_s", (128, (2, 2, 18, 2)): "swin_b"}


def read(src: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config.json as a dict, name -> tensor) of the ``save_pretrained`` directory ``src`` (local or s3://)."""
    config_uri = storage.join(src, "config.json")
    if not storage.exists(config_uri):
        raise ConvertError(f"--src {src}: no config.json there; --from hf takes a directory written by "
                           "Mask2FormerForUniversalSegmentation.save_pretrained")
    try:
        config = json.loads(storage.read_bytes(config_uri))
    except ValueError as e:
        raise ConvertError(f"{config_uri} is not valid JSON: {e}") from None
    for name in ("model.safetensors", "pytorch_model.bin"):
        uri = storage.join(src, name)
        if not storage.exists(uri):
            continue
        data = storage.read_bytes(uri)
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load as load_safetensors

                return config, load_safetensors(data)
            return config, torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # damaged files fail in many ways
            raise ConvertError(f"{uri} cannot be read ({e}): the file is damaged or not a checkpoint") from None
    raise ConvertError(f"--src {src}: neither model.safetensors nor pytorch_model.bin is there (sharded "
                       "checkpoints are not supported: save_pretrained(..., max_shard_size='10GB') writes one file)")


def architecture(config: dict[str, Any], label: str) -> dict[str, Any]:
    """The ``model.*`` fields ``config.json`` states. ConvertError naming the field and fix where it describes
    something our model does not compute."""
    if config.get("model_type") != "mask2former":
        raise ConvertError(f"{label}: model_type is {config.get('model_type')!r}, not 'mask2former'")
    checks = {"pre_norm": False, "enforce_input_projection": False, "common_stride": 4,
              "activation_function": "relu", "feature_strides": [4, 8, 16, 32]}
    for key, value in checks.items():
        if key in config and (list(config[key]) if isinstance(value, list) else config[key]) != value:
            raise ConvertError(f"{label}: {key}={config[key]!r}, but the model here is built for {key}={value!r} "
                               "(Mask2Former's released setting); such a checkpoint cannot be converted")
    if config.get("feature_size", 256) != config.get("hidden_dim", 256):
        raise ConvertError(f"{label}: feature_size={config['feature_size']} differs from hidden_dim="
                           f"{config['hidden_dim']}; the pixel decoder here is model.hidden_dim wide")
    bb = config.get("backbone_config") or {}
    fields: dict[str, Any] = {
        "num_classes": len(config["id2label"]) if config.get("id2label") else config["num_labels"],
        "num_queries": config.get("num_queries", 100), "hidden_dim": config.get("hidden_dim", 256),
        "nheads": config.get("num_attention_heads", 8), "dim_feedforward": config.get("dim_feedforward", 2048),
        "dec_layers": config.get("decoder_layers", 10) - 1, "enc_layers": config.get("encoder_layers", 6),
        "enc_dim_feedforward": config.get("encoder_feedforward_dim", 1024),
        "mask_dim": config.get("mask_feature_size", 256), "pretrained": None,
    }
    kind = bb.get("model_type")
    if kind == "resnet":
        name = _RESNET_DEPTHS.get(tuple(bb.get("depths", ())))
        if name is None or bb.get("layer_type", "bottleneck") != ("basic" if name == "resnet18" else "bottleneck"):
            raise ConvertError(f"{label}: backbone_config depths={bb.get('depths')} layer_type={bb.get('layer_type')} "
                               f"is none of {list(_RESNET_DEPTHS.values())}")
        fields.update(backbone=name, backbone_norm="frozen",
                      resnet_stride_in_1x1=bool(bb.get("downsample_in_bottleneck", False)))
        if bb.get("downsample_in_first_stage"):
            raise ConvertError(f"{label}: backbone_config.downsample_in_first_stage=true has no torchvision ResNet")
    elif kind == "swin":
        name = _SWIN_SHAPES.get((bb.get("embed_dim"), tuple(bb.get("depths", ()))))
        if name is None:
            raise ConvertError(f"{label}: backbone_config embed_dim={bb.get('embed_dim')} depths={bb.get('depths')} "
                               "is none of Swin-T / S / B")
        for key, value in (("patch_size", 4), ("mlp_ratio", 4.0), ("qkv_bias", True),
                           ("use_absolute_embeddings", False)):
            if bb.get(key, value) != value:
                raise ConvertError(f"{label}: backbone_config.{key}={bb[key]!r}; the Swin here has {key}={value!r}")
        fields.update(backbone=name, swin_window=bb.get("window_size", 7))
    else:
        raise ConvertError(f"{label}: backbone_config.model_type={kind!r}; ResNet and Swin backbones convert")
    return fields


def class_names(config: dict[str, Any]) -> list[str] | None:
    """The class names ``config.json``'s id2label gives, in id order (None without one)."""
    labels = config.get("id2label")
    return [labels[k] for k in sorted(labels, key=int)] if labels else None
