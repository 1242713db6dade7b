"""Compiling for ONNX Runtime (CPU): rewrite the Q/DQ graph, let ORT optimize it once, rewrite ORT's result,
save it, and check that the file is what was compiled.

The rewrites are :class:`~maptr.deploy.onnx_graph.GraphPass` entries of two lists, run in this order (each
pass's key in ``reports/compile.json``'s ``passes`` is its function's name). Before ORT's optimizer
(:data:`BEFORE_ORT`), so that ORT sees a graph it can fuse into integer kernels:

1. ``fold_constants`` (:mod:`~maptr.deploy.constant_folding`): the input-independent part of the graph is
   computed once; ORT folds it in a float model but not behind a DequantizeLinear;
2. ``drop_relus_before_quantize`` (:mod:`~maptr.deploy.redundant_relu`): the ReLUs that the uint8
   quantization after them already performs are removed; left in, they keep linears in float;
3. ``quantize_float_output_biases`` (:mod:`~maptr.deploy.integer_bias`): every uint8 linear gets its int32
   bias written here; ORT writes it only for those followed by a ``QuantizeLinear``, so the ones whose
   output stays float ran as float Gemm on dequantized inputs;
4. ``space_to_depth_stem`` (:mod:`~maptr.deploy.stem_space_to_depth`): the stem convolution is rewritten
   over 2x2 blocks: 12 input channels instead of 3 reach ORT's fast integer convolution kernel
   (bit-identical outputs);
5. ``drop_int16_rounding`` (:mod:`~maptr.deploy.int16_rounding`): the 16-bit Q -> DQ pairs in front of the
   operators ORT runs in float anyway are removed; ORT has no 16-bit kernel, so the pair only rounded a
   float tensor to a 16-bit grid, and those operators read it unrounded.

Then ORT's own graph optimizer (:func:`ort_optimize`): at ``extended`` level it fuses every
``DequantizeLinear -> op -> QuantizeLinear`` group it has an integer kernel for (QLinearConv, QGemm,
QLinearAdd, QLinearMatMul, ...), folds constants and fuses LayerNorm patterns; the result is written with
``SessionOptions.optimized_model_filepath``. After it (:data:`AFTER_ORT`), on ORT's graph:

6. ``move_qgemm_to_faster_kernels`` (:mod:`~maptr.deploy.qgemm_kernels`): ORT's fused integer linears
   (``QGemm``) move to kernels that add the bias after the integer GEMM: a channels-last 1x1
   ``QLinearConv`` where the output is uint8 (bit-identical), ``MatMulIntegerToFloat`` with a float bias
   where it is float (float rounding); QGemm's accumulate-mode bias kept it from using a second thread;
7. ``fold_leftover_dequantize`` (:mod:`~maptr.deploy.leftover_dequantize`): the constant DQs ORT left in
   front of kernels that stay float are folded into float initializers, except the weight and bias DQs
   that ORT would re-quantize per tensor when loading the file;
8. ``flatten_conv_outputs_channels_last`` (:mod:`~maptr.deploy.conv_output_layout`): a convolution's
   output flattened to tokens (``Reshape(N, C, H*W) -> Transpose(0, 2, 1)``) is written as
   ``Transpose(0, 2, 3, 1) -> Reshape``, so that the NHWC -> NCHW transpose ORT puts after its
   channels-last convolution at load cancels against it;
9. ``split_skip_layer_norms`` (:mod:`~maptr.deploy.skip_layer_norm`): ORT's fused
   ``SkipLayerNormalization`` nodes are written back as ``Sum -> LayerNormalization``: on 64 channels the
   fused CPU kernel is 2-6x slower than the standard one;
10. ``collapse_reshape_chains`` (:mod:`~maptr.deploy.reshape_chains`): chains of shape-only nodes that end
    in a ``Reshape`` collapse into that ``Reshape``; ORT's Gemm fusion and step 6 wrap every linear in
    reshapes (bit-identical);
11. ``expand_short_run_broadcasts`` (:mod:`~maptr.deploy.small_broadcasts`): element-wise operators that
    broadcast in runs of a few floats (deformable attention's reference points and offset normalizer)
    read their small input expanded to the full shape; ORT walks such a broadcast run by run on one
    thread (bit-identical).

A new pass is a module with a ``PASS`` and one entry in one of the two lists (and a line here).

The file is portable across x86 CPUs. Every session of the deployed model loads it at
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
from maptr.deploy import (
    constant_folding,
    conv_output_layout,
    int16_rounding,
    integer_bias,
    leftover_dequantize,
    qgemm_kernels,
    redundant_relu,
    reshape_chains,
    skip_layer_norm,
    small_broadcasts,
    stem_space_to_depth,
)
from maptr.deploy.onnx_graph import GraphPass, run_passes
from maptr.deploy.ort_runner import DEPLOYED_LEVEL, LEVELS, SAVED, create_session, run_frame, session_options

if TYPE_CHECKING:
    import onnxruntime as ort

# The passes in the order they run (the module doc's steps 1-5 and 6-11).
BEFORE_ORT: tuple[GraphPass, ...] = (
    constant_folding.PASS,
    redundant_relu.PASS,
    integer_bias.PASS,
    stem_space_to_depth.PASS,
    int16_rounding.PASS,
)
AFTER_ORT: tuple[GraphPass, ...] = (
    qgemm_kernels.PASS,
    leftover_dequantize.PASS,
    conv_output_layout.PASS,
    skip_layer_norm.PASS,
    reshape_chains.PASS,
    small_broadcasts.PASS,
)


def prepare_for_ort(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The :data:`BEFORE_ORT` passes applied to ``model``; returns the result and each pass's count."""
    prepared, counts = run_passes(model, BEFORE_ORT)
    onnx.checker.check_model(prepared)
    return prepared, counts


