"""The ``cpu`` backend: every fastbert primitive through PyTorch's fused CPU kernels (ATen).

``auto`` picks it for CPU tensors before the reference (``fastbert.registry.AUTO_ORDER["cpu"]``). The
reference (``fastbert/reference.py``) stays the specification and is written to be obviously correct:
padded ``[B, H, S, S]`` fp32 scores with a materialised bias, GELU derivatives composed from a dozen
elementwise ops. This backend computes the same functions with the kernels ATen already vectorises and
parallelises on a CPU:

* attention: the forward is ``aten::_scaled_dot_product_flash_attention_for_cpu`` (FlashAttention-2
  structure, natural-log LSE returned), one call per sequence on strided views of the packed ``[T, H, D]``
  tensors, so nothing is padded or copied in; the ALiBi bias (and a sliding window, folded in as ``-inf``
  outside the band) is an additive ``attn_mask`` shared by every sequence. At batch 32, lengths 8-66, one
  thread, per-sequence calls measured 1.2-1.7x faster than one call over the padded batch (what Hugging
  Face's SDPA path runs) and than padded length buckets of 4-16 sequences (the ``[b, H, S, S]`` masks cost
  more than the calls they save). The backward recomputes the softmax per sequence with batched GEMMs
  (see ``flash_attn_bwd`` for why not ATen's flash backward);
* GELU / GeGLU: ``aten::gelu`` and ``aten::gelu_backward`` (one vectorised pass each) instead of the
  reference's composed derivative;
* LayerNorm: ``aten::native_layer_norm`` / ``native_layer_norm_backward`` on centred fp32 rows (ATen
  alone cancels digits when a row's mean dwarfs its spread);
* MLM loss: ``fastbert.ops.mlm_chunked`` (labelled rows only, chunked fp32 GEMMs) with an ATen row kernel;
* padding: ``index_select`` / ``index_copy_``, which is what the reference already does.

Numerics: fp32 inputs compute in fp32. bf16/fp16 inputs are upcast to fp32 and the results rounded once,
as the reference does (attention included: ATen's low-precision CPU flash kernel uses an approximate exp
and was slower on the machines measured). fp64 goes to the reference (``BACKENDS["cpu"].dtypes``), so
``gradcheck`` keeps running on ``torch``.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch

from fastbert.ops.mlm_chunked import chunked_sparse_mlm_loss
from fastbert.reference import check_window_size
from fastbert.reference import index_gather_fwd, index_scatter_fwd  # noqa: F401 - already index_select / index_copy_

Tensor = torch.Tensor

_LOWP = (torch.bfloat16, torch.float16)
_ATTN_OPS = ("_scaled_dot_product_flash_attention_for_cpu",)


def why_not(device) -> Optional[str]:
    """None when ``device`` is a CPU and this torch has ATen's CPU flash attention; else why not."""
    if torch.device(device).type != "cpu":
        return f"the cpu backend runs ATen's CPU kernels on CPU tensors, got device {device}"
    missing = [op for op in _ATTN_OPS if not hasattr(torch.ops.aten, op)]
    if missing:
        return f"this torch ({torch.__version__}) lacks aten::{missing[0]} (PyTorch >= 2.3 has it)"
    return None


def unsupported(primitive: str, *args) -> Optional[str]:
    """Every fp32/bf16/fp16 input runs (the registry keeps fp64 on the reference); None."""
    return None


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------
def _lengths(cu_seqlens: Tensor) -> List[int]:
    """Sequence lengths (cu_seqlens is read once; it is on the CPU)."""
    cu = cu_seqlens.tolist()
    return [e - s for s, e in zip(cu[:-1], cu[1:])]


def _masks(alibi_slopes: Optional[Tensor], window_size: Tuple[int, int],
           S: int) -> Callable[[int, int], Optional[Tensor]]:
    """``mask(b, n)`` -> the additive fp32 ``attn_mask`` ``[1, H or 1, n, n]`` of sequence ``b`` (``n``
    tokens), or None when there is neither ALiBi nor a window.

    The bias depends on ``j - i`` only, so one ``[H, S, S]`` tensor for the longest sequence (``S``) serves
    every sequence as its top-left ``n x n`` block (a strided view, which the kernel reads as such);
    slopes that differ between sequences (``[B, H]`` with distinct rows) get one tensor per sequence.
    """
    left, right = window_size
    if alibi_slopes is None and left < 0 and right < 0:
        return lambda b, n: None

    def build(slopes: Optional[Tensor], n: int) -> Tensor:
        pos = torch.arange(n, dtype=torch.float32)
        rel = pos[None, :] - pos[:, None]  # j - i
        m = torch.zeros((1, n, n)) if slopes is None else slopes.float()[:, None, None] * -rel.abs()
        if left >= 0:
            m.masked_fill_(rel < -left, float("-inf"))
        if right >= 0:
            m.masked_fill_(rel > right, float("-inf"))
        return m[None]

    if alibi_slopes is None or bool((alibi_slopes == alibi_slopes[:1]).all()):
        full = build(None if alibi_slopes is None else alibi_slopes[0], S)
        size, stride = full.shape[:2], full.stride()
        return lambda b, n: full.as_strided(size + (n, n), stride)
    return lambda b, n: build(alibi_slopes[b], n)


