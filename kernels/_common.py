"""Shared pieces of the Triton kernels: GELU math, the launch-config tables, program counts, and the
helpers that turn a launch config into a ``compile_specs()`` entry.

Every launcher in ``kernels/`` picks its block sizes and warps from the small tables here, and every
module's ``compile_specs()`` is built from the same tables, so ``bench.compile_report`` compiles exactly
the configurations that run. There is no autotuning: one explicit config per shape class keeps the
kernels runnable under ``TRITON_INTERPRET=1`` and makes the compiled code inspectable ahead of time.
"""
from __future__ import annotations

import functools
from typing import Dict, Optional

import torch
import triton
import triton.language as tl

# Kernels compute in fp32 and read/write these dtypes. fp64 is the reference's gradcheck dtype, not a
# kernel dtype: ``unsupported`` reports it so a forced backend fails loudly instead of losing precision.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_ROW = 8192  # widest row a LayerNorm program keeps in registers

# ----------------------------------------------------------------------------------------------
# GELU (exact erf form and the tanh approximation), value and derivative, fp32 in, fp32 out
# ----------------------------------------------------------------------------------------------
# Constants are literals inside the jit functions (Triton reads only tl.constexpr globals):
# 1/sqrt(2) = 0.7071067811865476, 1/sqrt(2*pi) = 0.3989422804014327, sqrt(2/pi) = 0.7978845608028654,
# tanh-form cubic coefficient 0.044715 (3 * 0.044715 = 0.134145 in the derivative).
@triton.jit
def _tanh_gelu_halves(x):
    """For the tanh GELU with u = sqrt(2/pi) (x + 0.044715 x^3): ``(s, sc)`` with s = (1 + tanh u) / 2
    = sigmoid(2u) and sc = (1 - tanh u) / 2 = sigmoid(-2u), both from q = exp(-2|u|) in (0, 1].

    Forming 1 + tanh(u) directly cancels catastrophically for negative x (tanh u -> -1), which made the
    derivative's relative error ~100% near x = -3.5 in fp32; the sigmoid form keeps full relative
    precision at both tails and never overflows (no libdevice tanh, so it also runs in the interpreter).
    """
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    q = tl.exp(-2.0 * tl.abs(u))
    big = 1.0 / (1.0 + q)
    small = q * big
    pos = u >= 0
    return tl.where(pos, big, small), tl.where(pos, small, big)


@triton.jit
def gelu(x, APPROX_TANH: tl.constexpr):
    """GELU of an fp32 tensor: ``x * Phi(x)`` (erf) or the tanh approximation ``x * sigmoid(2u)``."""
    if APPROX_TANH:
        s, sc = _tanh_gelu_halves(x)
        y = x * s
    else:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    return y


@triton.jit
def gelu_and_grad(x, APPROX_TANH: tl.constexpr):
    """(gelu(x), gelu'(x)) of an fp32 tensor, sharing the erf / exp evaluation. Tanh form:
    gelu' = s + 2 x s sc sqrt(2/pi) (1 + 3 * 0.044715 x^2), i.e. 0.5 (1 + t) + 0.5 x (1 - t^2) u'."""
    if APPROX_TANH:
        s, sc = _tanh_gelu_halves(x)
        y = x * s
        d = s + 2.0 * x * s * sc * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        y = x * cdf
        d = cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    return y, d


