"""A synthetic world in nuScenes format that nuscenes-devkit reads unchanged.

Procedural roads (straights, arcs, T/X junctions, ped crossings, dividers, curbs, sidewalks) per scene
tile, written as map-expansion JSONs; an ego car driving one lane; six cameras rendered from the map
through nuScenes' n015 calibration; the 13 tables. Entry point: :func:`generate_world`.
"""

from maptr.data.synthetic.stats import FLOORS, WorldBelowFloorError
from maptr.data.synthetic.world import generate_world, scene_names

__all__ = ["FLOORS", "WorldBelowFloorError", "generate_world", "scene_names"]