def _f32(t: Tensor) -> Tensor:
    """bf16/fp16 attention runs ATen's fp32 kernel: its low-precision kernel takes a fast approximate exp
    (LSE ~20x further from the fp64 reference than an fp32 computation) and measured slower here."""
    return t.float() if t.dtype in _LOWP else t


def _per_sequence(t: Tensor, lens: List[int]) -> Tuple[Tensor, ...]:
    """A packed ``[T, H, D]`` tensor as one ``[1, H, n, D]`` view per sequence (no copy: the kernel takes
    strides, so fused-QKV views go in as they are)."""
    return torch.split(_f32(t).unsqueeze(0).transpose(1, 2), lens, dim=2)


def _pack_heads(parts: List[Tensor], T: int, dtype: torch.dtype) -> Tensor:
    """Per-sequence ``[H, n, D]`` results into one packed ``[T, H, D]`` tensor of ``dtype`` (one copy)."""
    H, D = parts[0].shape[0], parts[0].shape[2]
    out = torch.empty((T, H, D), dtype=parts[0].dtype)
    torch.cat(parts, dim=1, out=out.transpose(0, 1))
    return out.to(dtype)


def flash_attn_fwd(q, k, v, cu_seqlens, max_seqlen, alibi_slopes=None, softmax_scale=None, window_size=(-1, -1)):
    """Primitive (see ``fastbert.reference.flash_attn_fwd``): ``(out [T, H, D] q.dtype, lse [H, T] fp32)``.

    ``max_seqlen`` is not used: the lengths come from ``cu_seqlens`` itself, so a loose (or, under
    ``torch.compile``, unchecked) value cannot change the result.
    """
    T, H, D = q.shape
    window = check_window_size(window_size)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    lens = _lengths(cu_seqlens)
    if T == 0:
        return torch.empty((0, H, D), dtype=q.dtype), torch.empty((H, 0), dtype=torch.float32)
    mask = _masks(alibi_slopes, window, max(lens))
    kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    outs, lses = [], []
    for b, (qb, kb, vb) in enumerate(zip(*(_per_sequence(t, lens) for t in (q, k, v)))):
        if lens[b]:
            o, lse = kernel(qb, kb, vb, 0.0, False, attn_mask=mask(b, lens[b]), scale=scale)
            outs.append(o[0])
            lses.append(lse)
    lse = torch.empty((H, T), dtype=torch.float32)
    torch.cat(lses, dim=2, out=lse.unsqueeze(0))
    return _pack_heads(outs, T, q.dtype), lse


def flash_attn_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, alibi_slopes=None, softmax_scale=None,
                   window_size=(-1, -1)):
    """Primitive (see ``fastbert.reference.flash_attn_bwd``): ``(dq, dk, dv)``, each ``[T, H, D]`` q.dtype.

    Per sequence, with batched GEMMs over the heads: ``P = softmax(q k^T * scale + bias)`` recomputed,
    ``dV = P^T dO``, ``dS = P * (dO V^T - rowsum(.. * P))`` (``aten::_softmax_backward_data``), ``dQ = dS K``,
    ``dK = dS^T Q``. ATen's flash backward instead rebuilds ``P = exp(S - lse)`` from the forward's LSE,
    whose rounding differs from the scores it recomputes: over 40 random inputs its worst gradient error
    was 5.2x the fp32 reference's (the tolerance rule allows 3x); renormalising ``P`` brings it to 1.9x,
    for ~10% more time than the flash backward. ``out`` and ``lse`` are therefore not needed.
    """
    T, H, D = q.shape
    window = check_window_size(window_size)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    lens = _lengths(cu_seqlens)
    if T == 0:
        return tuple(torch.empty((0, H, D), dtype=q.dtype) for _ in range(3))
    mask = _masks(alibi_slopes, window, max(lens))
    grads = ([], [], [])
    views = zip(*(torch.split(_f32(t).transpose(0, 1), lens, dim=1) for t in (q, k, v, dout)))  # [H, n, D]
    for b, (qb, kb, vb, dob) in enumerate(views):
        n = lens[b]
        if not n:
            continue
        m = mask(b, n)
        if m is None:
            scores = torch.bmm(qb, kb.transpose(1, 2)).mul_(scale)
        else:
            scores = torch.baddbmm(m[0].expand(H, n, n), qb, kb.transpose(1, 2), alpha=scale)
        p = torch.softmax(scores, dim=-1)
        ds = torch._softmax_backward_data(torch.bmm(dob, vb.transpose(1, 2)), p, -1, p.dtype).mul_(scale)
        grads[0].append(torch.bmm(ds, kb))
        grads[1].append(torch.bmm(ds.transpose(1, 2), qb))
        grads[2].append(torch.bmm(p.transpose(1, 2), dob))
    return tuple(_pack_heads(parts, T, q.dtype) for parts in grads)


