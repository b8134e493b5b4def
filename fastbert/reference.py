"""Pure-PyTorch reference of every fastbert op: the specification, and the ``torch`` backend.

Every kernel in fastbert (Triton in ``kernels/``, CUDA in ``csrc/``) is tested against the functions in
this file. Two layers live here:

* **Spec functions** (``unpad_input``, ``pad_input``, ``alibi_slopes``, ``flash_attn_varlen_alibi``,
  ``bias_gelu``, ``geglu``, ``layer_norm``, ``sparse_mlm_loss``): plain differentiable PyTorch, written
  for clarity. They compute in fp32 (or fp64 when given fp64) and return the input dtype.
* **Backend primitives** (``*_fwd`` / ``*_bwd``): the forward and the hand-written backward that the
  ``torch`` backend registers in the op table (``fastbert/registry.py``). Every other backend implements
  the same primitives with the same signatures; see ``fastbert.registry.PRIMITIVES``.

Conventions: ``M`` rows, ``N`` features, ``T`` real (unpadded) tokens, ``B`` sequences, ``S`` padded
sequence length, ``H`` heads, ``D`` head dim, ``V`` vocabulary size.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 stays fp64 (for gradcheck), everything else computes in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# unpad / repad
# ----------------------------------------------------------------------------------------------
def unpad_indices(attention_mask: Tensor) -> Tuple[Tensor, Tensor, int]:
    """Indices of real tokens from a padding mask.

    Args:
        attention_mask: ``[B, S]`` bool or integer, nonzero (True) at real tokens. Real tokens need not be
            left-aligned; a sequence's tokens keep their order and their positions are counted among
            its real tokens only.
    Returns:
        ``indices`` ``[T]`` int64 into the flattened ``[B*S]`` batch, ``cu_seqlens`` ``[B+1]`` int32
        (``cu_seqlens[0] == 0``, non-decreasing, ``cu_seqlens[-1] == T``), ``max_seqlen`` (python int;
        the one host sync of unpadding).
    """
    mask = attention_mask.bool()
    seqlens = mask.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
    return indices, cu_seqlens, max_seqlen


def unpad_input(hidden: Tensor, attention_mask: Tensor) -> Tuple[Tensor, Tensor, Tensor, int]:
    """Gather the real tokens of a padded batch.

    Args:
        hidden: ``[B, S, ...]`` any dtype.
        attention_mask: ``[B, S]``, nonzero at real tokens.
    Returns:
        ``(x [T, ...], indices [T] int64, cu_seqlens [B+1] int32, max_seqlen int)`` with
        ``x[t] = hidden.flatten(0, 1)[indices[t]]``.
    """
    indices, cu_seqlens, max_seqlen = unpad_indices(attention_mask)
    return hidden.flatten(0, 1)[indices], indices, cu_seqlens, max_seqlen


def pad_input(x: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """Scatter unpadded tokens back to a padded batch, zeros at the pads.

    Args:
        x: ``[T, ...]``; indices: ``[T]`` int64 into ``[batch * seqlen]``.
    Returns:
        ``[batch, seqlen, ...]`` in ``x.dtype``.
    """
    out = x.new_zeros((batch * seqlen,) + tuple(x.shape[1:]))
    out = out.index_put((indices,), x)
    return out.view((batch, seqlen) + tuple(x.shape[1:]))


def index_gather_fwd(x: Tensor, indices: Tensor) -> Tensor:
    """Primitive: ``out[t, :] = x[indices[t], :]``. x ``[R, F]``, indices ``[T]`` int64 -> ``[T, F]``."""
    return x.index_select(0, indices)


def index_scatter_fwd(x: Tensor, indices: Tensor, num_rows: int) -> Tensor:
    """Primitive: ``out[indices[t], :] = x[t, :]``, zeros elsewhere. x ``[T, F]`` -> ``[num_rows, F]``.

    Indices are unique (they come from a mask), so the scatter has no collisions.
    """
    out = x.new_zeros((num_rows, x.shape[1]))
    out.index_copy_(0, indices, x)
    return out


# ----------------------------------------------------------------------------------------------
# ALiBi attention over unpadded variable-length batches
# ----------------------------------------------------------------------------------------------
def alibi_slopes(n_heads: int) -> Tensor:
    """ALiBi head slopes, fp32 ``[n_heads]``.

    For ``n`` a power of two the slopes are the geometric series ``2^(-8/n), 2^(-16/n), ...``. Otherwise
    (the ALiBi paper's rule) take the ``p = 2^floor(log2 n)`` slopes of ``p``, then every other slope
    (indices 0, 2, 4, ...) of the ``2p`` series until there are ``n``.
    """
    if n_heads < 1:
        raise ValueError(f"n_heads: expected a positive integer, got {n_heads}")

    def series(n: int):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    p = 2 ** int(math.floor(math.log2(n_heads)))
    slopes = series(p)
    if p < n_heads:
        slopes += series(2 * p)[0::2][: n_heads - p]
    return torch.tensor(slopes, dtype=torch.float32)


def _padded_positions(cu_seqlens: Tensor, max_seqlen: int):
    """(batch index, position) of each packed token and the ``[B, S]`` validity mask."""
    cu = cu_seqlens.long()
    B = cu.numel() - 1
    T = int(cu[-1].item())
    seqlens = cu[1:] - cu[:-1]
    S = max(int(max_seqlen), 1)
    tok = torch.arange(T, device=cu.device)
    b = torch.bucketize(tok, cu[1:], right=True)
    pos = tok - cu[b]
    valid = torch.arange(S, device=cu.device)[None, :] < seqlens[:, None]
    return b, pos, valid, B, S


def _alibi_bias(slopes: Optional[Tensor], B: int, H: int, S: int, device, dtype) -> Tensor:
    """``[B or 1, H or 1, S, S]`` additive bias ``-slope * |i - j|`` (zeros when slopes is None)."""
    if slopes is None:
        return torch.zeros((1, 1, S, S), device=device, dtype=dtype)
    s = slopes.to(device=device, dtype=dtype)
    if s.dim() == 1:
        s = s[None, :]
    ar = torch.arange(S, device=device, dtype=dtype)
    dist = (ar[:, None] - ar[None, :]).abs()
    return -s[:, :, None, None] * dist


def check_window_size(window_size) -> Tuple[int, int]:
    """``window_size`` as a ``(left, right)`` pair of Python ints, each -1 (unbounded) or >= 0.

    Raises ``TypeError`` for anything but a pair of ints (bools refused) and ``ValueError`` for a value
    below -1. Shared by the ops layer and every backend's primitives, so they agree on what is valid.
    """
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size: expected a pair (left, right) of ints, got {window_size!r}")
    for side, w in zip(("left", "right"), window_size):
        if not isinstance(w, int) or isinstance(w, bool):
            raise TypeError(f"window_size: expected ints, got {side} = {w!r} ({type(w).__name__})")
        if w < -1:
            raise ValueError(f"window_size: expected {side} >= 0, or -1 for no limit on that side, got {w}")
    return int(window_size[0]), int(window_size[1])


WINDOW_UNBOUNDED = 1 << 30  # what the kernels get for -1: farther than any sequence, no int32 overflow


def kernel_window(window_size) -> Tuple[bool, int, int]:
    """``(has_window, left, right)`` as the Triton and CUDA kernels take it: -1 (and anything larger than
    ``WINDOW_UNBOUNDED``) becomes ``WINDOW_UNBOUNDED``, so the kernels' masks need no special case;
    ``has_window`` is False only for ``(-1, -1)``, which runs the global kernels unchanged."""
    left, right = check_window_size(window_size)
    has = left >= 0 or right >= 0
    clamp = lambda w: WINDOW_UNBOUNDED if w < 0 else min(w, WINDOW_UNBOUNDED)  # noqa: E731
    return has, clamp(left), clamp(right)


def window_mask(window_size, S: int, device) -> Optional[Tensor]:
    """``[S, S]`` bool, True where query position i may attend key position j (None: no window)."""
    left, right = check_window_size(window_size)
    if left < 0 and right < 0:
        return None
    ar = torch.arange(S, device=device)
    rel = ar[None, :] - ar[:, None]  # j - i
    keep = torch.ones((S, S), dtype=torch.bool, device=device)
    if left >= 0:
        keep &= rel >= -left
    if right >= 0:
        keep &= rel <= right
    return keep


def _masked_scores(q, k, cu_seqlens, max_seqlen, alibi_slopes, scale, window_size, acc):
    """Padded ``[B, H, S, S]`` scores (acc dtype): ``q.k * scale - slope * |i - j|``, -inf at padded keys and
    at keys outside the window; plus the packing indices and the padding helper."""
    T, H, D = q.shape
    b, pos, valid, B, S = _padded_positions(cu_seqlens, max_seqlen)

    def pad(x):  # [T, H, D] -> [B, H, S, D]
        out = x.new_zeros((B, S, H, D), dtype=acc)
        out[b, pos] = x.to(acc)
        return out.permute(0, 2, 1, 3)

    scores = torch.matmul(pad(q), pad(k).transpose(-1, -2)) * scale
    scores = scores + _alibi_bias(alibi_slopes, B, H, S, q.device, acc)
    keep = valid[:, None, None, :]
    window = window_mask(window_size, S, q.device)
    if window is not None:
        keep = keep & window
    return scores.masked_fill(~keep, float("-inf")), pad, b, pos, B, S


def flash_attn_varlen_alibi(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                            alibi_slopes: Optional[Tensor] = None,
                            softmax_scale: Optional[float] = None, window_size=(-1, -1)) -> Tensor:
    """Bidirectional ALiBi attention over a packed batch of variable-length sequences.

    Args:
        q, k, v: ``[T, H, D]`` (same dtype). Token ``t`` belongs to sequence ``b`` with
            ``cu_seqlens[b] <= t < cu_seqlens[b+1]``; its position is ``i = t - cu_seqlens[b]``.
        cu_seqlens: ``[B+1]`` int32, starts at 0, non-decreasing, ends at ``T`` (empty sequences allowed;
            ``B == 0``, i.e. ``cu_seqlens == [0]``, is an empty batch).
        max_seqlen: at least the longest sequence.
        alibi_slopes: fp32 ``[H]`` or ``[B, H]``, or None for plain attention.
        softmax_scale: defaults to ``1/sqrt(D)``.
        window_size: ``(left, right)``: query i attends only keys j with ``i - left <= j <= i + right``
            (local attention, flash-attn's convention); -1 leaves that side unbounded. The default
            ``(-1, -1)`` is global attention. Every row keeps at least its own key (j = i).
    Returns:
        ``[T, H, D]`` in ``q.dtype``: ``softmax_j(q_i . k_j * scale - slope_h * |i - j|) v_j`` with
        ``j`` ranging over the same sequence (and the window) only.
    """
    return flash_attn_fwd(q, k, v, cu_seqlens, max_seqlen, alibi_slopes, softmax_scale, window_size, _grad=True)[0]


def flash_attn_fwd(q, k, v, cu_seqlens, max_seqlen, alibi_slopes=None, softmax_scale=None, window_size=(-1, -1),
                   *, _grad=False):
    """Primitive. Returns ``(out [T, H, D] q.dtype, lse [H, T] fp32)``, lse the natural log-sum-exp of
    each query row's scaled, biased scores. ``alibi_slopes`` is ``[B, H]`` fp32 or ``[H]`` or None;
    ``window_size`` as in ``flash_attn_varlen_alibi``.

    Computed on a padded ``[B, H, S, S]`` score tensor with a materialised ALiBi bias and window mask:
    the slow, obviously-correct form. A row whose scores are all -inf (only reachable when the ALiBi bias
    overflows to -inf everywhere) gets ``out = 0`` and ``lse = -inf``.
    """
    T, H, D = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    acc = _acc(q.dtype)
    with torch.set_grad_enabled(_grad and torch.is_grad_enabled()):
        scores, pad, b, pos, B, S = _masked_scores(q, k, cu_seqlens, max_seqlen, alibi_slopes, scale,
                                                   window_size, acc)
        lse = torch.logsumexp(scores, dim=-1)  # [B, H, S]
        p = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # padded query rows have lse=-inf
        out = torch.matmul(p, pad(v)).permute(0, 2, 1, 3)[b, pos]  # [T, H, D]
        lse_packed = lse.permute(0, 2, 1)[b, pos].transpose(0, 1)  # [H, T]
    return out.to(q.dtype), lse_packed.float().contiguous()


def flash_attn_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, alibi_slopes=None, softmax_scale=None,
                   window_size=(-1, -1)):
    """Primitive. Gradients of ``flash_attn_fwd``: returns ``(dq, dk, dv)``, each ``[T, H, D]`` in q.dtype.

    Recomputes ``P = exp(S - lse)`` and uses ``dS = P * (dP - delta)`` (FlashAttention-2) with
    ``delta_i = sum_j P_ij dP_ij / sum_j P_ij``. FlashAttention-2 forms delta as ``rowsum(dO * O)``
    instead: equal in exact arithmetic, but ``O`` arrives rounded to the input dtype, and when the softmax
    is nearly one-hot ``dP_ij - delta_i`` is a small difference of large terms, so the rounding of ``O``
    becomes the whole error (fp16, 2 tokens, q x5, k/v x3, slope 0.25: dK off by 2.5e-2 where PyTorch's
    fp16 attention is off by 6.6e-4; from P and dP it is 2.4e-5). Forming delta from the same P and dP
    that form dS keeps ``sum_j dS_ij = 0`` (the softmax's shift invariance) to fp32 rounding; dividing
    by ``sum_j P_ij`` (1 in exact arithmetic) cancels the rounding of the fp32 ``lse`` that P carries.
    ``out`` is not read (kept for flash-attn's signature). Rows with ``lse = -inf`` (all scores -inf) get
    zero gradient.
    """
    T, H, D = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    acc = _acc(q.dtype)
    scores, pad, b, pos, B, S = _masked_scores(q, k, cu_seqlens, max_seqlen, alibi_slopes, scale, window_size, acc)
    lse_p = torch.full((B, S, H), float("inf"), dtype=acc, device=q.device)
    lse_p[b, pos] = lse.transpose(0, 1).to(acc)
    lse_p = lse_p.permute(0, 2, 1)  # [B, H, S]
    lse_p = lse_p.masked_fill(lse_p == float("-inf"), float("inf"))  # all -inf rows: P = 0, not nan
    p = torch.exp(scores - lse_p[..., None])  # padded query rows: exp(-inf) = 0
    qp, kp, vp, dop = pad(q), pad(k), pad(v), pad(dout)
    dp = torch.matmul(dop, vp.transpose(-1, -2))
    psum = p.sum(-1)  # 1 up to the rounding of the fp32 lse; dividing by it cancels that rounding
    delta = torch.where(psum > 0, (p * dp).sum(-1) / psum.clamp_min(1e-30), 0.0)  # [B, H, S]
    dv = torch.matmul(p.transpose(-1, -2), dop)
    ds = p * (dp - delta[..., None])
    dq = torch.matmul(ds, kp) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qp) * scale

    def unpad(x):
        return x.permute(0, 2, 1, 3)[b, pos].to(q.dtype)

    return unpad(dq), unpad(dk), unpad(dv)


# ----------------------------------------------------------------------------------------------
# GELU family
# ----------------------------------------------------------------------------------------------
def _gelu_and_grad(x: Tensor, approximate: str) -> Tuple[Tensor, Tensor]:
    """GELU and its derivative, written out (erf form, or the tanh approximation)."""
    if approximate == "tanh":
        k = math.sqrt(2.0 / math.pi)
        inner = k * (x + 0.044715 * x ** 3)
        t = torch.tanh(inner)
        y = 0.5 * x * (1.0 + t)
        dy = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3 * 0.044715 * x * x)
        return y, dy
    cdf = 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    return x * cdf, cdf + x * pdf


def bias_gelu(x: Tensor, bias: Optional[Tensor] = None, approximate: str = "none") -> Tensor:
    """``gelu(x + bias)``; x ``[..., N]``, bias ``[N]`` or None; erf GELU (default) or ``"tanh"``.
    Computes in fp32, returns ``x.dtype``."""
    h = x.to(_acc(x.dtype))
    if bias is not None:
        h = h + bias.to(h.dtype)
    return F.gelu(h, approximate=approximate).to(x.dtype)


def bias_gelu_fwd(x, bias, approximate):
    """Primitive. x ``[M, N]``, bias ``[N]`` or None -> ``[M, N]`` in x.dtype."""
    return bias_gelu(x, bias, approximate)


def bias_gelu_bwd(dy, x, bias, approximate):
    """Primitive. Returns ``(dx [M, N] x.dtype, dbias [N] bias.dtype or None)``; recomputes from x."""
    acc = _acc(x.dtype)
    h = x.to(acc) + (bias.to(acc) if bias is not None else 0.0)
    _, dg = _gelu_and_grad(h, approximate)
    dh = dy.to(acc) * dg
    dbias = dh.sum(0).to(bias.dtype) if bias is not None else None
    return dh.to(x.dtype), dbias


def geglu(x: Tensor, bias: Optional[Tensor] = None, approximate: str = "none") -> Tensor:
    """Gated GELU (MosaicBERT layout): x ``[..., 2N]`` (+ bias ``[2N]``) split into ``a = x[..., :N]``
    and ``g = x[..., N:]``; returns ``gelu(a) * g`` ``[..., N]`` in x.dtype, computed in fp32."""
    h = x.to(_acc(x.dtype))
    if bias is not None:
        h = h + bias.to(h.dtype)
    a, g = h.chunk(2, dim=-1)
    return (F.gelu(a, approximate=approximate) * g).to(x.dtype)


def geglu_fwd(x, bias, approximate):
    """Primitive. x ``[M, 2N]``, bias ``[2N]`` or None -> ``[M, N]``."""
    return geglu(x, bias, approximate)


def geglu_bwd(dy, x, bias, approximate):
    """Primitive. dy ``[M, N]`` -> ``(dx [M, 2N] x.dtype, dbias [2N] or None)``; both halves' grads in one
    buffer (``dx[:, :N]`` for the GELU half, ``dx[:, N:]`` for the gate)."""
    acc = _acc(x.dtype)
    h = x.to(acc) + (bias.to(acc) if bias is not None else 0.0)
    a, g = h.chunk(2, dim=-1)
    ga, dga = _gelu_and_grad(a, approximate)
    d = dy.to(acc)
    dh = torch.cat([d * g * dga, d * ga], dim=-1)
    dbias = dh.sum(0).to(bias.dtype) if bias is not None else None
    return dh.to(x.dtype), dbias


# ----------------------------------------------------------------------------------------------
# LayerNorm (+ fused residual add)
# ----------------------------------------------------------------------------------------------
def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-12,
               residual: Optional[Tensor] = None):
    """LayerNorm over the last dim with fp32 statistics, optionally of ``x + residual``.

    Args:
        x: ``[..., N]`` bf16/fp16/fp32; residual: same shape and dtype as x, or None.
        weight, bias: ``[N]`` (any float dtype) or None.
    Returns:
        ``y`` in x.dtype when residual is None; else ``(y, z)`` with ``z = x + residual`` rounded to
        x.dtype (the new residual stream) and ``y = LayerNorm(z)``.
    """
    acc = _acc(x.dtype)
    z = x if residual is None else (x.to(acc) + residual.to(acc)).to(x.dtype)
    h = z.to(acc)
    mean = h.mean(-1, keepdim=True)
    var = ((h - mean) ** 2).mean(-1, keepdim=True)
    y = (h - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    y = y.to(x.dtype)
    return y if residual is None else (y, z)


def layer_norm_fwd(x, weight, bias, residual, eps):
    """Primitive. x ``[M, N]`` -> ``(y [M, N], z [M, N] or None, mean [M] fp32, rstd [M] fp32)``; ``z`` is
    ``x + residual`` in x.dtype when residual is given, else None (the statistics are of ``z``)."""
    acc = _acc(x.dtype)
    z = None if residual is None else (x.to(acc) + residual.to(acc)).to(x.dtype)
    h = (x if z is None else z).to(acc)
    mean = h.mean(-1)
    rstd = torch.rsqrt(((h - mean[:, None]) ** 2).mean(-1) + eps)
    y = (h - mean[:, None]) * rstd[:, None]
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    stat = torch.float64 if acc == torch.float64 else torch.float32
    return y.to(x.dtype), z, mean.to(stat), rstd.to(stat)


def layer_norm_bwd(dy, z, weight, has_bias, mean, rstd, dz_extra):
    """Primitive. Gradients of ``layer_norm_fwd``.

    Args:
        dy: ``[M, N]``; z: the normalised input ``[M, N]`` (x, or x + residual); weight ``[N]`` or None;
        has_bias: whether to return dbias; mean, rstd: ``[M]`` fp32 from the forward; dz_extra: grad of
        the returned sum ``z`` (``[M, N]``) or None, added to dz.
    Returns:
        ``(dz [M, N] z.dtype, dweight [N] weight.dtype or None, dbias [N] or None)``. With a residual,
        ``dz`` is the gradient of both x and residual.
    """
    acc = _acc(z.dtype)
    xhat = (z.to(acc) - mean.to(acc)[:, None]) * rstd.to(acc)[:, None]
    g = dy.to(acc)
    dweight = (g * xhat).sum(0).to(weight.dtype) if weight is not None else None
    dbias = g.sum(0).to(weight.dtype if weight is not None else dy.dtype) if has_bias else None
    if weight is not None:
        g = g * weight.to(acc)
    N = z.shape[-1]
    c1 = (g * xhat).sum(-1, keepdim=True) / N
    c2 = g.sum(-1, keepdim=True) / N
    dz = (g - xhat * c1 - c2) * rstd.to(acc)[:, None]
    if dz_extra is not None:
        dz = dz + dz_extra.to(acc)
    return dz.to(z.dtype), dweight, dbias


# ----------------------------------------------------------------------------------------------
# Sparse MLM loss
# ----------------------------------------------------------------------------------------------
def sparse_mlm_loss(hidden: Tensor, labels: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                    ignore_index: int = -100) -> Tensor:
    """Masked-LM cross-entropy where only labelled rows reach the vocabulary projection.

    Args:
        hidden: ``[T, H]``; labels: ``[T]`` int64, ``ignore_index`` or in ``[0, V)``;
        weight: ``[V, H]`` decoder (often tied to the embeddings); bias: ``[V]`` or None.
    Returns:
        fp32 scalar: mean over labelled rows of ``logsumexp(logits) - logits[label]`` with
        ``logits = hidden[row] @ weight.T + bias`` in fp32. No labelled rows gives 0 (zero grads), not NaN.
        No label smoothing.
    """
    acc = _acc(hidden.dtype)
    sel = labels != ignore_index
    h = hidden[sel].to(acc)
    if h.shape[0] == 0:
        return (hidden.sum() * 0.0 + weight.sum() * 0.0).to(acc)
    logits = h @ weight.to(acc).t()
    if bias is not None:
        logits = logits + bias.to(acc)
    return F.cross_entropy(logits, labels[sel], reduction="mean")


def sparse_mlm_loss_fwd(hidden, labels, weight, bias, ignore_index, compute_grad, max_labelled=None):
    """Primitive. Loss and, when ``compute_grad``, the gradients of the mean loss computed in the same pass.

    Returns ``(loss [] fp32, dhidden [T, H] or None, dweight [V, H] or None, dbias [V] or None)``; the
    gradients are fp32 (fp64 for fp64 inputs) whatever the input dtype, so that the op's backward applies
    the incoming gradient before rounding to the parameters' dtype (an fp16 gradient of the *mean* loss
    underflows: entries near ``1 / (V n)``). Rows without a label get zero gradient. ``max_labelled``: an
    upper bound on the number of labelled rows (the fast backends then need no host sync); when more rows
    are labelled, the loss and the gradients are NaN.
    """
    acc = _acc(hidden.dtype)
    sel = torch.nonzero(labels != ignore_index).flatten()
    n = sel.numel()
    h = hidden.index_select(0, sel).to(acc)
    logits = h @ weight.to(acc).t()
    if bias is not None:
        logits = logits + bias.to(acc)
    tgt = labels.index_select(0, sel)
    if n == 0:
        loss = torch.zeros((), dtype=acc, device=hidden.device)
    else:
        loss = F.cross_entropy(logits, tgt, reduction="sum") / n
    over = max_labelled is not None and n > max_labelled
    if over:
        loss = loss * float("nan")
    if not compute_grad:
        return loss, None, None, None
    dlogits = torch.softmax(logits, dim=-1)
    dlogits[torch.arange(n, device=hidden.device), tgt] -= 1.0
    dlogits /= max(n, 1)
    dh = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
    dh.index_copy_(0, sel, dlogits @ weight.to(acc))
    dweight = dlogits.t() @ h
    dbias = dlogits.sum(0) if bias is not None else None
    if over:
        return loss, dh * float("nan"), dweight * float("nan"), (dbias * float("nan") if dbias is not None else None)
    return loss, dh, dweight, dbias
