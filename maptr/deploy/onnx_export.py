"""ONNX export of MapTR's inference graph, float or fake-quantized (Q/DQ), with the dynamo exporter.

The exported graph is :class:`~maptr.models.maptr.MapTRInference`: inputs ``img`` (1, Ncam, 3, H, W) and
``lidar2img`` (1, Ncam, 4, 4), outputs ``scores`` (1, Q, K) sigmoid class probabilities and ``pts``
(1, Q, P, 2) normalized points. Fake-quant modules in QUANTIZE mode become QuantizeLinear ->
DequantizeLinear pairs through :func:`~maptr.quant.fake_quant.onnx_translation_table` (opset 21: int16
Q/DQ needs it). Inputs and outputs have static shapes (batch 1), as the deployed model runs one frame at a
time; inside, the spatial cross-attention samples only the (BEV cell, camera) pairs that see each other,
whose count depends on ``lidar2img`` (NonZero), exactly as in training.

Export goes in two explicit steps, ``torch.export.export`` then the ONNX conversion of that program,
so that when an operator has no ONNX translation the error names the module it sits in
(:class:`UnexportableOperatorError`) instead of an anonymous FX node. The file is written atomically.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import Tensor, nn

from maptr.atomic import atomic_file
from maptr.data.transforms import PIXEL_OFFSET, PIXEL_SCALE
from maptr.models.maptr import MapTR, MapTRInference
from maptr.quant.fake_quant import ONNX_OPSET, FakeQuantize, FakeQuantMode, onnx_translation_table

INPUT_NAMES = ("img", "lidar2img")
OUTPUT_NAMES = ("scores", "pts")


class UnexportableOperatorError(RuntimeError):
    """An operator of the model has no ONNX translation (or cannot be traced); names the module."""


@dataclass
class ExportResult:
    path: Path
    seconds: float
    num_nodes: int
    scores: Tensor  # (1, Q, K) the PyTorch outputs for the example inputs (reference for ONNX Runtime)
    pts: Tensor  # (1, Q, P, 2)


def pinhole_rig(image_size: tuple[int, int], num_cams: int = 6) -> Tensor:
    """lidar2img of ``num_cams`` pinhole cameras evenly spread in yaw around the car, 1.5 m up.

    A stand-in for a real rig when only the graph matters (export, the model checker): every BEV
    region is seen by some camera, so no part of the sampler runs on an empty input.
    Returns (1, Ncam, 4, 4).
    """
    width, height = image_size
    focal = 0.8 * width
    intrinsics = torch.tensor(
        [[focal, 0.0, width / 2, 0.0], [0.0, focal, height / 2, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    )
    mats = []
    for cam in range(num_cams):
        yaw = 2.0 * math.pi * cam / num_cams
        # Camera axes in the LiDAR frame (x right, y forward, z up): right, down, forward.
        forward = torch.tensor([math.sin(yaw), math.cos(yaw), 0.0])
        right = torch.tensor([math.cos(yaw), -math.sin(yaw), 0.0])
        down = torch.tensor([0.0, 0.0, -1.0])
        lidar2cam = torch.eye(4)
        lidar2cam[:3, :3] = torch.stack([right, down, forward])
        lidar2cam[:3, 3] = -lidar2cam[:3, :3] @ torch.tensor([0.0, 0.0, 1.5])  # camera 1.5 m above the LiDAR
        mats.append(intrinsics @ lidar2cam)
    return torch.stack(mats)[None]  # (1, Ncam, 4, 4)


def random_pixel_images(shape: tuple[int, ...] | list[int], seed: int = 0) -> Tensor:
    """Uniformly random 8-bit pixels, normalized as the data pipeline normalizes camera images: what the
    network is fed, on the pixel grid that quantizes the image input losslessly. (..., 3, H, W) float32."""
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, tuple(shape), generator=gen).float()
    return (pixels - PIXEL_OFFSET) / PIXEL_SCALE


def example_inputs(model: MapTR, seed: int = 0) -> tuple[Tensor, Tensor]:
    """:func:`random_pixel_images` (1, Ncam, 3, H, W) and :func:`pinhole_rig` for the model's input size."""
    width, height = model.image_size
    img = random_pixel_images((1, model.num_cams, 3, height, width), seed)
    return img, pinhole_rig((width, height), model.num_cams)


def _check_exportable_modes(model: nn.Module) -> None:
    observing = [
        name for name, m in model.named_modules() if isinstance(m, FakeQuantize) and m.mode is FakeQuantMode.OBSERVE
    ]
    if observing:
        raise ValueError(
            f"{len(observing)} fake-quant(s) still in OBSERVE mode (e.g. {observing[0]!r}): calibrate and freeze "
            "the model (maptr.quant.calibration.freeze_calibration) before exporting"
        )


