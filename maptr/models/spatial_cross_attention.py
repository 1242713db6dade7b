"""Spatial cross-attention (BEVFormer): BEV queries gather image features from the cameras that see them.

Every BEV query attends, in every camera that sees it, to points sampled around the projections of its
pillar anchors (from :mod:`maptr.models.camera_projection`); the per-camera results are averaged over
those cameras. Two paths compute the same function:

- visible pairs (THE path: training, evaluation, calibration, QAT and the exported ONNX graph): only
  the (query, camera) pairs that see each other are sampled, BEVFormer's per-camera re-batching. On the
  nuScenes rig a BEV cell is seen by about one camera of six (18 % of the pairs on the tiny preset), so
  this is ~5x less sampling work. The number of pairs depends on the rig, so this part of the graph has a
  dynamic shape (ONNX NonZero -> GatherND -> GridSample -> ScatterND); the model's inputs and outputs
  keep static shapes.
- dense: all (B * Ncam) camera batches attend with all queries and a multiplicative visibility mask
  removes the pairs that do not see each other. The reference the visible-pairs path is tested against,
  and the fallback on meta tensors (shape-only FLOP counting), which have no values to select pairs by.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maptr.models.deformable_attention import MultiScaleDeformableAttention

# Zero rows between the stacked camera maps of the visible-pairs path: with two, a bilinear sample
# that leaves its camera's rows reads zeros, as ``grid_sample``'s zero padding does for one map.
_CAMERA_GAP_ROWS = 2


class SpatialCrossAttention(nn.Module):
    """Deformable attention into each camera's feature map, averaged over the cameras that see a cell."""

    def __init__(self, embed_dims: int, num_heads: int, num_points: int, num_anchors: int) -> None:
        super().__init__()
        if num_points % num_anchors:
            raise ValueError(
                f"num_points {num_points} must be a multiple of num_points_in_pillar {num_anchors}: "
                "the sampling points are spread evenly over the pillar anchors"
            )
        self.num_anchors = num_anchors
        self.attention = MultiScaleDeformableAttention(
            embed_dims=embed_dims, num_heads=num_heads, num_levels=1, num_points=num_points
        )
        # True: sample only the visible (query, camera) pairs; False: the dense reference path.
        self.gather_visible = True

    def forward(
        self,
        query: Tensor,
        camera_features: Tensor,
        feature_shape: tuple[int, int],
        reference_points: Tensor,
        visible: Tensor,
    ) -> Tensor:
        """
        Args:
            query: (B, Lq, C) BEV queries with their positional embedding added.
            camera_features: (B*Ncam, h*w, C) flattened camera feature maps, camera index fastest.
            feature_shape: (h, w) of the camera feature maps.
            reference_points: (B, Ncam, Lq, A, 2) normalized projections of the pillar anchors.
            visible: (B, Ncam, Lq) in {0, 1}.
        Returns:
            (B, Lq, C): mean over the cameras that see each cell; exactly zero where no camera does.
        """
        attn = self.attention
        batch, num_cams, num_query = visible.shape
        channels = attn.embed_dims
        if not self.gather_visible or visible.is_meta:  # meta tensors have no values to select pairs by
            ref = reference_points.flatten(0, 1).unsqueeze(2)  # (B*Ncam, Lq, L=1, A, 2)
            per_camera = attn(query, ref, camera_features, [feature_shape], value_groups=num_cams)  # (B*Ncam, Lq, C)
            per_camera = per_camera.view(batch, num_cams, num_query, -1)  # (B, Ncam, Lq, C)
            summed = (per_camera * visible.unsqueeze(-1)).sum(dim=1)  # invisible cameras contribute nothing
        else:
            # The dense path's result from the K visible (batch, camera, query) triples only.
            pairs = visible.nonzero(as_tuple=True)  # (K,) each
            num_pairs = pairs[0].shape[0]
            locations, weights = self._pair_locations(query, reference_points, pairs, num_pairs, feature_shape)
            value = self._tall_value_map(camera_features, feature_shape)  # (M, D, B*Ncam*(h + gap), w)
            # Each pair's y moves into its camera's rows. Pixel rows (centre of row i at i); beyond -1.5 /
            # h + 0.5 a sample only reads zero rows in both paths, so the clamp changes nothing but keeps it
            # inside its camera's gap.
            height, stride = feature_shape[0], feature_shape[0] + _CAMERA_GAP_ROWS
            rows = (locations[..., 1] * height - 0.5).clamp(-1.5, height + 0.5)  # (K, M, P)
            camera = (pairs[0] * num_cams + pairs[1]).to(query.dtype)  # (K,)
            tall_rows = rows + (camera * stride)[:, None, None]  # (K, M, P)
            grid_y = (tall_rows + 0.5) * (2.0 / (batch * num_cams * stride)) - 1.0  # align_corners=False
            grid_x = 2.0 * locations[..., 0] - 1.0  # (K, M, P)
            grid = torch.stack([grid_x, grid_y], dim=-1).permute(1, 0, 2, 3)  # (M, K, P, 2)
            sampled = F.grid_sample(
                value, grid, mode="bilinear", padding_mode="zeros", align_corners=False
            )  # (M, D, K, P)
            pair_weights = weights[pairs[0], pairs[2]].permute(1, 0, 2).unsqueeze(1)  # (M, 1, K, P)
            attended = attn.weight_product(sampled, pair_weights).sum(-1)  # (M, D, K)
            attended = attended.permute(2, 0, 1).reshape(num_pairs, channels)  # (K, M*D)
            attended = attn.output_proj(attended)  # (K, C)
            summed = query.new_zeros(batch * num_query, channels)
            # Under bf16 autocast the projection is bf16; the sum over cameras stays in the query's dtype.
            summed = summed.index_add(0, pairs[0] * num_query + pairs[2], attended.to(summed.dtype))  # (B*Lq, C)
        count = visible.sum(dim=1).clamp(min=1.0)  # (B, Lq); clamp: unseen cells stay 0, not NaN
        return summed.view(batch, num_query, channels) / count.unsqueeze(-1)  # (B, Lq, C)

    def _pair_locations(
        self,
        query: Tensor,
        reference_points: Tensor,
        pairs: tuple[Tensor, ...],
        num_pairs: int,
        feature_shape: tuple[int, int],
    ) -> tuple[Tensor, Tensor]:
        """Sampling locations of the K visible pairs, (K, M, P, 2) in [0, 1], and the attention weights of
        every query, (B, Lq, M, P). ``pairs``: the (batch, camera, query) indices of the pairs, (K,) each."""
        attn = self.attention
        batch, num_query = query.shape[:2]
        height, width = feature_shape
        heads, points = attn.num_heads, attn.num_points
        anchors = reference_points.shape[3]
        pair_batch, pair_cam, pair_query = pairs
        # Offsets and weights depend on the query only (as in the dense path): computed per query,
        # then gathered per pair.
        offsets = attn.sampling_offsets(query).view(batch, num_query, heads, points, 2)  # cells
        offsets = offsets / torch.tensor([width, height], dtype=query.dtype, device=query.device)
        weights = attn.attention_weights(query).view(batch, num_query, heads, points).softmax(-1)
        offsets = offsets[pair_batch, pair_query]  # (K, M, P, 2)
        offsets = offsets.view(num_pairs, heads, points // anchors, anchors, 2)  # anchor index fastest
        ref = reference_points[pair_batch, pair_cam, pair_query]  # (K, A, 2)
        return attn.location_add(ref[:, None, None], offsets).flatten(2, 3), weights

    def _tall_value_map(self, camera_features: Tensor, feature_shape: tuple[int, int]) -> Tensor:
        """(B*Ncam, h*w, C) -> (M, D, B*Ncam*(h + gap), w): the projected camera maps of each head stacked
        into one tall map (camera map c in rows [c * (h + gap), c * (h + gap) + h), zero rows between), so
        that one ``grid_sample`` serves every pair."""
        attn = self.attention
        height, width = feature_shape
        heads = attn.num_heads
        head_dims = attn.embed_dims // heads
        num_maps = camera_features.shape[0]
        value = attn.value_proj(camera_features)  # (B*Ncam, h*w, C)
        value = value.view(num_maps, height, width, heads, head_dims)
        value = value.permute(3, 4, 0, 1, 2)  # (M, D, B*Ncam, h, w)
        value = F.pad(value, (0, 0, 0, _CAMERA_GAP_ROWS))  # (M, D, B*Ncam, h + gap, w)
        return value.reshape(heads, head_dims, num_maps * (height + _CAMERA_GAP_ROWS), width)


def use_dense_camera_attention(model: nn.Module) -> nn.Module:
    """Switches every spatial cross-attention of ``model`` to the dense reference path; returns it."""
    for module in model.modules():
        if isinstance(module, SpatialCrossAttention):
            module.gather_visible = False
    return model
