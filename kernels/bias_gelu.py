"""Fused bias + GELU (exact erf form, or the tanh approximation) and its backward (Triton).

Primitives (signatures and semantics: ``fastbert/reference.py``):

* ``bias_gelu_fwd(x [M, N], bias [N] | None, approximate)`` -> ``gelu(x + bias)`` ``[M, N]`` x.dtype
* ``bias_gelu_bwd(dy [M, N], x, bias, approximate)`` -> ``(dx [M, N] x.dtype, dbias [N] bias.dtype | None)``

Forward: 2-D tiles of ~4K elements, the bias tile loaded once per program. Backward recomputes the
pre-activation from x (nothing but x is saved), and for dbias each program walks a strip of rows for one
column tile, keeping an fp32 running sum in registers, then writes one partial row into a
``[num_strips, N]`` fp32 buffer that is summed afterwards (deterministic, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import approx_flag, gelu, gelu_grad, launch_strips_bwd, launch_tiles_fwd, spec, tile_config
from ._common import unsupported_elementwise as unsupported  # noqa: F401 - the backend's hook


@triton.jit
def _bias_gelu_fwd_kernel(X, BIAS, Y, M, N, HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    mask = (rows < M)[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    h = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        h = h + tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs, gelu(h, APPROX_TANH).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(DY, X, BIAS, DX, DB_PART, M, N, blocks_per_strip,
                          HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    strip = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    if HAS_BIAS:
        b = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i in range(0, blocks_per_strip):
        rows = (strip * blocks_per_strip + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        h = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            h = h + b[None, :]
        g = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        dh = g * gelu_grad(h, APPROX_TANH)  # masked lanes: g = 0 -> dh = 0
        if HAS_BIAS:
            db_acc += dh
        tl.store(DX + offs, dh.to(DX.dtype.element_ty), mask=mask)
    if HAS_BIAS:
        tl.store(DB_PART + strip * N + cols, tl.sum(db_acc, axis=0), mask=cmask)


def bias_gelu_fwd(x, bias, approximate):
    """x ``[M, N]`` bf16/fp16/fp32, bias ``[N]`` or None -> ``gelu(x + bias)`` ``[M, N]`` x.dtype, fp32 math."""
    tanh = approx_flag(approximate)
    return launch_tiles_fwd(_bias_gelu_fwd_kernel, x, bias, torch.empty_like(x), x.shape[1], tanh)


def bias_gelu_bwd(dy, x, bias, approximate):
    """dy, x ``[M, N]``, bias ``[N]`` or None -> ``(dx [M, N] x.dtype, dbias [N] bias.dtype or None)``;
    the pre-activation ``x + bias`` is recomputed."""
    tanh = approx_flag(approximate)
    return launch_strips_bwd(_bias_gelu_bwd_kernel, dy, x, bias, torch.empty_like(x), x.shape[1], tanh)


def compile_specs():
    """Launch configs at BERT shapes: intermediate size 3072 / 4096 (hidden 768 / 1024), bf16 and fp16,
    erf GELU (the default) plus the tanh form, built from the launchers' ``tile_config`` table."""
    specs = []
    for N in (3072, 4096):
        cfg = tile_config(N)
        for dt in ("bf16", "fp16"):
            for tanh in ((False, True) if dt == "bf16" else (False,)):
                tag = f"{dt}_N{N}" + ("_tanh" if tanh else "")
                const = {"HAS_BIAS": True, "APPROX_TANH": tanh, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]}
                specs.append(spec(f"bias_gelu_fwd_{tag}", _bias_gelu_fwd_kernel,
                                  {"X": f"*{dt}", "BIAS": f"*{dt}", "Y": f"*{dt}", "M": "i32", "N": "i32"},
                                  const, cfg["num_warps"], hot=not tanh, divisible=["X", "BIAS", "Y", "N"]))
                specs.append(spec(f"bias_gelu_bwd_{tag}", _bias_gelu_bwd_kernel,
                                  {"DY": f"*{dt}", "X": f"*{dt}", "BIAS": f"*{dt}", "DX": f"*{dt}",
                                   "DB_PART": "*fp32", "M": "i32", "N": "i32", "blocks_per_strip": "i32"},
                                  const, cfg["num_warps"], hot=not tanh,
                                  divisible=["DY", "X", "BIAS", "DX", "DB_PART", "N"]))
    return specs
