"""Mask2Former's multi-scale masked-attention transformer decoder, with optional pilot queries.

``num_queries`` learned query features plus a learned query positional embedding (``query_embed``) go
through ``dec_layers`` layers that visit the pixel decoder's three scales round-robin (strides 32, 16, 8).
Each layer is masked cross-attention -> self-attention -> FFN, post-norm as in Mask2Former. A query may
only attend to the cells where its previous prediction has sigmoid >= 0.5 (a row with no such cell
attends everywhere). Heads after the query init and after every layer predict class logits [K+1] and
masks (mask embedding . mask features).

Decision on positional embeddings: we KEEP Mask2Former's ``query_embed`` for the matching queries, so
the matching queries and inference are exactly Mask2Former's. Pilot queries (training only, appended
after the matching ones) get a ZERO positional embedding; their cross-attention masks in piloted layers
come from the ground truth instead of their previous prediction (see ``pilot.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpformer_ray.config import ModelConfig
from mpformer_ray.model.pilot import PilotBatch
from mpformer_ray.model.position_encoding import PositionEmbeddingSine

NUM_LEVELS = 3


@dataclass
class DecoderOutput:
    """What the decoder hands to the criterion, the post-processing and the diagnostics, for one batch
    of B images with L = dec_layers + 1 predictions (query init first, the final one last) of
    T = Q + P queries (the Q matching queries, then the P pilot slots; P = 0 without the pilot).

    logits:        [L, B, T, K+1] class logits
    embeds:        [L, B, T, mask_dim] mask embeddings: the only path the mask losses train
    masks:         L x [B, T, H/4, W/4] mask logits (embeds . mask_features), without gradient,
                   channels-last strides
    mask_features: [B, mask_dim, H/4, W/4], the decoder's input
    num_queries:   Q
    pilot:         the batch's pilot queries (their ``labels`` / ``target_index`` / ``valid`` [B, P] say
                   which segment each slot reconstructs), None when no pilot slot was decoded
    """

    logits: Tensor
    embeds: Tensor
    masks: list[Tensor]
    mask_features: Tensor
    num_queries: int
    pilot: PilotBatch | None = None

    @property
    def num_predictions(self) -> int:
        return self.logits.shape[0]

    @property
    def pred_logits(self) -> Tensor:
        """The final prediction's class logits of the matching queries: [B, Q, K+1]."""
        return self.logits[-1, :, : self.num_queries]

    @property
    def pred_masks(self) -> Tensor:
        """The final prediction's mask logits of the matching queries: [B, Q, H/4, W/4]."""
        return self.masks[-1][:, : self.num_queries]

    def query_masks(self) -> list[Tensor]:
        """Every prediction's mask logits of the matching queries: L x [B, Q, H/4, W/4]."""
        return [m[:, : self.num_queries] for m in self.masks]

    def pilot_masks(self) -> list[Tensor]:
        """Every prediction's mask logits of the pilot slots: L x [B, P, H/4, W/4]."""
        return [m[:, self.num_queries:] for m in self.masks]


