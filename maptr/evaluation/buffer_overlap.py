"""MapTR's buffer rule: a (prediction, GT) pair is scored only if the two lines, each grown by a
2 m flat-capped, mitre-joined buffer, intersect; any other pair can never match.

MapTR tests every pair with shapely. Here the rule is decided in two steps:

1. **A sufficient test, vectorized.** Both buffers contain their own (non-degenerate) line. A point
   ``p`` of line A lies inside the buffer of line B when its distance to B is at most the width and the
   point of B nearest to ``p`` is not one of B's two ends: then ``p`` is either in the rectangle swept
   by the segment holding that nearest point, or in the join region of an interior vertex (a mitre
   join contains the round join's sector). So if some resampled point of A has a resampled point of B
   within ``width`` that is strictly closer than both of B's end points, the buffers intersect (the
   same with A and B swapped). This reads only what the chamfer distance already computes: the
   squared distance matrix of the two point sets.
2. **The exact test, only where step 1 cannot decide.** Both steps run only on the pairs whose chamfer
   distance is within the largest threshold: farther pairs are false positives whatever the rule says.
   The few pairs step 1 leaves are buffered and intersected with shapely, as MapTR does.

A zero-length line buffers to an empty shape, so it never intersects anything.
"""

from __future__ import annotations

import numpy as np
import torch

BUFFER_WIDTH = 2.0  # meters: MapTR's ``linewidth`` passed from its tp/fp function
MITRE_LIMIT = 5.0  # shapely's default, as in MapTR's call
# Margins that keep float32 rounding of the squared distances (~1e-4 m^2 on centered coordinates) from
# deciding a pair: anything closer to the boundary than this goes to the exact test.
_WIDTH_MARGIN = 1e-2  # meters
_ORDER_MARGIN = 1e-2  # squared meters


def sure_overlap(
    sq: torch.Tensor,
    nearest_gt: torch.Tensor,
    nearest_pred: torch.Tensor,
    pairs: torch.Tensor,
    shape: tuple[int, int, int, int],
    width: float,
) -> torch.Tensor:
    """Which of the given pairs certainly have intersecting buffers (step 1 above).

    Args:
        sq: (Np*S, Ng*S2) squared distances between every resampled prediction point and GT point.
        nearest_gt: (Np*S, Ng) its minimum over each GT line's points.
        nearest_pred: (Np, Ng*S2) its minimum over each prediction line's points.
        pairs: (K, 2) int64 (prediction, GT) indices to decide.
        shape: (Np, S, Ng, S2), the shapes ``sq`` was built from.
        width: buffer width in meters.
    Returns:
        (K,) bool: True where the buffers intersect for sure; False means "undecided".
    """
    num_pred, s_pred, num_gt, s_gt = shape
    i, j = pairs[:, 0], pairs[:, 1]
    reach = (width - _WIDTH_MARGIN) ** 2
    sq4 = sq.view(num_pred, s_pred, num_gt, s_gt)
    # Prediction points against the GT line: nearest GT sample vs the GT's two end samples.
    near = nearest_gt.view(num_pred, s_pred, num_gt)[i, :, j]  # (K, S)
    ends = torch.minimum(sq4[i, :, j, 0], sq4[i, :, j, -1])  # (K, S)
    pred_in_gt = ((near <= reach) & (near + _ORDER_MARGIN < ends)).any(dim=1)  # (K,)
    # GT points against the prediction line.
    near = nearest_pred.view(num_pred, num_gt, s_gt)[i, j]  # (K, S2)
    ends = torch.minimum(sq4[i, 0, j, :], sq4[i, -1, j, :])  # (K, S2)
    gt_in_pred = ((near <= reach) & (near + _ORDER_MARGIN < ends)).any(dim=1)  # (K,)
    return pred_in_gt | gt_in_pred


def buffers_intersect(pred: np.ndarray, gt: np.ndarray, width: float = BUFFER_WIDTH) -> np.ndarray:
    """The exact rule for K pairs: shapely buffers (flat caps, mitre joins) of both lines intersect.

    Args:
        pred: (K, S, 2) float64 resampled prediction lines.
        gt: (K, S2, 2) float64 resampled GT lines, pair k = (pred[k], gt[k]).
    Returns:
        (K,) bool.
    """
    import shapely  # only here: the vectorized path needs no shapely (GPU machines may lack it)

    if len(pred) == 0:
        return np.zeros(0, dtype=bool)
    a = shapely.buffer(shapely.linestrings(pred), width, cap_style="flat", join_style="mitre", mitre_limit=MITRE_LIMIT)
    b = shapely.buffer(shapely.linestrings(gt), width, cap_style="flat", join_style="mitre", mitre_limit=MITRE_LIMIT)
    return np.asarray(shapely.intersects(a, b), dtype=bool)
