"""Quantization: fake-quant op and modules (int8 / uint8 / int16, exported to ONNX Q/DQ), range observers."""

from maptr.quant.fake_quant import (
    ONNX_OPSET,
    QUANT_RANGES,
    FakeQuantize,
    FakeQuantMode,
    QuantRange,
    QuantWrapper,
    WeightFakeQuantize,
    compute_fake_quant_qparams,
    fake_quant,
    onnx_translation_table,
    qparams_from_range,
    set_fake_quant_mode,
)
from maptr.quant.observers import (
    FixedRangeObserver,
    HistogramObserver,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    PerChannelAbsMaxObserver,
    RangeObserver,
)

__all__ = [
    "ONNX_OPSET",
    "QUANT_RANGES",
    "FakeQuantMode",
    "FakeQuantize",
    "FixedRangeObserver",
    "HistogramObserver",
    "MSEObserver",
    "MinMaxObserver",
    "PerChannelAbsMaxObserver",
    "PercentileObserver",
    "QuantRange",
    "QuantWrapper",
    "RangeObserver",
    "WeightFakeQuantize",
    "compute_fake_quant_qparams",
    "fake_quant",
    "onnx_translation_table",
    "qparams_from_range",
    "set_fake_quant_mode",
]
