"""Compiling for ONNX Runtime (CPU): optimize the Q/DQ graph once, save it, and measure what it became.

"Compiling" here is graph rewrites run ahead of time (:func:`prepare_for_ort`), then ORT's optimizer:

1. the input-independent part of the graph is computed once
   (:func:`~maptr.deploy.constant_folding.fold_constants`: ORT folds it in a float model but not
   behind a DequantizeLinear);
2. the ReLUs that the uint8 quantization after them already performs are removed
   (:func:`~maptr.deploy.redundant_relu.drop_relus_before_quantize`: left in, they keep linears in float);
3. every uint8 linear gets its int32 bias written here
   (:func:`~maptr.deploy.integer_bias.quantize_float_output_biases`): ORT writes it only for those
   followed by a ``QuantizeLinear``, so the ones whose output stays float ran as float Gemm on
   dequantized inputs;
4. the stem convolution is rewritten over 2x2 blocks
   (:func:`~maptr.deploy.stem_space_to_depth.space_to_depth_stem`: 12 input channels instead of 3 reach
   ORT's fast integer convolution kernel; bit-identical outputs), and the 16-bit Q -> DQ pairs in front
   of the operators ORT runs in float anyway are removed
   (:func:`~maptr.deploy.int16_rounding.drop_int16_rounding`: ORT has no 16-bit kernel, so the pair only
   rounded a float tensor to a 16-bit grid; those operators read it unrounded);
5. ORT's own graph optimizer: at ``extended`` level it fuses every ``DequantizeLinear -> op ->
   QuantizeLinear`` group it has an integer kernel for (QLinearConv, QGemm, QLinearAdd, QLinearMatMul,
   ...), folds constants and fuses LayerNorm patterns; the result is written with
   ``SessionOptions.optimized_model_filepath``;
6. ORT's fused integer linears (``QGemm``) move to kernels that add the bias after the integer GEMM
   (:func:`~maptr.deploy.qgemm_kernels.move_qgemm_to_faster_kernels`): a channels-last 1x1
   ``QLinearConv`` where the output is uint8 (bit-identical), ``MatMulIntegerToFloat`` with a float bias
   where it is float (float rounding); QGemm's accumulate-mode bias kept it from using a second thread;
7. the constant DQs ORT left in front of kernels that stay float are folded into float initializers
   (nothing reads their integer grid any more), except the weight and bias DQs of a float ``Gemm`` or
   ``Conv`` whose input is dequantized, which ORT would re-quantize per tensor when loading the file
   (:data:`~maptr.deploy.constant_folding._WEIGHT_REQUANTIZED_AT_LOAD`; none left once step 4 removed
   the 16-bit pairs);
8. a convolution's output flattened to tokens (``Reshape(N, C, H*W) -> Transpose(0, 2, 1)``) is written
   as ``Transpose(0, 2, 3, 1) -> Reshape`` (:mod:`~maptr.deploy.conv_output_layout`), so that the
   NHWC -> NCHW transpose ORT puts after its channels-last convolution at load cancels against it;
9. ORT's fused ``SkipLayerNormalization`` nodes are written back as ``Sum -> LayerNormalization``
   (:mod:`~maptr.deploy.skip_layer_norm`): on 64 channels the fused CPU kernel is 2-6x slower than the
   standard one (nano: 8 nodes, ~0.5 ms per frame at 2 threads, ~1.5 ms at 1);
10. chains of shape-only nodes that end in a ``Reshape`` collapse into that ``Reshape``
    (:mod:`~maptr.deploy.reshape_chains`): ORT's Gemm fusion and step 6 wrap every linear in reshapes
    (nano: 50 of 366 nodes removed; bit-identical);
11. element-wise operators that broadcast in runs of a few floats (deformable attention's reference
    points and offset normalizer) read their small input expanded to the full shape
    (:mod:`~maptr.deploy.small_broadcasts`): ORT walks such a broadcast run by run on one thread
    (nano: 3 nodes, ~0.3 ms per frame at 2 threads; bit-identical).

That file is portable across x86 CPUs. Every session of the deployed model loads it at
:data:`~maptr.deploy.ort_runner.DEPLOYED_LEVEL` (``all``): ORT then adds the layouts of the CPU it runs
on (channels-last integer convolutions and max-pool), which it cannot save portably.

What the compiled model became, beside the float ONNX model (latency, operators, sizes), is measured
in :mod:`maptr.deploy.compile_report`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from maptr.atomic import atomic_file
from maptr.deploy.checker import LEVELS
from maptr.deploy.constant_folding import FoldReport, fold_constants
from maptr.deploy.conv_output_layout import flatten_conv_outputs_channels_last
from maptr.deploy.int16_rounding import drop_int16_rounding
from maptr.deploy.integer_bias import quantize_float_output_biases
from maptr.deploy.ort_runner import DEPLOYED_LEVEL, SAVED, create_session, run_frame, session_options
from maptr.deploy.qgemm_kernels import QGemmRewrites, move_qgemm_to_faster_kernels
from maptr.deploy.redundant_relu import drop_relus_before_quantize
from maptr.deploy.reshape_chains import collapse_reshape_chains
from maptr.deploy.skip_layer_norm import split_skip_layer_norms
from maptr.deploy.small_broadcasts import expand_short_run_broadcasts
from maptr.deploy.stem_space_to_depth import space_to_depth_stem

if TYPE_CHECKING:
    import onnxruntime as ort


@dataclass
class PreparedModel:
    """A Q/DQ model after the rewrites that run before ORT's optimizer, and what each did."""

    model: onnx.ModelProto
    fold: FoldReport  # what the constant folding removed
    relus_removed: int  # ReLUs made redundant by the uint8 quantization after them
    integer_biases: int  # float biases of uint8 linears written as int32 DQs
    space_to_depth_convs: int  # stride-2 integer convolutions on < 4 channels rewritten over 2x2 blocks
    int16_pairs_removed: int  # 16-bit Q -> DQ pairs in front of float kernels


