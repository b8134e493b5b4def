"""Sparse MLM loss, Triton backend: the chunked driver of ``fastbert.ops.mlm_chunked`` with a Triton row
kernel for the cross-entropy.

Primitive (signature and semantics: ``fastbert/reference.py``):

* ``sparse_mlm_loss_fwd(hidden [T, H], labels [T] int64, weight [V, H], bias [V] | None, ignore_index,
  compute_grad)`` -> ``(loss [] fp32, dhidden | None, dweight | None, dbias | None)``, gradients of the
  mean loss over labelled rows.

Only labelled rows are projected (cuBLAS via torch.mm, in chunks of rows); the row kernel makes one pass
over each row of the fp32 logits chunk for an online logsumexp (running max and rescaled sum), then a
second pass that overwrites the logits with ``grad_scale * (softmax - onehot)``, so the chunk buffer
doubles as the logits' gradient. Label smoothing is not supported (plain cross-entropy, as the reference).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastbert.ops.mlm_chunked import chunked_sparse_mlm_loss

from ._common import check_float, spec

# (max V, BLOCK_V, num_warps): the vocabulary is streamed in BLOCK_V columns per step.
_V_TABLE = ((1024, 1024, 4), (1 << 62, 4096, 8))


def _v_config(V: int):
    block = triton.next_power_of_2(V)
    for max_v, block_v, warps in _V_TABLE:
        if V <= max_v:
            return {"BLOCK_V": min(block, block_v), "num_warps": warps}
    raise AssertionError("unreachable")


@triton.jit
def _ce_rows_kernel(LOGITS, TARGETS, LOSS, V, grad_scale, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """One program per row of the fp32 logits chunk ``[rows, V]`` (contiguous)."""
    row = tl.program_id(0)
    base = LOGITS + row.to(tl.int64) * V
    cols = tl.arange(0, BLOCK_V)
    # Pass 1: online logsumexp. The running max starts at -inf; every block has at least one valid
    # column, so after the first step m is finite and exp(m_old - m_new) is well defined.
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.full([], 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    tgt = tl.load(TARGETS + row)
    x_t = tl.load(base + tgt)
    tl.store(LOSS + row, lse - x_t)
    if WRITE_GRAD:
        # Pass 2: d loss_row / d logits = softmax - onehot, scaled (1/n for the mean); in place.
        for start in range(0, V, BLOCK_V):
            c = start + cols
            cmask = c < V
            x = tl.load(base + c, mask=cmask, other=0.0)
            p = tl.exp(x - lse) * grad_scale
            p = tl.where(c == tgt, p - grad_scale, p)
            tl.store(base + c, p, mask=cmask)


def triton_ce_rows(logits: torch.Tensor, targets: torch.Tensor, grad_scale: Optional[float]) -> torch.Tensor:
    """Row kernel for ``chunked_sparse_mlm_loss``: logits ``[c, V]`` fp32 contiguous (overwritten with
    ``grad_scale * (softmax - onehot)`` when grad_scale is a float), targets ``[c]`` int64 in ``[0, V)``
    -> per-row loss ``[c]`` fp32."""
    rows, V = logits.shape
    loss = torch.empty(rows, device=logits.device, dtype=torch.float32)
    if rows == 0:
        return loss
    cfg = _v_config(V)
    _ce_rows_kernel[(rows,)](logits, targets, loss, V, float(grad_scale or 0.0),
                             WRITE_GRAD=grad_scale is not None, BLOCK_V=cfg["BLOCK_V"], num_warps=cfg["num_warps"])
    return loss


def unsupported(primitive: str, *args) -> Optional[str]:
    """Why these inputs cannot run here (a hidden/weight/bias dtype other than fp32/bf16/fp16)."""
    hidden, _labels, weight, bias = args[:4]
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        reason = check_float(name, t)
        if reason:
            return reason
    return None


def sparse_mlm_loss_fwd(hidden, labels, weight, bias, ignore_index, compute_grad, chunk_rows=None):
    """hidden ``[T, H]``, labels ``[T]`` int64, weight ``[V, H]``, bias ``[V]`` or None ->
    ``(loss [] fp32, dhidden [T, H] or None, dweight [V, H] or None, dbias [V] or None)``; the gradients
    are those of the mean loss over labelled rows (zero rows with ``ignore_index``). ``chunk_rows``
    (not part of the primitive signature) overrides the chunk size, for tests."""
    return chunked_sparse_mlm_loss(hidden, labels, weight, bias, ignore_index, compute_grad,
                                   row_kernel=triton_ce_rows, chunk_rows=chunk_rows)


def compile_specs():
    """The row kernel at BERT's vocabulary (V = 30528, padded to a multiple of 64) with and without the
    gradient pass, from the launcher's ``_V_TABLE``."""
    specs = []
    V = 30528
    cfg = _v_config(V)
    for grad in (True, False):
        specs.append(spec("mlm_ce_rows_V30528" + ("" if grad else "_nograd"), _ce_rows_kernel,
                          {"LOGITS": "*fp32", "TARGETS": "*i64", "LOSS": "*fp32", "V": "i32", "grad_scale": "fp32"},
                          {"WRITE_GRAD": grad, "BLOCK_V": cfg["BLOCK_V"]}, cfg["num_warps"], hot=grad,
                          divisible=["LOGITS", "TARGETS", "LOSS", "V"]))
    return specs
