"""Triton ALiBi flash attention over unpadded variable-length batches, global or local (sliding window)
(the ``attention`` family).

Primitives (signatures and semantics: the same-named functions in ``fastbert/reference.py``):

* ``flash_attn_fwd(q, k, v, cu_seqlens, max_seqlen, alibi_slopes, softmax_scale, window_size) -> (out, lse)``
* ``flash_attn_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, alibi_slopes, softmax_scale, window_size)
  -> (dq, dk, dv)``

q, k, v are ``[T, H, D]`` packed tokens (last-dim stride 1, any token/head strides: a fused-QKV view of a
``[T, 3, H, D]`` buffer is read in place), ``cu_seqlens`` int32 ``[B+1]``, ``alibi_slopes`` fp32 ``[B, H]``
contiguous or None, ``window_size = (left, right)`` (-1: unbounded). Score ``s_ij = q_i . k_j * scale -
slope * |i - j|`` for positions i, j of the same sequence with ``i - left <= j <= i + right``;
bidirectional; never across sequences.

Forward (FlashAttention-2): one program per (query block, sequence, head). The query block stays in
registers while the program streams the K/V blocks *of its own sequence only* (no padding, no work on
other sequences), keeping a running max and sum in fp32 (online softmax). Scores are kept in log2 units:
``log2(e)`` is folded into the scale and the slope, so the exponentials are plain ``exp2``. The ALiBi bias
is computed from the two position vectors in registers and never materialised. Only the sequence's partial
last key block is masked (run first, as straight-line code: the softmax is order-free); the other blocks
load and score without a mask (``_fwd_tile``'s ``MASKED``; the dQ pass does the same). Programs whose query block
starts past the end of their sequence exit at once (the grid is sized for ``max_seqlen``). It saves the
natural-log ``lse`` ``[H, T]`` fp32 for the backward.

Local attention is a compile-time switch (``HAS_WINDOW``; ``(-1, -1)`` compiles the global kernels with
no window code). With it, every loop takes its bounds from ``_reach``: key (or query) blocks wholly
outside the window of all the program's rows are never visited, so the work per row is proportional to
the window, not the sequence; every visited block is masked then (few blocks lie inside the window of all
the rows of a block at the windows in use). A block cut by the window's edge can hold
no finite score for some rows (as can any block when the ALiBi bias overflows to -inf): the online
softmax then subtracts 0 instead of a -inf running max, so no nan appears.

Backward: two kernels, no atomics.

1. ``_attn_bwd_dq_kernel``, one program per query block, two loops over the key blocks it can see: the
   first forms ``delta_i = sum_j P_ij dP_ij / sum_j P_ij`` for its rows (stored, fp32 ``[H, T]``, for the
   next kernel), the second recomputes ``P = exp2(S - lse)`` and accumulates ``dQ = dS K`` in registers.
   FlashAttention-2 forms delta as ``rowsum(dO * O)`` from the output rounded to fp16/bf16 at no matmul
   cost; that rounding becomes the whole gradient error when the softmax is nearly one-hot
   (``fastbert.reference.flash_attn_bwd`` has the measurement), so delta is computed from the same P and
   dP that form dS, for 2 extra block matmuls per block pair (9 instead of 7 in the backward).
2. ``_attn_bwd_dkdv_kernel``, one program per key block: loops over the query blocks that can see it,
   recomputing ``P^T`` and accumulating ``dV = P^T dO`` and ``dK = dS^T Q``.

Why a separate dQ pass rather than atomics into dQ from the key-block kernel: the result is
deterministic (bitwise reproducible run to run, which matters for debugging training runs and for tests),
needs no fp32 dQ scratch buffer plus a conversion kernel, and no atomic traffic: with atomics every key
block of a sequence adds into the same ``[BLOCK_M, D]`` rows of an fp32 dQ, and the summation order (so
the bits) changes run to run. The price is recomputing ``Q K^T`` and ``dO V^T`` in the dQ pass. No
gradient for the slopes.

Tensor cores run on the input dtype (bf16/fp16 operands, fp32 accumulation); fp32 inputs use IEEE fp32
dots (not TF32) so that fp32 results match the fp32 reference. Under ``TRITON_INTERPRET=1`` (CPU tests)
the interpreter cannot multiply bf16 matrices, so the launcher sets ``UPCAST_DOT`` and the kernels cast
dot operands to fp32 right before ``tl.dot``. That is numerically what the tensor cores do (a product of
two bf16/fp16 values is exact in fp32, accumulation is fp32); roundings such as ``P -> bf16`` before the
``P V`` product still happen exactly as on the GPU; the interpreter's own fp32 -> bf16 conversion
truncates, so ``_round`` rounds to nearest even on the bit pattern instead. Neither is ever used on a GPU.

Launch configs: one explicit (block sizes, warps, stages) row per kernel, head dim and GPU generation in
``_CONFIGS`` (no autotuning, so the interpreter runs the same code and the compiled kernels can be
inspected ahead of time); ``compile_specs()`` is built from the same table. Every bf16/fp16 config
compiles to mma.sync (sm_80) / wgmma (sm_90) without register spills (ptxas -v, recorded beside the
table). Head dims 16, 32, 64, 128; others are reported by ``unsupported`` so ``auto`` uses another backend.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastbert import reference as _ref
from fastbert.testing import VisitLog

from ._common import GRID_YZ_MAX, spec

Tensor = torch.Tensor

_LOG2E = tl.constexpr(1.4426950408889634)  # scores in log2 units: exp(x) == exp2(x * log2(e))
_LN2 = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` with fp32 accumulation; UPCAST (interpreter only) casts the operands to fp32 first."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _round(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` (to nearest even, as the GPU's conversion does).

    The interpreter's fp32 -> bf16 conversion truncates; with UPCAST (interpreter only) bf16 rounding is
    done here on the bit pattern instead and the result stays fp32 (exactly representable in bf16, so a
    later cast or store is exact), which keeps CPU tests numerically faithful to the GPU."""
    if UPCAST and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _reach(first, last, seqlen, before, after, BLOCK: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """``[lo, hi)``: the positions of the other axis that the rows ``first..last`` of this program can see,
    ``lo`` rounded down to a multiple of ``BLOCK`` (the loop's block size). A row at position x sees
    ``x - before .. x + after``. Every loop over key (or query) blocks takes its bounds from here, so
    blocks wholly outside the window are never visited; without a window it is the whole sequence."""
    if HAS_WINDOW:
        lo = tl.maximum(first - before, 0) // BLOCK * BLOCK
        hi = tl.minimum(last + after + 1, seqlen)
    else:
        lo = 0
        hi = seqlen
    return lo, hi


@triton.jit
def _in_window(rows, cols, before, after):
    """``[R, C]`` bool: column position within ``[row - before, row + after]``."""
    rel = cols[None, :] - rows[:, None]
    return (rel >= -before) & (rel <= after)


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_n, offs_n_f, offs_d, seqlen, stride_kt,
              stride_vt, qk_scale, slope, win_left, win_right, MASKED: tl.constexpr, HAS_ALIBI: tl.constexpr,
              HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """One key block of the online softmax: ``(acc, l_i, m_i)`` updated. ``MASKED``: the sequence's partial
    last block, or any block with a window (loads and scores masked); else every key is inside for every row."""
    cols = start_n + offs_n
    k_ptrs = k_base + cols[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = v_base + cols[:, None] * stride_vt + offs_d[None, :]
    if MASKED:
        mask_n = cols < seqlen
        k = tl.load(k_ptrs, mask=mask_n[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
    s = _dot(q, tl.trans(k), PRECISION, UPCAST_DOT) * qk_scale
    if HAS_ALIBI:  # i - j as floats (exact below 2^24): one conversion per row and tile, not per element
        s -= slope * tl.abs((offs_m - start_n).to(tl.float32)[:, None] - offs_n_f[None, :])
    if MASKED:
        if HAS_WINDOW:
            s = tl.where(mask_n[None, :] & _in_window(offs_m, cols, win_left, win_right), s, float("-inf"))
        else:
            s = tl.where(mask_n[None, :], s, float("-inf"))
    # A row can meet a block with no finite score (window edge, or an ALiBi bias that overflowed to -inf,
    # which can happen in an unmasked block too): its max stays -inf and exp2(-inf - -inf) would be nan,
    # so such rows subtract 0 instead.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_ptrs, mask=mask_n[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    acc = acc * alpha[:, None] + _dot(_round(p, v.dtype, UPCAST_DOT), v, PRECISION, UPCAST_DOT)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, CuSeqlens, Slopes, Visits,
    qk_scale,  # softmax_scale * log2(e), fp32
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_lse_h, n_heads, win_left, win_right,
    HAS_ALIBI: tl.constexpr, HAS_WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, COUNT_VISITS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    start = tl.load(CuSeqlens + b)
    seqlen = tl.load(CuSeqlens + b + 1) - start
    if pid_m * BLOCK_M >= seqlen:  # grid is sized for max_seqlen; shorter sequences stop here
        return
    start = start.to(tl.int64)  # T * stride_t can pass 2^31 for large fused-QKV batches

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < seqlen

    q = tl.load(Q + (start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=mask_m[:, None], other=0.0)
    k_base = K + start * stride_kt + h * stride_kh
    v_base = V + start * stride_vt + h * stride_vh
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + b * n_heads + h) * _LOG2E
    offs_n_f = offs_n.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    first = pid_m * BLOCK_M
    last = tl.minimum(first + BLOCK_M, seqlen) - 1
    lo, hi = _reach(first, last, seqlen, win_left, win_right, BLOCK_N, HAS_WINDOW)
    # Masks only where a block can need one. Without a window: only the sequence's partial last block (if
    # any), run first as straight-line code (the softmax is order-free; a loop of its own costs registers:
    # 2 -> 1 CTA/SM on sm_90 at D 64), then the unmasked blocks. With a window every visited block is
    # masked: at the windows in use (e.g. 64 + 64 around 128-row blocks) almost no block lies inside the
    # window of all the rows, and a separate edge loop made each masked block dearer (D 32 sm_80: 993 ->
    # 1160 main-loop instructions; D 128 sm_90: 255 registers).
    visits = 0
    if HAS_WINDOW:
        for start_n in range(lo, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_n, offs_n_f, offs_d,
                                      seqlen, stride_kt, stride_vt, qk_scale, slope, win_left, win_right, True,
                                      HAS_ALIBI, HAS_WINDOW, PRECISION, UPCAST_DOT)
            visits += 1
    else:
        full_hi = seqlen // BLOCK_N * BLOCK_N
        if full_hi < hi:
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, full_hi, offs_m, offs_n, offs_n_f, offs_d,
                                      seqlen, stride_kt, stride_vt, qk_scale, slope, win_left, win_right, True,
                                      HAS_ALIBI, HAS_WINDOW, PRECISION, UPCAST_DOT)
            visits += 1
        for start_n in range(lo, full_hi, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_n, offs_n_f, offs_d,
                                      seqlen, stride_kt, stride_vt, qk_scale, slope, win_left, win_right, False,
                                      HAS_ALIBI, HAS_WINDOW, PRECISION, UPCAST_DOT)
            visits += 1

    # l_i == 0 only for a row whose every score is -inf: out 0, lse -inf (as the reference)
    empty = l_i == 0.0
    l_i = tl.where(empty, 1.0, l_i)
    out = acc / l_i[:, None]
    tl.store(Out + (start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             _round(out, Out.dtype.element_ty, UPCAST_DOT), mask=mask_m[:, None])
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_i)) * _LN2)  # natural log, as the reference
    tl.store(Lse + h * stride_lse_h + start + offs_m, lse, mask=mask_m)
    if COUNT_VISITS:
        tl.store(Visits + (h * tl.num_programs(1) + b) * tl.num_programs(0) + pid_m, visits)


@triton.jit
def _dq_block(q, do, lse2, k_base, v_base, start_n, offs_m, offs_n, offs_d, seqlen, stride_kt, stride_vt,
              qk_scale, slope, win_left, win_right, MASKED: tl.constexpr,
              HAS_ALIBI: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """One key block of the dQ pass: ``(K, P, dP)`` with ``P = exp2(S - lse2)`` (0 outside the sequence and
    the window) and ``dP = dO V^T``. ``MASKED``: the sequence's partial last block, or any block with a window
    (loads and P masked); else no mask at all (rows past the sequence have ``lse2 = +inf``, so P = 0)."""
    cols = start_n + offs_n
    k_ptrs = k_base + cols[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = v_base + cols[:, None] * stride_vt + offs_d[None, :]
    if MASKED:
        mask_n = cols < seqlen
        k = tl.load(k_ptrs, mask=mask_n[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=mask_n[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    s = _dot(q, tl.trans(k), PRECISION, UPCAST_DOT) * qk_scale
    if HAS_ALIBI:  # (the forward's per-row conversion spills on sm_80 here: 24 B)
        s -= slope * tl.abs(offs_m[:, None] - cols[None, :]).to(tl.float32)
    p = tl.exp2(s - lse2[:, None])
    if MASKED:
        if HAS_WINDOW:
            p = tl.where(mask_n[None, :] & _in_window(offs_m, cols, win_left, win_right), p, 0.0)
        else:
            p = tl.where(mask_n[None, :], p, 0.0)
    dp = _dot(do, tl.trans(v), PRECISION, UPCAST_DOT)
    return k, p, dp


@triton.jit
def _dq_stats(pdp, psum, q, do, lse2, k_base, v_base, start_n, offs_m, offs_n, offs_d, seqlen, stride_kt,
              stride_vt, qk_scale, slope, win_left, win_right, MASKED: tl.constexpr, HAS_ALIBI: tl.constexpr,
              HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Pass 1 of the dQ kernel on one key block: ``sum_j P dP`` and ``sum_j P`` per row, accumulated."""
    k, p, dp = _dq_block(q, do, lse2, k_base, v_base, start_n, offs_m, offs_n, offs_d, seqlen, stride_kt, stride_vt,
                         qk_scale, slope, win_left, win_right, MASKED, HAS_ALIBI, HAS_WINDOW, PRECISION, UPCAST_DOT)
    return pdp + tl.sum(p * dp, 1), psum + tl.sum(p, 1)


@triton.jit
def _dq_accum(dq, delta, q, do, lse2, k_base, v_base, start_n, offs_m, offs_n, offs_d, seqlen, stride_kt,
              stride_vt, qk_scale, slope, win_left, win_right, MASKED: tl.constexpr, HAS_ALIBI: tl.constexpr,
              HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Pass 2 of the dQ kernel on one key block: ``dQ += dS K`` with ``dS = P (dP - delta)`` (unscaled)."""
    k, p, dp = _dq_block(q, do, lse2, k_base, v_base, start_n, offs_m, offs_n, offs_d, seqlen, stride_kt, stride_vt,
                         qk_scale, slope, win_left, win_right, MASKED, HAS_ALIBI, HAS_WINDOW, PRECISION, UPCAST_DOT)
    ds = p * (dp - delta[:, None])
    return dq + _dot(_round(ds, k.dtype, UPCAST_DOT), k, PRECISION, UPCAST_DOT)


@triton.jit
def _load_lse2(ptr, mask):
    """lse in log2 units for the backward: +inf past the sequence and for rows whose every score was -inf
    (lse = -inf), so that their P is exactly 0 instead of nan."""
    lse2 = tl.load(ptr, mask=mask, other=float("inf")) * _LOG2E
    return tl.where(lse2 == float("-inf"), float("inf"), lse2)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, CuSeqlens, Slopes, Visits,
    softmax_scale, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dqt, stride_dqh,
    stride_lse_h, n_heads, win_left, win_right,
    HAS_ALIBI: tl.constexpr, HAS_WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, COUNT_VISITS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    start = tl.load(CuSeqlens + b)
    seqlen = tl.load(CuSeqlens + b + 1) - start
    if pid_m * BLOCK_M >= seqlen:
        return
    start = start.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < seqlen
    rows = start + offs_m

    q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=mask_m[:, None], other=0.0)
    do = tl.load(DOut + rows[:, None] * stride_dot + h * stride_doh + offs_d[None, :],
                 mask=mask_m[:, None], other=0.0)
    lse2 = _load_lse2(Lse + h * stride_lse_h + rows, mask_m)
    k_base = K + start * stride_kt + h * stride_kh
    v_base = V + start * stride_vt + h * stride_vh
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + b * n_heads + h) * _LOG2E
    first = pid_m * BLOCK_M
    last = tl.minimum(first + BLOCK_M, seqlen) - 1
    lo, hi = _reach(first, last, seqlen, win_left, win_right, BLOCK_N, HAS_WINDOW)
    full_hi = seqlen // BLOCK_N * BLOCK_N
    # As the forward: without a window both passes run the partial last block (if any) masked, first, then
    # the unmasked blocks; with one every block is masked (an edge/interior split spills here: sm_80,
    # D 64, 124 B).
    visits = 0

    # Pass 1: delta_i = sum_j P_ij dP_ij / sum_j P_ij, from the same P and dP that form dS below (not
    # rowsum(dO * O) from the rounded output: see fastbert.reference.flash_attn_bwd for why). Stored for
    # the dK/dV kernel.
    pdp = tl.zeros([BLOCK_M], dtype=tl.float32)
    psum = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_WINDOW:
        for start_n in range(lo, hi, BLOCK_N):
            pdp, psum = _dq_stats(pdp, psum, q, do, lse2, k_base, v_base, start_n, offs_m, offs_n, offs_d, seqlen,
                                  stride_kt, stride_vt, qk_scale, slope, win_left, win_right, True, HAS_ALIBI,
                                  HAS_WINDOW, PRECISION, UPCAST_DOT)
            visits += 1
    else:
        if full_hi < hi:
            pdp, psum = _dq_stats(pdp, psum, q, do, lse2, k_base, v_base, full_hi, offs_m, offs_n, offs_d, seqlen,
                                  stride_kt, stride_vt, qk_scale, slope, win_left, win_right, True, HAS_ALIBI,
                                  HAS_WINDOW, PRECISION, UPCAST_DOT)
            visits += 1
        for start_n in range(lo, full_hi, BLOCK_N):
            pdp, psum = _dq_stats(pdp, psum, q, do, lse2, k_base, v_base, start_n, offs_m, offs_n, offs_d, seqlen,
                                  stride_kt, stride_vt, qk_scale, slope, win_left, win_right, False, HAS_ALIBI,
                                  HAS_WINDOW, PRECISION, UPCAST_DOT)
            visits += 1
    delta = tl.where(psum > 0.0, pdp / tl.where(psum > 0.0, psum, 1.0), 0.0)
    tl.store(Delta + h * stride_lse_h + rows, delta, mask=mask_m)

    # Pass 2: dQ = sum_j dS_ij K_j * scale with dS = P (dP - delta)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if HAS_WINDOW:
        for start_n in range(lo, hi, BLOCK_N):
            dq = _dq_accum(dq, delta, q, do, lse2, k_base, v_base, start_n, offs_m, offs_n, offs_d, seqlen,
                           stride_kt, stride_vt, qk_scale, slope, win_left, win_right, True, HAS_ALIBI, HAS_WINDOW,
                           PRECISION, UPCAST_DOT)
            visits += 1
    else:
        if full_hi < hi:
            dq = _dq_accum(dq, delta, q, do, lse2, k_base, v_base, full_hi, offs_m, offs_n, offs_d, seqlen,
                           stride_kt, stride_vt, qk_scale, slope, win_left, win_right, True, HAS_ALIBI, HAS_WINDOW,
                           PRECISION, UPCAST_DOT)
            visits += 1
        for start_n in range(lo, full_hi, BLOCK_N):
            dq = _dq_accum(dq, delta, q, do, lse2, k_base, v_base, start_n, offs_m, offs_n, offs_d, seqlen,
                           stride_kt, stride_vt, qk_scale, slope, win_left, win_right, False, HAS_ALIBI, HAS_WINDOW,
                           PRECISION, UPCAST_DOT)
            visits += 1

    dq *= softmax_scale
    tl.store(DQ + rows[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :],
             _round(dq, DQ.dtype.element_ty, UPCAST_DOT), mask=mask_m[:, None])
    if COUNT_VISITS:
        tl.store(Visits + (h * tl.num_programs(1) + b) * tl.num_programs(0) + pid_m, visits)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, CuSeqlens, Slopes, Visits,
    softmax_scale, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    stride_lse_h, n_heads, win_left, win_right,
    HAS_ALIBI: tl.constexpr, HAS_WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, COUNT_VISITS: tl.constexpr,
):
    # BLOCK_N: keys owned by this program; BLOCK_M: query rows streamed per iteration
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    start = tl.load(CuSeqlens + b)
    seqlen = tl.load(CuSeqlens + b + 1) - start
    if pid_n * BLOCK_N >= seqlen:
        return
    start = start.to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_n = offs_n < seqlen
    keys = start + offs_n

    k = tl.load(K + keys[:, None] * stride_kt + h * stride_kh + offs_d[None, :], mask=mask_n[:, None], other=0.0)
    v = tl.load(V + keys[:, None] * stride_vt + h * stride_vh + offs_d[None, :], mask=mask_n[:, None], other=0.0)
    q_base = Q + start * stride_qt + h * stride_qh
    do_base = DOut + start * stride_dot + h * stride_doh
    lse_base = Lse + h * stride_lse_h + start
    delta_base = Delta + h * stride_lse_h + start
    if HAS_ALIBI:
        slope = tl.load(Slopes + b * n_heads + h) * _LOG2E

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    # key j is seen by the queries i with i - win_left <= j <= i + win_right, i.e. j - win_right .. j + win_left
    lo, hi = _reach(pid_n * BLOCK_N, tl.minimum(pid_n * BLOCK_N + BLOCK_N, seqlen) - 1, seqlen, win_right,
                    win_left, BLOCK_M, HAS_WINDOW)
    visits = 0
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < seqlen
        q = tl.load(q_base + rows[:, None] * stride_qt + offs_d[None, :], mask=mask_m[:, None], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dot + offs_d[None, :], mask=mask_m[:, None], other=0.0)
        # lse = +inf on rows past the sequence makes their P exactly 0 (and q, dO are 0 there anyway)
        lse2 = _load_lse2(lse_base + rows, mask_m)
        delta = tl.load(delta_base + rows, mask=mask_m, other=0.0)
        st = _dot(k, tl.trans(q), PRECISION, UPCAST_DOT) * qk_scale  # S^T: [BLOCK_N, BLOCK_M]
        if HAS_ALIBI:
            st -= slope * tl.abs(offs_n[:, None] - rows[None, :]).to(tl.float32)
        # keys past the end are zeroed too: never stored, but exp2 of their bias-only score can overflow
        if HAS_WINDOW:
            pt = tl.where(mask_n[:, None] & _in_window(offs_n, rows, win_right, win_left),
                          tl.exp2(st - lse2[None, :]), 0.0)
        else:
            pt = tl.where(mask_n[:, None], tl.exp2(st - lse2[None, :]), 0.0)
        dv += _dot(_round(pt, do.dtype, UPCAST_DOT), do, PRECISION, UPCAST_DOT)
        dpt = _dot(v, tl.trans(do), PRECISION, UPCAST_DOT)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(_round(dst, q.dtype, UPCAST_DOT), q, PRECISION, UPCAST_DOT)
        visits += 1

    dk *= softmax_scale
    tl.store(DK + keys[:, None] * stride_dkt + h * stride_dkh + offs_d[None, :],
             _round(dk, DK.dtype.element_ty, UPCAST_DOT), mask=mask_n[:, None])
    tl.store(DV + keys[:, None] * stride_dvt + h * stride_dvh + offs_d[None, :],
             _round(dv, DV.dtype.element_ty, UPCAST_DOT), mask=mask_n[:, None])
    if COUNT_VISITS:
        tl.store(Visits + (h * tl.num_programs(1) + b) * tl.num_programs(0) + pid_n, visits)


# ----------------------------------------------------------------------------------------------
# launch configurations
# ----------------------------------------------------------------------------------------------
# (block_m, block_n, num_warps, num_stages) per kernel, keyed on GPU generation and head dim.
# fwd: block_m query rows per program, block_n keys per iteration.
# dq: the same roles. dkdv: block_n keys per program, block_m query rows per iteration.
# Chosen so that ptxas reports no spills at sm_80/sm_90 (see compile_specs / bench.compile_report).
_CONFIGS = {
    # ptxas -v registers/thread (sm_90a, bf16, ALiBi on), no spills anywhere:
    # fwd 177/123/184, dq 142/150/164, dkdv 216/207/215 for D = 32/64/128
    # dkdv D <= 64: 64 queries per step (was 32: a 32-wide wgmma N for S^T / dP^T and K = 32 for dV / dK,
    # one CTA per SM at D = 64); bench.perf_model predicts 47.3 -> 42.1 us (D 32) and 57.0 -> 42.8 us
    # (D 64) for the dkdv launch at BERT-base seq 512 on H100 (D 64: 64 x 128 x 8 warps 45.1 us with 2
    # stages, 52.7 with 3; 128 x 128 x 8 and 64 x 128 x 4 spill)
    "sm90": {
        "fwd": {32: (128, 64, 4, 3), 64: (128, 64, 8, 3), 128: (128, 64, 8, 3)},
        "dq": {32: (64, 64, 4, 3), 64: (128, 64, 8, 3), 128: (64, 64, 8, 2)},
        "dkdv": {32: (64, 64, 4, 3), 64: (64, 64, 4, 2), 128: (64, 64, 8, 2)},
    },
    # sm_80 (mma.sync keeps the accumulators *and* A operands in registers, so more warps per tile):
    # fwd 213/188/193, dq 168/255/178, dkdv 167/176/173
    "sm80": {
        "fwd": {32: (128, 64, 4, 3), 64: (128, 64, 8, 3), 128: (128, 32, 8, 3)},
        # dq D 128: 32 keys per step since the edge/interior split (64 keys: 255 registers, 64 B spilled)
        "dq": {32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (64, 32, 8, 2)},
        "dkdv": {32: (64, 64, 4, 3), 64: (32, 128, 8, 3), 128: (64, 64, 8, 2)},
    },
}
# fp32 on a GPU (IEEE fp32 dots on the FMA units: a correctness path, not a fast one). The fp32 dot
# layouts need many registers; at 32 x 32 with 8 warps fwd has no spills, dq/dkdv at D=128 spill a few
# hundred bytes (sm_80 and sm_90), acceptable off the bf16/fp16 path.
_FP32_GPU_CONFIG = (32, 32, 8, 1)
# CPU tensors run under the interpreter, which executes each program as numpy ops: bigger blocks mean
# fewer python steps, but tests use short sequences and want several blocks (and masked tails) per
# sequence. BLOCK_M != BLOCK_N so a mix-up of the two roles cannot pass the tests.
_INTERPRET_CONFIG = (64, 32, 1, 1)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_TORCH_TO_TL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _generation(device: torch.device) -> str:
    major, _ = torch.cuda.get_device_capability(device)
    return "sm90" if major >= 9 else "sm80"


def _config(kind: str, head_dim: int, dtype: torch.dtype, device: torch.device) -> Tuple[int, int, int, int]:
    if device.type != "cuda":
        return _INTERPRET_CONFIG
    if dtype == torch.float32:
        return _FP32_GPU_CONFIG
    table = _CONFIGS[_generation(device)][kind]
    # D=16 uses the D=32 row (same register/shared-memory footprint class)
    return table[max(head_dim, 32)]


def _dot_flags(dtype: torch.dtype, device: torch.device) -> dict:
    upcast = device.type != "cuda" and dtype != torch.float32
    return {"PRECISION": "ieee" if (dtype == torch.float32 or upcast) else "tf32", "UPCAST_DOT": upcast}


# ----------------------------------------------------------------------------------------------
# backend hooks
# ----------------------------------------------------------------------------------------------
def why_not(device: torch.device) -> Optional[str]:
    """Nothing beyond the registry's Triton check: the kernels run wherever Triton does."""
    return None


def unsupported(primitive: str, *args) -> Optional[str]:
    """Why these inputs cannot run here (dtype, head dim, grid or 32-bit index limits), else None."""
    q = args[1] if primitive == "flash_attn_bwd" else args[0]
    if q.dtype not in _TORCH_TO_TL:
        return f"the Triton attention kernels support fp16, bf16 and fp32 inputs, got {q.dtype}"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"the Triton attention kernels support head dims {SUPPORTED_HEAD_DIMS}, got {q.shape[-1]}"
    T, H = q.shape[0], q.shape[1]
    if T == 0:
        return None  # nothing is launched
    cu_at = 6 if primitive == "flash_attn_bwd" else 3
    B = args[cu_at].shape[0] - 1 if len(args) > cu_at else 1  # (_check passes q alone)
    if B > GRID_YZ_MAX:  # sequences are grid axis 1
        return f"the Triton attention grid puts sequences on axis 1: at most {GRID_YZ_MAX} sequences, got {B}"
    if H > GRID_YZ_MAX:  # heads are grid axis 2
        return f"the Triton attention grid puts heads on axis 2: at most {GRID_YZ_MAX} heads, got {H}"
    if H * T >= 2**31:  # lse / delta offsets h * T are 32-bit
        return f"the Triton attention kernels index lse [H, T] with 32-bit offsets: H * T < 2^31, got {H * T}"
    if B * H >= 2**31:  # slopes offsets b * H + h are 32-bit
        return f"the Triton attention kernels index alibi_slopes [B, H] with 32-bit offsets: B * H < 2^31, got {B * H}"
    return None


def _check(**tensors: Tensor) -> None:
    """Cheap guards the kernels rely on (the ops layer validates the rest before calling)."""
    reason = unsupported("flash_attn_fwd", tensors["q"])
    if reason:
        raise ValueError(f"q: {reason}")
    for name, t in tensors.items():
        if t.shape != tensors["q"].shape or t.dtype != tensors["q"].dtype:
            raise ValueError(f"{name}: expected shape {tuple(tensors['q'].shape)} and dtype {tensors['q'].dtype} "
                             f"like q, got {tuple(t.shape)} {t.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: the last dim must have stride 1, got strides {tuple(t.stride())}")


def _scale(softmax_scale: Optional[float], head_dim: int) -> float:
    return float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)


def _empty(shape, dtype, device) -> Tensor:
    """Every output buffer comes from here (tests patch it to hand out NaN-poisoned buffers)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _device_ctx(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


_VISITS = VisitLog()


def record_visits():
    """Test hook: inside ``with record_visits() as log:`` every launch compiles its kernels with
    ``COUNT_VISITS`` and each program stores how many blocks of the other axis its loops visited (key
    blocks for fwd and dq, both dq loops counted; query blocks for dkdv): ``log[kind]`` is int32
    ``[H, B, grid_0]`` for the last launch of each kind, 0 for programs that exited at once. The flag is a
    constexpr, so normal launches compile without it."""
    return _VISITS.record()


def _visits(kind: str, grid, device, dummy: Tensor) -> Tuple[Tensor, bool]:
    if _VISITS.log is None:
        return dummy, False
    buf = torch.zeros((grid[2], grid[1], grid[0]), dtype=torch.int32, device=device)
    _VISITS.log[kind] = buf
    return buf, True


def _window_args(window_size) -> dict:
    has_window, left, right = _ref.kernel_window(window_size)
    return {"win_left": left, "win_right": right, "HAS_WINDOW": has_window}


# ----------------------------------------------------------------------------------------------
# primitives
# ----------------------------------------------------------------------------------------------
def flash_attn_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                   alibi_slopes: Optional[Tensor] = None, softmax_scale: Optional[float] = None,
                   window_size=(-1, -1)) -> Tuple[Tensor, Tensor]:
    """Primitive. q, k, v ``[T, H, D]`` (last-dim stride 1), cu_seqlens int32 ``[B+1]``, alibi_slopes fp32
    ``[B, H]`` contiguous or None, window_size ``(left, right)`` (-1: unbounded) -> ``(out [T, H, D]
    q.dtype contiguous, lse [H, T] fp32)``.

    ``max_seqlen`` must be at least the longest sequence (the ops layer guarantees it; rows past
    ``max_seqlen`` would not be computed).
    """
    _check(q=q, k=k, v=v)
    window = _window_args(window_size)
    T, H, D = q.shape
    B = cu_seqlens.numel() - 1
    scale = _scale(softmax_scale, D)
    out = _empty((T, H, D), q.dtype, q.device)
    lse = _empty((H, T), torch.float32, q.device)
    if T == 0 or B <= 0 or max_seqlen <= 0:
        return out, lse
    block_m, block_n, num_warps, num_stages = _config("fwd", D, q.dtype, q.device)
    has_alibi = alibi_slopes is not None
    slopes = alibi_slopes if has_alibi else lse  # dummy pointer, never read when HAS_ALIBI is False
    grid = (triton.cdiv(max_seqlen, block_m), B, H)
    visits, count = _visits("fwd", grid, q.device, lse)
    with _device_ctx(q):
        _attn_fwd_kernel[grid](
            q, k, v, out, lse, cu_seqlens, slopes, visits, scale * 1.4426950408889634,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), lse.stride(0), H,
            HAS_ALIBI=has_alibi, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, COUNT_VISITS=count,
            num_warps=num_warps, num_stages=num_stages, **window, **_dot_flags(q.dtype, q.device))
    return out, lse


def flash_attn_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   cu_seqlens: Tensor, max_seqlen: int, alibi_slopes: Optional[Tensor] = None,
                   softmax_scale: Optional[float] = None, window_size=(-1, -1)) -> Tuple[Tensor, Tensor, Tensor]:
    """Primitive. Gradients of ``flash_attn_fwd``: dout ``[T, H, D]`` (last-dim stride 1), lse ``[H, T]``
    fp32 -> ``(dq, dk, dv)`` each ``[T, H, D]`` q.dtype contiguous. No slope grad. ``out`` is checked but
    not read: delta comes from P and dP (see ``fastbert.reference.flash_attn_bwd``)."""
    _check(q=q, k=k, v=v, dout=dout, out=out)
    window = _window_args(window_size)
    T, H, D = q.shape
    B = cu_seqlens.numel() - 1
    scale = _scale(softmax_scale, D)
    lse = lse.contiguous()
    dq = _empty((T, H, D), q.dtype, q.device)
    dk = _empty((T, H, D), q.dtype, q.device)
    dv = _empty((T, H, D), q.dtype, q.device)
    if T == 0 or B <= 0 or max_seqlen <= 0:
        return dq, dk, dv
    delta = _empty((H, T), torch.float32, q.device)
    has_alibi = alibi_slopes is not None
    slopes = alibi_slopes if has_alibi else lse
    flags = _dot_flags(q.dtype, q.device)
    common = dict(HAS_ALIBI=has_alibi, HEAD_DIM=D, **window, **flags)
    with _device_ctx(q):
        block_m, block_n, num_warps, num_stages = _config("dq", D, q.dtype, q.device)
        grid = (triton.cdiv(max_seqlen, block_m), B, H)
        visits, count = _visits("dq", grid, q.device, lse)
        _attn_bwd_dq_kernel[grid](
            q, k, v, dout, lse, delta, dq, cu_seqlens, slopes, visits, scale, scale * 1.4426950408889634,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), lse.stride(0), H,
            BLOCK_M=block_m, BLOCK_N=block_n, COUNT_VISITS=count, num_warps=num_warps, num_stages=num_stages,
            **common)
        block_m, block_n, num_warps, num_stages = _config("dkdv", D, q.dtype, q.device)
        grid = (triton.cdiv(max_seqlen, block_n), B, H)
        visits, count = _visits("dkdv", grid, q.device, lse)
        _attn_bwd_dkdv_kernel[grid](
            q, k, v, dout, lse, delta, dk, dv, cu_seqlens, slopes, visits, scale, scale * 1.4426950408889634,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            lse.stride(0), H, BLOCK_M=block_m, BLOCK_N=block_n, COUNT_VISITS=count, num_warps=num_warps,
            num_stages=num_stages, **common)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# compile report
# ----------------------------------------------------------------------------------------------
_KERNELS = {"fwd": _attn_fwd_kernel, "dq": _attn_bwd_dq_kernel, "dkdv": _attn_bwd_dkdv_kernel}
_SCALARS = {"qk_scale": "fp32", "softmax_scale": "fp32"}
_FP32_POINTERS = {"Lse", "Delta", "Slopes"}
_CONSTEXPRS = ("HAS_ALIBI", "HAS_WINDOW", "HEAD_DIM", "BLOCK_M", "BLOCK_N", "PRECISION", "UPCAST_DOT",
               "COUNT_VISITS")  # of all three
_I32 = {"n_heads", "win_left", "win_right"}


def _runtime_signature(kernel, dtype: str) -> dict:
    """Triton types of a kernel's runtime (non-constexpr) arguments for q/k/v of ``dtype``."""
    sig = {}
    for name in kernel.arg_names:
        if name in _CONSTEXPRS:
            continue
        if name in _SCALARS:
            sig[name] = _SCALARS[name]
        elif name.startswith("stride_") or name in _I32:
            sig[name] = "i32"
        elif name in ("CuSeqlens", "Visits"):
            sig[name] = "*i32"
        else:
            sig[name] = "*fp32" if name in _FP32_POINTERS else f"*{dtype}"
    return sig


def _divisible(kernel) -> list:
    """Arguments the JIT sees as multiples of 16 at BERT shapes: every pointer (torch allocations are
    16-byte aligned; a fused-QKV view starts H*D elements in) and every token/head stride (multiples of
    D in {32, 64, 128}); ``stride_lse_h`` (= T), ``n_heads`` and the window sizes are not. Without this the
    ahead-of-time compile cannot vectorise the tile loads and needs far more registers (it spilled) than
    real runs."""
    return [n for n, t in _runtime_signature(kernel, "bf16").items()
            if t.startswith("*") or (n.startswith("stride_") and n != "stride_lse_h")]


def compile_specs(generations: Tuple[str, ...] = ("sm80", "sm90")) -> list:
    """Launch configurations the launchers use at BERT shapes, for ``bench.compile_report``.

    One entry per GPU generation (the ``_CONFIGS`` row the launcher picks there) x kernel (fwd, dq, dkdv)
    x head dim (32, 64, 128) x dtype (bf16, fp16), with ALiBi on (the MosaicBERT path; ALiBi off only
    removes instructions), plus the local-attention build (``HAS_WINDOW``) of each in bf16 (named
    ``...bf16.window.<gen>``; fp16 is the same code). Extra keys: ``"attrs"`` (see ``kernels._common.spec``)
    and ``"capability"`` (80 or 90: compile for ``GPUTarget("cuda", capability, 32)``, the generation the
    config is for).
    """
    specs = []
    for gen in generations:
        for kind, kernel in _KERNELS.items():
            for head_dim in (32, 64, 128):
                block_m, block_n, num_warps, num_stages = _CONFIGS[gen][kind][head_dim]
                for dtype, window in (("bf16", False), ("fp16", False), ("bf16", True)):
                    const = {"HAS_ALIBI": True, "HAS_WINDOW": window, "HEAD_DIM": head_dim, "BLOCK_M": block_m,
                             "BLOCK_N": block_n, "PRECISION": "tf32", "UPCAST_DOT": False, "COUNT_VISITS": False}
                    name = f"attention.{kind}.d{head_dim}.{dtype}{'.window' if window else ''}.{gen}"
                    entry = spec(name, kernel,
                                 _runtime_signature(kernel, dtype), const, num_warps, num_stages,
                                 hot=head_dim == 64, kind="tensor_core", divisible=_divisible(kernel))
                    entry["capability"] = int(gen[2:])
                    specs.append(entry)
    return specs