@dataclass
class AfterOrt:
    """ORT's optimized graph after the rewrites that follow ORT's optimizer, and what each did."""

    model: onnx.ModelProto
    qgemm_rewrites: QGemmRewrites
    float_weights_folded: int
    conv_outputs_channels_last: int
    skip_layer_norms_split: int
    reshapes_collapsed: int
    broadcasts_expanded: int


@dataclass
class CompiledModel:
    path: Path  # the saved, optimized model
    fold: FoldReport  # what the constant folding removed
    relus_removed: int  # ReLUs made redundant by the uint8 quantization after them
    integer_biases: int  # uint8 linears given an int32 bias, so that the float-output ones run as QGemm too
    space_to_depth_convs: int  # the stem convolution as a 12-channel block convolution (exact)
    int16_pairs_removed: int  # 16-bit Q -> DQ pairs removed: those operators read the float tensor
    qgemm_rewrites: QGemmRewrites  # ORT's QGemm nodes moved to kernels that add the bias after the GEMM
    float_weights_folded: int  # constant DQs ORT left in front of float kernels, folded after its optimizer
    conv_outputs_channels_last: int  # conv -> tokens flattened channels-last (no NCHW round trip at load)
    skip_layer_norms_split: int  # ORT's SkipLayerNormalization nodes as Sum -> LayerNormalization
    reshapes_collapsed: int  # shape-only nodes removed by collapsing Reshape chains
    broadcasts_expanded: int  # element-wise operators whose short-run broadcast input is expanded first


def prepare_for_ort(model: onnx.ModelProto) -> PreparedModel:
    """The graph rewrites done before ORT's optimizer: constant folding, redundant ReLUs, integer biases,
    the stem convolution over 2x2 blocks, the 16-bit rounding pairs."""
    folded, report = fold_constants(model)
    without_relus, relus = drop_relus_before_quantize(folded)
    with_biases, biases = quantize_float_output_biases(without_relus)
    with_stem, stems = space_to_depth_stem(with_biases)
    prepared, int16_pairs = drop_int16_rounding(with_stem)
    onnx.checker.check_model(prepared)
    return PreparedModel(prepared, report, relus, biases, stems, int16_pairs)


