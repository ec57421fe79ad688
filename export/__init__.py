"""Compiles a trained run into a Triton model repository: ONNX graphs, fp16 conversion, parity checks, templates."""
