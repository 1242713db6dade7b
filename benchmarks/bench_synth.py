"""Benchmark of the synthetic world's hot paths, on one thread.

    python benchmarks/bench_synth.py [--scenes 3] [--width 480] [--height 270]

Prints, per stage: road network + scenery + appearance (per scene), ground raster painting (per scene),
renderer set-up (per scene), one camera image (render, then JPEG encode), and the projected time of the
default world (72 scenes x 20 samples x 6 cameras) on one and on two processes.
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np

from maptr.data.synthetic.appearance import draw_appearance
from maptr.data.synthetic.raster import GROUND_RESOLUTION, paint_ground
from maptr.data.synthetic.render import SceneRenderer, encode_jpeg, rig_geometry
from maptr.data.synthetic.rig import build_rig
from maptr.data.synthetic.road_network import EgoWindow, build_network, draw_main_profile, ego_lane_offset, plan_tile
from maptr.data.synthetic.scene import RASTER_MARGIN
from maptr.data.synthetic.scenery import place_scenery
from maptr.data.synthetic.trajectory import draw_speed, drive_lane, travel_distance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=3)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--width", type=int, default=480)
    parser.add_argument("--height", type=int, default=270)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    times: dict[str, list[float]] = {"network": [], "raster": [], "renderer": [], "render": [], "jpeg": []}

    start = time.perf_counter()
    geometry = rig_geometry(build_rig(args.width, args.height))
    geometry_s = time.perf_counter() - start
    for index in range(args.scenes):
        rng = np.random.default_rng([0, 0, index])
        t0 = time.perf_counter()
        profile = draw_main_profile(rng)
        speed = draw_speed(rng)
        window = EgoWindow(start=70.0, travel=travel_distance(speed, args.samples))
        plan = plan_tile(rng, profile, window, np.array([250.0, 250.0]))
        net = build_network(rng, plan, profile, drive_left=False)
        traj = drive_lane(rng, net.main, ego_lane_offset(rng, net), window.start, speed, args.samples, 0)
        boxes = place_scenery(rng, net)
        look = draw_appearance(rng)
        t1 = time.perf_counter()
        lo, hi = traj.xy.min(axis=0) - RASTER_MARGIN, traj.xy.max(axis=0) + RASTER_MARGIN
        raster = paint_ground(rng, net, boxes, look, (lo[0], lo[1], hi[0], hi[1]), GROUND_RESOLUTION)
        t2 = time.perf_counter()
        renderer = SceneRenderer(geometry, raster, boxes, look)
        t3 = time.perf_counter()
        times["network"].append(t1 - t0)
        times["raster"].append(t2 - t1)
        times["renderer"].append(t3 - t2)
        for k in range(args.samples):
            for cam in range(len(geometry)):
                t4 = time.perf_counter()
                image = renderer.render(cam, traj.xy[k], float(traj.yaw[k]), (k % 64, cam * 7))
                t5 = time.perf_counter()
                encode_jpeg(image, 90)
                times["render"].append(t5 - t4)
                times["jpeg"].append(time.perf_counter() - t5)

    ms = {name: 1e3 * float(np.mean(values)) for name, values in times.items()}
    print(f"threads: 1 (cv2.setNumThreads(1)); image {args.width}x{args.height}; {args.scenes} scenes")
    print(f"camera geometry (once per process): {geometry_s * 1e3:.0f} ms")
    print(
        f"per scene: network+scenery {ms['network']:.0f} ms, raster {ms['raster']:.0f} ms, "
        f"renderer set-up {ms['renderer']:.0f} ms"
    )
    print(f"per image: render {ms['render']:.2f} ms, jpeg {ms['jpeg']:.2f} ms")
    per_scene = (ms["network"] + ms["raster"] + ms["renderer"]) / 1e3 + 120 * (ms["render"] + ms["jpeg"]) / 1e3
    print(
        f"default world (72 scenes x 120 images): {72 * per_scene:.1f} s on 1 process, "
        f"{36 * per_scene:.1f} s on 2 (rendering only; tables/maps/stats add a few seconds)"
    )


if __name__ == "__main__":
    main()