def _ort_optimize(prepared: onnx.ModelProto, path: str | Path, level: str) -> None:
    """ORT's graph optimizations at ``level`` applied to ``prepared``, the result written as ONNX to ``path``."""
    import onnxruntime as ort

    options = session_options(threads=1, level=level)
    options.optimized_model_filepath = str(path)
    # A temporary name has no .onnx / .ort suffix, from which ORT would guess the format.
    options.add_session_config_entry("session.save_model_format", "ONNX")
    ort.InferenceSession(prepared.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _after_ort(optimized: onnx.ModelProto) -> AfterOrt:
    """The rewrites of ORT's optimized graph: QGemm onto faster kernels, the leftover constant DQs
    folded, the convolutions' token outputs flattened channels-last, the fused skip layer norms split, the
    reshape chains collapsed, the short-run broadcasts expanded."""
    rewritten, qgemms = move_qgemm_to_faster_kernels(optimized)
    # A constant DQ that ORT could not fuse feeds a float kernel: left in, it dequantizes the same
    # tensor on every frame. Float Gemm / Conv weights keep theirs (see fold_constants).
    folded, leftover = fold_constants(rewritten, keep_dequantize=False)
    flattened, token_layouts = flatten_conv_outputs_channels_last(folded)
    split, norms = split_skip_layer_norms(flattened)
    collapsed, reshapes = collapse_reshape_chains(split)
    expanded, broadcasts = expand_short_run_broadcasts(collapsed)
    return AfterOrt(expanded, qgemms, leftover.folded_nodes, token_layouts, norms, reshapes, broadcasts)


def optimize_and_save(source: str | Path, target: str | Path, level: str = "extended") -> CompiledModel:
    """:func:`prepare_for_ort`, then ORT's graph optimizations at ``level`` and the rewrites after them,
    saved atomically as ONNX to ``target``.

    Returns:
        the saved file's path and what the graph rewrites did.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {sorted(LEVELS)}, got {level!r}")
    target = Path(target)
    prepared = prepare_for_ort(onnx.load(str(source)))
    with atomic_file(target) as tmp:
        _ort_optimize(prepared.model, tmp, level)
        after = _after_ort(onnx.load(str(tmp)))
        onnx.save(after.model, str(tmp))
        onnx.checker.check_model(str(tmp))  # what is saved is a loadable, valid model
    return CompiledModel(
        target, prepared.fold, prepared.relus_removed, prepared.integer_biases, prepared.space_to_depth_convs,
        prepared.int16_pairs_removed,
        after.qgemm_rewrites, after.float_weights_folded, after.conv_outputs_channels_last,
        after.skip_layer_norms_split, after.reshapes_collapsed, after.broadcasts_expanded,
    )  # fmt: skip


def _max_differences(a: ort.InferenceSession, b: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Max |difference| of (scores, pts) between two sessions on ``feeds``."""
    out_a = run_frame(a, feeds["img"], feeds["lidar2img"])
    out_b = run_frame(b, feeds["img"], feeds["lidar2img"])
    return np.array([np.abs(x - y).max() for x, y in zip(out_a, out_b, strict=True)], dtype=np.float64)


@dataclass
class SavedModelCheck:
    """Max |difference| per output (``scores``, ``pts``) of the checks in :func:`outputs_match`."""

    reproduces: dict[str, float]  # worst of the three reproduction checks: 0 unless the file is not the model
    qgemm_rewrite_effect: dict[str, float]  # ORT's own QGemm graph vs the deployed file, both at ORT level all


def outputs_match(
    reference: str | Path, deployed: str | Path, feeds: dict[str, np.ndarray], level: str = "extended"
) -> SavedModelCheck:
    """Whether the saved ``deployed`` file is ``reference`` compiled, and what the QGemm rewrite changes.

    Three reproduction checks, each between runs of the same graph with the same kernels, so anything
    above float rounding means the saved file is not the model that was compiled:

    - :func:`prepare_for_ort` of the Q/DQ model optimized in one go at
      :data:`~maptr.deploy.ort_runner.DEPLOYED_LEVEL` vs the same optimized at the compile ``level``, saved and
      loaded at ``DEPLOYED_LEVEL``: ORT's optimizer survives the save;
    - that saved graph after the post-ORT rewrites, made here in memory, vs the deployed file, both run as
      written (level ``disabled``): the file holds the compiled graph;
    - the deployed file run as written vs loaded at ``DEPLOYED_LEVEL``: what a user who loads the file with
      ORT's defaults runs. This one caught ORT re-quantizing folded float weights at load time (see
      :data:`~maptr.deploy.constant_folding._WEIGHT_REQUANTIZED_AT_LOAD`).

    The QGemm rewrite (:mod:`~maptr.deploy.qgemm_kernels`) is a numerics choice, not a reproduction: the
    float-output linears add their bias after the scale, which moves a value by float rounding and, where
    that value sits on a rounding boundary of a later QuantizeLinear, the code there by one step. Its
    effect is measured against ORT's plain QGemm graph and reported, not checked.
    """
    prepared = prepare_for_ort(onnx.load(str(reference))).model
    with tempfile.TemporaryDirectory() as tmp:
        prepared_path, ort_path, compiled_path = (Path(tmp) / f"{n}.onnx" for n in ("prepared", "ort", "compiled"))
        onnx.save(prepared, str(prepared_path))
        _ort_optimize(prepared, ort_path, level)
        onnx.save(_after_ort(onnx.load(str(ort_path))).model, str(compiled_path))
        one_go = create_session(prepared_path, threads=1, level=DEPLOYED_LEVEL)
        ort_graph = create_session(ort_path, threads=1, level=DEPLOYED_LEVEL)
        compiled_as_written = create_session(compiled_path, threads=1, level=SAVED)
    saved = create_session(deployed, threads=1, level=SAVED)
    loaded = create_session(deployed, threads=1, level=DEPLOYED_LEVEL)
    worst = np.maximum.reduce([
        _max_differences(one_go, ort_graph, feeds),
        _max_differences(compiled_as_written, saved, feeds),
        _max_differences(saved, loaded, feeds),
    ])  # fmt: skip
    effect = _max_differences(ort_graph, loaded, feeds)
    names = ("scores", "pts")
    return SavedModelCheck(
        {name: float(v) for name, v in zip(names, worst, strict=True)},
        {name: float(v) for name, v in zip(names, effect, strict=True)},
    )
