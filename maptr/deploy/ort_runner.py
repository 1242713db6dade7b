"""Running an exported MapTR on ONNX Runtime (CPU): sessions with explicit threads, and the predictor.

The deployed graph takes one frame: ``img`` (1, Ncam, 3, H, W) and ``lidar2img`` (1, Ncam, 4, 4), and
returns ``scores`` (1, Q, K) sigmoid probabilities and ``pts`` (1, Q, P, 2) normalized points.
:class:`OrtPredictor` turns that into the :data:`~maptr.evaluation.inference.Predictor` signature that
every stage is scored with (batches in, raw logits and points out), so the deployed model goes through
the SAME post-processing and metric code as the float, calibrated and QAT models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.capi import onnxruntime_pybind11_state as _ORT_ERRORS
from torch import Tensor

from maptr.deploy.checker import LEVELS
from maptr.deploy.onnx_export import INPUT_NAMES, OUTPUT_NAMES

# Loading a model exactly as saved, no optimizer run (e.g. only to read its input shapes).
SAVED = "disabled"
_ALL_LEVELS = {**LEVELS, SAVED: ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
# How every session of the deployed model (compile's timing, validate, predict, infer) loads the saved,
# portable ``extended`` file: the fusions are already in it, and ``all`` adds the layouts of the CPU at
# hand, which ORT cannot save portably: channels-last QLinearConv and a uint8 NhwcMaxPool (nano, Xeon with
# AVX-512, 2 threads: 15.3 -> 10.7 ms; the NCHW uint8 MaxPool alone took 4.1 ms).
DEPLOYED_LEVEL = "all"


def session_options(threads: int, level: str = "all") -> ort.SessionOptions:
    """ORT CPU options: ``threads`` intra-op threads (>= 1, never ORT's all-cores default), one inter-op.

    Args:
        threads: intra-op threads; the machine is shared, so the count is always explicit.
        level: graph optimization level at load time: "basic", "extended", "all" or "disabled".
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if level not in _ALL_LEVELS:
        raise ValueError(f"level must be one of {sorted(_ALL_LEVELS)}, got {level!r}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = _ALL_LEVELS[level]
    options.log_severity_level = 3  # ORT warns that ENABLE_ALL output is CPU-specific; we say so in docs
    # ORT turns a linear with a float input and an int8 weight DQ (MapTR's int16-input linears) into
    # MatMulNBits; at ORT's default accuracy level 4 that kernel quantizes its input to int8 per 32 values,
    # which the QAT model never does (nano: 0.004 on the scores). Level 1 computes in float32, as the
    # fake-quant model does; the level is saved in the compiled file's nodes.
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return options


class OnnxModelError(RuntimeError):
    """An ONNX file that is not a usable model (garbage, truncated): names the file and the fix."""


def _unreadable(path: Path, exc: BaseException) -> OnnxModelError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return OnnxModelError(f"{path}: not a readable ONNX model (truncated or corrupt: {first}); re-run the "
                          "export / compile stage that writes it")  # fmt: skip


def check_onnx_readable(path: str | Path) -> None:
    """Parse and check ``path`` before any work is spent on it (onnx.load and the ONNX checker)."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ONNX model not found; run the export / compile stage (dvc repro)")
    try:
        onnx.checker.check_model(onnx.load(str(path)))
    except (DecodeError, onnx.checker.ValidationError, ValueError, OSError) as exc:
        raise _unreadable(path, exc) from None


def create_session(path: str | Path, threads: int, level: str = "all") -> ort.InferenceSession:
    """An ORT CPU session of ``path`` (see :func:`session_options`); checks the MapTR input / output names.
    A file ORT cannot load is an OnnxModelError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ONNX model not found; run the export / compile stage (dvc repro)")
    options = session_options(threads, level)
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except (_ORT_ERRORS.InvalidProtobuf, _ORT_ERRORS.InvalidGraph, _ORT_ERRORS.Fail) as exc:
        raise _unreadable(path, exc) from None
    inputs = tuple(i.name for i in session.get_inputs())
    outputs = tuple(o.name for o in session.get_outputs())
    if inputs != INPUT_NAMES or outputs != OUTPUT_NAMES:
        raise OnnxModelError(
            f"{path}: expected inputs {INPUT_NAMES} and outputs {OUTPUT_NAMES}, got {inputs} -> {outputs}; "
            "give a MapTR model written by the export / compile stage"
        )
    return session


def run_frame(session: ort.InferenceSession, img: np.ndarray, lidar2img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One frame: img (1, Ncam, 3, H, W), lidar2img (1, Ncam, 4, 4) -> scores (1, Q, K), pts (1, Q, P, 2)."""
    feeds = {
        "img": np.ascontiguousarray(img, dtype=np.float32),
        "lidar2img": np.ascontiguousarray(lidar2img, dtype=np.float32),
    }
    scores, pts = session.run(list(OUTPUT_NAMES), feeds)
    return scores, pts


def scores_to_logits(scores: np.ndarray) -> np.ndarray:
    """Inverse sigmoid, in float64: the post-process takes logits and applies the sigmoid itself.

    Saturated probabilities map to +-inf, whose sigmoid is exactly 1 or 0 again, so the post-process
    sees the deployed model's probabilities unchanged (to float32 rounding).
    """
    p = scores.astype(np.float64)
    with np.errstate(divide="ignore"):
        return np.log(p) - np.log1p(-p)


class OrtPredictor:
    """A :data:`~maptr.evaluation.inference.Predictor` backed by an ORT session of the deployed graph.

    Call: img (B, Ncam, 3, H, W), lidar2img (B, Ncam, 4, 4) -> logits (B, Q, K), pts (B, Q, P, 2) as
    float32 CPU tensors. The batch-1 graph runs once per sample. The raw ``scores`` of the last call are
    kept in :attr:`last_scores` (B, Q, K) for agreement checks.
    """

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.last_scores: np.ndarray | None = None

    @classmethod
    def from_path(cls, path: str | Path, threads: int, level: str = "all") -> OrtPredictor:
        return cls(create_session(path, threads, level))

    def __call__(self, img: Tensor, lidar2img: Tensor) -> tuple[Tensor, Tensor]:
        if img.dim() != 5 or lidar2img.shape != (img.shape[0], img.shape[1], 4, 4):
            raise ValueError(f"expected img (B, Ncam, 3, H, W) and lidar2img (B, Ncam, 4, 4), got "
                             f"{tuple(img.shape)} and {tuple(lidar2img.shape)}")  # fmt: skip
        scores, pts = [], []
        for b in range(img.shape[0]):
            s, p = run_frame(self.session, img[b : b + 1].numpy(), lidar2img[b : b + 1].numpy())
            scores.append(s)  # (1, Q, K)
            pts.append(p)  # (1, Q, P, 2)
        self.last_scores = np.concatenate(scores)  # (B, Q, K)
        logits = scores_to_logits(self.last_scores).astype(np.float32)  # (B, Q, K)
        return torch.from_numpy(logits), torch.from_numpy(np.concatenate(pts))


class RecordingPredictor:
    """Wraps a predictor and keeps what it returned: scores (sigmoid of the logits) and points, per batch.

    Used to compare two models on exactly the inputs the metric saw (:func:`output_agreement`).
    """

    def __init__(self, predictor) -> None:
        self.predictor = predictor
        self.scores: list[np.ndarray] = []  # per batch (B, Q, K)
        self.pts: list[np.ndarray] = []  # per batch (B, Q, P, 2)

    def __call__(self, img: Tensor, lidar2img: Tensor) -> tuple[Tensor, Tensor]:
        logits, pts = self.predictor(img, lidar2img)
        self.scores.append(torch.sigmoid(logits.double()).numpy())
        self.pts.append(pts.double().numpy())
        return logits, pts

    def outputs(self) -> tuple[np.ndarray, np.ndarray]:
        """All recorded outputs: scores (N, Q, K), pts (N, Q, P, 2), in call order."""
        return np.concatenate(self.scores), np.concatenate(self.pts)


def output_agreement(
    scores: np.ndarray,
    pts: np.ndarray,
    ref_scores: np.ndarray,
    ref_pts: np.ndarray,
    pc_range: list[float],
    top_k: int,
) -> dict[str, float]:
    """How closely a model (the deployed one) reproduces a reference (the QAT model) on the same inputs.

    Args:
        scores, ref_scores: (N, Q, K) class probabilities; pts, ref_pts: (N, Q, P, 2) normalized points.
        pc_range: [x0, y0, z0, x1, y1, z1], to express point differences in meters too.
        top_k: per sample, the ``top_k`` queries with the highest reference score are compared by class.
    Returns:
        scores_max_abs_diff / scores_mean_abs_diff; pts_max_abs_diff / pts_mean_abs_diff (normalized) and
        pts_max_abs_diff_m / pts_mean_abs_diff_m (Euclidean, meters, all queries) and
        topk_pts_mean_abs_diff_m (the top-k queries: the ones that become detections); topk_class_agreement:
        fraction of those top-k queries whose best class (argmax over K) is the same in both; samples.
    """
    if scores.shape != ref_scores.shape or pts.shape != ref_pts.shape or scores.shape[:2] != pts.shape[:2]:
        raise ValueError(
            f"shape mismatch: scores {scores.shape} vs {ref_scores.shape}, pts {pts.shape} vs {ref_pts.shape}"
        )
    num_queries = scores.shape[1]
    if not 1 <= top_k <= num_queries:
        raise ValueError(f"top_k must be in [1, {num_queries}], got {top_k}")
    score_diff = np.abs(scores - ref_scores)  # (N, Q, K)
    pts_diff = np.abs(pts - ref_pts)  # (N, Q, P, 2)
    extent = np.array([pc_range[3] - pc_range[0], pc_range[4] - pc_range[1]])  # (2,) meters per unit
    meters = np.linalg.norm((pts - ref_pts) * extent, axis=-1)  # (N, Q, P)
    top = np.argsort(-ref_scores.max(axis=2), axis=1, kind="stable")[:, :top_k]  # (N, top_k) query indices
    same = np.take_along_axis(scores.argmax(axis=2), top, 1) == np.take_along_axis(ref_scores.argmax(axis=2), top, 1)
    return {
        "scores_max_abs_diff": float(score_diff.max()),
        "scores_mean_abs_diff": float(score_diff.mean()),
        "pts_max_abs_diff": float(pts_diff.max()),
        "pts_mean_abs_diff": float(pts_diff.mean()),
        "pts_max_abs_diff_m": float(meters.max()),
        "pts_mean_abs_diff_m": float(meters.mean()),
        "topk_pts_mean_abs_diff_m": float(np.take_along_axis(meters, top[:, :, None], 1).mean()),
        "topk_class_agreement": float(same.mean()),
        "top_k": top_k,
        "samples": int(scores.shape[0]),
    }
