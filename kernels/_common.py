"""Shared pieces of the Triton kernels: GELU math, the launch-config tables, program counts, and the
helpers that turn a launch config into a ``compile_specs()`` entry.

Every launcher in ``kernels/`` picks its block sizes and warps from the small tables here, and every
module's ``compile_specs()`` is built from the same tables, so ``bench.compile_report`` compiles exactly
the configurations that run. There is no autotuning: one explicit config per shape class keeps the
kernels runnable under ``TRITON_INTERPRET=1`` and makes the compiled code inspectable ahead of time.
"""
from __future__ import annotations

import functools
import os
from typing import Dict, Optional

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Kernels compute in fp32 and read/write these dtypes. fp64 is the reference's gradcheck dtype, not a
# kernel dtype: ``unsupported`` reports it so a forced backend fails loudly instead of losing precision.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_ROW = 8192  # widest row a LayerNorm program keeps in registers

_TL_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
             torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
             torch.bool: "i1"}


def tl_type(dtype: torch.dtype) -> str:
    """Triton signature string of a torch dtype (``torch.bfloat16`` -> ``"bf16"``)."""
    return _TL_NAMES[dtype]


# ----------------------------------------------------------------------------------------------
# GELU (exact erf form and the tanh approximation), value and derivative, fp32 in, fp32 out
# ----------------------------------------------------------------------------------------------
# Constants are literals inside the jit functions (Triton reads only tl.constexpr globals):
# 1/sqrt(2) = 0.7071067811865476, 1/sqrt(2*pi) = 0.3989422804014327, sqrt(2/pi) = 0.7978845608028654,
# tanh-form cubic coefficient 0.044715 (3 * 0.044715 = 0.134145 in the derivative).
@triton.jit
def tanh_via_exp(u):
    """tanh(u) = 1 - 2 / (exp(2u) + 1): libdevice tanh does not run in the interpreter. Saturates
    correctly at both ends (exp overflow -> 1, underflow -> -1); absolute error ~1e-7 near 0."""
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def gelu(x, APPROX_TANH: tl.constexpr):
    """GELU of an fp32 tensor: ``x * Phi(x)`` (erf) or the tanh approximation."""
    if APPROX_TANH:
        t = tanh_via_exp(0.7978845608028654 * (x + 0.044715 * x * x * x))
        y = 0.5 * x * (1.0 + t)
    else:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    return y


@triton.jit
def gelu_grad(x, APPROX_TANH: tl.constexpr):
    """d gelu(x) / dx of an fp32 tensor (recomputed from the pre-activation in the backward)."""
    if APPROX_TANH:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        t = tanh_via_exp(inner)
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
        d = cdf + x * pdf
    return d


@triton.jit
def gelu_and_grad(x, APPROX_TANH: tl.constexpr):
    """(gelu(x), gelu'(x)) sharing the erf / tanh evaluation (GeGLU backward needs both)."""
    if APPROX_TANH:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        t = tanh_via_exp(inner)
        y = 0.5 * x * (1.0 + t)
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        y = x * cdf
        d = cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    return y, d


def approx_flag(approximate: str) -> bool:
    """``"none"`` -> False, ``"tanh"`` -> True; anything else is an error naming the argument."""
    if approximate == "none":
        return False
    if approximate == "tanh":
        return True
    raise ValueError(f"approximate: expected 'none' or 'tanh', got {approximate!r}")


# ----------------------------------------------------------------------------------------------
# Launch-config tables
# ----------------------------------------------------------------------------------------------
# Whole-row kernels (LayerNorm): one program owns BLOCK_M full rows (BLOCK_N = next power of two >= N).
# Narrow rows pack several per program so a program still moves ~2-4K elements; wide rows get more warps
# so each thread keeps <= 16 fp32 values per live tensor (no spills at N = 8192).
#   (max BLOCK_N, BLOCK_M, num_warps)
ROW_TABLE = (
    (128, 16, 4),
    (256, 8, 4),
    (512, 4, 4),
    (1024, 1, 4),
    (2048, 1, 8),
    (4096, 1, 8),
    (8192, 1, 16),
)


def row_config(N: int) -> Dict[str, int]:
    """Launch config of a whole-row kernel for rows of N elements: BLOCK_M, BLOCK_N, num_warps."""
    if N < 1 or N > MAX_ROW:
        raise ValueError(f"row length N={N} outside the supported 1..{MAX_ROW}")
    block_n = triton.next_power_of_2(N)
    for max_n, block_m, warps in ROW_TABLE:
        if block_n <= max_n:
            return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps}
    raise AssertionError("unreachable")


def tile_config(N: int) -> Dict[str, int]:
    """Launch config of an elementwise 2-D tile kernel (bias-GELU, GeGLU, row gather) over N columns:
    tiles of ~4K elements, at most 1024 columns wide, 4 warps (32 elements per thread: four 16-byte
    accesses per thread in bf16)."""
    block_n = min(triton.next_power_of_2(max(N, 1)), 1024)
    block_m = max(1, 4096 // block_n)
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 4}


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_strips(device: torch.device, row_blocks: int, col_programs: int = 1) -> int:
    """How many row strips a reducing backward kernel uses (each writes one partial row of dW / dbias).

    On a GPU: enough programs for ~4 per SM, which bounds the partial buffer at a few MB. Under the
    interpreter programs run one after another, so a few strips suffice (and keep the test fast).
    """
    if device.type == "cuda":
        target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        target = max(1, target // max(col_programs, 1))
    else:
        target = 4
    return max(1, min(row_blocks, target))


# ----------------------------------------------------------------------------------------------
# Backend hooks and compile_specs helpers
# ----------------------------------------------------------------------------------------------
def check_float(name: str, t: Optional[torch.Tensor]) -> Optional[str]:
    """Reason a tensor argument cannot go through the kernels, or None."""
    if t is not None and t.dtype not in FLOAT_DTYPES:
        return f"Triton kernels take fp32/bf16/fp16 {name}, got {t.dtype} (use the torch backend)"
    return None


def divisible_attrs(kernel, names) -> dict:
    """``ASTSource`` attrs saying the named pointer/int args are multiples of 16, as the JIT launcher
    specialises them at run time (torch allocations are 16-byte aligned; hidden sizes are multiples of
    16). Without this the ahead-of-time compile would not show the vectorised accesses that really run."""
    return {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in names}


def spec(name, kernel, signature, constexprs, num_warps, num_stages=1, hot=True, kind="bandwidth",
         note="", divisible=()) -> dict:
    """One ``compile_specs()`` entry (format in DEVELOPERS.md). ``signature`` lists the runtime args;
    constexprs are added to it as ``"constexpr"``. ``attrs`` (extra key) carries the divisibility
    specialisation; pass it to ``ASTSource(..., attrs=spec["attrs"])``."""
    sig = dict(signature)
    for k in constexprs:
        sig[k] = "constexpr"
    ordered = {a: sig[a] for a in kernel.arg_names}  # ASTSource wants every arg, in order
    return {"name": name, "kernel": kernel, "signature": ordered, "constexprs": dict(constexprs),
            "num_warps": num_warps, "num_stages": num_stages, "hot": hot, "kind": kind, "note": note,
            "attrs": divisible_attrs(kernel, divisible)}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["INTERPRET", "FLOAT_DTYPES", "MAX_ROW", "tl_type", "gelu", "gelu_grad", "gelu_and_grad",
           "tanh_via_exp", "approx_flag", "ROW_TABLE", "row_config", "tile_config", "num_strips",
           "check_float", "spec", "divisible_attrs", "cdiv"]
