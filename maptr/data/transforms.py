"""The guide's multi-view image transforms, each keeping ``lidar2img`` consistent with the pixels.

Order (as the guide's data_loader): resize every view to the network width (keeping the aspect ratio),
fit to the network height by cropping the top (sky) or padding the bottom, then in training colour jitter
and GridMask, then tensor conversion with optional RGB->YUV444 and normalization ``(x - 128) / 128``.

Every geometric step left-multiplies ``lidar2img`` (rows: u*d, v*d, d, 1) by the same pixel-space affine
map that moved the pixels, so a ground point projected with the returned matrix lands on the same
painted pixel as before.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch


def fit_to_size(
    images: list[np.ndarray], lidar2img: np.ndarray, out_w: int, out_h: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """Resize each view to width ``out_w`` and crop its top / pad its bottom to height ``out_h``.

    Args:
        images: Ncam arrays (H, W, 3) uint8.
        lidar2img: (Ncam, 4, 4) projection matrices of those images.
    Returns:
        images (out_h, out_w, 3) uint8 and the (Ncam, 4, 4) float32 projections of the new pixels.
    """
    out_imgs, out_mats = [], []
    for img, mat in zip(images, lidar2img, strict=True):
        h, w = img.shape[:2]
        scale = out_w / w
        new_h = int(round(h * scale))
        resized = cv2.resize(img, (out_w, new_h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        top = max(new_h - out_h, 0)  # rows of sky cropped away
        canvas = np.zeros((out_h, out_w, 3), dtype=np.uint8)
        kept = resized[top : top + out_h]
        canvas[: kept.shape[0]] = kept
        affine = np.eye(4)
        affine[0, 0] = scale  # u' = s u
        affine[1, 1] = scale  # v' = s v - top  ->  (v' d) = s (v d) - top * d
        affine[1, 2] = -top
        out_imgs.append(canvas)
        out_mats.append(affine @ mat)
    return out_imgs, np.asarray(out_mats, dtype=np.float32)


class GridMask:
    """GridMask (Chen et al. 2020): hide a regular grid of squares, with the guide's settings.

    With ``mode=1`` the mask is inverted (the squares are kept, the grid lines hidden), as in the guide's
    ``GridMask(use_h=True, use_w=True, rotate=1, offset=False, ratio=0.5, mode=1, prob=0.7)``.
    """

    def __init__(self, ratio: float = 0.5, mode: int = 1, prob: float = 0.7) -> None:
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"GridMask ratio must be in (0, 1), got {ratio}")
        self.ratio, self.mode, self.prob = ratio, mode, prob

    def __call__(self, img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """img: (3, H, W) uint8 -> same shape, masked pixels set to 0."""
        if torch.rand((), generator=gen).item() >= self.prob:
            return img
        _, h, w = img.shape
        period = int(torch.randint(2, max(3, min(h, w) // 2), (), generator=gen))
        length = max(1, int(period * self.ratio))
        oy, ox = (int(v) for v in torch.randint(0, period, (2,), generator=gen))
        rows = ((torch.arange(h) + oy) % period) < length  # (H,)
        cols = ((torch.arange(w) + ox) % period) < length  # (W,)
        hidden = rows[:, None] | cols[None, :]  # (H, W) grid lines
        if self.mode == 1:
            hidden = ~hidden
        return img * (~hidden).to(img.dtype)


def rgb_to_yuv444(img: torch.Tensor) -> torch.Tensor:
    """(3, H, W) float RGB in [0, 255] -> YUV444 (BT.601 full range, as JPEG) in [0, 255]."""
    r, g, b = img[0], img[1], img[2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    u = -0.168736 * r - 0.331264 * g + 0.5 * b + 128.0
    v = 0.5 * r - 0.418688 * g - 0.081312 * b + 128.0
    return torch.stack([y, u, v])


# The network sees ``(pixel - PIXEL_OFFSET) / PIXEL_SCALE``: 8-bit pixels land on a grid of step 1 / 128
# over [-1, 127 / 128], which the quantizer uses as the image input's exact uint8 grid.
PIXEL_OFFSET = 128.0
PIXEL_SCALE = 128.0


def normalized_pixel_range() -> tuple[float, float]:
    """The normalized values of pixels 0 and 255: the range of every image the network is fed."""
    return (0.0 - PIXEL_OFFSET) / PIXEL_SCALE, (255.0 - PIXEL_OFFSET) / PIXEL_SCALE


class MultiViewImageTransform:
    """Per-view photometric augmentation and normalization.

    Args:
        augment: apply colour jitter and GridMask (training only).
        color_jitter: (brightness, contrast, saturation, hue), the guide's (0.4, 0.4, 0.4, 0.1).
        grid_mask_prob: probability of GridMask per view.
        yuv: convert RGB to YUV444 before normalizing (the guide's BgrToYuv444, for YUV camera inputs).
    """

    def __init__(
        self,
        augment: bool,
        color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
        grid_mask_prob: float = 0.7,
        yuv: bool = False,
    ) -> None:
        self.augment = augment
        self.color_jitter = color_jitter
        self.grid_mask = GridMask(prob=grid_mask_prob)
        self.yuv = yuv

    def jitter(self, img: np.ndarray, gen: torch.Generator) -> np.ndarray:
        """torchvision ColorJitter semantics (random factors, random order) on one (H, W, 3) uint8 RGB view,
        in OpenCV (several times faster than the tensor version, hue above all). Factors come from ``gen``,
        not from a global RNG, so a sample's augmentation depends only on its seed, not on the workers."""
        b, c, s, h = self.color_jitter
        u = torch.rand(4, generator=gen).tolist()
        factors = (1 + b * (2 * u[0] - 1), 1 + c * (2 * u[1] - 1), 1 + s * (2 * u[2] - 1), h * (2 * u[3] - 1))
        x = img.astype(np.float32)
        for op in torch.randperm(4, generator=gen).tolist():
            f = factors[op]
            if op == 0:  # brightness: scale
                x = x * f
            elif op == 1:  # contrast: blend with the mean grey level
                gray = cv2.cvtColor(np.clip(x, 0, 255).astype(np.uint8), cv2.COLOR_RGB2GRAY).mean()
                x = (x - gray) * f + gray
            elif op == 2:  # saturation: blend with the grey image
                gray = cv2.cvtColor(np.clip(x, 0, 255).astype(np.uint8), cv2.COLOR_RGB2GRAY)[..., None]
                x = (x - gray) * f + gray
            else:  # hue: rotate the H channel (OpenCV's uint8 hue spans 0..179 for 360 degrees)
                hsv = cv2.cvtColor(np.clip(x, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV)
                hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + int(round(f * 180))) % 180).astype(np.uint8)
                x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).astype(np.float32)
            x = np.clip(x, 0, 255)
        return x.astype(np.uint8)

    def __call__(self, images: list[np.ndarray], gen: torch.Generator) -> torch.Tensor:
        """Ncam (H, W, 3) uint8 RGB -> (Ncam, 3, H, W) float32 normalized to about [-1, 1]."""
        views = []
        for img in images:
            if self.augment:
                img = self.jitter(img, gen)
            x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)  # (3, H, W) uint8
            if self.augment:
                x = self.grid_mask(x, gen)
            x = x.float()
            if self.yuv:
                x = rgb_to_yuv444(x)
            views.append((x - PIXEL_OFFSET) / PIXEL_SCALE)
        return torch.stack(views)  # (Ncam, 3, H, W)
