"""MapTRv2 decoder: decoupled self-attention over instances and points, deformable attention to the BEV.

Queries are hierarchical: Q instances x P points, flattened instance-major to (B, Q*P, C) (query
``q * P + p`` is point p of instance q). Each layer (post-norm):
1. instance self-attention: for each point index p, the Q instances attend to each other;
2. point self-attention: within each instance, its P points attend to each other;
3. deformable cross-attention from each point query into the BEV features, around its reference point;
4. FFN.
Queries are split into groups (one2one, one2many) that never see each other: the instance
self-attention runs separately per group, which is exactly a block-diagonal attention mask without
materializing a (Q, Q) mask (and without -inf values in the graph, which fake-quant observers would
choke on). Points 2.-4. are per instance or per query, so the groups stay independent throughout.

Iterative refinement: after each layer the layer's regression branch predicts a delta in
inverse-sigmoid space that is added to the current reference points; the refined points are that
layer's prediction, and are detached before they become the next layer's reference points.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from maptr.config import ModelConfig
from maptr.models.deformable_attention import MultiScaleDeformableAttention
from maptr.models.feed_forward import FeedForward
from maptr.models.multihead_attention import MultiHeadAttention
from maptr.models.tensor_ops import Add


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x), clamped so that points at 0 or 1 stay finite."""
    x = x.clamp(0.0, 1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))


class DecoderContext(NamedTuple):
    """What every decoder layer of one forward reads besides the queries and their reference points."""

    query_pos: Tensor  # (B, Q*P, C) positional half of the queries
    bev: Tensor  # (B, H*W, C) BEV features
    bev_shape: tuple[int, int]  # (H, W)
    group_sizes: list[int]  # instances per group, summing to Q (e.g. [50, 300] in training, [50] in eval)
    points_per_instance: int  # P


class DecoupledDecoderLayer(nn.Module):
    """One MapTRv2 decoder layer: instance self-attn, point self-attn, BEV cross-attn, FFN."""

    def __init__(self, embed_dims: int, num_heads: int, ffn_dims: int, sampling_points: int, dropout: float) -> None:
        super().__init__()
        # Each sum is its own module so that the quantizer can fake-quantize its inputs.
        self.instance_pos_add = Add()
        self.point_pos_add = Add()
        self.cross_pos_add = Add()
        self.residual_add1 = Add()
        self.residual_add2 = Add()
        self.residual_add3 = Add()
        self.instance_attn = MultiHeadAttention(embed_dims, num_heads)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(embed_dims)
        self.point_attn = MultiHeadAttention(embed_dims, num_heads)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(embed_dims)
        self.cross_attn = MultiScaleDeformableAttention(
            embed_dims=embed_dims, num_heads=num_heads, num_levels=1, num_points=sampling_points
        )
        self.dropout3 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(embed_dims)
        self.ffn = FeedForward(embed_dims=embed_dims, ffn_dims=ffn_dims, dropout=dropout)

    def forward(self, query: Tensor, reference_points: Tensor, context: DecoderContext) -> Tensor:
        """
        Args:
            query: (B, Q*P, C).
            reference_points: (B, Q*P, 2) normalized BEV (x, y) in [0, 1].
            context: the positional codes, the BEV features and the query layout.
        Returns:
            (B, Q*P, C).
        """
        query_pos, bev, bev_shape, group_sizes, num_points = context
        batch, num_query, channels = query.shape
        num_instances = num_query // num_points

        # 1. Instance self-attention: one sequence of Q instances per (batch, point index).
        x = self.instance_pos_add(query, query_pos).view(batch, num_instances, num_points, channels)  # (B, Q, P, C)
        x = x.transpose(1, 2).reshape(batch * num_points, num_instances, channels)  # (B*P, Q, C)
        v = query.view(batch, num_instances, num_points, channels).transpose(1, 2)  # (B, P, Q, C)
        v = v.reshape(batch * num_points, num_instances, channels)  # (B*P, Q, C)
        outputs = []
        start = 0
        for size in group_sizes:  # static python ints: a fixed graph per mode
            xq = x[:, start : start + size]  # (B*P, Qg, C)
            outputs.append(self.instance_attn(xq, xq, v[:, start : start + size]))
            start += size
        attended = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]  # (B*P, Q, C)
        attended = attended.view(batch, num_points, num_instances, channels).transpose(1, 2)  # (B, Q, P, C)
        query = self.norm1(self.residual_add1(query, self.dropout1(attended.reshape(batch, num_query, channels))))

        # 2. Point self-attention: one sequence of P points per (batch, instance).
        x = self.point_pos_add(query, query_pos).view(batch * num_instances, num_points, channels)  # (B*Q, P, C)
        v = query.view(batch * num_instances, num_points, channels)  # (B*Q, P, C)
        attended = self.point_attn(x, x, v).view(batch, num_query, channels)  # (B, Q*P, C)
        query = self.norm2(self.residual_add2(query, self.dropout2(attended)))

        # 3. Deformable cross-attention into the BEV around each point's reference.
        attended = self.cross_attn(
            self.cross_pos_add(query, query_pos), reference_points.unsqueeze(2), bev, [bev_shape]
        )  # (B, Q*P, C)
        query = self.norm3(self.residual_add3(query, self.dropout3(attended)))
        return self.ffn(query)


class MapDecoder(nn.Module):
    """A stack of decoupled layers with iterative reference-point refinement."""

    def __init__(self, layers: list[DecoupledDecoderLayer]) -> None:
        super().__init__()
        if not layers:
            raise ValueError("the decoder needs at least one layer, got none")
        self.layers = nn.ModuleList(layers)

    def forward(
        self, query: Tensor, reference_points: Tensor, context: DecoderContext, reg_branches: nn.ModuleList
    ) -> tuple[list[Tensor], list[Tensor]]:
        """
        Args:
            query: (B, Q*P, C); reference_points: (B, Q*P, 2) initial, normalized.
            context: what every layer reads besides those two (:class:`DecoderContext`).
            reg_branches: one module per layer mapping (B, Q*P, C) -> (B, Q*P, 2) deltas in logit space.
        Returns:
            hidden: per layer (B, Q*P, C); points: per layer (B, Q*P, 2) refined normalized points
            (differentiable w.r.t. that layer's regression branch).
        """
        hidden, points = [], []
        for layer, reg_branch in zip(self.layers, reg_branches, strict=True):
            query = layer(query, reference_points, context)
            refined = (reg_branch(query) + inverse_sigmoid(reference_points)).sigmoid()  # (B, Q*P, 2)
            hidden.append(query)
            points.append(refined)
            # Each layer learns a correction of the previous estimate, not the whole path.
            reference_points = refined.detach()
        return hidden, points


def build_map_decoder(cfg: ModelConfig) -> MapDecoder:
    layer = (cfg.embed_dims, cfg.num_heads, cfg.ffn_dims, cfg.decoder_points, cfg.dropout)
    return MapDecoder([DecoupledDecoderLayer(*layer) for _ in range(cfg.decoder_layers)])
