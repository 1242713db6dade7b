"""Running an exported MapTR on ONNX Runtime (CPU): the one place ORT sessions are configured, and the predictor.

Every ORT session of the project takes its options from :func:`session_options` (the deployed model's,
the compile stage's optimizer run, the constant folding's evaluation, the model checker's profiled run), so
that all of them run with explicit threads and the same ``MatMulNBits`` accuracy level.

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

from maptr.deploy.onnx_export import INPUT_NAMES, OUTPUT_NAMES

# The graph optimization levels a model can be optimized at (compile.optimization_level, check_model --level).
LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,  # where the Q/DQ -> integer fusions happen
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,  # + hardware-specific layouts (NCHWc)
}
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
