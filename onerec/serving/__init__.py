"""Serving-side library: the ONNX beam-search engine the Triton backend adapts, and the repository layout owner."""