def ort_optimize(prepared: onnx.ModelProto, path: str | Path, level: str) -> None:
    """ORT's graph optimizations at ``level`` applied to ``prepared``, the result written as ONNX to ``path``."""
    import onnxruntime as ort

    options = session_options(threads=1, level=level)
    options.optimized_model_filepath = str(path)
    # A temporary name has no .onnx / .ort suffix, from which ORT would guess the format.
    options.add_session_config_entry("session.save_model_format", "ONNX")
    ort.InferenceSession(prepared.SerializeToString(), options, providers=["CPUExecutionProvider"])


def after_ort(optimized: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The :data:`AFTER_ORT` passes applied to ORT's optimized graph; returns the result and each pass's count."""
    return run_passes(optimized, AFTER_ORT)


@dataclass
class CompiledModel:
    path: Path  # the saved, optimized model
    counts: dict[str, int]  # pass name -> how many places it changed, in the order the passes ran

    def passes(self) -> dict[str, dict]:
        """``reports/compile.json``'s ``passes``: per pass, in order, its step (as numbered in the module doc),
        whether it runs before or after ORT's optimizer, its count, what that counts and the ORT version it
        was measured on."""
        stages = [("before ORT", graph_pass) for graph_pass in BEFORE_ORT]
        stages += [("after ORT", graph_pass) for graph_pass in AFTER_ORT]
        return {
            graph_pass.name: {
                "step": step,
                "runs": runs,
                "count": self.counts[graph_pass.name],
                "counts": graph_pass.counts,
                "measured_on_ort": graph_pass.measured_on_ort,
            }
            for step, (runs, graph_pass) in enumerate(stages, start=1)
        }


def optimize_and_save(source: str | Path, target: str | Path, level: str = "extended") -> CompiledModel:
    """:func:`prepare_for_ort`, then ORT's graph optimizations at ``level`` and the rewrites after them,
    saved atomically as ONNX to ``target``.

    Returns:
        the saved file's path and what each pass did.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {sorted(LEVELS)}, got {level!r}")
    target = Path(target)
    prepared, before = prepare_for_ort(onnx.load(str(source)))
    with atomic_file(target) as tmp:
        ort_optimize(prepared, tmp, level)
        compiled, after = after_ort(onnx.load(str(tmp)))
        onnx.save(compiled, str(tmp))
        onnx.checker.check_model(str(tmp))  # what is saved is a loadable, valid model
    return CompiledModel(target, {**before, **after})


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
    prepared, _ = prepare_for_ort(onnx.load(str(reference)))
    with tempfile.TemporaryDirectory() as tmp:
        prepared_path, ort_path, compiled_path = (Path(tmp) / f"{n}.onnx" for n in ("prepared", "ort", "compiled"))
        onnx.save(prepared, str(prepared_path))
        ort_optimize(prepared, ort_path, level)
        onnx.save(after_ort(onnx.load(str(ort_path)))[0], str(compiled_path))
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
