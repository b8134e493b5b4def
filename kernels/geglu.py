"""Fused GeGLU, ``gelu(a) * g`` over the two halves of the last dim (MosaicBERT layout), optionally with
the bias of the preceding Linear fused in (Triton).

Primitives (signatures and semantics: ``fastbert/reference.py``):

* ``geglu_fwd(x [M, 2N], bias [2N] | None, approximate)`` -> ``[M, N]`` x.dtype, with
  ``a = x[:, :N] + bias[:N]`` and ``g = x[:, N:] + bias[N:]``
* ``geglu_bwd(dy [M, N], x, bias, approximate)`` -> ``(dx [M, 2N] x.dtype, dbias [2N] bias.dtype | None)``;
  ``dx[:, :N] = dy * g * gelu'(a)``, ``dx[:, N:] = dy * gelu(a)``, both written by the same program into
  one buffer.

dbias uses the same strip scheme as the other reducing backwards: one fp32 partial row per strip in a
``[num_strips, 2N]`` buffer, summed afterwards.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import approx_flag, gelu, gelu_and_grad, launch_strips_bwd, launch_tiles_fwd, spec, tile_config
from ._common import unsupported_elementwise as unsupported  # noqa: F401 - the backend's hook


@triton.jit
def _geglu_fwd_kernel(X, BIAS, Y, M, N, HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    mask = (rows < M)[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x_offs = r64 * (2 * N) + cols[None, :]
    a = tl.load(X + x_offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(X + x_offs + N, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        a = a + tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        g = g + tl.load(BIAS + N + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    y = gelu(a, APPROX_TANH) * g
    tl.store(Y + r64 * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd_kernel(DY, X, BIAS, DX, DB_PART, M, N, blocks_per_strip,
                      HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    strip = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    if HAS_BIAS:
        ba = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)
        bg = tl.load(BIAS + N + cols, mask=cmask, other=0.0).to(tl.float32)
    dba_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    dbg_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i in range(0, blocks_per_strip):
        rows = (strip * blocks_per_strip + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)[:, None]
        x_offs = r64 * (2 * N) + cols[None, :]
        a = tl.load(X + x_offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(X + x_offs + N, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            a = a + ba[None, :]
            g = g + bg[None, :]
        d = tl.load(DY + r64 * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        ga, dga = gelu_and_grad(a, APPROX_TANH)
        da = d * g * dga
        dg = d * ga
        if HAS_BIAS:
            dba_acc += da
            dbg_acc += dg
        tl.store(DX + x_offs, da.to(DX.dtype.element_ty), mask=mask)
        tl.store(DX + x_offs + N, dg.to(DX.dtype.element_ty), mask=mask)
    if HAS_BIAS:
        tl.store(DB_PART + strip * (2 * N) + cols, tl.sum(dba_acc, axis=0), mask=cmask)
        tl.store(DB_PART + strip * (2 * N) + N + cols, tl.sum(dbg_acc, axis=0), mask=cmask)


def _halves(x) -> int:
    if x.shape[1] % 2:
        raise ValueError(f"x: GeGLU needs an even last dim (two halves), got shape {tuple(x.shape)}")
    return x.shape[1] // 2


def geglu_fwd(x, bias, approximate):
    """x ``[M, 2N]``, bias ``[2N]`` or None -> ``gelu(a) * g`` ``[M, N]`` x.dtype (fp32 math)."""
    tanh = approx_flag(approximate)
    M, N = x.shape[0], _halves(x)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    return launch_tiles_fwd(_geglu_fwd_kernel, x, bias, y, N, tanh)


def geglu_bwd(dy, x, bias, approximate):
    """dy ``[M, N]``, x ``[M, 2N]``, bias ``[2N]`` or None -> ``(dx [M, 2N] x.dtype, dbias [2N] or None)``."""
    tanh = approx_flag(approximate)
    N = _halves(x)
    return launch_strips_bwd(_geglu_bwd_kernel, dy, x, bias, torch.empty_like(x), N, tanh)


def compile_specs():
    """Launch configs at MosaicBERT shapes: GLU width N = 3072 / 4096 (x is [M, 2N]), bf16 and fp16,
    erf GELU, with the fused bias, from the launchers' ``tile_config`` table."""
    specs = []
    for N in (3072, 4096):
        cfg = tile_config(N)
        for dt in ("bf16", "fp16"):
            const = {"HAS_BIAS": True, "APPROX_TANH": False, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]}
            specs.append(spec(f"geglu_fwd_{dt}_N{N}", _geglu_fwd_kernel,
                              {"X": f"*{dt}", "BIAS": f"*{dt}", "Y": f"*{dt}", "M": "i32", "N": "i32"},
                              const, cfg["num_warps"], divisible=["X", "BIAS", "Y", "N"]))
            specs.append(spec(f"geglu_bwd_{dt}_N{N}", _geglu_bwd_kernel,
                              {"DY": f"*{dt}", "X": f"*{dt}", "BIAS": f"*{dt}", "DX": f"*{dt}", "DB_PART": "*fp32",
                               "M": "i32", "N": "i32", "blocks_per_strip": "i32"},
                              const, cfg["num_warps"], divisible=["DY", "X", "BIAS", "DX", "DB_PART", "N"]))
    return specs
