"""MapTRv2: six surround cameras -> vectorized HD-map elements (class scores + P ordered points each).

    img (B, Ncam, 3, H, W) -> Backbone -> FPN -> camera features (B*Ncam, C, h, w)
        -> BEVEncoder (+ lidar2img) -> BEV features (B, bev_h*bev_w, C) -> MapHead -> predictions

Output contract (``MapTR.forward``):
- ``pred_logits`` (B, Q1, K) raw logits (sigmoid / focal), ``pred_pts`` (B, Q1, P, 2) normalized
  to [0, 1] over pc_range, for the last decoder layer of the one2one group (Q1 = num_vec_one2one);
- ``aux_outputs``: one {pred_logits, pred_pts} per earlier decoder layer;
- training mode only: ``one2many`` {pred_logits, pred_pts, aux_outputs} (Q2 = num_vec_one2many),
  ``bev_seg`` logits (B, 1, bev_h, bev_w) and ``pv_seg`` logits (B, Ncam, 1, h, w) when enabled.
:class:`MapTRInference` wraps the eval path for export: ``(scores, pts)`` only.
"""

from __future__ import annotations

from torch import Tensor, nn

from maptr.config import ModelConfig
from maptr.models.backbone import Backbone, build_backbone
from maptr.models.bev_encoder import BEVEncoder, build_bev_encoder
from maptr.models.decoder import build_map_decoder
from maptr.models.fpn import FPN, build_fpn
from maptr.models.map_head import MapHead, build_map_head
from maptr.models.precision import as_float32, float32_region
from maptr.models.seg_heads import BEVSegmentationHead, PVSegmentationHead, build_bev_seg_head, build_pv_seg_head

NUM_CAMS = 6  # nuScenes' surround rig; the model itself only needs lidar2img to agree


class MapTR(nn.Module):
    """Backbone, neck, BEV encoder, map head and (training-only) segmentation heads."""

    def __init__(
        self,
        backbone: Backbone,
        neck: FPN,
        encoder: BEVEncoder,
        head: MapHead,
        bev_seg_head: BEVSegmentationHead | None,
        pv_seg_head: PVSegmentationHead | None,
        image_size: tuple[int, int],
        num_cams: int = NUM_CAMS,
    ) -> None:
        super().__init__()
        if encoder.num_cams != num_cams:
            raise ValueError(f"encoder built for {encoder.num_cams} cameras, model for {num_cams}")
        self.backbone = backbone
        self.neck = neck
        self.encoder = encoder
        self.head = head
        self.bev_seg_head = bev_seg_head
        self.pv_seg_head = pv_seg_head
        self.image_size = tuple(image_size)  # (W, H)
        self.num_cams = num_cams

    def forward(self, img: Tensor, lidar2img: Tensor) -> dict:
        """
        Args:
            img: (B, Ncam, 3, H, W) normalized images of size ``image_size``.
            lidar2img: (B, Ncam, 4, 4) LiDAR -> network-input pixels.
        Returns:
            the output dict of the module docstring (training extras only when ``self.training``).
        """
        return self.predict(img, lidar2img, with_training_outputs=self.training)

    def predict(self, img: Tensor, lidar2img: Tensor, with_training_outputs: bool) -> dict:
        """``forward`` with the training extras (one2many, segmentation) chosen explicitly."""
        batch, num_cams, _, height, width = img.shape
        if (width, height) != self.image_size or num_cams != self.num_cams:
            raise ValueError(
                f"expected img (B, {self.num_cams}, 3, {self.image_size[1]}, {self.image_size[0]}), "
                f"got {tuple(img.shape)}"
            )
        images = img.flatten(0, 1)  # (B*Ncam, 3, H, W)
        camera_features = self.neck(self.backbone(images))  # (B*Ncam, C, h, w); bf16 under float.bf16
        # Under bf16 autocast only the image side above runs in bf16 (models/precision.py).
        with float32_region(camera_features):
            camera_features = as_float32(camera_features)
            bev = self.encoder(camera_features, lidar2img)  # (B, bev_h*bev_w, C)
            outputs = self.head(bev, with_one2many=with_training_outputs)
            if with_training_outputs and self.bev_seg_head is not None:
                outputs["bev_seg"] = self.bev_seg_head(bev)  # (B, 1, bev_h, bev_w)
            if with_training_outputs and self.pv_seg_head is not None:
                outputs["pv_seg"] = self.pv_seg_head(camera_features, num_cams)  # (B, Ncam, 1, h, w)
        return outputs


class MapTRInference(nn.Module):
    """Export wrapper: the one2one predictions as ``(scores, pts)``, no training extras.

    Put the wrapped model in eval mode before exporting (dropout and BatchNorm follow that mode).
    The spatial cross-attention keeps its visible-pairs path: the deployed graph samples only the
    (BEV cell, camera) pairs that see each other, as training did.
    """

    def __init__(self, model: MapTR) -> None:
        super().__init__()
        self.model = model

    def forward(self, img: Tensor, lidar2img: Tensor) -> tuple[Tensor, Tensor]:
        """
        Args:
            img: (B, Ncam, 3, H, W); lidar2img: (B, Ncam, 4, 4).
        Returns:
            scores: (B, Q1, K) sigmoid class probabilities; pts: (B, Q1, P, 2) normalized points.
        """
        outputs = self.model.predict(img, lidar2img, with_training_outputs=False)
        return outputs["pred_logits"].sigmoid(), outputs["pred_pts"]


def build_maptr(cfg: ModelConfig) -> MapTR:
    backbone = build_backbone(cfg)
    neck = build_fpn(cfg, in_channels=backbone.out_channels, in_strides=backbone.out_strides)
    encoder = build_bev_encoder(cfg, num_cams=NUM_CAMS)
    head = build_map_head(cfg, build_map_decoder(cfg))
    return MapTR(
        backbone=backbone,
        neck=neck,
        encoder=encoder,
        head=head,
        bev_seg_head=build_bev_seg_head(cfg) if cfg.bev_seg else None,
        pv_seg_head=build_pv_seg_head(cfg) if cfg.pv_seg else None,
        image_size=(cfg.image_size[0], cfg.image_size[1]),
        num_cams=NUM_CAMS,
    )
