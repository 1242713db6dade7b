"""Draw the DVC stage graph (`dvc dag --dot`) with each stage's outputs, for the README.

    python docs/stage_graph.py --out docs/images/stage_graph.png

The graph is read from DVC itself, so the picture follows dvc.yaml; stages are placed left to right in
dependency order (longest path from the sources), outputs from dvc.yaml are written under each box.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402


def read_dag() -> tuple[list[str], list[tuple[str, str]]]:
    """Stages in DVC's order and the (upstream, downstream) edges, from `dvc dag --dot`."""
    dot = subprocess.run(["dvc", "dag", "--dot"], capture_output=True, text=True, check=True).stdout
    edges = re.findall(r'"([^"]+)" -> "([^"]+)"', dot)
    nodes = [n for n in re.findall(r'^"([^"]+)";$', dot, flags=re.M)]
    return nodes, edges


def layer_of(nodes: list[str], edges: list[tuple[str, str]]) -> dict[str, int]:
    """Longest-path layer of every node (sources are layer 0)."""
    layer = {n: 0 for n in nodes}
    for _ in nodes:  # relax |V| times: enough for a DAG
        for a, b in edges:
            layer[b] = max(layer[b], layer[a] + 1)
    return layer


def stage_outputs(dvc_yaml: Path) -> dict[str, list[str]]:
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    result = {}
    for name, stage in stages.items():
        items = [*stage.get("outs", []), *stage.get("metrics", [])]
        result[name] = [next(iter(o)) if isinstance(o, dict) else o for o in items]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dvc-yaml", default="dvc.yaml")
    p.add_argument("--out", default="docs/images/stage_graph.png")
    args = p.parse_args()

    nodes, edges = read_dag()
    layer = layer_of(nodes, edges)
    order = sorted(nodes, key=lambda n: layer[n])
    x = {n: 2.2 * i for i, n in enumerate(order)}
    outputs = stage_outputs(Path(args.dvc_yaml))

    fig, ax = plt.subplots(figsize=(2.0 * len(order), 4.2))
    for n in order:
        box = FancyBboxPatch((x[n] - 0.8, -0.3), 1.6, 0.6, boxstyle="round,pad=0.05", fc="#dbe8f6", ec="#2b5d8a")
        ax.add_patch(box)
        ax.text(x[n], 0, n, ha="center", va="center", fontsize=11, weight="bold")
        below = "\n".join(Path(o).name for o in outputs.get(n, []))
        ax.text(x[n], -0.5, below, ha="center", va="top", fontsize=7.5, color="#333")
    for a, b in edges:
        span = order.index(b) - order.index(a)
        if span == 1:
            ax.annotate("", xy=(x[b] - 0.85, 0), xytext=(x[a] + 0.85, 0),
                        arrowprops=dict(arrowstyle="-|>", color="#2b5d8a", lw=1.5))  # fmt: skip
        else:  # a skip edge (data or checkpoint reused further down): an arc above the chain
            ax.annotate("", xy=(x[b], 0.36), xytext=(x[a], 0.36),
                        arrowprops=dict(arrowstyle="-|>", color="#999", lw=1.0,
                                        connectionstyle=f"arc3,rad=-{0.12 + 0.02 * span}"))  # fmt: skip
    ax.set_xlim(-1.1, x[order[-1]] + 1.1)
    ax.set_ylim(-1.3, 2.4)
    ax.axis("off")
    ax.set_title("dvc dag: stages left to right; grey arcs = an output reused by a later stage", fontsize=10)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
