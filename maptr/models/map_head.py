"""MapTRv2 map head: hierarchical queries, the decoder, and per-layer class and point branches.

Query of point p of instance q = instance_embedding[q] + point_embedding[p] (2C channels), split into
a positional half (query_pos) and a content half (query). Initial reference points come from a linear
layer on query_pos (sigmoid), as MapTR. In training the one2one group (``num_vec_one2one`` instances,
matched one-to-one) and the one2many group (``num_vec_one2many`` instances, matched to GT repeated
``k_one2many`` times by the criterion) run together but never attend to each other; in eval and export
only the one2one instances are built.

Outputs per decoder layer: class logits per instance from its point features averaged over the P
points, and the P refined points, normalized to [0, 1] over pc_range (x over [x0, x1], y over [y0, y1]).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from maptr.config import ModelConfig
from maptr.models.decoder import DecoderContext, MapDecoder


def _class_branch(embed_dims: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(embed_dims, embed_dims),
        nn.LayerNorm(embed_dims),
        nn.ReLU(inplace=True),
        nn.Linear(embed_dims, embed_dims),
        nn.LayerNorm(embed_dims),
        nn.ReLU(inplace=True),
        nn.Linear(embed_dims, num_classes),
    )


def _point_branch(embed_dims: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(embed_dims, embed_dims),
        nn.ReLU(inplace=True),
        nn.Linear(embed_dims, embed_dims),
        nn.ReLU(inplace=True),
        nn.Linear(embed_dims, 2),
    )


class MapHead(nn.Module):
    """Queries + :class:`MapDecoder` + class/point branches -> per-layer, per-group predictions."""

    def __init__(
        self,
        decoder: MapDecoder,
        embed_dims: int,
        num_classes: int,
        num_vec_one2one: int,
        num_vec_one2many: int,
        num_pts_per_vec: int,
        bev_h: int,
        bev_w: int,
    ) -> None:
        super().__init__()
        if num_vec_one2one < 1 or num_vec_one2many < 0 or num_pts_per_vec < 2:
            raise ValueError(
                f"need num_vec_one2one >= 1, num_vec_one2many >= 0, num_pts_per_vec >= 2; got "
                f"{num_vec_one2one}, {num_vec_one2many}, {num_pts_per_vec}"
            )
        self.decoder = decoder
        self.embed_dims = embed_dims
        self.num_classes = num_classes
        self.num_vec_one2one = num_vec_one2one
        self.num_vec_one2many = num_vec_one2many
        self.num_pts_per_vec = num_pts_per_vec
        self.bev_shape = (bev_h, bev_w)
        num_layers = len(decoder.layers)
        self.instance_embedding = nn.Embedding(num_vec_one2one + num_vec_one2many, 2 * embed_dims)
        self.point_embedding = nn.Embedding(num_pts_per_vec, 2 * embed_dims)
        self.reference_points = nn.Linear(embed_dims, 2)
        # Separate branches per layer (MapTR's with_box_refine): each layer refines differently.
        self.cls_branches = nn.ModuleList([_class_branch(embed_dims, num_classes) for _ in range(num_layers)])
        self.reg_branches = nn.ModuleList([_point_branch(embed_dims) for _ in range(num_layers)])
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Reference points: xavier weights, zero bias -> initial points spread around the BEV centre.
        nn.init.xavier_uniform_(self.reference_points.weight)
        nn.init.zeros_(self.reference_points.bias)
        # Focal-loss prior: every class starts at probability 0.01, so the many unmatched queries
        # do not swamp the loss in the first iterations.
        prior_bias = -math.log((1.0 - 0.01) / 0.01)
        for branch in self.cls_branches:
            nn.init.constant_(branch[-1].bias, prior_bias)

    def forward(self, bev: Tensor, with_one2many: bool) -> dict:
        """
        Args:
            bev: (B, H*W, C) BEV features, row-major over (bev_h, bev_w).
            with_one2many: also run the one2many group (training).
        Returns:
            {"pred_logits": (B, Q1, K), "pred_pts": (B, Q1, P, 2), "aux_outputs": [...]} for the one2one
            group (last layer; earlier layers in aux_outputs), and with ``with_one2many`` a "one2many"
            entry of the same structure with Q2 instances.
        """
        batch = bev.shape[0]
        num_pts = self.num_pts_per_vec
        group_sizes = [self.num_vec_one2one]
        if with_one2many and self.num_vec_one2many > 0:
            group_sizes.append(self.num_vec_one2many)
        num_instances = sum(group_sizes)

        instance = self.instance_embedding.weight[:num_instances]  # (Q, 2C)
        embed = instance[:, None, :] + self.point_embedding.weight[None, :, :]  # (Q, P, 2C)
        embed = embed.flatten(0, 1)[None].expand(batch, -1, -1)  # (B, Q*P, 2C)
        query_pos, query = torch.split(embed, self.embed_dims, dim=-1)  # (B, Q*P, C) each
        reference_points = self.reference_points(query_pos).sigmoid()  # (B, Q*P, 2)

        context = DecoderContext(query_pos, bev, self.bev_shape, group_sizes, num_pts)
        hidden, points = self.decoder(query, reference_points, context, self.reg_branches)
        layer_logits, layer_points = [], []
        for state, refined, cls_branch in zip(hidden, points, self.cls_branches, strict=True):
            per_instance = state.view(batch, num_instances, num_pts, self.embed_dims).mean(dim=2)  # (B, Q, C)
            layer_logits.append(cls_branch(per_instance))  # (B, Q, K)
            layer_points.append(refined.view(batch, num_instances, num_pts, 2))  # (B, Q, P, 2)

        outputs = self._group_outputs(layer_logits, layer_points, 0, self.num_vec_one2one)
        if len(group_sizes) > 1:
            outputs["one2many"] = self._group_outputs(layer_logits, layer_points, self.num_vec_one2one, num_instances)
        return outputs

    @staticmethod
    def _group_outputs(layer_logits: list[Tensor], layer_points: list[Tensor], start: int, end: int) -> dict:
        """Slice instances [start, end) of every layer: last layer at top level, the others as aux."""
        logits = [x[:, start:end] for x in layer_logits]  # per layer (B, Qg, K)
        pts = [x[:, start:end] for x in layer_points]  # per layer (B, Qg, P, 2)
        return {
            "pred_logits": logits[-1],
            "pred_pts": pts[-1],
            "aux_outputs": [{"pred_logits": c, "pred_pts": p} for c, p in zip(logits[:-1], pts[:-1], strict=True)],
        }


def build_map_head(cfg: ModelConfig, decoder: MapDecoder) -> MapHead:
    return MapHead(
        decoder=decoder,
        embed_dims=cfg.embed_dims,
        num_classes=cfg.num_classes,
        num_vec_one2one=cfg.num_vec_one2one,
        num_vec_one2many=cfg.num_vec_one2many,
        num_pts_per_vec=cfg.num_pts_per_vec,
        bev_h=cfg.bev_h,
        bev_w=cfg.bev_w,
    )
