"""ONNX / TensorRT export and runtimes (issue 4). Importable as ``dbae.export``."""
