"""Camera renderer: each pixel's ray meets the flat ground (z = 0) or the sky; boxes are drawn on top.

The car is always level on flat ground, so in the ego frame every camera pixel hits the same ground
point at every pose: :class:`CameraGeometry` computes those points once per camera, and a pose only
rotates and shifts them (one small matmul) before ``cv2.remap`` samples the ground raster. Distance haze,
the sky gradient, vignetting and the choice of raster mip level depend only on the pixel, so they are
folded into per-camera weights once per scene. Obstacles are projected boxes painted far-to-near
(painter's algorithm) with near-plane clipping, so they occlude the ground and each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from maptr.data.synthetic.appearance import SceneAppearance
from maptr.data.synthetic.raster import GROUND_RESOLUTION, LEVEL_FACTOR, NUM_LEVELS, GroundRaster
from maptr.data.synthetic.rig import SensorCalibration, SensorRig, quaternion_to_matrix
from maptr.data.synthetic.scenery import Boxes

NEAR_PLANE = 0.3  # meters in front of a camera
MAX_BOX_DISTANCE = 150.0  # boxes beyond this are lost in haze anyway
SENSOR_NOISE_SIGMA = 3.0
SUBPIXEL_SHIFT = 4
_FACES = np.array([[0, 3, 2, 1], [4, 5, 6, 7], [0, 1, 5, 4], [1, 2, 6, 5], [2, 3, 7, 6], [3, 0, 4, 7]])


@dataclass
class CameraGeometry:
    """Per-pixel facts of one camera that do not depend on the pose.

    Attributes:
        calib: the camera's calibration (intrinsic at the rendered size).
        ground_xy: (H, W, 2) float32 ground point of each pixel in the ego frame (far away for the sky).
        ground_distance: (H, W) float32 meters from the camera to that point (inf for the sky).
        footprint: (H, W) float32 meters of ground one pixel covers, geometric mean of its two axes.
        sky_rise: (H, W) float32 sky gradient position, 0 at the horizon .. 1 high up.
        vignette: (H, W) float32 lens fall-off gain.
        mip_bands: per raster level, (row0, row1, weight) with weight (row1 - row0, W) float32: how much
            of each pixel comes from that level, on the band of rows where it contributes (a level camera
            sees fine texels only low in the image and coarse ones near the horizon, so each level's
            remap covers only its band).
    """

    calib: SensorCalibration
    ground_xy: np.ndarray
    ground_distance: np.ndarray
    footprint: np.ndarray
    sky_rise: np.ndarray
    vignette: np.ndarray
    mip_bands: list[tuple[int, int, np.ndarray]]


def camera_geometry(calib: SensorCalibration, width: int, height: int) -> CameraGeometry:
    """Cast every pixel's ray (pixel centers at integer coordinates, as the intrinsics assume)."""
    assert calib.intrinsic is not None
    u, v = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))  # (H, W)
    pix = np.stack([u, v, np.ones_like(u)], axis=-1)  # (H, W, 3)
    rays = pix @ np.linalg.inv(calib.intrinsic).T @ quaternion_to_matrix(calib.rotation).T  # (H, W, 3) ego
    origin = np.asarray(calib.translation)
    down = rays[..., 2] < -1e-6
    t = np.where(down, -origin[2] / np.where(down, rays[..., 2], -1.0), np.inf)  # (H, W) ray parameter
    ground = origin[:2] + np.where(down, t, 1e6)[..., None] * rays[..., :2]  # (H, W, 2)
    norm = np.linalg.norm(rays, axis=-1)
    distance = np.where(down, t * norm, np.inf)
    # Footprint: how far the ground point moves between neighbouring pixels. Far ground is seen at a
    # grazing angle: a pixel spans much more ground along the view (dv) than across it (du). The
    # geometric mean keeps thin lines that run away from the camera (dividers, zebra stripes) visible,
    # where the isotropic max would blur them into the asphalt, at the price of some aliasing along it.
    dv = np.linalg.norm(np.diff(ground, axis=0, append=ground[-1:] * 2 - ground[-2:-1]), axis=-1)
    du = np.linalg.norm(np.diff(ground, axis=1, append=ground[:, -1:] * 2 - ground[:, -2:-1]), axis=-1)
    footprint = np.where(down, np.sqrt(du * dv), np.inf)
    radius = np.hypot((u - width / 2) / (width / 2), (v - height / 2) / (width / 2))
    # Mip level: log_LEVEL_FACTOR of texels per pixel, blended linearly between neighbouring levels.
    level = np.log(np.maximum(np.where(down, footprint, 1.0) / GROUND_RESOLUTION, 1.0)) / np.log(LEVEL_FACTOR)
    level = np.clip(level, 0, NUM_LEVELS - 1)
    bands = []
    for lvl in range(NUM_LEVELS):
        weight = np.where(down, np.clip(1.0 - np.abs(level - lvl), 0.0, 1.0), 0.0)  # (H, W)
        rows = np.nonzero((weight > 1e-4).any(axis=1))[0]
        r0, r1 = (int(rows[0]), int(rows[-1]) + 1) if rows.size else (0, 0)
        bands.append((r0, r1, weight[r0:r1].astype(np.float32)))
    return CameraGeometry(
        calib=calib,
        ground_xy=ground.astype(np.float32),
        ground_distance=distance.astype(np.float32),
        footprint=footprint.astype(np.float32),
        sky_rise=(np.clip(np.arcsin(np.clip(rays[..., 2] / norm, -1, 1)) / 0.6, 0.0, 1.0) ** 0.8).astype(np.float32),
        vignette=(1.0 - 0.22 * radius**2).astype(np.float32),
        mip_bands=bands,
    )