def _module_of_failed_node(exc: BaseException, program: torch.export.ExportedProgram) -> str | None:
    """'<module path> (<class>)' of the FX node an ONNX conversion error names, if it can be found."""
    text = ""
    seen: BaseException | None = exc
    while seen is not None:  # the node is named in a chained ConversionError
        text += f"\n{seen}"
        seen = seen.__cause__ or seen.__context__
    match = re.search(r"translating node %(\S+) ", text)
    if match is None:
        return None
    for node in program.graph.nodes:
        if node.name == match.group(1):
            stack = node.meta.get("nn_module_stack") or {}
            if not stack:
                return "the top-level module"
            path, cls = list(stack.values())[-1]
            path = path.removeprefix("model.")  # the export wrapper holds MapTR as .model
            cls_name = (cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))).rsplit(".", 1)[-1]
            return f"{path or 'the top-level module'} ({cls_name}), FX node {node.name} = {node.target}"
    return None


def _failure_summary(exc: BaseException) -> str:
    """The most specific line of an exporter error chain (its DispatchError / first line)."""
    lines = []
    seen: BaseException | None = exc
    while seen is not None:
        lines.append(str(seen).strip().splitlines()[0] if str(seen).strip() else type(seen).__name__)
        seen = seen.__cause__ or seen.__context__
    dispatch = [line for line in lines if "No ONNX function" in line or "not supported" in line.lower()]
    return (dispatch or lines[-1:])[0]


def export_onnx(
    model: MapTR,
    path: str | Path,
    inputs: tuple[Tensor, Tensor] | None = None,
    opset: int = ONNX_OPSET,
) -> ExportResult:
    """Exports ``model``'s inference graph (batch 1) to ``path`` atomically.

    Args:
        model: float or quantized MapTR (fake-quants frozen: QUANTIZE or DISABLED); put in eval mode here.
        path: the ``.onnx`` file to write (a temporary sibling is renamed into place when complete).
        inputs: example ``(img (1, Ncam, 3, H, W), lidar2img (1, Ncam, 4, 4))``; :func:`example_inputs`
            by default. Any inputs of that shape give the same graph (the camera-pair count is dynamic).
        opset: ONNX opset, 21 or later for int16 Q/DQ.
    Raises:
        UnexportableOperatorError naming the module when an operator cannot be traced or translated.
    """
    model.eval()
    _check_exportable_modes(model)
    wrapper = MapTRInference(model).eval()
    img, lidar2img = inputs if inputs is not None else example_inputs(model)
    if img.shape[0] != 1 or lidar2img.shape[0] != 1:
        raise ValueError(f"the deployed graph takes batch 1, got img {tuple(img.shape)}")
    start = time.perf_counter()
    with torch.no_grad():
        # One eager forward: weight fake-quants take their scales from the current weights (they are
        # read from buffers while exporting), and the outputs are the reference for ONNX Runtime.
        scores, pts = wrapper(img, lidar2img)
    try:
        program = torch.export.export(wrapper, (img, lidar2img), strict=False)
    except Exception as exc:  # torch.export raises many types; all mean "this model cannot be traced"
        raise UnexportableOperatorError(f"torch.export cannot trace the model: {_failure_summary(exc)}") from exc
    try:
        onnx_program = torch.onnx.export(
            program,
            (img, lidar2img),
            dynamo=True,
            opset_version=opset,
            custom_translation_table=onnx_translation_table(),
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            verbose=False,
        )
    except torch.onnx.OnnxExporterError as exc:
        where = _module_of_failed_node(exc, program) or "an unidentified module"
        raise UnexportableOperatorError(
            f"operator in {where} cannot be exported to ONNX opset {opset}: {_failure_summary(exc)}. "
            "Give it an ONNX translation (as maptr.quant.fake_quant.onnx_translation_table does for "
            "maptr::fake_quant) or express it with standard operators."
        ) from exc
    with atomic_file(path) as tmp:
        onnx_program.save(str(tmp), external_data=False)
    num_nodes = len(onnx_program.model_proto.graph.node)
    return ExportResult(Path(path), time.perf_counter() - start, num_nodes, scores, pts)


def check_onnx_file(path: str | Path) -> dict[str, list[int]]:
    """``onnx.checker`` (full check) and strict shape inference of an exported file.

    Returns the inferred static shape of every graph output (name -> dims); raises
    ``onnx.checker.ValidationError`` / ``onnx.shape_inference.InferenceError`` on an invalid model and
    ValueError when an output shape is not fully static.
    """
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    shapes = {}
    for output in inferred.graph.output:
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in output.type.tensor_type.shape.dim]
        if not dims or min(dims) < 1:
            raise ValueError(f"{path}: output {output.name} has no static shape after inference ({dims})")
        shapes[output.name] = dims
    return shapes


def qdq_dtype_counts(model: onnx.ModelProto) -> dict[str, int]:
    """QuantizeLinear nodes per quantized type (the dtype of their zero point): {"uint8": n, "int8": n, ...}."""
    dtypes = {init.name: init.data_type for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    dtypes[node.output[0]] = attr.t.data_type
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) > 2:
            name = onnx.helper.tensor_dtype_to_np_dtype(dtypes.get(node.input[2], onnx.TensorProto.UINT8)).name
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def log_onnx_model(path: str | Path, name: str, registered: str | None = None, source: str | Path | None = None):
    """Logs ``path`` as an MLflow model (flavour ``onnx``, with its signature) to the active run, registered
    as a new version of ``registered`` when given (see maptr.deploy.registry); None when no run is active."""
    from maptr.deploy.registry import log_onnx

    return log_onnx(path, name, registered=registered, source=source)
