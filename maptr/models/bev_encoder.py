"""Single-frame BEVFormer encoder: learned BEV queries lift the camera features to a BEV feature map.

Each layer (post-norm, BEVFormer's order): deformable self-attention on the BEV grid -> norm ->
spatial cross-attention into the cameras -> norm -> FFN -> norm. The BEV grid has ``bev_h`` rows along
y (row 0 behind the ego car) and ``bev_w`` columns along x, flattened row-major (cell i * bev_w + j).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from maptr.config import ModelConfig
from maptr.models.camera_projection import bev_cell_centers, pillar_points, project_to_cameras
from maptr.models.deformable_attention import MultiScaleDeformableAttention
from maptr.models.feed_forward import FeedForward
from maptr.models.position_encoding import LearnedPositionalEncoding
from maptr.models.spatial_cross_attention import SpatialCrossAttention
from maptr.models.tensor_ops import Add


class BEVEncoderLayer(nn.Module):
    """BEV self-attention, spatial cross-attention and FFN, each with residual, dropout and LayerNorm."""

    def __init__(
        self,
        embed_dims: int,
        num_heads: int,
        ffn_dims: int,
        self_attn_points: int,
        cross_attn_points: int,
        num_points_in_pillar: int,
        dropout: float,
    ) -> None:
        super().__init__()
        # Each sum is its own module so that the quantizer can fake-quantize its inputs.
        self.self_attn_pos_add = Add()
        self.cross_attn_pos_add = Add()
        self.residual_add1 = Add()
        self.residual_add2 = Add()
        self.self_attn = MultiScaleDeformableAttention(
            embed_dims=embed_dims, num_heads=num_heads, num_levels=1, num_points=self_attn_points
        )
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(embed_dims)
        self.cross_attn = SpatialCrossAttention(
            embed_dims=embed_dims,
            num_heads=num_heads,
            num_points=cross_attn_points,
            num_anchors=num_points_in_pillar,
        )
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(embed_dims)
        self.ffn = FeedForward(embed_dims=embed_dims, ffn_dims=ffn_dims, dropout=dropout)

    def forward(
        self,
        bev: Tensor,
        bev_pos: Tensor,
        bev_shape: tuple[int, int],
        bev_reference: Tensor,
        camera_features: Tensor,
        feature_shape: tuple[int, int],
        camera_reference: Tensor,
        visible: Tensor,
    ) -> Tensor:
        """
        Args:
            bev: (B, H*W, C) BEV queries; bev_pos: (B, H*W, C) their positional codes.
            bev_shape: (H, W) of the BEV grid.
            bev_reference: (B, H*W, 1, 2) normalized cell centres (one level).
            camera_features: (B*Ncam, h*w, C); feature_shape: (h, w).
            camera_reference: (B, Ncam, H*W, A, 2); visible: (B, Ncam, H*W).
        Returns:
            (B, H*W, C) updated BEV features.
        """
        query = self.self_attn_pos_add(bev, bev_pos)  # (B, H*W, C)
        attended = self.self_attn(query, bev_reference, bev, [bev_shape])  # (B, H*W, C)
        bev = self.norm1(self.residual_add1(bev, self.dropout1(attended)))
        query = self.cross_attn_pos_add(bev, bev_pos)  # (B, H*W, C)
        lifted = self.cross_attn(query, camera_features, feature_shape, camera_reference, visible)  # (B, H*W, C)
        bev = self.norm2(self.residual_add2(bev, self.dropout2(lifted)))
        return self.ffn(bev)


class BEVEncoder(nn.Module):
    """BEV queries + positional encoding + ``num_layers`` encoder layers over the camera features."""

    def __init__(
        self,
        embed_dims: int,
        num_heads: int,
        ffn_dims: int,
        num_layers: int,
        bev_h: int,
        bev_w: int,
        pc_range: list[float],
        num_points_in_pillar: int,
        self_attn_points: int,
        cross_attn_points: int,
        image_size: tuple[int, int],
        feature_shape: tuple[int, int],
        num_cams: int,
        dropout: float,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"the BEV encoder needs at least one layer, got {num_layers}")
        if len(pc_range) != 6:
            raise ValueError(f"pc_range must be [x0, y0, z0, x1, y1, z1], got {pc_range}")
        self.bev_h = bev_h
        self.bev_w = bev_w
        self.image_size = tuple(image_size)  # (W, H) of the network input, normalizes projections
        # (h, w) of the camera feature maps, static so that no shape is read back in the graph.
        self.feature_shape = tuple(feature_shape)
        self.num_cams = num_cams
        self.bev_queries = nn.Embedding(bev_h * bev_w, embed_dims)
        self.positional_encoding = LearnedPositionalEncoding(embed_dims, bev_h, bev_w)
        # Tells the shared sampling which camera a feature came from (BEVFormer's cams_embeds).
        self.camera_embeddings = nn.Parameter(torch.empty(num_cams, embed_dims))
        self.camera_embedding_add = Add()
        self.layers = nn.ModuleList(
            [
                BEVEncoderLayer(
                    embed_dims=embed_dims,
                    num_heads=num_heads,
                    ffn_dims=ffn_dims,
                    self_attn_points=self_attn_points,
                    cross_attn_points=cross_attn_points,
                    num_points_in_pillar=num_points_in_pillar,
                    dropout=dropout,
                )
                for _ in range(num_layers)
            ]
        )
        # Fixed geometry, recomputed from the config (not saved in checkpoints).
        self.register_buffer("bev_reference", bev_cell_centers(bev_h, bev_w), persistent=False)  # (H*W, 2)
        self.register_buffer(
            "pillar_points", pillar_points(bev_h, bev_w, num_points_in_pillar, pc_range), persistent=False
        )  # (A, H*W, 3)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Normal(0, 1) as nn.Embedding's default for the queries; camera codes likewise, so they
        # are as large as the LayerNorm-scaled features they are added to.
        nn.init.normal_(self.bev_queries.weight)
        nn.init.normal_(self.camera_embeddings)

    def forward(self, camera_features: Tensor, lidar2img: Tensor) -> Tensor:
        """
        Args:
            camera_features: (B*Ncam, C, h, w) neck output, camera index fastest, (h, w) = feature_shape.
            lidar2img: (B, Ncam, 4, 4) LiDAR -> network-input pixels.
        Returns:
            (B, H*W, C) BEV features, row-major over (bev_h, bev_w).
        """
        batch, num_cams = lidar2img.shape[:2]
        if num_cams != self.num_cams:
            raise ValueError(f"expected {self.num_cams} cameras, got lidar2img of shape {tuple(lidar2img.shape)}")
        height, width = self.feature_shape
        channels = camera_features.shape[1]
        features = camera_features.flatten(2).transpose(1, 2)  # (B*Ncam, h*w, C)
        features = features.view(batch, num_cams, height * width, channels)  # (B, Ncam, h*w, C)
        features = self.camera_embedding_add(features, self.camera_embeddings[None, :, None, :])
        features = features.flatten(0, 1)  # (B*Ncam, h*w, C)

        camera_reference, visible = project_to_cameras(
            self.pillar_points, lidar2img, self.image_size
        )  # (B, Ncam, H*W, A, 2), (B, Ncam, H*W)
        bev = self.bev_queries.weight[None].expand(batch, -1, -1)  # (B, H*W, C)
        bev_pos = self.positional_encoding()[None].expand(batch, -1, -1)  # (B, H*W, C)
        bev_reference = self.bev_reference[None, :, None, :].expand(batch, -1, -1, -1)  # (B, H*W, 1, 2)
        for layer in self.layers:
            bev = layer(
                bev,
                bev_pos,
                (self.bev_h, self.bev_w),
                bev_reference,
                features,
                (height, width),
                camera_reference,
                visible,
            )
        return bev


def build_bev_encoder(cfg: ModelConfig, num_cams: int = 6) -> BEVEncoder:
    return BEVEncoder(
        embed_dims=cfg.embed_dims,
        num_heads=cfg.num_heads,
        ffn_dims=cfg.ffn_dims,
        num_layers=cfg.encoder_layers,
        bev_h=cfg.bev_h,
        bev_w=cfg.bev_w,
        pc_range=cfg.pc_range,
        num_points_in_pillar=cfg.num_points_in_pillar,
        self_attn_points=cfg.encoder_tsa_points,
        cross_attn_points=cfg.encoder_sca_points,
        image_size=(cfg.image_size[0], cfg.image_size[1]),
        feature_shape=(cfg.image_size[1] // cfg.feature_stride, cfg.image_size[0] // cfg.feature_stride),
        num_cams=num_cams,
        dropout=cfg.dropout,
    )