# ----------------------------------------------------------------------------------------------
# GELU family
# ----------------------------------------------------------------------------------------------
def _biased(x: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``x + bias`` in the compute dtype (fp32 for bf16/fp16, as the reference), always a fresh tensor
    when it differs from x (callers may then work on it in place)."""
    h = x.float() if x.dtype in _LOWP else x
    if bias is not None:
        h = torch.add(h, bias.to(h.dtype))
    return h


def _gelu_grad(d: Tensor, h: Tensor, approximate: str, out: Optional[Tensor] = None) -> Tensor:
    """``d * gelu'(h)`` through ``aten::gelu_backward`` (into ``out`` when given).

    The tanh form runs in fp64: ATen's vectorised fp32 kernel takes ``1 - tanh(u)^2`` with ``tanh(u)``
    rounded next to 1 for ``|h|`` ~ 4-6, so its derivative there is off by up to 1e-6 absolute (0 instead
    of 8e-6 at h = -5.09): 30 of 3000 random GeGLU inputs broke the tolerance rule, none in fp64. That
    costs this non-default mode (``hidden_act="gelu_tanh"``) ~8x the op's time (1280 x 1024, one thread:
    11 ms against 1.3 ms); the erf form (the models' default) stays fp32."""
    if approximate == "tanh" and h.dtype != torch.float64:
        g = torch.ops.aten.gelu_backward(d.double(), h.double(), approximate="tanh")
        return g.to(h.dtype) if out is None else out.copy_(g)
    if out is None:
        return torch.ops.aten.gelu_backward(d, h, approximate=approximate)
    return torch.ops.aten.gelu_backward.grad_input(d, h, approximate=approximate, grad_input=out)


def bias_gelu_fwd(x, bias, approximate):
    """Primitive: ``gelu(x + bias)``, x ``[M, N]`` -> ``[M, N]`` x.dtype."""
    h = _biased(x, bias)
    if h is x:
        return torch.nn.functional.gelu(x, approximate=approximate)
    return torch.ops.aten.gelu_(h, approximate=approximate).to(x.dtype)  # h is ours: in place


def bias_gelu_bwd(dy, x, bias, approximate):
    """Primitive: ``(dx [M, N] x.dtype, dbias [N] or None)`` through ``aten::gelu_backward``."""
    h = _biased(x, bias)
    dh = _gelu_grad(dy.to(h.dtype), h, approximate)
    dbias = dh.sum(0).to(bias.dtype) if bias is not None else None
    return dh.to(x.dtype), dbias


def geglu_fwd(x, bias, approximate):
    """Primitive: ``gelu(a) * g`` with ``a, g = (x + bias).chunk(2, -1)``; x ``[M, 2N]`` -> ``[M, N]``."""
    h = _biased(x, bias)
    a, g = h.chunk(2, dim=-1)
    y = torch.nn.functional.gelu(a, approximate=approximate)
    y.mul_(g)
    return y.to(x.dtype)


def geglu_bwd(dy, x, bias, approximate):
    """Primitive: ``(dx [M, 2N] x.dtype, dbias [2N] or None)``; ``dx[:, :N]`` the GELU half's grad,
    ``dx[:, N:]`` the gate's."""
    h = _biased(x, bias)
    a, g = h.chunk(2, dim=-1)
    N = a.shape[1]
    d = dy.to(h.dtype)
    dh = torch.empty((h.shape[0], 2 * N), dtype=h.dtype)
    torch.mul(d, torch.nn.functional.gelu(a, approximate=approximate), out=dh[:, N:])
    _gelu_grad(d * g, a, approximate, out=dh[:, :N])
    dbias = dh.sum(0).to(bias.dtype) if bias is not None else None
    return dh.to(x.dtype), dbias


# ----------------------------------------------------------------------------------------------
# LayerNorm
# ----------------------------------------------------------------------------------------------
# ATen's CPU LayerNorm takes the variance in one pass (E[x^2] - mean^2) and forms the gradient from x and
# mean separately: both cancel when |mean| >> std (rows of 1 + 0.01 * noise: rstd ~1e-5 off, 30x the
# fp32 reference's error, and dz past the tolerance rule). Both primitives therefore hand ATen the centred
# rows ``z - mean`` in fp32 (its mean is then ~0 and nothing cancels): one extra pass, which for bf16/fp16
# is also the upcast (results are rounded once, as the reference does).
def _centred(z: Tensor, mean: Tensor) -> Tensor:
    """``z - mean[:, None]`` in fp32, ``[M, N]``."""
    return torch.sub(z, mean.view(-1, 1).float())


def layer_norm_fwd(x, weight, bias, residual, eps):
    """Primitive: ``(y, z or None, mean [M] fp32, rstd [M] fp32)`` through ``aten::native_layer_norm``."""
    z = None if residual is None else torch.add(x, residual)
    h = x if z is None else z
    M, N = h.shape
    mean = h.mean(1, dtype=torch.float32)
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    y, _, rstd = torch.native_layer_norm(_centred(h, mean), [N], w, b, float(eps))
    return y.to(x.dtype), z, mean, rstd.view(M)


def layer_norm_bwd(dy, z, weight, has_bias, mean, rstd, dz_extra):
    """Primitive: ``(dz, dweight or None, dbias or None)`` through ``aten::native_layer_norm_backward``
    on the centred rows (fp32, rounded once to z.dtype)."""
    M, N = z.shape
    acc = torch.float32
    w = weight.to(acc) if weight is not None else None
    # ATen sizes and types dbias from the bias argument, whose values the backward never reads.
    b = (w if w is not None else torch.empty(N, dtype=acc)) if has_bias else None
    dz, dw, db = torch.ops.aten.native_layer_norm_backward(
        dy.to(acc), _centred(z, mean), [N], torch.zeros((M, 1), dtype=acc), rstd.view(M, 1), w, b,
        [True, weight is not None, bool(has_bias)])
    if N == 1:  # a one-wide row normalises to exactly 0 whatever z is; ATen's formula leaves rounding noise
        dz.zero_()
    if dz_extra is not None:
        dz = dz.add_(dz_extra)
    pdt = weight.dtype if weight is not None else dy.dtype
    return dz.to(z.dtype), (dw.to(weight.dtype) if weight is not None else None), \
        (db.to(pdt) if has_bias else None)


# ----------------------------------------------------------------------------------------------
# sparse MLM loss
# ----------------------------------------------------------------------------------------------
def cross_entropy_rows(logits: Tensor, targets: Tensor, bias: Optional[Tensor], grad: Optional[Tensor],
                       grad_scale: float) -> Tensor:
    """The MLM row kernel (contract: ``fastbert.ops.mlm_chunked``): per row ``x = logits + bias``, loss
    ``logsumexp(x) - x[t]`` ``[c]`` fp32 (0 for ``t < 0``, NaN for ``t >= V``); with ``grad`` given it is
    written with ``grad_scale * (softmax(x) - onehot(t))``, rounded once (zero rows for ``t < 0``).

    One fused ``log_softmax`` pass (``aten::logsumexp`` plus a subtraction measured 30% slower); ATen's
    log_softmax of a row with one finite entry among -inf is that entry's 0, never NaN."""
    x = logits + bias if bias is not None else logits
    logp = torch.log_softmax(x, dim=1)
    V = logits.shape[1]
    pad, over = targets < 0, targets >= V
    loss = -logp.gather(1, targets.clamp(0, V - 1)[:, None])[:, 0]
    loss = loss.masked_fill(pad, 0.0).masked_fill(over, float("nan"))
    if grad is not None:
        g = logp.exp_()
        rows = torch.arange(g.shape[0])
        g.index_put_((rows, targets.clamp(0, V - 1)), torch.tensor(-1.0), accumulate=True)
        g.mul_(torch.where(pad, 0.0, grad_scale)[:, None]).masked_fill_(over[:, None], float("nan"))
        grad.copy_(g)
    return loss


def sparse_mlm_loss_fwd(hidden, labels, weight, bias, ignore_index, compute_grad, max_labelled=None):
    """Primitive (see ``fastbert.reference.sparse_mlm_loss_fwd``)."""
    return chunked_sparse_mlm_loss(hidden, labels, weight, bias, ignore_index, compute_grad,
                                   row_kernel=cross_entropy_rows, max_labelled=max_labelled)
