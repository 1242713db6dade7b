"""Map-expansion JSONs (``maps/expansion/<location>.json``, version 1.3) from the tiles' road networks.

Writes every key ``NuScenesMap`` reads: the geometric layers (node, line, polygon), the polygon layers,
the line layers, ``arcline_path_3`` for every lane and lane connector and ``connectivity`` for the lane
graph. Node coordinates are rounded to millimetres: shared vertices stay bit-identical (they are the same
float before rounding), and the files stay small.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from maptr.data.synthetic.network import RoadNetwork
from maptr.data.synthetic.road_network import road_union
from maptr.data.synthetic.tokens import make_token

LOCATIONS = ("singapore-onenorth", "boston-seaport", "singapore-hollandvillage", "singapore-queenstown")
MAP_VERSION = "1.3"
_LIST_LAYERS = (
    "polygon",
    "line",
    "node",
    "drivable_area",
    "road_segment",
    "road_block",
    "lane",
    "ped_crossing",
    "walkway",
    "stop_line",
    "carpark_area",
    "road_divider",
    "lane_divider",
    "traffic_light",
    "lane_connector",
)
_SEGMENT_TYPES = {
    "double_yellow": "DOUBLE_SOLID_YELLOW",
    "solid_yellow": "SINGLE_SOLID_YELLOW",
    "double_white": "DOUBLE_SOLID_WHITE",
    "solid_white": "SINGLE_SOLID_WHITE",
    "dashed_white": "DOUBLE_DASHED_WHITE",
}


class MapExpansionBuilder:
    """Accumulates the records of one location's map; :meth:`add_tile` once per scene tile."""

    def __init__(self, namespace: str, location: str) -> None:
        if location not in LOCATIONS:
            raise ValueError(f"unknown location {location!r}; nuScenes maps are {LOCATIONS}")
        self.namespace = namespace
        self.location = location
        self.layers: dict[str, list[dict[str, Any]]] = {name: [] for name in _LIST_LAYERS}
        self.arcline_path_3: dict[str, list[dict]] = {}
        self.connectivity: dict[str, dict[str, list[str]]] = {}
        self._max_xy = np.zeros(2)

    def _token(self, *parts: object) -> str:
        return make_token(self.namespace, "map", self.location, *parts)

    def _nodes(self, points: np.ndarray, key: tuple) -> list[str]:
        tokens = []
        for i, (x, y) in enumerate(np.round(np.asarray(points, dtype=np.float64), 3)):
            tok = self._token(*key, "node", i)
            self.layers["node"].append({"token": tok, "x": float(x), "y": float(y)})
            tokens.append(tok)
        self._max_xy = np.maximum(self._max_xy, np.asarray(points).max(axis=0))
        return tokens

    def _polygon(self, ring: np.ndarray, key: tuple) -> str:
        tok = self._token(*key, "polygon")
        nodes = self._nodes(ring, key)
        self.layers["polygon"].append({"token": tok, "exterior_node_tokens": nodes, "holes": []})
        return tok

    def _line(self, points: np.ndarray, key: tuple) -> tuple[str, list[str]]:
        tok = self._token(*key, "line")
        nodes = self._nodes(points, key)
        self.layers["line"].append({"token": tok, "node_tokens": nodes})
        return tok, nodes

    def add_tile(self, tile: str, net: RoadNetwork) -> None:
        """All elements of one tile (``tile`` names it uniquely, e.g. the scene name)."""
        divider_tokens, divider_nodes = [], []
        for i, d in enumerate(net.dividers):
            key = (tile, "divider", i)
            line_tok, nodes = self._line(d.points, key)
            tok = self._token(*key)
            divider_tokens.append(tok)
            divider_nodes.append([{"node_token": n, "segment_type": _SEGMENT_TYPES[d.style]} for n in nodes])
            if d.kind == "road":
                self.layers["road_divider"].append({"token": tok, "line_token": line_tok, "road_segment_token": ""})
            else:
                self.layers["lane_divider"].append(
                    {"token": tok, "line_token": line_tok, "lane_divider_segments": divider_nodes[-1]}
                )

        area_tok = self._token(tile, "drivable_area")
        union = road_union(net)
        area_polys = [
            self._polygon(np.asarray(p.exterior.coords)[:-1], (tile, "drivable_area", k))
            for k, p in enumerate(getattr(union, "geoms", [union]))
        ]
        self.layers["drivable_area"].append({"token": area_tok, "polygon_tokens": area_polys})
        for i, seg in enumerate(net.road_segments):
            key = (tile, "road_segment", i)
            self.layers["road_segment"].append(
                {
                    "token": self._token(*key),
                    "polygon_token": self._polygon(seg.polygon, key),
                    "is_intersection": seg.is_intersection,
                    "drivable_area_token": area_tok,
                }
            )

        lane_tokens = [self._token(tile, "lane", i) for i in range(len(net.lanes))]
        for i, lane in enumerate(net.lanes):
            key = (tile, "lane", i)
            poly = self._polygon(lane.polygon, key)
            if lane.is_connector:
                self.layers["lane_connector"].append({"token": lane_tokens[i], "polygon_token": poly})
            else:
                self.layers["lane"].append(
                    {
                        "token": lane_tokens[i],
                        "polygon_token": poly,
                        "lane_type": "CAR",
                        "from_edge_line_token": None,
                        "to_edge_line_token": None,
                        "left_lane_divider_segments": [s for d in lane.left_dividers for s in divider_nodes[d]],
                        "right_lane_divider_segments": [s for d in lane.right_dividers for s in divider_nodes[d]],
                    }
                )
            self.arcline_path_3[lane_tokens[i]] = [_rounded_arcline(p) for p in lane.arcline]
            self.connectivity[lane_tokens[i]] = {
                "incoming": [lane_tokens[j] for j in lane.incoming],
                "outgoing": [lane_tokens[j] for j in lane.outgoing],
            }

        for i, crossing in enumerate(net.crossings):
            key = (tile, "ped_crossing", i)
            self.layers["ped_crossing"].append(
                {
                    "token": self._token(*key),
                    "polygon_token": self._polygon(crossing.polygon, key),
                    "road_segment_token": "",
                }
            )
        for i, ring in enumerate(net.walkways):
            key = (tile, "walkway", i)
            self.layers["walkway"].append({"token": self._token(*key), "polygon_token": self._polygon(ring, key)})

    def to_json(self) -> dict[str, Any]:
        """The map-expansion document; an empty map still has every key and a nonzero canvas."""
        edge = np.maximum(np.ceil(self._max_xy + 100.0), [1000.0, 1000.0])
        doc: dict[str, Any] = {"version": MAP_VERSION, "canvas_edge": [float(edge[0]), float(edge[1])]}
        doc.update(self.layers)
        doc["arcline_path_3"] = self.arcline_path_3
        doc["connectivity"] = self.connectivity
        return doc


def _rounded_arcline(path: dict) -> dict:
    return {
        "start_pose": [round(v, 6) for v in path["start_pose"]],
        "end_pose": [round(v, 6) for v in path["end_pose"]],
        "shape": path["shape"],
        "radius": round(path["radius"], 6),
        "segment_length": [round(v, 6) for v in path["segment_length"]],
    }
