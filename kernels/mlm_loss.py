"""Sparse MLM loss, Triton backend: the chunked driver of ``fastbert.ops.mlm_chunked`` with a Triton row
kernel for the cross-entropy.

Primitive (signature and semantics: ``fastbert/reference.py``):

* ``sparse_mlm_loss_fwd(hidden [T, H], labels [T] int64, weight [V, H], bias [V] | None, ignore_index,
  compute_grad, max_labelled=None)`` -> ``(loss [] fp32, dhidden | None, dweight | None, dbias | None)``,
  gradients of the mean loss over labelled rows, fp32.

Only labelled rows are projected (cuBLAS via torch.mm, in chunks of rows). The row kernel reads each fp32
logit row once: up to ``MAX_RESIDENT`` columns the whole row (plus the bias) stays in registers, so the
max, the sum of exponentials and the gradient ``grad_scale * (softmax - onehot)`` (stored in the GEMM
dtype) come from one read; wider rows stream the vocabulary twice (an online logsumexp, then the
gradient). Rows with a negative target are padding (loss 0, zero gradient); a target >= V gives NaN.
Label smoothing is not supported (plain cross-entropy, as the reference).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastbert.ops.mlm_chunked import chunked_sparse_mlm_loss

from ._common import check_float, spec

MAX_RESIDENT = 32768  # widest row kept in registers (BERT's 30528 fits): 32 fp32 per thread at 32 warps
_STREAM_BLOCK = 4096  # columns per step of the streaming variant


def _v_config(V: int):
    """Launch config of the row kernel: the whole row in one block when it fits, else streamed."""
    block = triton.next_power_of_2(max(V, 1))
    if block <= MAX_RESIDENT:
        return {"BLOCK_V": block, "COLS": min(block, 1024), "RESIDENT": True,
                "num_warps": max(4, min(32, block // 1024))}
    return {"BLOCK_V": _STREAM_BLOCK, "COLS": 1024, "RESIDENT": False, "num_warps": 8}


@triton.jit
def _ce_rows_kernel(LOGITS, BIAS, TARGETS, LOSS, GRAD, V, grad_scale, HAS_BIAS: tl.constexpr,
                    WRITE_GRAD: tl.constexpr, RESIDENT: tl.constexpr, BLOCK_V: tl.constexpr, COLS: tl.constexpr):
    """One program per row of the fp32 logits chunk ``[rows, V]`` (contiguous, without the bias)."""
    row = tl.program_id(0)
    base = LOGITS + row.to(tl.int64) * V
    gbase = GRAD + row.to(tl.int64) * V
    cols = tl.arange(0, BLOCK_V)
    tgt = tl.load(TARGETS + row)
    pad = tgt < 0  # a slot the driver did not fill: loss 0, zero gradient (gs = 0, no onehot column)
    bad = tgt >= V  # NaN loss and gradient (never an out-of-bounds read)
    t_safe = tl.minimum(tl.maximum(tgt, 0), V - 1)
    x_t = tl.load(base + t_safe)
    if HAS_BIAS:
        x_t += tl.load(BIAS + t_safe)
    x_t = tl.where(bad, float("nan"), x_t)
    gs = tl.where(pad, 0.0, tl.where(bad, float("nan"), grad_scale))
    if RESIDENT:
        # The row as [BLOCK_V // COLS, COLS]: 16-byte vector loads and a few predicates per thread (the flat
        # masked [BLOCK_V] row kept more predicates alive to the store and spilled on sm_90 at 32 warps).
        c2 = tl.arange(0, BLOCK_V // COLS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
        cmask = c2 < V
        x = tl.load(base + c2, mask=cmask, other=float("-inf"))
        if HAS_BIAS:
            x += tl.load(BIAS + c2, mask=cmask, other=0.0)
        m = tl.max(tl.max(x, axis=1), axis=0)  # -inf only when the whole row is -inf (NaN, as the reference)
        e = tl.exp(x - m)
        s = tl.sum(tl.sum(e, axis=1), axis=0)
        lse = m + tl.log(s)
        if WRITE_GRAD:
            g = e * (gs / s)
            g = tl.where(c2 == tgt, g - gs, g)
            tl.store(gbase + c2, g.to(GRAD.dtype.element_ty), mask=cmask)
    else:
        # Pass 1: online logsumexp over blocks. A block (or a prefix of blocks) that is entirely -inf
        # leaves m = -inf; subtracting a finite stand-in (0) keeps exp(m - m_new) = 0 instead of NaN.
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.full([], 0.0, tl.float32)
        for start in range(0, V, BLOCK_V):
            c = start + cols
            cmask = c < V
            x = tl.load(base + c, mask=cmask, other=float("-inf"))
            if HAS_BIAS:
                x += tl.load(BIAS + c, mask=cmask, other=0.0)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), axis=0)
            m = m_new
        lse = m + tl.log(s)
        if WRITE_GRAD:
            # Pass 2: d loss_row / d logits = softmax - onehot, scaled; in the GEMM dtype.
            for start in range(0, V, BLOCK_V):
                c = start + cols
                cmask = c < V
                x = tl.load(base + c, mask=cmask, other=0.0)
                if HAS_BIAS:
                    x += tl.load(BIAS + c, mask=cmask, other=0.0)
                g = tl.exp(x - lse) * gs
                g = tl.where(c == tgt, g - gs, g)
                tl.store(gbase + c, g.to(GRAD.dtype.element_ty), mask=cmask)
    tl.store(LOSS + row, tl.where(pad, 0.0, lse - x_t))


def triton_ce_rows(logits: torch.Tensor, targets: torch.Tensor, bias: Optional[torch.Tensor],
                   grad: Optional[torch.Tensor], grad_scale: float) -> torch.Tensor:
    """Row kernel for ``chunked_sparse_mlm_loss`` (contract there): logits ``[c, V]`` fp32 contiguous,
    targets ``[c]`` int64, bias ``[V]`` fp32 or None, grad ``[c, V]`` contiguous (may be ``logits``) or
    None -> per-row loss ``[c]`` fp32."""
    rows, V = logits.shape
    loss = torch.empty(rows, device=logits.device, dtype=torch.float32)
    if rows == 0:
        return loss
    cfg = _v_config(V)
    _ce_rows_kernel[(rows,)](logits, bias, targets, loss, grad if grad is not None else logits, V,
                             float(grad_scale), HAS_BIAS=bias is not None, WRITE_GRAD=grad is not None,
                             RESIDENT=cfg["RESIDENT"], BLOCK_V=cfg["BLOCK_V"], COLS=cfg["COLS"],
                             num_warps=cfg["num_warps"])
    return loss


def unsupported(primitive: str, *args) -> Optional[str]:
    """Why these inputs cannot run here (a hidden/weight/bias dtype other than fp32/bf16/fp16)."""
    hidden, _labels, weight, bias = args[:4]
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        reason = check_float(name, t)
        if reason:
            return reason
    return None


def sparse_mlm_loss_fwd(hidden, labels, weight, bias, ignore_index, compute_grad, max_labelled=None,
                        chunk_rows=None):
    """hidden ``[T, H]``, labels ``[T]`` int64, weight ``[V, H]``, bias ``[V]`` or None ->
    ``(loss [] fp32, dhidden [T, H] fp32 or None, dweight [V, H] fp32 or None, dbias [V] fp32 or None)``;
    the gradients are those of the mean loss over labelled rows (zero rows with ``ignore_index``).
    ``max_labelled``: see ``fastbert.ops.mlm_chunked``. ``chunk_rows`` (not part of the primitive
    signature) overrides the chunk size, for tests."""
    return chunked_sparse_mlm_loss(hidden, labels, weight, bias, ignore_index, compute_grad,
                                   row_kernel=triton_ce_rows, chunk_rows=chunk_rows, max_labelled=max_labelled)


def compile_specs():
    """The row kernel at BERT's vocabulary (V = 30528, padded to a multiple of 64: the resident variant)
    with a bf16 gradient and without the gradient, and the streaming variant (V > MAX_RESIDENT), from the
    launcher's ``_v_config``."""
    specs = []
    for V, grad, name in ((30528, True, "mlm_ce_rows_V30528_bf16grad"), (30528, False, "mlm_ce_rows_V30528_nograd"),
                          (50304, True, "mlm_ce_rows_V50304_stream_bf16grad")):
        cfg = _v_config(V)
        specs.append(spec(name, _ce_rows_kernel,
                          {"LOGITS": "*fp32", "BIAS": "*fp32", "TARGETS": "*i64", "LOSS": "*fp32",
                           "GRAD": "*bf16", "V": "i32", "grad_scale": "fp32"},
                          {"HAS_BIAS": True, "WRITE_GRAD": grad, "RESIDENT": cfg["RESIDENT"],
                           "BLOCK_V": cfg["BLOCK_V"], "COLS": cfg["COLS"]}, cfg["num_warps"], hot=grad and V == 30528,
                          divisible=["LOGITS", "BIAS", "TARGETS", "LOSS", "GRAD", "V"]))
    return specs