def rig_geometry(rig: SensorRig) -> list[CameraGeometry]:
    """:class:`CameraGeometry` of every camera of the rig, in rig order."""
    return [camera_geometry(cam, rig.image_width, rig.image_height) for cam in rig.cameras]


class SceneRenderer:
    """Renders one scene's cameras at any ego pose.

    Args:
        geometry: per-camera pixel geometry (:func:`rig_geometry`).
        raster: the painted ground.
        boxes: obstacles.
        look: lighting, sky and haze.
    """

    def __init__(
        self,
        geometry: list[CameraGeometry],
        raster: GroundRaster,
        boxes: Boxes,
        look: SceneAppearance,
    ) -> None:
        self.geometry = geometry
        self.raster = raster
        self.boxes = boxes
        self.look = look
        self.corners = boxes.corners()  # (N, 8, 3)
        self._weights = [self._pixel_weights(g) for g in geometry]
        h, w = geometry[0].ground_xy.shape[:2]
        self.noise_bank = _noise_bank(h, w)
        self._box_normals = self._face_normals()  # (N, 6, 3)

    def _pixel_weights(self, geo: CameraGeometry) -> tuple[list[tuple[int, int, np.ndarray]], np.ndarray]:
        """This scene's ground weights per mip band ((rows, W, 3) float32) and the additive sky/haze term
        (H, W, 3) float32 BGR."""
        look = self.look
        haze = 1.0 - np.exp(geo.ground_distance * np.float32(-1.0 / look.visibility))  # (H, W), 1 for the sky
        ground_gain = geo.vignette * (1.0 - haze)  # (H, W) float32
        levels = [
            (r0, r1, np.repeat((weight * ground_gain[r0:r1])[..., None], 3, axis=2).astype(np.float32))
            for r0, r1, weight in geo.mip_bands
        ]
        horizon = look.sky_horizon[::-1].astype(np.float32)
        sky = horizon + geo.sky_rise[..., None] * (look.sky_zenith[::-1] - look.sky_horizon[::-1]).astype(np.float32)
        return levels, (geo.vignette * haze)[..., None] * sky  # (H, W, 3) float32 BGR

    def _face_normals(self) -> np.ndarray:
        yaw = self.boxes.yaw
        c, s, zero, one = np.cos(yaw), np.sin(yaw), np.zeros_like(yaw), np.ones_like(yaw)
        normals = [(zero, zero, -one), (zero, zero, one), (s, -c, zero), (c, s, zero), (-s, c, zero), (-c, -s, zero)]
        return np.stack([np.stack(n, axis=-1) for n in normals], axis=1)  # (N, 6, 3)

    def render(self, camera: int, ego_xy: np.ndarray, ego_yaw: float, noise_offset: tuple[int, int]) -> np.ndarray:
        """(H, W, 3) uint8 BGR image of camera ``camera`` at ego pose (x, y, yaw)."""
        geo = self.geometry[camera]
        weights, additive = self._weights[camera]
        h, w = geo.ground_xy.shape[:2]
        c, s = float(np.cos(ego_yaw)), float(np.sin(ego_yaw))
        x0, y0 = self.raster.origin
        image = additive.copy()
        for lvl, level in enumerate(self.raster.levels):
            r0, r1, weight = weights[lvl]
            if r1 == r0:
                continue
            res = self.raster.resolution * LEVEL_FACTOR**lvl
            center = (LEVEL_FACTOR**lvl - 1) / 2.0 * self.raster.resolution  # level-l pixel centers
            # Ego ground point -> global (rotate by yaw, shift by the ego position) -> level-l pixels.
            affine = np.array(
                [
                    [c / res, -s / res, (ego_xy[0] - x0 - center) / res],
                    [s / res, c / res, (ego_xy[1] - y0 - center) / res],
                ],
                dtype=np.float32,
            )
            grid = cv2.transform(geo.ground_xy[r0:r1], affine)  # (r1 - r0, W, 2) float32
            sampled = cv2.remap(
                level, grid, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=self.raster.background
            )
            band = image[r0:r1]  # a view: accumulateProduct adds into the image in place
            cv2.accumulateProduct(sampled.astype(np.float32), weight, band)
        out = cv2.convertScaleAbs(image)  # saturating float -> uint8
        self._draw_boxes(out, geo, np.asarray(ego_xy, dtype=np.float64), ego_yaw)
        oy, ox = noise_offset
        cv2.addWeighted(out, 1.0, self.noise_bank[oy : oy + h, ox : ox + w], 1.0, -128.0, dst=out)
        return out

    def _draw_boxes(self, image: np.ndarray, geo: CameraGeometry, ego_xy: np.ndarray, ego_yaw: float) -> None:
        if len(self.boxes) == 0:
            return
        calib = geo.calib
        K = calib.intrinsic
        c, s = np.cos(ego_yaw), np.sin(ego_yaw)
        ego_rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
        cam_rot = ego_rot @ quaternion_to_matrix(calib.rotation)  # camera -> global
        cam_pos = np.array([*ego_xy, 0.0]) + ego_rot @ np.asarray(calib.translation)
        dist = np.linalg.norm(self.boxes.center - cam_pos[:2], axis=1)  # (N,)
        near = np.nonzero(dist < MAX_BOX_DISTANCE)[0]
        if near.size == 0:
            return
        pts = (self.corners[near] - cam_pos) @ cam_rot  # (M, 8, 3) camera frame
        z = pts[..., 2]
        in_front = z > NEAR_PLANE
        safe_z = np.where(in_front, z, 1.0)
        u = K[0, 0] * pts[..., 0] / safe_z + K[0, 2]  # (M, 8)
        v = K[1, 1] * pts[..., 1] / safe_z + K[1, 2]
        h, w = image.shape[:2]
        fully = in_front.all(axis=1)
        off_screen = fully & ((u.max(1) < 0) | (u.min(1) > w) | (v.max(1) < 0) | (v.min(1) > h))
        keep = in_front.any(axis=1) & ~off_screen
        order = np.nonzero(keep)[0]
        order = order[np.argsort(-dist[near[order]], kind="stable")]  # far to near: painter's algorithm
        if order.size == 0:
            return
        idx = near[order]
        look = self.look
        normals = self._box_normals[idx]  # (K, 6, 3) global
        face_pts = pts[order][:, _FACES]  # (K, 6, 4, 3) camera frame
        visible = np.einsum("kfc,kfc->kf", normals @ cam_rot, face_pts.mean(axis=2)) < 0  # (K, 6)
        ambient, diffuse = (0.8, 0.15) if look.shadow_strength == 0 else (0.55, 0.55)
        shade = ambient + diffuse * np.clip(normals @ look.sun_direction, 0.0, None)  # (K, 6)
        haze = (1.0 - np.exp(-dist[idx] / look.visibility))[:, None, None]  # (K, 1, 1)
        base = np.clip(self.boxes.color[idx] * look.brightness * look.tint, 0, 255)[:, None, :]  # (K, 1, 3)
        rgb = base * shade[..., None] * (1 - haze) + look.sky_horizon * haze  # (K, 6, 3)
        colors = rgb[..., ::-1].tolist()  # BGR tuples for cv2
        face_z = face_pts[..., 2]
        fz = np.where(face_z > NEAR_PLANE, face_z, 1.0)
        proj = np.stack([K[0, 0] * face_pts[..., 0] / fz + K[0, 2], K[1, 1] * face_pts[..., 1] / fz + K[1, 2]], -1)
        scale = float(1 << SUBPIXEL_SHIFT)
        proj_int = np.ascontiguousarray(np.round(np.clip(proj, -1e5, 1e5) * scale), dtype=np.int32)  # (K, 6, 4, 2)
        clipped = (face_z <= NEAR_PLANE).any(axis=2)  # (K, 6)
        for k, f in zip(*np.nonzero(visible), strict=True):
            if clipped[k, f]:
                poly = _clip_near(face_pts[k, f])
                if poly.shape[0] < 3:
                    continue
                pp = np.stack(
                    [K[0, 0] * poly[:, 0] / poly[:, 2] + K[0, 2], K[1, 1] * poly[:, 1] / poly[:, 2] + K[1, 2]], 1
                )
                pts_int = np.round(np.clip(pp, -1e5, 1e5) * scale).astype(np.int32)
            else:
                pts_int = proj_int[k, f]
            cv2.fillConvexPoly(image, pts_int, colors[k][f], cv2.LINE_AA, SUBPIXEL_SHIFT)


