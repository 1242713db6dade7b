"""Auxiliary segmentation heads of MapTRv2 (training only): BEV map mask and per-camera image mask.

They add dense supervision that speeds up learning of the BEV features and the camera features; they
are not run in eval mode and are not part of the exported model.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from maptr.config import ModelConfig


class SegmentationHead(nn.Module):
    """3x3 conv -> ReLU -> 1x1 conv to one logit per pixel."""

    def __init__(self, in_channels: int, hidden_channels: int, prior_prob: float = 0.1) -> None:
        super().__init__()
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"prior_prob must be in (0, 1), got {prior_prob}")
        self.conv = nn.Conv2d(in_channels, hidden_channels, kernel_size=3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.classifier = nn.Conv2d(hidden_channels, 1, kernel_size=1)
        self.prior_prob = prior_prob
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # He init before the ReLU; the classifier starts at the expected foreground rate (map
        # elements cover a small part of the BEV / image) so the first losses are not dominated by
        # confidently wrong background pixels.
        nn.init.kaiming_normal_(self.conv.weight, nonlinearity="relu")
        nn.init.zeros_(self.conv.bias)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.constant_(self.classifier.bias, -math.log((1.0 - self.prior_prob) / self.prior_prob))

    def forward(self, features: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, 1, H, W) logits."""
        return self.classifier(self.relu(self.conv(features)))


class BEVSegmentationHead(nn.Module):
    """BEV features (B, H*W, C) -> BEV mask logits (B, 1, bev_h, bev_w), row 0 behind the ego car."""

    def __init__(self, embed_dims: int, bev_h: int, bev_w: int) -> None:
        super().__init__()
        self.bev_h = bev_h
        self.bev_w = bev_w
        self.head = SegmentationHead(embed_dims, embed_dims)

    def forward(self, bev: Tensor) -> Tensor:
        batch, _, channels = bev.shape
        grid = bev.transpose(1, 2).reshape(batch, channels, self.bev_h, self.bev_w)  # (B, C, bev_h, bev_w)
        return self.head(grid)  # (B, 1, bev_h, bev_w)


class PVSegmentationHead(nn.Module):
    """Camera features (B*Ncam, C, h, w) -> per-camera mask logits (B, Ncam, 1, h, w)."""

    def __init__(self, embed_dims: int) -> None:
        super().__init__()
        self.head = SegmentationHead(embed_dims, embed_dims)

    def forward(self, camera_features: Tensor, num_cams: int) -> Tensor:
        logits = self.head(camera_features)  # (B*Ncam, 1, h, w)
        return logits.view(-1, num_cams, *logits.shape[1:])  # (B, Ncam, 1, h, w)


def build_bev_seg_head(cfg: ModelConfig) -> BEVSegmentationHead:
    return BEVSegmentationHead(embed_dims=cfg.embed_dims, bev_h=cfg.bev_h, bev_w=cfg.bev_w)


def build_pv_seg_head(cfg: ModelConfig) -> PVSegmentationHead:
    return PVSegmentationHead(embed_dims=cfg.embed_dims)
