"""Backend-agnostic driver of the sparse MLM loss: compact the labelled rows on the device, project them in
chunks with the matmul library, and let a backend's row kernel turn each chunk of logits into its loss
and its low-precision gradient.

Only labelled rows reach the vocabulary projection, and the ``[n, V]`` logits never exist at once: per
chunk of ``c`` rows one fp32 logits buffer ``[c, V]`` (written by the projection GEMM) and one gradient
buffer ``[c, V]`` in the GEMM dtype are reused. The row kernel reads each logit row once, adds the bias,
and writes ``S * (softmax - onehot)`` rounded once to the GEMM dtype; two GEMMs consume it at once
(``dhidden`` rows, and the fp32 ``dweight`` accumulator, whose extra column of ones in the hidden operand
also yields ``dbias``: ``[h | 1] ^T`` trick, no separate reduction over the logits).

No host sync when ``max_labelled`` is given: the labelled rows are put first by a stable sort on the device
(or, when ``max_labelled >= T``, every row goes through and unlabelled ones contribute nothing); the count
``n`` stays on the device and scales the results there. If more than ``max_labelled`` rows are labelled the
loss and every gradient are NaN (never a silently truncated mean). Without ``max_labelled`` the count is
read once on the host (one small sync) so that exactly ``n`` rows are projected.

Low precision (issue 22.3): the gradients are returned in fp32, for the loss *mean*, and the op's backward
multiplies by the upstream gradient before casting to the parameters' dtype, as PyTorch's own fp16 path
does (``GradScaler``'s 65536 is applied before anything is rounded). The gradient rows handed to the GEMMs
as fp16 are scaled by ``S = 2**15`` (not ``1/n``), so entries down to ``1e-9 * max`` stay normal fp16
numbers; ``1/(n S)`` is applied to the fp32 GEMM outputs.

GEMMs: with bf16/fp16 ``hidden`` and ``weight`` on a GPU, the projections run in that dtype with fp32
output (``torch.mm(..., out_dtype=torch.float32)``: tensor cores, fp32 accumulate); elsewhere (CPU, fp32)
the same numerics are computed with fp32 GEMMs (the gradient is still rounded to the input dtype first, so
CPU tests see the GPU path's rounding).

Bytes moved (HBM; for a static model: ``traffic_bytes`` computes these). ``n`` labelled rows of ``T``,
``c`` rows per chunk, ``k = ceil(n / c)`` chunks, vocabulary ``V``, hidden ``H``, ``b`` bytes per element
of the GEMM dtype (2 for bf16/fp16), ``Hp = H + 16 / b`` (the hidden operand with the ones column, padded
to 16 bytes; ``H`` without a bias)::

    per logit, outside the GEMMs' reads of hidden / weight:
        4 (projection writes fp32) + 4 (row kernel reads it once) + b (writes the gradient)
        + b (dhidden GEMM reads it) + b (dweight GEMM reads it)                      = 8 + 3b  (14 for bf16)
    per chunk: 2 V H b (weight, read by the projection and the dhidden GEMMs) + 2 V Hp 4 (the fp32
        dweight accumulator, read and written by the addmm)
    per labelled row: H b (hidden in) + H 4 (fp32 dhidden rows out)
    once: V Hp 4 (zero the accumulator) + V Hp 4 + V H 4 + V 4 (scale; dweight / dbias out) + 3 T H 4
        (zero, scale dhidden) + the op's backward: (V H + T H) (4 + b) (upstream scale, cast)

Before (256-row chunks, in-place fp32 gradient, separate bias add, two-pass row kernel, separate
bias-gradient sum and cast) each logit cost ``4 + 8 + 12 + 4 + (4 + b) + 2b = 32 + 3b`` (38 for bf16)
and the accumulator term had ``k = ceil(n / 256)``. BERT-base MLM step (T = 32768 tokens, n = 9830
labelled, V = 30528, H = 768, bf16): logits 11.4 GB -> 4.2 GB, accumulator 39 x 188 MB = 7.3 GB ->
5 x 190 MB = 0.95 GB (c = 2048), weight reads 3.7 GB -> 0.47 GB; total ~22.4 GB -> ~6.5 GB per step
(6.7 ms -> 1.95 ms at 3.35 TB/s, besides the 1.4 TFLOP of GEMMs).

Label smoothing is not supported (the loss is plain cross-entropy, as the reference).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

Tensor = torch.Tensor

# row_kernel(logits [c, V] fp32, targets [c] int64, bias [V] fp32 | None, grad [c, V] | None, grad_scale)
# -> loss [c] fp32 (contract in chunked_sparse_mlm_loss's docstring).
RowKernel = Callable[[Tensor, Tensor, Optional[Tensor], Optional[Tensor], float], Tensor]

_LOWP = (torch.bfloat16, torch.float16)
FP16_GRAD_SCALE = 2.0 ** 15  # |S * (softmax - onehot)| <= 32768 < 65504: no fp16 overflow, 2^15 more range below
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
    """Rows per chunk: a power of two with the chunk's fp32 logits at most 256 MiB, between 256 and 4096
    rows (2048 at BERT's V = 30528: few passes over the fp32 dweight accumulator, GEMMs that fill the GPU),
    and never more than n."""
    rows = 1 << max(0, ((1 << 28) // (4 * max(V, 1))).bit_length() - 1)
    return max(1, min(n, max(256, min(4096, rows))))


def traffic_bytes(n: int, T: int, V: int, H: int, elem_bytes: int = 2, chunk_rows: Optional[int] = None,
                  bias: bool = True) -> dict:
    """HBM bytes one forward+backward of this driver moves (the formulas of the module docstring), by part:
    ``{"logits", "accumulator", "weight", "rows", "once", "total"}``. GEMM operand re-reads from L2 and the
    hidden / weight reads of the GEMMs' own tiling are not modelled."""
    b = elem_bytes
    c = chunk_rows or default_chunk_rows(n, V, H)
    k = -(-n // c) if n else 0
    Hp = H + (16 // b if bias else 0)
    parts = {"logits": n * V * (8 + 3 * b), "accumulator": k * 2 * V * Hp * 4, "weight": k * 2 * V * H * b,
             "rows": n * H * (b + 4),
             "once": V * Hp * 8 + V * H * 4 + V * 4 + 3 * T * H * 4 + (V * H + T * H) * (4 + b)}
    parts["total"] = sum(parts.values())
    return parts


def labelled_rows(labels: Tensor, ignore_index: int, V: int, max_labelled: Optional[int]
                  ) -> Tuple[Optional[Tensor], Tensor, Tensor, int]:
    """The rows to project and their row-kernel targets, without a host sync when ``max_labelled`` is given.

    Returns ``(rows [U] int64 or None (all rows, in order), targets [U] int64, n [] int64 on the device,
    U)``. Targets: the label for labelled rows (``V`` when the label is outside ``[0, V)``, which the row
    kernels turn into NaN), ``-1`` for rows that only fill the ``U`` slots (no loss, no gradient).
    """
    T = labels.shape[0]
    mask = labels != ignore_index
    n = mask.sum()
    U = int(n) if max_labelled is None else min(int(max_labelled), T)  # int(n): the one host sync
    bad = (labels < 0) | (labels >= V)
    tgt = torch.where(mask, torch.where(bad, torch.full_like(labels, V), labels), torch.full_like(labels, -1))
    if U >= T:
        return None, tgt, n, T
    rows = torch.argsort((~mask).to(torch.uint8), stable=True)[:U]  # labelled rows first, in order
    return rows, tgt.index_select(0, rows), n, U


def chunked_sparse_mlm_loss(hidden: Tensor, labels: Tensor, weight: Tensor, bias: Optional[Tensor],
                            ignore_index: int, compute_grad: bool, row_kernel: RowKernel,
                            chunk_rows: Optional[int] = None, max_labelled: Optional[int] = None
                            ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Sparse MLM cross-entropy (mean over labelled rows) and, if ``compute_grad``, its gradients.

    Args:
        hidden: ``[T, H]`` fp32/bf16/fp16, contiguous. labels: ``[T]`` int64, ``ignore_index`` or in ``[0, V)``.
        weight: ``[V, H]`` decoder weight; bias: ``[V]`` or None. ignore_index: label of unlabelled rows.
        compute_grad: also return the gradients of the mean loss.
        row_kernel: ``row_kernel(logits, targets, bias, grad, grad_scale) -> loss [c] fp32`` with logits
            ``[c, V]`` fp32 contiguous (without the bias), targets ``[c]`` int64, bias ``[V]`` fp32 or None,
            grad ``[c, V]`` contiguous (fp32/bf16/fp16; may be ``logits`` itself) or None. Per row ``r`` with
            ``x = logits[r] + bias`` and ``t = targets[r]``: ``t`` in ``[0, V)`` gives loss
            ``logsumexp(x) - x[t]`` and ``grad[r] = grad_scale * (softmax(x) - onehot(t))`` (rounded once);
            ``t < 0`` gives loss 0 and a zero gradient row; ``t >= V`` gives NaN. A logsumexp over entries
            that are all -inf but one (or blocks of them) is that entry, never NaN.
        chunk_rows: labelled rows per chunk (default ``default_chunk_rows``).
        max_labelled: an upper bound on the number of labelled rows (no host sync; NaN results if exceeded),
            or None (count them on the host).
    Returns:
        ``(loss [] fp32, dhidden [T, H] fp32 or None, dweight [V, H] fp32 or None, dbias [V] fp32 or None)``:
        gradients of the mean loss, in fp32 so that the caller can apply the upstream gradient before
        rounding. Unlabelled rows get zero ``dhidden``; no labelled rows at all gives loss 0 and zero
        gradients. No label smoothing.
    """
    T, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    f32 = torch.float32
    rows, targets, n, U = labelled_rows(labels, ignore_index, V, max_labelled)
    # 1/n on the device (NaN when more rows are labelled than max_labelled allows: never a silent subset)
    inv_n = torch.where(n > U, torch.full((), float("nan"), device=dev), 1.0 / n.clamp_min(1).to(f32))
    want_db = compute_grad and bias is not None
    dhidden = torch.zeros((T, H), device=dev, dtype=f32) if compute_grad else None
    c = int(chunk_rows) if chunk_rows else default_chunk_rows(U, V, H)
    if c < 1:
        raise ValueError(f"chunk_rows: expected a positive integer, got {chunk_rows}")
    # One GEMM dtype for both operands: the shared low precision, else fp32.
    gd = hidden.dtype if (hidden.dtype == weight.dtype and hidden.dtype in _LOWP) else f32
    w = weight if weight.dtype == gd else weight.to(gd)  # [V, H]
    if gd == f32 or not _fast_lowp(w, w, "mm"):
        w = w.float()  # fp32 GEMM fallback: convert the (large) weight once, not once per chunk
    wt = w.t()
    S = FP16_GRAD_SCALE if gd == torch.float16 else 1.0
    bias32 = bias.to(f32).contiguous() if bias is not None else None
    # dweight accumulator; with a bias, extra columns [1, 0, ...] in the hidden operand give dbias too
    Hp = H + (16 // torch.empty((), dtype=gd).element_size() if want_db else 0)
    acc = torch.zeros((V, Hp), device=dev, dtype=f32) if compute_grad else None
    h_aug = None
    if want_db:
        h_aug = torch.zeros((min(c, U), Hp), device=dev, dtype=gd)
        h_aug[:, H] = 1.0
    loss_sum = torch.zeros((), device=dev, dtype=f32)
    grad_buf = torch.empty((min(c, U), V), device=dev, dtype=gd) if compute_grad and gd != f32 else None
    for s in range(0, U, c):
        r = min(c, U - s)
        h = hidden[s:s + r] if rows is None else hidden.index_select(0, rows[s:s + r])
        if h.dtype != gd:
            h = h.to(gd)
        logits = mm_f32(h, wt)  # [r, V] fp32, without the bias (the row kernel adds it)
        grad = None if not compute_grad else (logits if grad_buf is None else grad_buf[:r])
        loss_sum += row_kernel(logits, targets[s:s + r], bias32, grad, S).sum()
        if not compute_grad:
            continue
        dh = mm_f32(grad, w)  # [r, H] fp32, in units of S / n
        if rows is None:
            dhidden[s:s + r] = dh
        else:
            dhidden.index_copy_(0, rows[s:s + r], dh)
        if h_aug is not None:
            h_aug[:r, :H] = h
            addmm_f32_(acc, grad.t(), h_aug[:r])
        else:
            addmm_f32_(acc, grad.t(), h)
    loss = loss_sum * inv_n
    if not compute_grad:
        return loss, None, None, None
    scale = inv_n / S
    dhidden.mul_(scale)
    dweight = acc[:, :H].mul(scale) if want_db else acc.mul_(scale)
    dbias = acc[:, H].mul(scale) if want_db else None
    return loss, dhidden, dweight, dbias
