"""What this GPU can do, measured in the same run as the kernels: device-to-device copy bandwidth (the
yardstick of the bandwidth-bound ops) and bf16 matmul TFLOP/s (the yardstick of attention and the
train step). ``bench.report`` divides by these."""
from __future__ import annotations

import torch

from bench.common import SMOKE, Case, bench, rand

COPY_ELEMS = 2**14 if SMOKE else 2**29  # bf16: 1 GiB per buffer, far beyond L2
MATMUL_N = 64 if SMOKE else 8192


def _copy() -> Case:
    def make(i):
        return {"src": rand(COPY_ELEMS, seed=i), "dst": rand(COPY_ELEMS, seed=100 + i)}
    nbytes = 2 * COPY_ELEMS * 2  # read + write
    return Case(op="copy", shape=f"{COPY_ELEMS * 2 / 2**20:g}MiB", provider="torch-copy", role="calibration",
                make_inputs=make, fn=lambda d: d["dst"].copy_(d["src"]), kind="bandwidth", bytes=nbytes)


def _matmul() -> Case:
    n = MATMUL_N

    def make(i):
        return {"a": rand(n, n, seed=i), "b": rand(n, n, seed=100 + i)}
    return Case(op="matmul", shape=f"{n}x{n}x{n}", provider="torch-matmul", role="calibration",
                make_inputs=make, fn=lambda d: d["a"] @ d["b"], kind="compute", flops=2.0 * n ** 3)


def test_copy_bandwidth(benchmark):
    bench(benchmark, _copy, "copy", f"{COPY_ELEMS * 2 / 2**20:g}MiB", "torch-copy", "fwd")


def test_matmul_tflops(benchmark):
    bench(benchmark, _matmul, "matmul", f"{MATMUL_N}x{MATMUL_N}x{MATMUL_N}", "torch-matmul", "fwd")
