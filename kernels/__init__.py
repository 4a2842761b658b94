"""Triton kernels (issue 3). Importable as ``dbae.kernels``."""
