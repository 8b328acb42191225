"""Hugging Face Mask2Former models in the released shapes with seeded random weights: the reference that the
conversion tests and ``benchmarks/convert_checkpoint.py`` compare our model with. Needs ``transformers``
(``pip install .[convert]``); builds everything from configs, downloads nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# transformers' backbone configs of the backbones Mask2Former's released checkpoints use
BACKBONES = {
    "resnet50": ("resnet", {"depths": [3, 4, 6, 3], "hidden_sizes": [256, 512, 1024, 2048],
                            "layer_type": "bottleneck", "embedding_size": 64}),
    "swin_t": ("swin", {"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24]}),
    "swin_s": ("swin", {"embed_dim": 96, "depths": [2, 2, 18, 2], "num_heads": [3, 6, 12, 24]}),
    "swin_b": ("swin", {"embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32]}),
}
STAGES = ["stage1", "stage2", "stage3", "stage4"]


def hf_model(backbone: str = "resnet50", num_classes: int = 133, num_queries: int = 100, dec_layers: int = 9,
             enc_layers: int = 6, window: int = 7, seed: int = 0) -> nn.Module:
    """A ``Mask2FormerForUniversalSegmentation`` in eval mode (r50 shape by default: 6 encoder layers,
    ``dec_layers`` decoder layers, i.e. HF's ``decoder_layers = dec_layers + 1``) with random weights
    (``randomise``)."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig, SwinConfig

    kind, spec = BACKBONES[backbone]
    if kind == "resnet":
        bb = ResNetConfig(**spec, out_features=STAGES)
    else:
        bb = SwinConfig(**spec, window_size=window, out_features=STAGES)
    config = Mask2FormerConfig(backbone_config=bb, num_labels=num_classes, num_queries=num_queries,
                               decoder_layers=dec_layers + 1, encoder_layers=enc_layers)
    torch.manual_seed(seed)
    model = Mask2FormerForUniversalSegmentation(config)
    randomise(model, seed)
    return model.eval()


@torch.no_grad()
def randomise(model: nn.Module, seed: int) -> None:
    """Perturb every weight (HF initialises many to zeros / ones, which would hide a mapping that swaps or
    drops them) and give every BatchNorm random statistics, keeping activations of order one."""
    gen = torch.Generator().manual_seed(seed)

    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0.0, 0.1, generator=gen)
            module.running_var.uniform_(0.5, 1.5, generator=gen)
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.dim() == 1:  # norms' scales around one
            p.uniform_(0.5, 1.5, generator=gen)
        else:
            p.add_(torch.empty_like(p).normal_(0.0, 0.02, generator=gen))


def semantic_scores(class_logits: Tensor, mask_logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Mask2Former's semantic inference from HF outputs: class_logits [B, Q, K+1], mask_logits [B, Q, h, w] ->
    [B, K, H, W] = sum over queries of softmax(classes)[:K] x sigmoid(masks upsampled bilinearly to ``size``)."""
    masks = torch.nn.functional.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)
    return torch.einsum("bqk,bqhw->bkhw", class_logits.softmax(-1)[..., :-1], masks.sigmoid())


@torch.no_grad()
def compare(reference: nn.Module, ours: nn.Module, images: Tensor) -> dict[str, float]:
    """Max absolute differences between the HF ``reference`` and ``ours`` (both in eval mode) on normalised
    ``images`` [B, 3, H, W] (H, W multiples of 32: ours pads, HF does not): final class / mask logits,
    the same over every earlier prediction (query init and layers 1..L-1), and the semantic scores."""
    ref = reference(pixel_values=images, output_auxiliary_logits=True)
    out = ours.forward_raw(images)
    # every prediction but the final one, query init first, as HF's auxiliary_logits
    aux_logits, aux_masks = out.logits[:-1, :, : out.num_queries], out.query_masks()[:-1]
    if len(aux_masks) != len(ref.auxiliary_logits):
        raise ValueError(f"{len(aux_masks)} intermediate predictions, HF has {len(ref.auxiliary_logits)}")
    sem = torch.stack([r["sem_seg"] for r in ours(images)])
    size = tuple(images.shape[-2:])

    def diff(a: Tensor, b: Tensor) -> float:
        if a.shape != b.shape:
            raise ValueError(f"shapes differ: ours {tuple(a.shape)}, HF {tuple(b.shape)}")
        return (a - b).abs().max().item()

    return {
        "class_logits": diff(out.pred_logits, ref.class_queries_logits),
        "mask_logits": diff(out.pred_masks, ref.masks_queries_logits),
        "aux_class_logits": max(diff(a, r["class_queries_logits"]) for a, r in zip(aux_logits, ref.auxiliary_logits)),
        "aux_mask_logits": max(diff(a, r["masks_queries_logits"]) for a, r in zip(aux_masks, ref.auxiliary_logits)),
        "sem_seg": diff(sem, semantic_scores(ref.class_queries_logits, ref.masks_queries_logits, size)),
    }
