"""How a scene looks: lighting, sky, haze and the colours of every surface, drawn per scene.

All colours are RGB floats in [0, 255] *after* lighting (brightness and colour temperature are applied
here once), so the raster painter, the sky and the obstacle shader just use them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SceneAppearance:
    """Per-scene look.

    Attributes:
        brightness: global exposure gain (about 0.5 dusk .. 1.35 bright noon).
        tint: (3,) RGB gains of the colour temperature (warm > 1 in red, cool > 1 in blue).
        sun_direction: (3,) unit vector towards the sun in the global frame (z up).
        shadow_strength: 0 (overcast) .. 0.6, how much cast shadows darken the ground.
        visibility: meters; haze reaches 63 % at this distance.
        sky_zenith, sky_horizon: (3,) RGB.
        terrain, walkway, asphalt, curb, paint_white, paint_yellow: (3,) RGB surface colours.
        texture_noise: standard deviation (grey levels) of the ground texture.
    """

    brightness: float
    tint: np.ndarray
    sun_direction: np.ndarray
    shadow_strength: float
    visibility: float
    sky_zenith: np.ndarray
    sky_horizon: np.ndarray
    terrain: np.ndarray
    walkway: np.ndarray
    asphalt: np.ndarray
    curb: np.ndarray
    paint_white: np.ndarray
    paint_yellow: np.ndarray
    texture_noise: float

    def lit(self, rgb: np.ndarray | list[float]) -> np.ndarray:
        """A base colour (3,) under this scene's light, clipped to [0, 255]."""
        return np.clip(np.asarray(rgb, dtype=np.float64) * self.brightness * self.tint, 0.0, 255.0)


def draw_appearance(rng: np.random.Generator) -> SceneAppearance:
    """Random but plausible daylight: from overcast dusk to sunny noon, warm to cool."""
    brightness = float(rng.uniform(0.5, 1.35))
    warmth = float(rng.uniform(-1.0, 1.0))  # -1 cool/blue .. +1 warm/orange
    tint = np.array([1.0 + 0.12 * warmth, 1.0, 1.0 - 0.15 * warmth])
    overcast = rng.random() < 0.35
    elevation = np.radians(rng.uniform(15.0, 70.0))
    azimuth = rng.uniform(-np.pi, np.pi)
    sun = np.array([np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth), np.sin(elevation)])
    terrain_base = [
        [92, 128, 62],  # grass
        [120, 130, 80],  # dry grass
        [130, 115, 90],  # dirt
        [78, 110, 70],  # dark vegetation
    ][int(rng.integers(4))]
    asphalt_grey = float(rng.uniform(70.0, 115.0))
    walkway_grey = float(rng.uniform(135.0, 185.0))
    gain = brightness * tint

    def lit(rgb: list[float] | np.ndarray) -> np.ndarray:
        return np.clip(np.asarray(rgb, dtype=np.float64) * gain, 0.0, 255.0)

    jitter = rng.uniform(0.92, 1.08, size=3)
    return SceneAppearance(
        brightness=brightness,
        tint=tint,
        sun_direction=sun,
        shadow_strength=0.0 if overcast else float(rng.uniform(0.3, 0.6)),
        visibility=float(rng.uniform(70.0, 260.0)) if overcast else float(rng.uniform(150.0, 400.0)),
        sky_zenith=lit(np.array([150, 165, 180] if overcast else [70, 120, 200]) * jitter),
        sky_horizon=lit([200, 205, 210] if overcast else [175, 200, 230]),
        terrain=lit(np.array(terrain_base) * jitter),
        walkway=lit([walkway_grey, walkway_grey * 0.98, walkway_grey * 0.95]),
        asphalt=lit([asphalt_grey, asphalt_grey, asphalt_grey * 1.03]),
        curb=lit([200.0, 200.0, 195.0]),
        paint_white=lit([235.0, 235.0, 230.0]),
        paint_yellow=lit([230.0, 190.0, 40.0]),
        texture_noise=float(rng.uniform(4.0, 10.0)),
    )
