"""unpad_input / pad_input: gather the real tokens of a padded batch and scatter them back."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from fastbert.ops import _checks
from fastbert.ops._dispatch import pick, run, traced

Tensor = torch.Tensor


@torch.library.custom_op("fastbert::index_gather", mutates_args=())
def _index_gather(x: Tensor, indices: Tensor, backend: str) -> Tensor:
    if traced(backend):
        _checks.indices_values("indices", indices, x.shape[0])
    return run("index_gather_fwd", backend, x, indices)


@_index_gather.register_fake
def _(x, indices, backend):
    return x.new_empty((indices.shape[0], x.shape[1]))


@torch.library.custom_op("fastbert::index_scatter", mutates_args=())
def _index_scatter(x: Tensor, indices: Tensor, num_rows: int, backend: str) -> Tensor:
    if traced(backend):
        _checks.indices_values("indices", indices, num_rows)
    return run("index_scatter_fwd", backend, x, indices, num_rows)


@_index_scatter.register_fake
def _(x, indices, num_rows, backend):
    return x.new_empty((num_rows, x.shape[1]))


def _gather_setup(ctx, inputs, output):
    x, indices, backend = inputs
    ctx.save_for_backward(indices)
    ctx.num_rows, ctx.backend = x.shape[0], backend


def _gather_backward(ctx, grad):
    (indices,) = ctx.saved_tensors
    return _index_scatter(grad.contiguous(), indices, ctx.num_rows, ctx.backend), None, None


def _scatter_setup(ctx, inputs, output):
    x, indices, num_rows, backend = inputs
    ctx.save_for_backward(indices)
    ctx.backend = backend


def _scatter_backward(ctx, grad):
    (indices,) = ctx.saved_tensors
    return _index_gather(grad.contiguous(), indices, ctx.backend), None, None, None


_index_gather.register_autograd(_gather_backward, setup_context=_gather_setup)
_index_scatter.register_autograd(_scatter_backward, setup_context=_scatter_setup)


def unpad_indices(attention_mask: Tensor) -> Tuple[Tensor, Tensor, int]:
    """``(indices [T] int64, cu_seqlens [B+1] int32, max_seqlen)`` of the nonzero entries of a ``[B, S]``
    mask, with one host sync (for T and max_seqlen together). A batch of no sequences gives
    ``cu_seqlens == [0]`` and ``max_seqlen == 0``.

    Under ``torch.compile`` T and max_seqlen are unbacked SymInts (data-dependent); their ranges
    (``0 <= T <= B*S``, ``0 <= max_seqlen <= S``) are declared here so later size checks need no guard.
    """
    _checks.tensor("attention_mask", attention_mask, dim=2)
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise TypeError(f"attention_mask: expected a bool or integer tensor, got {attention_mask.dtype}")
    mask = attention_mask.bool()
    B, S = mask.shape
    seqlens = mask.sum(dim=1, dtype=torch.int32)
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    if B == 0:
        return torch.zeros(0, dtype=torch.long, device=mask.device), cu_seqlens, 0
    total, max_seqlen = torch.stack([cu_seqlens[-1], seqlens.max()]).tolist()  # the one sync
    torch._check(total >= 0)
    torch._check(total <= B * S)
    torch._check(max_seqlen >= 0)
    torch._check(max_seqlen <= S)
    indices = torch.nonzero_static(mask.flatten(), size=total).flatten()
    # correct by construction: later ops need not check these values again
    _checks.mark_checked("indices", indices, (B * S,))
    _checks.mark_checked("cu_seqlens", cu_seqlens, (total, max_seqlen))
    return indices, cu_seqlens, max_seqlen


def unpad_input(hidden: Tensor, attention_mask: Tensor) -> Tuple[Tensor, Tensor, Tensor, int]:
    """Gather the real tokens of a padded batch.

    Args:
        hidden: ``[B, S, ...]``; attention_mask: ``[B, S]`` bool/int, nonzero at real tokens.
    Returns:
        ``(x [T, ...], indices [T] int64, cu_seqlens [B+1] int32, max_seqlen int)``. Differentiable in
        ``hidden`` (the backward is a scatter).
    """
    _checks.tensor("hidden", hidden, min_dim=2)
    _checks.tensor("attention_mask", attention_mask, dim=2, device=hidden.device)
    if attention_mask.shape != hidden.shape[:2]:
        raise ValueError(f"attention_mask: expected shape {tuple(hidden.shape[:2])} (the first two dims of "
                         f"hidden), got {tuple(attention_mask.shape)}")
    indices, cu_seqlens, max_seqlen = unpad_indices(attention_mask)
    B, S = hidden.shape[:2]
    rest = tuple(hidden.shape[2:])
    flat = _checks.flat2d(hidden, 2)
    backend = pick("index_gather_fwd", hidden.device, hidden.dtype if hidden.is_floating_point() else None,
                   flat, indices)
    x = _index_gather(flat, indices, backend)
    return x.view((x.shape[0],) + rest), indices, cu_seqlens, max_seqlen


def pad_input(x: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """Scatter unpadded tokens back to ``[batch, seqlen, ...]`` with zeros at the pads.

    Args:
        x: ``[T, ...]``; indices: ``[T]`` int64 positions in the flattened ``[batch * seqlen]`` batch, each
            in ``[0, batch * seqlen)`` (checked: ValueError naming ``indices``), no two alike.
    """
    _checks.tensor("x", x, min_dim=1)
    _checks.tensor("indices", indices, dtypes=(torch.int64,), dim=1, device=x.device)
    if indices.shape[0] != x.shape[0]:
        raise ValueError(f"indices: expected shape ({x.shape[0]},) (one per row of x), got {tuple(indices.shape)}")
    for name, v in (("batch", batch), ("seqlen", seqlen)):
        _checks.size_arg(name, v)
    _checks.require(x.shape[0] <= batch * seqlen, lambda: f"x: {x.shape[0]} tokens do not fit a batch of "
                    f"{batch} x {seqlen}", "x: more tokens than fit a batch of batch x seqlen")
    if not torch.compiler.is_compiling():
        _checks.indices_values("indices", indices, batch * seqlen)
    rest = tuple(x.shape[1:])
    flat = _checks.flat2d(x, 1)
    backend = pick("index_scatter_fwd", x.device, x.dtype if x.is_floating_point() else None,
                   flat, indices, batch * seqlen)
    out = _index_scatter(flat, indices, batch * seqlen, backend)
    return out.view((batch, seqlen) + rest)
