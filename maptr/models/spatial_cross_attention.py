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
        if self.gather_visible and not visible.is_meta:  # meta tensors have no values to select pairs by
            return self._attend_visible_pairs(query, camera_features, feature_shape, reference_points, visible)
        batch, num_cams, num_query = visible.shape
        ref = reference_points.flatten(0, 1)  # (B*Ncam, Lq, A, 2)
        ref = ref.unsqueeze(2)  # (B*Ncam, Lq, L=1, A, 2)
        per_camera = self.attention(
            query, ref, camera_features, [feature_shape], value_groups=num_cams
        )  # (B*Ncam, Lq, C)
        per_camera = per_camera.view(batch, num_cams, num_query, -1)  # (B, Ncam, Lq, C)
        per_camera = per_camera * visible.unsqueeze(-1)  # invisible cameras contribute nothing
        count = visible.sum(dim=1).clamp(min=1.0)  # (B, Lq); clamp: unseen cells stay 0, not NaN
        return per_camera.sum(dim=1) / count.unsqueeze(-1)  # (B, Lq, C)

    def _attend_visible_pairs(
        self,
        query: Tensor,
        camera_features: Tensor,
        feature_shape: tuple[int, int],
        reference_points: Tensor,
        visible: Tensor,
    ) -> Tensor:
        """The dense path's result from the K visible (batch, camera, query) triples only.

        The B*Ncam camera maps are stacked into one tall map per head (with zero rows between them) so
        that one ``grid_sample`` serves every pair; each pair's y coordinate is shifted into its camera's
        rows. Shapes as in :meth:`forward`.
        """
        attn = self.attention
        batch, num_cams, num_query = visible.shape
        height, width = feature_shape
        heads, points, channels = attn.num_heads, attn.num_points, attn.embed_dims
        head_dims = channels // heads
        anchors = reference_points.shape[3]
        pair_batch, pair_cam, pair_query = visible.nonzero(as_tuple=True)  # (K,) each
        num_pairs = pair_batch.shape[0]

        # Offsets and weights depend on the query only (as in the dense path): computed per query,
        # then gathered per pair.
        offsets = attn.sampling_offsets(query).view(batch, num_query, heads, points, 2)  # cells
        offsets = offsets / torch.tensor([width, height], dtype=query.dtype, device=query.device)
        weights = attn.attention_weights(query).view(batch, num_query, heads, points).softmax(-1)
        offsets = offsets[pair_batch, pair_query]  # (K, M, P, 2)
        offsets = offsets.view(num_pairs, heads, points // anchors, anchors, 2)  # anchor index fastest
        ref = reference_points[pair_batch, pair_cam, pair_query]  # (K, A, 2)
        locations = attn.location_add(ref[:, None, None], offsets).flatten(2, 3)  # (K, M, P, 2) in [0, 1]

        # Tall map: camera map c occupies rows [c * (h + gap), c * (h + gap) + h).
        value = attn.value_proj(camera_features)  # (B*Ncam, h*w, C)
        value = value.view(batch * num_cams, height, width, heads, head_dims)
        value = value.permute(3, 4, 0, 1, 2)  # (M, D, B*Ncam, h, w)
        value = F.pad(value, (0, 0, 0, _CAMERA_GAP_ROWS))  # (M, D, B*Ncam, h + gap, w)
        stride = height + _CAMERA_GAP_ROWS
        value = value.reshape(heads, head_dims, batch * num_cams * stride, width)  # (M, D, Htall, w)

        # Pixel rows (centre of row i at i); beyond -1.5 / h + 0.5 a sample only reads zero rows in
        # both paths, so the clamp changes nothing but keeps it inside its camera's gap.
        rows = (locations[..., 1] * height - 0.5).clamp(-1.5, height + 0.5)  # (K, M, P)
        camera = (pair_batch * num_cams + pair_cam).to(query.dtype)  # (K,)
        tall_rows = rows + (camera * stride)[:, None, None]  # (K, M, P)
        grid_y = (tall_rows + 0.5) * (2.0 / (batch * num_cams * stride)) - 1.0  # align_corners=False
        grid_x = 2.0 * locations[..., 0] - 1.0  # (K, M, P)
        grid = torch.stack([grid_x, grid_y], dim=-1).permute(1, 0, 2, 3)  # (M, K, P, 2)
        sampled = F.grid_sample(
            value, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )  # (M, D, K, P)
        pair_weights = weights[pair_batch, pair_query].permute(1, 0, 2).unsqueeze(1)  # (M, 1, K, P)
        attended = attn.weight_product(sampled, pair_weights).sum(-1)  # (M, D, K)
        attended = attended.permute(2, 0, 1).reshape(num_pairs, channels)  # (K, M*D)
        attended = attn.output_proj(attended)  # (K, C)

        summed = query.new_zeros(batch * num_query, channels)
        # Under bf16 autocast the projection is bf16; the sum over cameras stays in the query's dtype.
        summed = summed.index_add(0, pair_batch * num_query + pair_query, attended.to(summed.dtype))  # (B*Lq, C)
        count = visible.sum(dim=1).clamp(min=1.0)  # (B, Lq); unseen cells stay 0
        return summed.view(batch, num_query, channels) / count.unsqueeze(-1)  # (B, Lq, C)


def build_spatial_cross_attention(
    embed_dims: int, num_heads: int, num_points: int, num_anchors: int
) -> SpatialCrossAttention:
    return SpatialCrossAttention(
        embed_dims=embed_dims, num_heads=num_heads, num_points=num_points, num_anchors=num_anchors
    )


def use_dense_camera_attention(model: nn.Module) -> nn.Module:
    """Switches every spatial cross-attention of ``model`` to the dense reference path; returns it."""
    for module in model.modules():
        if isinstance(module, SpatialCrossAttention):
            module.gather_visible = False
    return model
