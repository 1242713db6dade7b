"""Spatial cross-attention (BEVFormer): BEV queries gather image features from the cameras that see them.

Every BEV query attends, in every camera, to points sampled around the projections of its pillar
anchors (from :mod:`maptr.models.camera_projection`); the per-camera results are masked by visibility
and averaged over the cameras that see the cell. Unlike BEVFormer's CUDA path, queries are not
re-batched per camera: all (B * Ncam) camera batches attend with all queries at once and the
visibility mask is multiplicative, which keeps shapes static and the graph exportable.
"""

from __future__ import annotations

from torch import Tensor, nn

from maptr.models.deformable_attention import MultiScaleDeformableAttention


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


def build_spatial_cross_attention(
    embed_dims: int, num_heads: int, num_points: int, num_anchors: int
) -> SpatialCrossAttention:
    return SpatialCrossAttention(
        embed_dims=embed_dims, num_heads=num_heads, num_points=num_points, num_anchors=num_anchors
    )
