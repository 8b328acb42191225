"""detectron2-format Mask2Former / MP-Former checkpoints (the released ``model_final_*.pkl`` and training ``.pth``).

A ``.pkl`` is a pickle of ``{"model": {name: numpy array}, ...}`` (read with an unpickler that builds numpy
arrays and plain containers only, nothing else); a ``.pth`` is ``torch.save({"model": state_dict, ...})``
(read with ``weights_only=True``). Names are those of facebookresearch/Mask2Former (``backbone.*`` as
detectron2's ResNet or Mask2Former's D2SwinTransformer, ``sem_seg_head.pixel_decoder.*``,
``sem_seg_head.predictor.*``) and IDEA-Research/MP-Former, whose decoder has no ``query_embed`` and adds the
pilot label embedding ``label_enc``. A checkpoint holds no config: the architecture is read from the tensors'
names and shapes; what they do not say (attention heads, sampling points, the ResNet stride placement) comes
from ``--config`` and is checked by the shapes where they depend on it.
"""

from __future__ import annotations

import io
import pickle
import re
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mpformer_ray import storage
from mpformer_ray.convert.mapping import ConvertError, Rule, Skip

_WB = r"(weight|bias)"
_BN = r"(weight|bias|running_mean|running_var)"
_PD = r"sem_seg_head\.pixel_decoder\."
_PR = r"sem_seg_head\.predictor\."
_BLOCK = r"backbone\.layers\.(\d+)\.blocks\.(\d+)\."
_OUR_BLOCK = "backbone.features.{1*2+1}.{2}."

RULES: list[Rule] = [
    # detectron2 ResNet: stem.conv1 (+ .norm), res2..res5 blocks with conv1..3 (+ .norm) and a shortcut
    (r"backbone\.stem\.conv1\.weight", "backbone.conv1.weight"),
    (r"backbone\.stem\.conv1\.norm\." + _BN, "backbone.bn1.{1}"),
    (r"backbone\.res(\d)\.(\d+)\.conv(\d)\.weight", "backbone.layer{1-1}.{2}.conv{3}.weight"),
    (r"backbone\.res(\d)\.(\d+)\.conv(\d)\.norm\." + _BN, "backbone.layer{1-1}.{2}.bn{3}.{4}"),
    (r"backbone\.res(\d)\.(\d+)\.shortcut\.weight", "backbone.layer{1-1}.{2}.downsample.0.weight"),
    (r"backbone\.res(\d)\.(\d+)\.shortcut\.norm\." + _BN, "backbone.layer{1-1}.{2}.downsample.1.{3}"),
    # Mask2Former's D2SwinTransformer -> torchvision's features.{0: patch embed, 2i+1: stage i, 2i+2: merge}
    (r"backbone\.patch_embed\.proj\." + _WB, "backbone.features.0.0.{1}"),
    (r"backbone\.patch_embed\.norm\." + _WB, "backbone.features.0.2.{1}"),
    (_BLOCK + r"norm1\." + _WB, _OUR_BLOCK + "norm1.{3}"),
    (_BLOCK + r"norm2\." + _WB, _OUR_BLOCK + "norm2.{3}"),
    (_BLOCK + r"attn\.qkv\." + _WB, _OUR_BLOCK + "attn.qkv.{3}"),
    (_BLOCK + r"attn\.proj\." + _WB, _OUR_BLOCK + "attn.proj.{3}"),
    (_BLOCK + r"attn\.relative_position_bias_table", _OUR_BLOCK + "attn.relative_position_bias_table"),
    (_BLOCK + r"attn\.relative_position_index",
     Skip("index buffer, a function of the window size (rebuilt by the model)")),
    (_BLOCK + r"mlp\.fc1\." + _WB, _OUR_BLOCK + "mlp.0.{3}"),
    (_BLOCK + r"mlp\.fc2\." + _WB, _OUR_BLOCK + "mlp.3.{3}"),
    (r"backbone\.layers\.(\d+)\.downsample\.reduction\.weight", "backbone.features.{1*2+2}.reduction.weight"),
    (r"backbone\.layers\.(\d+)\.downsample\.norm\." + _WB, "backbone.features.{1*2+2}.norm.{2}"),
    (r"backbone\.norm(\d)\." + _WB, "backbone.out_norms.{1}.{2}"),
    (r"(?:pixel_mean|pixel_std)", Skip("input normalisation constants (the data pipeline normalises)")),
    # pixel decoder: the same names as ours below transformer.encoder
    (_PD + r"input_proj\.(\d+)\.(\d+)\." + _WB, "pixel_decoder.input_proj.{1}.{2}.{3}"),
    (_PD + r"transformer\.level_embed", "pixel_decoder.encoder.level_embed"),
    (_PD + r"transformer\.encoder\.layers\.(\d+)\.(.+)", "pixel_decoder.encoder.layers.{1}.{2}"),
    (_PD + r"mask_features\." + _WB, "pixel_decoder.mask_features.{1}"),
    (_PD + r"adapter_1\.weight", "pixel_decoder.lateral_convs.0.0.weight"),
    (_PD + r"adapter_1\.norm\." + _WB, "pixel_decoder.lateral_convs.0.1.{1}"),
    (_PD + r"layer_1\.weight", "pixel_decoder.output_convs.0.0.weight"),
    (_PD + r"layer_1\.norm\." + _WB, "pixel_decoder.output_convs.0.1.{1}"),
    # transformer decoder
    (_PR + r"transformer_self_attention_layers\.(\d+)\.self_attn\.(.+)", "predictor.self_attention_layers.{1}.attn.{2}"),
    (_PR + r"transformer_self_attention_layers\.(\d+)\.norm\." + _WB, "predictor.self_attention_layers.{1}.norm.{2}"),
    (_PR + r"transformer_cross_attention_layers\.(\d+)\.multihead_attn\.(.+)",
     "predictor.cross_attention_layers.{1}.attn.{2}"),
    (_PR + r"transformer_cross_attention_layers\.(\d+)\.norm\." + _WB, "predictor.cross_attention_layers.{1}.norm.{2}"),
    (_PR + r"transformer_ffn_layers\.(\d+)\.(linear1|linear2|norm)\." + _WB, "predictor.ffn_layers.{1}.{2}.{3}"),
    (_PR + r"(decoder_norm|class_embed)\." + _WB, "predictor.{1}.{2}"),
    (_PR + r"(query_feat|query_embed|level_embed)\.weight", "predictor.{1}.weight"),
    (_PR + r"input_proj\.(\d+)\." + _WB, "predictor.input_proj.{1}.{2}"),
    (_PR + r"mask_embed\.layers\.(\d+)\." + _WB, "predictor.mask_embed.layers.{1}.{2}"),
    (_PR + r"label_enc\.weight", "pilot.label_embed.weight"),
    (r"criterion\.empty_weight", Skip("loss weight, set by model.no_object_weight")),
]

