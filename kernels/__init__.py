"""Triton kernels, one module per kernel family (installed as ``fastbert.kernels``)."""