@triton.jit
def gelu_grad(x, APPROX_TANH: tl.constexpr):
    """d gelu(x) / dx of an fp32 tensor (recomputed from the pre-activation in the backward)."""
    y, d = gelu_and_grad(x, APPROX_TANH)
    return d


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
    tiles of ~4K elements, at most 1024 columns wide, 8 warps: 16 elements per thread, i.e. two 16-byte
    accesses per thread and tensor in bf16. (4 warps doubled the live values per thread: the GeGLU
    backward needed 214 registers on sm_90, which caps occupancy at 8 warps per SM.)"""
    block_n = min(triton.next_power_of_2(max(N, 1)), 1024)
    block_m = max(1, 4096 // block_n)
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 8}


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


GRID_YZ_MAX = 65535  # CUDA's limit on grid axes 1 and 2 (axis 0 allows 2^31 - 1)


def tile_grid_reason(N: int) -> Optional[str]:
    """Why a tile kernel over N columns cannot launch (its column tiles are grid axis 1), or None."""
    block_n = tile_config(N)["BLOCK_N"]
    if cdiv(N, block_n) > GRID_YZ_MAX:
        return (f"Triton tile kernels put column tiles on grid axis 1: at most {GRID_YZ_MAX} tiles of {block_n}, "
                f"i.e. {GRID_YZ_MAX * block_n} columns, got {N}")
    return None


def unsupported_elementwise(primitive: str, *args) -> Optional[str]:
    """``unsupported`` of the elementwise modules (bias-GELU, GeGLU): every tensor argument must be
    fp32/bf16/fp16 (the reason names the first that is not), and the output columns must fit the grid."""
    for t in args:
        if isinstance(t, torch.Tensor):
            reason = check_float("x/dy/bias", t)
            if reason:
                return reason
    x = args[1] if primitive.endswith("_bwd") else args[0]
    return tile_grid_reason(x.shape[-1] // 2 if primitive.startswith("geglu") else x.shape[-1])


# ----------------------------------------------------------------------------------------------
# Launchers shared by the elementwise activation kernels (bias-GELU, GeGLU)
# ----------------------------------------------------------------------------------------------
# Both kernel pairs take the same arguments, so one launcher each serves both: forward
# ``kernel(X, BIAS, Y, M, N, HAS_BIAS, APPROX_TANH, BLOCK_M, BLOCK_N)`` over 2-D [BLOCK_M, BLOCK_N] tiles
# of the N output columns, backward ``kernel(DY, X, BIAS, DX, DB_PART, M, N, blocks_per_strip, ...)`` with
# one program per (row strip, column tile) writing one fp32 partial row of dbias per strip.
def launch_tiles_fwd(kernel, x, bias, y, N: int, approx_tanh: bool):
    """Run a forward tile kernel over ``x [M, *]`` into the preallocated ``y [M, N]``; returns ``y``."""
    if y.numel() == 0:
        return y
    M = x.shape[0]
    cfg = tile_config(N)
    grid = (cdiv(M, cfg["BLOCK_M"]), cdiv(N, cfg["BLOCK_N"]))
    kernel[grid](x, bias, y, M, N, HAS_BIAS=bias is not None, APPROX_TANH=approx_tanh,
                 BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"])
    return y


def launch_strips_bwd(kernel, dy, x, bias, dx, N: int, approx_tanh: bool):
    """Run a backward strip kernel over ``x [M, W]`` (``W`` = N, or 2N for GeGLU) into the preallocated
    ``dx`` like x. Returns ``(dx, dbias [W] bias.dtype or None)``: dbias is the sum of the ``[strips, W]``
    fp32 partial rows (deterministic, no atomics)."""
    M, W = x.shape
    if x.numel() == 0:
        return dx, (torch.zeros_like(bias) if bias is not None else None)
    cfg = tile_config(N)
    col_tiles = cdiv(N, cfg["BLOCK_N"])
    row_blocks = cdiv(M, cfg["BLOCK_M"])
    strips = num_strips(x.device, row_blocks, col_tiles)
    per_strip = cdiv(row_blocks, strips)
    strips = cdiv(row_blocks, per_strip)  # with per_strip rounded up, fewer strips may cover every row block
    db_part = torch.empty((strips, W), device=x.device, dtype=torch.float32) if bias is not None else None
    kernel[(strips, col_tiles)](dy, x, bias, dx, db_part, M, N, per_strip,
                                HAS_BIAS=bias is not None, APPROX_TANH=approx_tanh,
                                BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"])
    return dx, (db_part.sum(0).to(bias.dtype) if bias is not None else None)


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


__all__ = ["FLOAT_DTYPES", "MAX_ROW", "gelu", "gelu_grad", "gelu_and_grad",
           "approx_flag", "ROW_TABLE", "row_config", "tile_config", "num_strips",
           "check_float", "unsupported_elementwise", "tile_grid_reason", "GRID_YZ_MAX", "launch_tiles_fwd",
           "launch_strips_bwd", "spec", "divisible_attrs", "cdiv"]
