"""Backend-agnostic driver of the sparse MLM loss: gather labelled rows, project them in chunks with the
matmul library, and let a backend's row kernel turn each chunk of logits into its loss and gradient.

Only rows whose label is not ``ignore_index`` reach the vocabulary projection, and the ``[n, V]`` fp32
logits of the ``n`` labelled rows never exist at once: one ``[chunk_rows, V]`` fp32 buffer is reused,
the row kernel overwrites it in place with the logits' gradient, and that gradient is immediately
consumed by two GEMMs (``dhidden`` rows and the fp32 ``dweight`` accumulator). The Triton backend
(``fastbert.kernels.mlm_loss``) and the CUDA backend plug in their own row kernels.

GEMMs: with bf16/fp16 ``hidden`` and ``weight`` on a GPU, the projections run in that dtype with fp32
output (``torch.mm(..., out_dtype=torch.float32)``: tensor cores, fp32 accumulate) and the gradient
GEMMs take the logits' gradient rounded to that dtype; elsewhere (CPU, fp32) the same numerics are
computed with fp32 GEMMs (the gradient is still rounded to the input dtype first, so CPU tests see the
GPU path's rounding).

Label smoothing is not supported (the loss is plain cross-entropy, as the reference).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

Tensor = torch.Tensor

RowKernel = Callable[[Tensor, Tensor, Optional[float]], Tensor]

_LOWP = (torch.bfloat16, torch.float16)
# Does this torch build run mm / addmm with out_dtype=fp32 on CUDA bf16/fp16? None: not probed yet.
# A failure (older build, unsupported combination) switches that GEMM to the fp32 path for good.
_out_dtype_ok = {"mm": None, "addmm": None}


def _fast_lowp(a: Tensor, b: Tensor, which: str = "mm") -> bool:
    return a.is_cuda and a.dtype in _LOWP and b.dtype == a.dtype and _out_dtype_ok[which] is not False


def mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` as fp32. Low-precision CUDA operands use cuBLAS with fp32 output; others go through fp32
    GEMMs (exact products, fp32 accumulation: the same numerics, slower)."""
    if _fast_lowp(a, b, "mm"):
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _out_dtype_ok["mm"] = True
            return out
        except (RuntimeError, TypeError):
            _out_dtype_ok["mm"] = False
    return torch.mm(a.float(), b.float())


def addmm_f32_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` in place, ``acc`` fp32 (the dweight accumulator)."""
    if _fast_lowp(a, b, "addmm"):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _out_dtype_ok["addmm"] = True
            return
        except (RuntimeError, TypeError):
            _out_dtype_ok["addmm"] = False
    acc.addmm_(a.float(), b.float())


def default_chunk_rows(n: int, V: int, H: int) -> int:
    """Rows per chunk: the chunk's fp32 logits about the size of the labelled hidden rows (as Liger's
    fused linear cross-entropy sizes its chunks), at least 256 rows so each GEMM still fills the GPU,
    a power of two, and never more than n."""
    ratio = max(1, -(-V // max(H, 1)))
    rows = max(256, 1 << max(0, (-(-n // ratio) - 1).bit_length()))
    return max(1, min(n, rows))


def chunked_sparse_mlm_loss(hidden: Tensor, labels: Tensor, weight: Tensor, bias: Optional[Tensor],
                            ignore_index: int, compute_grad: bool, row_kernel: RowKernel,
                            chunk_rows: Optional[int] = None
                            ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Sparse MLM cross-entropy (mean over labelled rows) and, if ``compute_grad``, its gradients.

    Args:
        hidden: ``[T, H]`` fp32/bf16/fp16, contiguous. labels: ``[T]`` int64, ``ignore_index`` or in ``[0, V)``.
        weight: ``[V, H]`` decoder weight; bias: ``[V]`` or None. ignore_index: label of unlabelled rows.
        compute_grad: also return the gradients of the mean loss.
        row_kernel: ``row_kernel(logits [c, V] fp32 contiguous, targets [c] int64, grad_scale)`` returns
            the per-row loss ``logsumexp(logits[r]) - logits[r, targets[r]]`` as ``[c]`` fp32 and, when
            ``grad_scale`` is a float, overwrites ``logits`` in place with
            ``grad_scale * (softmax(logits[r]) - onehot(targets[r]))``; with ``grad_scale=None`` it may
            leave ``logits`` as they are.
        chunk_rows: labelled rows per chunk (default ``default_chunk_rows``).
    Returns:
        ``(loss [] fp32, dhidden [T, H] hidden.dtype or None, dweight [V, H] weight.dtype or None,
        dbias [V] bias.dtype or None)``. Unlabelled rows get zero ``dhidden``; no labelled rows at all
        gives loss 0 and zero gradients. No label smoothing.
    """
    T, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    sel = torch.nonzero(labels != ignore_index).flatten()  # host sync: n sizes everything below
    n = sel.numel()
    want_db = compute_grad and bias is not None
    dhidden = torch.zeros_like(hidden) if compute_grad else None
    if n == 0:
        loss = torch.zeros((), device=dev, dtype=torch.float32)
        if not compute_grad:
            return loss, None, None, None
        return (loss, dhidden, torch.zeros_like(weight), torch.zeros_like(bias) if want_db else None)

    c = int(chunk_rows) if chunk_rows else default_chunk_rows(n, V, H)
    if c < 1:
        raise ValueError(f"chunk_rows: expected a positive integer, got {chunk_rows}")
    # One GEMM dtype for both operands: the shared low precision, else fp32.
    gd = hidden.dtype if (hidden.dtype == weight.dtype and hidden.dtype in _LOWP) else torch.float32
    w = weight if weight.dtype == gd else weight.to(gd)  # [V, H]
    wt = w.t()
    if gd == torch.float32 or not _fast_lowp(w, w, "mm"):
        # fp32 GEMM fallback: convert the (large) weight once, not once per chunk.
        w = w.float()
        wt = w.t()
    bias32 = bias.float() if bias is not None else None
    dw32 = torch.zeros((V, H), device=dev, dtype=torch.float32) if compute_grad else None
    db32 = torch.zeros((V,), device=dev, dtype=torch.float32) if want_db else None
    loss_sum = torch.zeros((), device=dev, dtype=torch.float32)
    scale = 1.0 / n
    targets_all = labels.index_select(0, sel)
    for s in range(0, n, c):
        rows = sel[s:s + c]
        h = hidden.index_select(0, rows)
        if h.dtype != gd:
            h = h.to(gd)
        logits = mm_f32(h, wt)  # [rows, V] fp32
        if bias32 is not None:
            logits += bias32
        loss_rows = row_kernel(logits, targets_all[s:s + c], scale if compute_grad else None)
        loss_sum += loss_rows.sum()
        if not compute_grad:
            continue
        dl = logits  # now grad_scale * (softmax - onehot)
        if db32 is not None:
            db32 += dl.sum(0)
        dl_g = dl.to(gd) if gd != torch.float32 else dl
        dhidden.index_copy_(0, rows, mm_f32(dl_g, w).to(hidden.dtype))
        addmm_f32_(dw32, dl_g.t(), h)
    loss = loss_sum * scale
    if not compute_grad:
        return loss, None, None, None
    return loss, dhidden, dw32.to(weight.dtype), (db32.to(bias.dtype) if db32 is not None else None)
