"""FPN neck reduced to one output level: the BEV encoder samples a single feature map per camera.

The stages from the output stride down to stride 32 are fused top-down (1x1 lateral convs, nearest x2
upsampling, sums), then one 3x3 conv + BatchNorm gives the ``embed_dims``-channel map. With
``feature_stride = 32`` (the guide's r50) this is a lateral conv and an output conv on C5; at stride 16
the coarse, semantically strong C5 is added to the finer C4.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from maptr.config import ModelConfig
from maptr.models.tensor_ops import Add


class FPN(nn.Module):
    """Top-down fusion of backbone stages into one map of ``out_channels`` at the finest input stride."""

    def __init__(self, in_channels: list[int], in_strides: list[int], out_channels: int) -> None:
        super().__init__()
        if len(in_channels) != len(in_strides) or not in_channels:
            raise ValueError(f"in_channels {in_channels} and in_strides {in_strides} must match, non-empty")
        if any(b != 2 * a for a, b in zip(in_strides, in_strides[1:], strict=False)):
            raise ValueError(f"in_strides must double from level to level, got {in_strides}")
        self.in_strides = list(in_strides)
        self.out_stride = in_strides[0]
        self.lateral_convs = nn.ModuleList([nn.Conv2d(c, out_channels, kernel_size=1) for c in in_channels])
        # One sum per finer level (modules so that the quantizer can fake-quantize their inputs).
        self.merge_adds = nn.ModuleList([Add() for _ in in_channels[:-1]])
        self.output_conv = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.output_norm = nn.BatchNorm2d(out_channels)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Xavier as in the reference FPN: the laterals are linear maps that should keep the scale of
        # their input; the output conv feeds BatchNorm, so its scale matters little.
        for conv in [*self.lateral_convs, self.output_conv]:
            nn.init.xavier_uniform_(conv.weight)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def forward(self, features: list[Tensor]) -> Tensor:
        """
        Args:
            features: one (N, C_in_l, H / s_l, W / s_l) map per input stride, finest first.
        Returns:
            (N, out_channels, H / s_0, W / s_0).
        """
        if len(features) != len(self.lateral_convs):
            raise ValueError(f"expected {len(self.lateral_convs)} feature maps, got {len(features)}")
        fused = self.lateral_convs[-1](features[-1])  # (N, C, H/32, W/32)
        for level in range(len(features) - 2, -1, -1):
            upsampled = F.interpolate(fused, scale_factor=2.0, mode="nearest")  # (N, C, H/s_l, W/s_l)
            fused = self.merge_adds[level](self.lateral_convs[level](features[level]), upsampled)
        return self.output_norm(self.output_conv(fused))  # (N, C, H/s_0, W/s_0)


def build_fpn(cfg: ModelConfig, in_channels: list[int], in_strides: list[int]) -> FPN:
    return FPN(in_channels=in_channels, in_strides=in_strides, out_channels=cfg.embed_dims)
