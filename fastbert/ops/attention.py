"""flash_attn_varlen_alibi: bidirectional ALiBi attention over packed variable-length sequences, global or
within a local window."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from fastbert import reference as _ref
from fastbert.ops import _checks
from fastbert.ops._dispatch import pick, run, traced

Tensor = torch.Tensor


@torch.library.custom_op("fastbert::flash_attn_fwd", mutates_args=())
def _attn_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
              alibi_slopes: Optional[Tensor], softmax_scale: float, window_left: int, window_right: int,
              backend: str) -> Tuple[Tensor, Tensor]:
    if traced(backend):
        _checks.cu_seqlens_values(cu_seqlens, q.shape[0], max_seqlen)
    out, lse = run("flash_attn_fwd", backend, q, k, v, cu_seqlens, max_seqlen, alibi_slopes, softmax_scale,
                   (window_left, window_right))
    return out, lse


@_attn_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, alibi_slopes, softmax_scale, window_left, window_right, backend):
    T, H, D = q.shape
    return q.new_empty((T, H, D)), q.new_empty((H, T), dtype=torch.float32)


@torch.library.custom_op("fastbert::flash_attn_bwd", mutates_args=())
def _attn_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor,
              max_seqlen: int, alibi_slopes: Optional[Tensor], softmax_scale: float, window_left: int,
              window_right: int, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    if traced(backend):
        _checks.cu_seqlens_values(cu_seqlens, q.shape[0], max_seqlen)
    dq, dk, dv = run("flash_attn_bwd", backend, dout, q, k, v, out, lse, cu_seqlens, max_seqlen,
                     alibi_slopes, softmax_scale, (window_left, window_right))
    return dq, dk, dv


@_attn_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, alibi_slopes, softmax_scale, window_left, window_right,
      backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, slopes, scale, window_left, window_right, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, slopes if slopes is not None else q.new_empty(0))
    ctx.has_slopes = slopes is not None
    ctx.max_seqlen, ctx.scale, ctx.backend = max_seqlen, scale, backend
    ctx.window = (window_left, window_right)
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens, slopes = ctx.saved_tensors
    if dout is None:
        return (None,) * 10
    dq, dk, dv = _attn_bwd(dout.contiguous(), q, k, v, out, lse, cu_seqlens, ctx.max_seqlen,
                           slopes if ctx.has_slopes else None, ctx.scale, *ctx.window, ctx.backend)
    return dq, dk, dv, None, None, None, None, None, None, None


_attn_fwd.register_autograd(_backward, setup_context=_setup)


def alibi_slopes(n_heads: int, device=None) -> Tensor:
    """ALiBi slopes ``[n_heads]`` fp32 (see ``fastbert.reference.alibi_slopes``)."""
    return _ref.alibi_slopes(n_heads).to(device) if device is not None else _ref.alibi_slopes(n_heads)


def flash_attn_varlen_alibi(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                            alibi_slopes: Optional[Tensor] = None,
                            softmax_scale: Optional[float] = None, window_size=(-1, -1)) -> Tensor:
    """Bidirectional ALiBi attention over a packed batch of variable-length sequences, global or local.

    Args:
        q, k, v: ``[T, H, D]`` fp16/bf16/fp32, D in {32, 64, 128}, last-dim stride 1 (views of a fused
            ``[T, 3, H, D]`` QKV projection are accepted without a copy).
        cu_seqlens: ``[B+1]`` int32 (0, ..., T), non-decreasing; empty sequences allowed, and ``B == 0``
            (``cu_seqlens == [0]``, no tokens) gives an empty output.
        max_seqlen: Python int (a SymInt under ``torch.compile``), at least the longest sequence.
        alibi_slopes: fp32 ``[H]`` or ``[B, H]``, or None for plain attention.
        softmax_scale: default ``1/sqrt(D)``.
        window_size: ``(left, right)`` ints: query i attends only keys j with ``i - left <= j <= i + right``
            (flash-attn's convention; ModernBERT's local layers use ``(64, 64)``); -1 leaves a side
            unbounded. Default ``(-1, -1)``: global attention. The kernels skip key blocks outside the
            window, so the work per query grows with the window, not the sequence.
    Returns:
        ``[T, H, D]`` in q.dtype; score ``q_i.k_j * scale - slope * |i - j|`` within each sequence only.
    Raises:
        ValueError naming ``cu_seqlens`` or ``max_seqlen`` when their values disagree, eagerly and inside
        a compiled graph alike; TypeError/ValueError for bad dtypes, shapes, devices, and for a
        ``window_size`` that is not a pair of ints each -1 or >= 0.
    """
    _checks.tensor("q", q, dtypes=_checks.FLOAT_DTYPES, dim=3)
    dev = q.device
    for name, t in (("k", k), ("v", v)):
        _checks.tensor(name, t, dim=3, device=dev)
        _checks.same_dtype(name, t, "q", q)
        _checks.same_shape(name, t, "q", q)
    T, H, D = q.shape
    if D not in _checks.HEAD_DIMS:
        raise ValueError(f"q: head dim {D} is not supported; expected one of {_checks.HEAD_DIMS}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: expected the last dim to be contiguous (stride 1), got strides {t.stride()}")
    _checks.cu_seqlens(cu_seqlens, T, max_seqlen, dev)
    B = cu_seqlens.shape[0] - 1
    if alibi_slopes is not None:
        _checks.tensor("alibi_slopes", alibi_slopes, dtypes=(torch.float32,), device=dev)
        s = alibi_slopes.shape  # sizes compared one by one: tuple equality is False for SymInts
        if not ((len(s) == 1 and s[0] == H) or (len(s) == 2 and s[0] == B and s[1] == H)):
            raise ValueError(f"alibi_slopes: expected shape ({H},) or ({B}, {H}), got {tuple(alibi_slopes.shape)}")
        alibi_slopes = alibi_slopes.expand(B, H).contiguous()
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    window = _ref.check_window_size(window_size)
    backend = pick("flash_attn_fwd", dev, q.dtype, q, k, v, cu_seqlens, max_seqlen, alibi_slopes, scale, window)
    out, _ = _attn_fwd(q, k, v, cu_seqlens, max_seqlen, alibi_slopes, scale, *window, backend)
    return out


__all__ = ["flash_attn_varlen_alibi", "alibi_slopes"]