def _xavier_init(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class CrossAttentionLayer(nn.Module):
    """Queries attend to one feature level; post-norm."""

    def __init__(self, d_model: int, nhead: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        _xavier_init(self)

    def forward(self, tgt: Tensor, memory: Tensor, attn_mask: Tensor | None, pos: Tensor, query_pos: Tensor) -> Tensor:
        """tgt, query_pos: [B, T, C]; memory, pos: [B, S, C]; attn_mask: bool [B * nhead, T, S], True = blocked."""
        out = self.attn(tgt + query_pos, memory + pos, memory, attn_mask=attn_mask, need_weights=False)[0]
        return self.norm(tgt + self.dropout(out))


class SelfAttentionLayer(nn.Module):
    """Queries attend to each other; post-norm."""

    def __init__(self, d_model: int, nhead: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        _xavier_init(self)

    def forward(self, tgt: Tensor, attn_mask: Tensor | None, query_pos: Tensor) -> Tensor:
        """tgt, query_pos: [B, T, C]; attn_mask: [B * nhead, T, T], additive float (-inf = blocked) or
        bool (True = blocked)."""
        q = k = tgt + query_pos
        out = self.attn(q, k, tgt, attn_mask=attn_mask, need_weights=False)[0]
        return self.norm(tgt + self.dropout(out))


class FFNLayer(nn.Module):
    """Linear -> ReLU -> Linear with a residual; post-norm."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        _xavier_init(self)

    def forward(self, tgt: Tensor) -> Tensor:
        out = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm(tgt + self.dropout(out))


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MultiScaleMaskedTransformerDecoder(nn.Module):
    """Mask2Former's decoder; ``forward`` also runs a batch's pilot queries when given one."""

    def __init__(self, cfg: ModelConfig, in_channels: int):
        super().__init__()
        d, nhead = cfg.hidden_dim, cfg.nheads
        self.num_heads = nhead
        self.num_layers = cfg.dec_layers
        self.num_queries = cfg.num_queries
        self.pe_layer = PositionEmbeddingSine(d // 2, normalize=True)
        self.cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(d, nhead, cfg.dropout) for _ in range(cfg.dec_layers))
        self.self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(d, nhead, cfg.dropout) for _ in range(cfg.dec_layers))
        self.ffn_layers = nn.ModuleList(FFNLayer(d, cfg.dim_feedforward, cfg.dropout) for _ in range(cfg.dec_layers))
        self.decoder_norm = nn.LayerNorm(d)
        self.query_feat = nn.Embedding(cfg.num_queries, d)
        self.query_embed = nn.Embedding(cfg.num_queries, d)
        self.level_embed = nn.Embedding(NUM_LEVELS, d)
        self.input_proj = nn.ModuleList()
        for _ in range(NUM_LEVELS):
            if in_channels != d:
                proj = nn.Conv2d(in_channels, d, kernel_size=1)
                nn.init.kaiming_uniform_(proj.weight, a=1)
                nn.init.constant_(proj.bias, 0)
                self.input_proj.append(proj)
            else:
                self.input_proj.append(nn.Identity())
        self.class_embed = nn.Linear(d, cfg.num_classes + 1)
        self.mask_embed = MLP(d, d, cfg.mask_dim, 3)

    def prediction_heads(self, output: Tensor, mask_features: Tensor, attn_size: tuple[int, int]
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """output [B, T, C], mask_features [B, D, H, W] -> class logits [B, T, K+1], mask logits [B, T, H, W]
        (no gradient; channels-last strides), mask embeddings [B, T, D] and the next layer's attention mask
        bool [B, T, h * w] at ``attn_size`` (True = blocked).

        The full mask logits only feed matching, attention masks and inference; the losses supervise a
        few matched / pilot queries, whose masks the criterion recomputes from the embeddings with
        gradient (``SetCriterion.mask_losses``). Backpropagating through every query's full-resolution
        mask instead costs a [B, T, H, W] gradient per decoder layer that is zero outside the matched
        queries.
        """
        decoded = self.decoder_norm(output)
        logits = self.class_embed(decoded)
        embed = self.mask_embed(decoded)
        with torch.no_grad():
            # computed as [B, H*W, T] and viewed as channels-last [B, T, H, W] (the mask features come
            # channels-last from the pixel decoder): resizing channels-last masks for the attention mask
            # and point-sampling them in the matcher run 1.5-30x faster on a CPU than the NCHW layout
            # einsum or bmm(embed, features) give, with identical values
            b, t = embed.shape[:2]
            masks = torch.bmm(mask_features.flatten(2).transpose(1, 2), embed.transpose(1, 2))
            masks = masks.transpose(1, 2).view(b, t, *mask_features.shape[-2:])
            resized = F.interpolate(masks, size=attn_size, mode="bilinear", align_corners=False)
            attn_mask = resized.sigmoid().flatten(2) < 0.5
        return logits, masks, embed, attn_mask

    def forward(self, features: list[Tensor], mask_features: Tensor, pilot: PilotBatch | None = None
                ) -> DecoderOutput:
        """features: 3 maps [B, C_in, h_l, w_l] at strides 32, 16, 8; mask_features: [B, mask_dim, H/4, W/4];
        ``pilot``: pilot slots decoded after the matching queries."""
        if len(features) != NUM_LEVELS:
            raise ValueError(f"transformer decoder expects {NUM_LEVELS} feature levels, got {len(features)}")
        b = mask_features.shape[0]
        sizes, srcs, pos = [], [], []
        for lvl, (x, proj) in enumerate(zip(features, self.input_proj)):
            sizes.append((x.shape[-2], x.shape[-1]))
            pos.append(self.pe_layer(x).flatten(2).transpose(1, 2).to(x.dtype))
            srcs.append((proj(x).flatten(2) + self.level_embed.weight[lvl][None, :, None]).transpose(1, 2))

        output = self.query_feat.weight[None].expand(b, -1, -1)
        query_pos = self.query_embed.weight[None].expand(b, -1, -1)
        self_mask = None
        if pilot is not None:
            output = torch.cat((output, pilot.content.to(output.dtype)), dim=1)
            query_pos = torch.cat((query_pos, query_pos.new_zeros(b, pilot.num_slots, query_pos.shape[-1])), dim=1)
            # additive (0 / -inf) once, not the bool mask that attention would convert in every layer
            blocked = pilot.self_attn_mask.repeat_interleave(self.num_heads, dim=0)
            self_mask = torch.zeros(blocked.shape, dtype=output.dtype, device=blocked.device)
            self_mask.masked_fill_(blocked, float("-inf"))

        predictions = []
        logits, masks, embed, attn_mask = self.prediction_heads(output, mask_features, sizes[0])
        predictions.append((logits, masks, embed))
        for i in range(self.num_layers):
            lvl = i % NUM_LEVELS
            if pilot is not None:
                pilot_mask = pilot.cross_attention_mask(i, sizes[lvl])
                if pilot_mask is not None:
                    attn_mask = torch.cat((attn_mask[:, : self.num_queries], ~pilot_mask), dim=1)
            # a query whose mask is empty everywhere attends everywhere instead of nowhere
            attn_mask = attn_mask & ~attn_mask.all(-1, keepdim=True)
            output = self.cross_attention_layers[i](
                output, srcs[lvl], attn_mask.repeat_interleave(self.num_heads, dim=0), pos[lvl], query_pos)
            output = self.self_attention_layers[i](output, self_mask, query_pos)
            output = self.ffn_layers[i](output)
            logits, masks, embed, attn_mask = self.prediction_heads(output, mask_features,
                                                                    sizes[(i + 1) % NUM_LEVELS])
            predictions.append((logits, masks, embed))

        # stacked once: the criterion reads every prediction from these, so the backward pass meets one
        # stack instead of a slice per layer and query kind (each a zero-filled gradient)
        return DecoderOutput(logits=torch.stack([lg for lg, _, _ in predictions]),
                             embeds=torch.stack([em for _, _, em in predictions]),
                             masks=[mk for _, mk, _ in predictions], mask_features=mask_features,
                             num_queries=self.num_queries, pilot=pilot)
