"""layer_norm: LayerNorm with fp32 statistics in any float dtype, with an optional fused residual add."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from fastbert.ops import _checks
from fastbert.ops._dispatch import opt_in, opt_out, pick, run

Tensor = torch.Tensor


def _stat_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("fastbert::layer_norm_fwd", mutates_args=())
def _ln_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
            eps: float, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    y, z, mean, rstd = run("layer_norm_fwd", backend, x, weight, bias, residual, eps)
    return y, opt_out(z, x), mean, rstd


@_ln_fwd.register_fake
def _(x, weight, bias, residual, eps, backend):
    M = x.shape[0]
    z = torch.empty_like(x) if residual is not None else x.new_empty((0,))
    return torch.empty_like(x), z, x.new_empty((M,), dtype=_stat_dtype(x)), x.new_empty((M,), dtype=_stat_dtype(x))


@torch.library.custom_op("fastbert::layer_norm_bwd", mutates_args=())
def _ln_bwd(dy: Tensor, z: Tensor, weight: Optional[Tensor], has_bias: bool, mean: Tensor, rstd: Tensor,
            dz_extra: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    dz, dw, db = run("layer_norm_bwd", backend, dy, z, weight, has_bias, mean, rstd, dz_extra)
    return dz, opt_out(dw, z), opt_out(db, z)


@_ln_bwd.register_fake
def _(dy, z, weight, has_bias, mean, rstd, dz_extra, backend):
    N = z.shape[1]
    wdt = weight.dtype if weight is not None else dy.dtype
    dw = z.new_empty((N,), dtype=wdt) if weight is not None else z.new_empty((0,))
    db = z.new_empty((N,), dtype=wdt) if has_bias else z.new_empty((0,))
    return torch.empty_like(z), dw, db


def _setup(ctx, inputs, output):
    x, weight, bias, residual, eps, backend = inputs
    y, z, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(z if ctx.has_residual else x, weight, mean, rstd)
    ctx.has_bias, ctx.backend = bias is not None, backend
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, dz_out, dmean, drstd):
    z, weight, mean, rstd = ctx.saved_tensors
    if dy is None and dz_out is None:
        return (None,) * 6
    if dy is None:
        dy = torch.zeros_like(z)
    dz_extra = dz_out.contiguous() if (ctx.has_residual and dz_out is not None) else None
    dz, dw, db = _ln_bwd(dy.contiguous(), z, weight, ctx.has_bias, mean, rstd, dz_extra, ctx.backend)
    return dz, opt_in(dw), opt_in(db), (dz if ctx.has_residual else None), None, None


_ln_fwd.register_autograd(_backward, setup_context=_setup)


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-12,
               residual: Optional[Tensor] = None):
    """LayerNorm over the last dim with fp32 statistics; bf16 in, bf16 out (likewise fp16, fp32).

    Args:
        x: ``[..., N]``; weight, bias: ``[N]`` (any float dtype, e.g. fp32 parameters with bf16 x) or None;
        residual: same shape and dtype as x, or None.
    Returns:
        ``y`` (x.dtype), or ``(y, x + residual)`` when a residual is given (the sum is the new residual
        stream of a pre-LN block; a post-LN block uses only ``y``).
    """
    _checks.tensor("x", x, dtypes=_checks.FLOAT_DTYPES, min_dim=1)
    N = x.shape[-1]
    _checks.optional_vector("weight", weight, N, x.device)
    _checks.optional_vector("bias", bias, N, x.device)
    if residual is not None:
        _checks.tensor("residual", residual, device=x.device)
        _checks.same_shape("residual", residual, "x", x)
        _checks.same_dtype("residual", residual, "x", x)
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps: expected a non-negative float, got {eps!r}")
    x2 = _checks.flat2d(x)
    r2 = _checks.flat2d(residual) if residual is not None else None
    w = weight.contiguous() if weight is not None else None
    b = bias.contiguous() if bias is not None else None
    backend = pick("layer_norm_fwd", x.device, x.dtype, x2, w, b, r2, float(eps))
    y, z, _, _ = _ln_fwd(x2, w, b, r2, float(eps), backend)
    if residual is None:
        return y.view(x.shape)
    return y.view(x.shape), z.view(x.shape)
