"""Deployment: ONNX export of the (fake-quantized) inference graph and the model checker on ONNX Runtime."""