_RESNET_DEPTHS = {(2, 2, 2, 2): "resnet18", (3, 4, 6, 3): "resnet50", (3, 4, 23, 3): "resnet101"}
_SWIN_SHAPES = {(96, (2, 2, 6, 2)): "swin_t", (96, (2, 2, 18, 2)): "swin_s", (128, (2, 2, 18, 2)): "swin_b"}
# what a released .pkl's pickle may build: numpy arrays, their dtypes and scalars, plain containers
_SAFE_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                 ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                 ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict")}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and containers; any other class is refused (a pickle can run any code)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to build {module}.{name}")


def read(src: str) -> dict[str, Tensor]:
    """name -> tensor of the ``.pkl`` / ``.pth`` file ``src`` (local or s3://): its ``model`` entry, or the
    whole file when it is a bare state dict."""
    if not storage.exists(src):
        raise ConvertError(f"--src {src} does not exist")
    data = storage.read_bytes(src)
    try:
        if src.endswith(".pkl"):
            obj = _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
        else:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # damaged or foreign files fail in many ways
        raise ConvertError(f"{src} cannot be read as a detectron2 checkpoint ({e}); a .pkl must hold numpy "
                           "arrays, a .pth must load with torch.load(weights_only=True)") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state:
        raise ConvertError(f"{src}: expected {{'model': {{name: array}}}}, got {type(obj).__name__}")
    out = {}
    for name, value in state.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, Tensor):
            raise ConvertError(f"{src}: model entry {name} is a {type(value).__name__}, not an array")
        out[name] = value
    return out


def _count(state: dict[str, Tensor], pattern: str) -> int:
    """Number of distinct values of ``pattern``'s first group among ``state``'s names."""
    regex = re.compile(pattern)
    return len({m.group(1) for k in state if (m := regex.match(k))})


def architecture(state: dict[str, Tensor], label: str) -> dict[str, Any]:
    """The ``model.*`` fields the tensors' names and shapes state."""
    def tensor(name: str) -> Tensor:
        if name not in state:
            raise ConvertError(f"{label}: no tensor {name}; not a Mask2Former / MP-Former checkpoint")
        return state[name]

    query_feat = tensor("sem_seg_head.predictor.query_feat.weight")
    fields: dict[str, Any] = {
        "num_classes": tensor("sem_seg_head.predictor.class_embed.weight").shape[0] - 1,
        "num_queries": query_feat.shape[0], "hidden_dim": query_feat.shape[1],
        "dec_layers": _count(state, r"sem_seg_head\.predictor\.transformer_cross_attention_layers\.(\d+)\."),
        "enc_layers": _count(state, r"sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\."),
        "dim_feedforward": tensor("sem_seg_head.predictor.transformer_ffn_layers.0.linear1.weight").shape[0],
        "enc_dim_feedforward": tensor(
            "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.linear1.weight").shape[0],
        "mask_dim": tensor("sem_seg_head.pixel_decoder.mask_features.weight").shape[0], "pretrained": None,
    }
    if "backbone.stem.conv1.weight" in state:
        depths = tuple(_count(state, rf"backbone\.res{r}\.(\d+)\.") for r in range(2, 6))
        name = _RESNET_DEPTHS.get(depths)
        if name is None:
            raise ConvertError(f"{label}: a ResNet with {depths} blocks per stage is none of "
                               f"{list(_RESNET_DEPTHS.values())}")
        fields.update(backbone=name, backbone_norm="frozen")
    elif "backbone.patch_embed.proj.weight" in state:
        embed = tensor("backbone.patch_embed.proj.weight").shape[0]
        depths = tuple(_count(state, rf"backbone\.layers\.{i}\.blocks\.(\d+)\.") for i in range(4))
        name = _SWIN_SHAPES.get((embed, depths))
        if name is None:
            raise ConvertError(f"{label}: a Swin with embed_dim={embed} and depths={list(depths)} is none of "
                               "Swin-T / S / B")
        table = tensor("backbone.layers.0.blocks.0.attn.relative_position_bias_table").shape[0]
        fields.update(backbone=name, swin_window=(round(table ** 0.5) + 1) // 2)
    else:
        raise ConvertError(f"{label}: neither a detectron2 ResNet (backbone.stem.*) nor a Swin "
                           "(backbone.patch_embed.*) backbone")
    return fields
