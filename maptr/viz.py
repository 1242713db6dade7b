"""Pictures people would rather look at than read: BEV maps, camera overlays, PR and learning curves.

BEV panels are drawn in the LiDAR frame with x to the right and y (forward) up, the ego at the center.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from maptr.atomic import atomic_file  # noqa: E402
from maptr.classes import CLASS_NAMES  # noqa: E402
from maptr.data.seg_targets import ground_height  # noqa: E402

CLASS_COLORS = ("#ff9f1c", "#2e86de", "#27ae60")  # orange, blue, green (RGB hex)


def _save(fig, path: str | Path) -> None:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi, bbox_inches="tight")
    plt.close(fig)


def draw_bev(
    ax,
    vectors: Sequence[np.ndarray],
    labels: Sequence[int],
    pc_range: Sequence[float],
    scores: Sequence[float] | None = None,
    title: str = "",
) -> None:
    """Polylines (K_i, 2) meters in the LiDAR frame on a matplotlib axis, coloured by class."""
    x0, y0, _, x1, y1, _ = pc_range
    for i, (vec, lab) in enumerate(zip(vectors, labels, strict=True)):
        vec = np.asarray(vec)
        alpha = 1.0 if scores is None else float(np.clip(scores[i], 0.25, 1.0))
        ax.plot(vec[:, 0], vec[:, 1], "-", color=CLASS_COLORS[int(lab)], lw=1.6, alpha=alpha)
        ax.plot(vec[:, 0], vec[:, 1], ".", color=CLASS_COLORS[int(lab)], ms=2.5, alpha=alpha)
    ax.add_patch(plt.Rectangle((-0.9, -2.2), 1.8, 4.4, color="black", alpha=0.6))  # the ego car
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_aspect("equal")
    ax.set_xticks([x0, 0, x1])
    ax.set_yticks([y0, 0, y1])
    ax.set_title(title, fontsize=9)


def bev_comparison(
    gt: dict,
    pred: dict,
    pc_range: Sequence[float],
    path: str | Path,
    score_threshold: float = 0.3,
    title: str = "",
) -> None:
    """Ground truth beside predictions (score >= threshold) as one PNG."""
    fig, axes = plt.subplots(1, 2, figsize=(5, 5), dpi=120)
    draw_bev(axes[0], gt["vectors"], gt["labels"], pc_range, title="ground truth")
    keep = np.asarray(pred["scores"]) >= score_threshold
    draw_bev(
        axes[1],
        [v for v, k in zip(pred["vectors"], keep, strict=True) if k],
        np.asarray(pred["labels"])[keep],
        pc_range,
        scores=np.asarray(pred["scores"])[keep],
        title=f"prediction (score >= {score_threshold})",
    )
    _legend(fig)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def _legend(fig) -> None:
    handles = [plt.Line2D([], [], color=c, lw=2) for c in CLASS_COLORS]
    fig.legend(handles, CLASS_NAMES, loc="lower center", ncol=3, fontsize=8, frameon=False)


def project_to_image(
    vectors: Sequence[np.ndarray], lidar2img: np.ndarray, lidar2ego: np.ndarray
) -> list[list[np.ndarray]]:
    """Ground polylines -> per camera, the pixel polylines of their parts in front of the camera."""
    out: list[list[np.ndarray]] = [[] for _ in range(lidar2img.shape[0])]
    for vec in vectors:
        vec = np.asarray(vec, dtype=np.float64)
        # densify so that parts behind the camera are cut close to the image border
        steps = np.linspace(0, 1, 8)[:-1]
        parts = [a + (b - a) * steps[:, None] for a, b in zip(vec[:-1], vec[1:], strict=True)]
        dense = np.concatenate([*parts, vec[-1:]])  # (K, 2)
        pts = np.concatenate([dense, ground_height(lidar2ego, dense)[:, None], np.ones((len(dense), 1))], axis=1)
        proj = np.einsum("cij,nj->cni", lidar2img.astype(np.float64), pts)  # (Ncam, K, 4)
        for cam in range(len(out)):
            front = proj[cam, :, 2] > 0.5
            uv = proj[cam, :, :2] / np.maximum(proj[cam, :, 2:3], 1e-6)
            edges = np.flatnonzero(np.diff(np.concatenate([[0], front.astype(np.int8), [0]])))
            out[cam] += [uv[s:e] for s, e in zip(edges[::2], edges[1::2], strict=True) if e - s >= 2]
    return out


def camera_overlay(
    images: Sequence[np.ndarray],
    cam_names: Sequence[str],
    lidar2img: np.ndarray,
    lidar2ego: np.ndarray,
    pred: dict,
    pc_range: Sequence[float],
    path: str | Path,
    gt: dict | None = None,
    score_threshold: float = 0.3,
    title: str = "",
    pred_title: str = "prediction (BEV)",
) -> None:
    """Six camera images with the predicted map projected onto the ground, and the BEV map beside them.

    Args:
        images: Ncam (H, W, 3) uint8 RGB, the pixels that ``lidar2img`` (Ncam, 4, 4) projects into.
        pred: {vectors, labels, scores} meters in the LiDAR frame; gt: optional {vectors, labels}.
    """
    keep = np.asarray(pred["scores"]) >= score_threshold
    vectors = [v for v, k in zip(pred["vectors"], keep, strict=True) if k]
    labels = np.asarray(pred["labels"])[keep]
    ncols = 3 + (2 if gt is not None else 1)
    fig = plt.figure(figsize=(3.2 * ncols, 4.2), dpi=110)
    grid = fig.add_gridspec(2, ncols)
    order = [2, 0, 1, 4, 3, 5]  # FRONT_LEFT FRONT FRONT_RIGHT / BACK_LEFT BACK BACK_RIGHT
    for slot, cam in enumerate(order[: len(images)]):
        ax = fig.add_subplot(grid[slot // 3, slot % 3])
        img = images[cam]
        ax.imshow(img)
        for vec, lab in _with_labels(vectors, labels, lidar2img[cam : cam + 1], lidar2ego):
            ax.plot(vec[:, 0], vec[:, 1], "-", color=CLASS_COLORS[int(lab)], lw=1.4)
        ax.set_xlim(0, img.shape[1])
        ax.set_ylim(img.shape[0], 0)
        ax.set_axis_off()
        ax.set_title(cam_names[cam], fontsize=8)
    ax = fig.add_subplot(grid[:, 3])
    draw_bev(ax, vectors, labels, pc_range, scores=np.asarray(pred["scores"])[keep], title=pred_title)
    if gt is not None:
        ax = fig.add_subplot(grid[:, 4])
        draw_bev(ax, gt["vectors"], gt["labels"], pc_range, title="ground truth (BEV)")
    _legend(fig)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def _with_labels(vectors, labels, lidar2img_one: np.ndarray, lidar2ego: np.ndarray):
    for vec, lab in zip(vectors, labels, strict=True):
        for part in project_to_image([vec], lidar2img_one, lidar2ego)[0]:
            yield part, lab


def pr_curves(curves, path: str | Path, title: str = "") -> None:
    """Precision-recall curve per class (one panel each), one line per chamfer threshold."""
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.4), dpi=110, squeeze=False)
    for ax, per_thr in zip(axes[0], curves, strict=True):
        for curve in per_thr:
            ax.plot(curve.recall, curve.precision, label=f"{curve.threshold} m: AP {curve.ap:.3f}")
        name = CLASS_NAMES[per_thr[0].class_id] if per_thr else "?"
        ax.set_title(f"{name} ({per_thr[0].num_gt if per_thr else 0} GT)", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.legend(fontsize=7, loc="lower left")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def learning_curve(history: Sequence[dict], path: str | Path, title: str = "") -> None:
    """Validation mAP (and per class AP) of the validated epochs, and training loss per epoch."""
    epochs = [h["epoch"] for h in history]
    validated = [h for h in history if "mAP" in h]  # float.val_every_epochs may skip epochs
    val_epochs = [h["epoch"] for h in validated]
    fig, (ax_map, ax_loss) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    ax_map.plot(val_epochs, [h["mAP"] for h in validated], "o-", color="black", label="mAP")
    for name, color in zip(CLASS_NAMES, CLASS_COLORS, strict=True):
        ax_map.plot(val_epochs, [h.get(f"AP_{name}", np.nan) for h in validated], ".--", color=color,
                    label=f"AP {name}")  # fmt: skip
    ax_map.set_xlabel("epoch")
    ax_map.set_ylabel("val AP (chamfer)")
    ax_map.set_ylim(0, 1)
    ax_map.grid(alpha=0.3)
    ax_map.legend(fontsize=7)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", color="tab:red")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("train loss (weighted sum)")
    ax_loss.grid(alpha=0.3)
    for ax in (ax_map, ax_loss):  # epochs are whole numbers: no 1.5 ticks on short runs
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
