"""bias_gelu and geglu: fused bias + GELU, and the gated GELU of MosaicBERT's MLP."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from fastbert.ops import _checks
from fastbert.ops._dispatch import opt_in, opt_out, pick, run

Tensor = torch.Tensor


def _register(name: str, out_cols):
    """Register ``fastbert::<name>_fwd`` / ``_bwd`` (same argument pattern for both families)."""

    @torch.library.custom_op(f"fastbert::{name}_fwd", mutates_args=())
    def fwd(x: Tensor, bias: Optional[Tensor], approximate: str, backend: str) -> Tensor:
        return run(f"{name}_fwd", backend, x, bias, approximate)

    @fwd.register_fake
    def _(x, bias, approximate, backend):
        return x.new_empty((x.shape[0], out_cols(x.shape[1])))

    @torch.library.custom_op(f"fastbert::{name}_bwd", mutates_args=())
    def bwd(dy: Tensor, x: Tensor, bias: Optional[Tensor], approximate: str,
            backend: str) -> Tuple[Tensor, Tensor]:
        dx, dbias = run(f"{name}_bwd", backend, dy, x, bias, approximate)
        return dx, opt_out(dbias, x)

    @bwd.register_fake
    def _(dy, x, bias, approximate, backend):
        return torch.empty_like(x), (torch.empty_like(bias) if bias is not None else x.new_empty((0,)))

    def setup(ctx, inputs, output):
        x, bias, approximate, backend = inputs
        ctx.save_for_backward(x, bias)
        ctx.approximate, ctx.backend = approximate, backend

    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        dx, dbias = bwd(dy.contiguous(), x, bias, ctx.approximate, ctx.backend)
        return dx, opt_in(dbias), None, None

    fwd.register_autograd(backward, setup_context=setup)
    return fwd


_bias_gelu_fwd = _register("bias_gelu", lambda n: n)
_geglu_fwd = _register("geglu", lambda n: n // 2)


def _prepare(name: str, x: Tensor, bias: Optional[Tensor], approximate: str, width: int):
    _checks.tensor("x", x, dtypes=_checks.FLOAT_DTYPES, min_dim=1)
    _checks.optional_vector("bias", bias, width, x.device)
    _checks.approximate(approximate)
    x2 = _checks.flat2d(x)
    bias = bias.contiguous() if bias is not None else None
    backend = pick(f"{name}_fwd", x.device, x.dtype, x2, bias, approximate)
    return x2, bias, backend


def bias_gelu(x: Tensor, bias: Optional[Tensor] = None, approximate: str = "none") -> Tensor:
    """``gelu(x + bias)`` fused. x ``[..., N]`` fp16/bf16/fp32, bias ``[N]`` (any float dtype) or None;
    ``approximate`` "none" (erf, default) or "tanh". Returns ``[..., N]`` in x.dtype (fp32 math)."""
    x2, bias, backend = _prepare("bias_gelu", x, bias, approximate, x.shape[-1] if x.dim() else 0)
    return _bias_gelu_fwd(x2, bias, approximate, backend).view(x.shape)


def geglu(x: Tensor, bias: Optional[Tensor] = None, approximate: str = "none") -> Tensor:
    """Gated GELU: x ``[..., 2N]`` (+ bias ``[2N]``) -> ``gelu(x[..., :N]) * x[..., N:]``, ``[..., N]``."""
    if x.dim() >= 1 and x.shape[-1] % 2:
        raise ValueError(f"x: expected an even last dim (two halves), got shape {tuple(x.shape)}")
    x2, bias, backend = _prepare("geglu", x, bias, approximate, x.shape[-1] if x.dim() else 0)
    return _geglu_fwd(x2, bias, approximate, backend).view(tuple(x.shape[:-1]) + (x.shape[-1] // 2,))
