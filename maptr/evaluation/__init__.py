"""Evaluation: post-processing of model outputs and the chamfer-distance mAP of the MapTR benchmark."""

from maptr.evaluation.chamfer_ap import CLASS_NAMES, PRCurve, evaluate, precision_recall_curves
from maptr.evaluation.postprocess import MapTRPostProcess, build_postprocess

__all__ = [
    "CLASS_NAMES",
    "MapTRPostProcess",
    "PRCurve",
    "build_postprocess",
    "evaluate",
    "precision_recall_curves",
]