_NOISE_BANKS: dict[tuple[int, int], np.ndarray] = {}


def _noise_bank(height: int, width: int) -> np.ndarray:
    """(H + 64, W + 64, 3) uint8 sensor noise around 128, made once per image size (fixed seed); each
    image adds a crop at its own offset."""
    if (height, width) not in _NOISE_BANKS:
        rng = np.random.default_rng(12345)
        bank = rng.normal(128.0, SENSOR_NOISE_SIGMA, size=(height + 64, width + 64, 3))
        _NOISE_BANKS[(height, width)] = np.clip(bank, 0, 255).astype(np.uint8)
    return _NOISE_BANKS[(height, width)]


def _clip_near(poly: np.ndarray) -> np.ndarray:
    """Sutherland-Hodgman clip of a convex polygon (K, 3) in camera coordinates to z >= NEAR_PLANE."""
    out = []
    for i in range(poly.shape[0]):
        a, b = poly[i], poly[(i + 1) % poly.shape[0]]
        a_in, b_in = a[2] >= NEAR_PLANE, b[2] >= NEAR_PLANE
        if a_in:
            out.append(a)
        if a_in != b_in:
            t = (NEAR_PLANE - a[2]) / (b[2] - a[2])
            out.append(a + t * (b - a))
    return np.array(out).reshape(-1, 3)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of a BGR uint8 image."""
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("cv2.imencode failed to encode a JPEG")
    return buf.tobytes()
