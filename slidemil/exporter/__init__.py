"""Exporter: checkpoint -> model package (ONNX graphs, optional TensorRT engines, manifest)."""
