"""The sensor rig of the synthetic car: six cameras and LIDAR_TOP with nuScenes' vehicle n015 calibration.

Extrinsics are sensor -> ego (translation in meters, rotation as a unit quaternion w, x, y, z), intrinsics
are the 1600x900 pinhole matrices of v1.0-mini's n015 logs. Rendering at another image size is a plain
resize, so ``fx, cx`` scale by ``width / 1600`` and ``fy, cy`` by ``height / 900`` (the same factor at
16:9). Camera frame: x right, y down, z forward (OpenCV); ego frame: x forward, y left, z up, with z = 0
on the ground.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUSCENES_IMAGE_WIDTH = 1600
NUSCENES_IMAGE_HEIGHT = 900

# Order used everywhere (tables, rendering, mosaics): nuScenes' usual camera order.
CAMERA_CHANNELS = (
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_FRONT_LEFT",
    "CAM_BACK",
    "CAM_BACK_LEFT",
    "CAM_BACK_RIGHT",
)
LIDAR_CHANNEL = "LIDAR_TOP"

# channel -> (translation, rotation wxyz, fx, cx, cy) of n015 at 1600x900 (fx == fy in nuScenes).
_N015_CAMERAS: dict[str, tuple[tuple[float, ...], tuple[float, ...], float, float, float]] = {
    "CAM_FRONT": (
        (1.70079118954, 0.0159456324149, 1.51095763913),
        (0.4998015430569128, -0.5030316162024876, 0.4997798114386805, -0.49737083824542755),
        1266.417203046554,
        816.2670197447984,
        491.50706579294757,
    ),
    "CAM_FRONT_RIGHT": (
        (1.5508477543, -0.493404796419, 1.49574800619),
        (0.2060347966337182, -0.2026940577919598, 0.6824507824531167, -0.6713610884174485),
        1260.8474446004698,
        807.968244525554,
        495.3344268742088,
    ),
    "CAM_FRONT_LEFT": (
        (1.52387798135, 0.494631336551, 1.50932822144),
        (0.6757265034669446, -0.6736266522251881, 0.21214015046209478, -0.21122827103904068),
        1272.5979470598488,
        826.6154927353808,
        479.75165386361925,
    ),
    "CAM_BACK": (
        (0.0283260309358, 0.00345136761476, 1.57910346144),
        (0.5037872666382278, -0.49740249788611096, -0.4941850223835201, 0.5045496097725578),
        809.2209905677063,
        829.2196003259838,
        481.77842384512485,
    ),
    "CAM_BACK_LEFT": (
        (1.03569100218, 0.484795032713, 1.59097014818),
        (0.6924185592174665, -0.7031619420114925, -0.11648342771943819, 0.11203317912370753),
        1256.7414812095406,
        792.1125740759628,
        492.7757465151356,
    ),
    "CAM_BACK_RIGHT": (
        (1.0148780988, -0.480568219723, 1.56239545128),
        (0.12280980120078765, -0.132400842670559, -0.7004305821388234, 0.690496031265798),
        1259.5137405846733,
        807.2529053838625,
        501.19579884916527,
    ),
}
_N015_LIDAR = (
    (0.943713, 0.0, 1.84023),
    (0.7077955119163518, -0.006492242056004365, 0.010646214713995808, -0.7063073142877817),
)


def quaternion_to_matrix(q: np.ndarray | list[float] | tuple[float, ...]) -> np.ndarray:
    """(4,) quaternion w, x, y, z (normalized here) -> (3, 3) rotation matrix."""
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def yaw_to_quaternion(yaw: float) -> list[float]:
    """Rotation about +z by ``yaw`` radians as w, x, y, z (the ego pose of a car on flat ground)."""
    return [float(np.cos(yaw / 2.0)), 0.0, 0.0, float(np.sin(yaw / 2.0))]


def pose_matrix(translation: np.ndarray | list[float], rotation: np.ndarray | list[float]) -> np.ndarray:
    """(4, 4) homogeneous transform from a translation (3,) and a quaternion w, x, y, z (4,)."""
    mat = np.eye(4)
    mat[:3, :3] = quaternion_to_matrix(rotation)
    mat[:3, 3] = np.asarray(translation, dtype=np.float64)
    return mat


@dataclass(frozen=True)
class SensorCalibration:
    """One calibrated sensor: extrinsics sensor -> ego and, for cameras, the scaled intrinsics.

    Attributes:
        channel: nuScenes channel name (``CAM_FRONT`` ... ``LIDAR_TOP``).
        translation: (3,) sensor origin in the ego frame, meters.
        rotation: (4,) quaternion w, x, y, z, sensor -> ego.
        intrinsic: (3, 3) pinhole matrix at the rendered image size; None for the lidar.
    """

    channel: str
    translation: tuple[float, float, float]
    rotation: tuple[float, float, float, float]
    intrinsic: np.ndarray | None

    @property
    def modality(self) -> str:
        return "lidar" if self.intrinsic is None else "camera"

    def sensor_to_ego(self) -> np.ndarray:
        """(4, 4) transform from sensor coordinates to ego coordinates."""
        return pose_matrix(self.translation, self.rotation)


@dataclass(frozen=True)
class SensorRig:
    """The six cameras (in :data:`CAMERA_CHANNELS` order) and the lidar, at one image size."""

    cameras: tuple[SensorCalibration, ...]
    lidar: SensorCalibration
    image_width: int
    image_height: int

    def camera(self, channel: str) -> SensorCalibration:
        for cam in self.cameras:
            if cam.channel == channel:
                return cam
        raise KeyError(f"no camera {channel!r}; the rig has {[c.channel for c in self.cameras]}")


def scaled_intrinsic(fx: float, cx: float, cy: float, image_width: int, image_height: int) -> np.ndarray:
    """(3, 3) nuScenes pinhole matrix resized from 1600x900 to ``image_width`` x ``image_height``."""
    sx = image_width / NUSCENES_IMAGE_WIDTH
    sy = image_height / NUSCENES_IMAGE_HEIGHT
    return np.array([[fx * sx, 0.0, cx * sx], [0.0, fx * sy, cy * sy], [0.0, 0.0, 1.0]])


def build_rig(image_width: int, image_height: int) -> SensorRig:
    """The n015 rig with camera intrinsics for ``image_width`` x ``image_height`` images."""
    if image_width < 16 or image_height < 16:
        raise ValueError(f"image size must be at least 16x16 pixels, got {image_width}x{image_height}")
    cameras = tuple(
        SensorCalibration(
            channel=channel,
            translation=_N015_CAMERAS[channel][0],  # type: ignore[arg-type]
            rotation=_N015_CAMERAS[channel][1],  # type: ignore[arg-type]
            intrinsic=scaled_intrinsic(*_N015_CAMERAS[channel][2:], image_width, image_height),
        )
        for channel in CAMERA_CHANNELS
    )
    lidar = SensorCalibration(
        channel=LIDAR_CHANNEL,
        translation=_N015_LIDAR[0],  # type: ignore[arg-type]
        rotation=_N015_LIDAR[1],  # type: ignore[arg-type]
        intrinsic=None,
    )
    return SensorRig(cameras=cameras, lidar=lidar, image_width=image_width, image_height=image_height)


def camera_optical_axis_yaw_deg(cam: SensorCalibration) -> float:
    """Yaw of a camera's optical axis (camera +z) in the ego frame, degrees (0 = forward, + = left)."""
    axis = quaternion_to_matrix(cam.rotation)[:, 2]  # (3,) camera z in ego coordinates
    return float(np.degrees(np.arctan2(axis[1], axis[0])))
