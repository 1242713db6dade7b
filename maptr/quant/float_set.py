"""What stays float in a quantized MapTR, and why: the quantizer's exceptions, each with its reason.

:mod:`maptr.quant.quantizer` wraps every conv, linear and :mod:`~maptr.models.tensor_ops` module of the
inference path except the ones named here, each with the reason it stays float (the README's
"What stays float, and why" and ``pipeline/check_model.py``'s table of float kernels point here).
"""

from __future__ import annotations

# Module paths (prefixes) of the float model that are never quantized, and why.
FLOAT_MODULES: dict[str, str] = {
    "bev_seg_head": "training-only auxiliary head: not run in eval mode, not part of the exported model",
    "pv_seg_head": "training-only auxiliary head: not run in eval mode, not part of the exported model",
    "head.reference_points": "its input is the learned query embedding, a constant at inference: the "
    "initial reference points are constant-folded at export, there is nothing to quantize at run time",
}

# Operations of the forward that are not modules and stay float (each exported as float ONNX nodes).
FLOAT_OPERATIONS: dict[str, str] = {
    "LayerNorm": "normalization needs the mean and variance of its input at full precision; it reads the "
    "dequantized residual sum and its output is quantized again by the next operator's input",
    "softmax": "exp / sum in float (no integer kernel in ONNX Runtime); its output, the attention weights, "
    "is quantized as the input of weight_product / value_matmul",
    "grid_sample": "bilinear sampling has no integer kernel in ONNX Runtime; it reads the quantized value "
    "map and the sampling locations computed from quantized reference points and offsets",
    "camera projection": "lidar2img geometry (matmul with the camera matrices, division by depth, "
    "visibility tests) needs float: a 1e-3 relative error is pixels at 50 m; it depends only on the "
    "calibration, a deployment could even precompute it per rig",
    "camera averaging": "the spatial cross-attention's selection of the visible (cell, camera) pairs, the "
    "scatter-add of their outputs per BEV cell and the division by the camera count: index arithmetic and a "
    "division, then quantized by the residual add",
    "offset normalization": "sampling offsets divided by the feature-map size: a constant scale, quantized "
    "right after as an input of location_add",
    "point refinement": "inverse_sigmoid(reference) + delta, then sigmoid: the output coordinates are "
    "produced in float from the float output of the last point-branch linear (as a detection head's boxes)",
    "mean over points": "the class branch averages each instance's point features (ReduceMean); its input "
    "is a LayerNorm output and its result is quantized by the class branch's first linear",
    "query construction": "instance + point embeddings and the BEV queries / positional codes are learned "
    "constants at inference (constant-folded at export); they are quantized where they enter an operator",
    "reshape / transpose / slicing / nearest upsampling / ReLU": "move or select values without changing "
    "them: a quantized tensor stays on its grid",
}

# tensor_ops modules (matched by the last components of their path) that ONNX Runtime computes in float
# whatever their inputs are: they get no fake-quant, so the QAT model computes what the deployed one does.
# Measured on nano (2026-12-06), quantized they put 33 of the deployed graph's 65 Q/DQ nodes in front of
# float kernels, and the four location_adds headed the sensitivity ranking (0.24 m steps in uint8).
FLOAT_OPERATORS: dict[str, str] = {
    "location_add": "reference points + sampling offsets: the sum is grid_sample's coordinate input, "
    "computed in float (no integer kernel reads it)",
    "weight_product": "bilinear samples (grid_sample's float output) x softmaxed attention weights: ONNX "
    "Runtime multiplies and sums over the points in float; the sum is quantized as the output "
    "projection's input",
    "residual_add1": "a post-norm residual sum: ONNX Runtime fuses the add into the LayerNorm after it "
    "(SkipLayerNormalization, a float kernel); the sublayer's last linear then outputs float",
    "residual_add2": "as residual_add1",
    "residual_add3": "as residual_add1",
    "ffn.residual_add": "as residual_add1 (the FFN's residual sum before its LayerNorm)",
}


def is_float_module(name: str) -> bool:
    """Whether module path ``name`` is in, or under, :data:`FLOAT_MODULES`."""
    return any(name == prefix or name.startswith(prefix + ".") for prefix in FLOAT_MODULES)


def is_float_operator(name: str) -> bool:
    """Whether module path ``name`` ends with one of :data:`FLOAT_OPERATORS` (whole path components)."""
    return any(name == suffix or name.endswith("." + suffix) for suffix in FLOAT_OPERATORS)
