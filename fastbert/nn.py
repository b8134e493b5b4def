"""Drop-in ``nn.Module``s built on the functional ops of ``fastbert.ops``.

Each module keeps the parameter names of its PyTorch / Hugging Face counterpart (``weight``/``bias`` for
LayerNorm, ``nn.Linear`` children for the projections), so state dicts move both ways. The ops pick their
backend per call (the reference on CPU), and every module is differentiable.

Shapes: ``T`` real tokens of an unpadded batch, ``B`` sequences, ``S`` padded length, ``H`` hidden size,
``I`` intermediate size, ``V`` vocabulary rows.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastbert import ops as _ops  # attribute lookups at call time: the ops table may be swapped in tests
from fastbert import reference as _ref

_APPROX = ("none", "tanh")


def _check_approximate(approximate: str) -> str:
    if approximate not in _APPROX:
        raise ValueError(f"approximate: expected one of {_APPROX}, got {approximate!r}")
    return approximate


class LayerNorm(nn.Module):
    """LayerNorm over the last dim with fp32 statistics, optionally fused with the residual add.

    Same constructor and state dict (``weight``, ``bias``) as ``torch.nn.LayerNorm`` over one trailing
    dim, so it loads its weights; ``eps`` defaults to PyTorch's 1e-5 (BERT models pass 1e-12).

    ``forward(x [..., N])`` -> ``[..., N]`` in x.dtype. ``forward(x, residual)`` (same shape, cast to
    x.dtype) -> ``(y, z)`` with ``z = x + residual`` (the new residual stream) and ``y = LayerNorm(z)``.
    """

    def __init__(self, normalized_shape: Union[int, Tuple[int]], eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (int(normalized_shape),)
        normalized_shape = tuple(normalized_shape)
        if len(normalized_shape) != 1:
            raise ValueError(f"normalized_shape: fastbert LayerNorm normalises the last dim only, got {normalized_shape}")
        self.normalized_shape = normalized_shape
        self.eps = float(eps)
        self.elementwise_affine = elementwise_affine
        kw = dict(device=device, dtype=dtype)
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(normalized_shape, **kw))
            self.bias = nn.Parameter(torch.zeros(normalized_shape, **kw)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    @classmethod
    def from_torch(cls, ln: nn.LayerNorm) -> "LayerNorm":
        """A fastbert LayerNorm sharing ``ln``'s parameters (not copies: optimizers keep working)."""
        new = cls(ln.normalized_shape, eps=ln.eps, elementwise_affine=False)
        new.elementwise_affine = ln.elementwise_affine
        new.weight = ln.weight
        new.bias = ln.bias
        return new

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        N = self.normalized_shape[0]
        if x.shape[-1] != N:
            raise ValueError(f"x: expected last dim {N}, got shape {tuple(x.shape)}")
        shape = x.shape
        x2 = x.reshape(-1, N)
        if residual is None:
            return _ops.layer_norm(x2, self.weight, self.bias, self.eps).view(shape)
        if residual.shape != shape:
            raise ValueError(f"residual: expected shape {tuple(shape)} like x, got {tuple(residual.shape)}")
        # Under autocast the sublayer output is bf16 while the residual may still be fp32 (embeddings):
        # the stream continues in the sublayer's dtype, as MosaicBERT's low-precision LayerNorm does.
        y, z = _ops.layer_norm(x2, self.weight, self.bias, self.eps, residual=residual.reshape(-1, N).to(x.dtype))
        return y.view(shape), z.view(shape)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class BiasGELU(nn.Module):
    """``gelu(x + bias)`` in one pass: x ``[..., N]``, bias ``[N]`` or None -> ``[..., N]`` in x.dtype.

    Pair with a bias-free matmul (``F.linear(x, linear.weight)``) and pass the Linear's bias here so the
    bias add is fused into the activation."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = _check_approximate(approximate)

    def forward(self, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        shape = x.shape
        return _ops.bias_gelu(x.reshape(-1, shape[-1]), bias, self.approximate).view(shape)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class GatedMLP(nn.Module):
    """The transformer MLP: ``wo(act(wi(x)))`` with the ``wi`` bias fused into the activation.

    ``gated=True`` (MosaicBERT's GeGLU): ``wi`` is ``Linear(H, 2*I)``; its output ``[..., 2I]`` is split into
    ``a = [..., :I]`` and ``g = [..., I:]`` and ``gelu(a) * g`` goes to ``wo = Linear(I, H)``.
    ``gated=False``: the classic BERT MLP, ``wi = Linear(H, I)`` then GELU (HF ``intermediate.dense`` /
    ``output.dense`` map to ``wi`` / ``wo``). On CPU tensors the ``wi`` bias is added by the GEMM instead
    (measured ~8% faster for the tiny MLP's forward and backward).

    ``forward(x [..., H])`` -> ``[..., H]``. Dropout and the residual add belong to the caller.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, gated: bool = True, approximate: str = "none",
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.gated = gated
        self.approximate = _check_approximate(approximate)
        self.wi = nn.Linear(hidden_size, (2 if gated else 1) * intermediate_size, bias=bias, **kw)
        self.wo = nn.Linear(intermediate_size, hidden_size, bias=bias, **kw)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        if x.is_cuda:  # the GPU kernels add the bias while they apply the activation: no extra pass
            h, bias = F.linear(x.reshape(-1, shape[-1]), self.wi.weight), self.wi.bias
        else:  # on CPU addmm adds it as the GEMM writes its output, cheaper than the activation's own add
            h, bias = F.linear(x.reshape(-1, shape[-1]), self.wi.weight, self.wi.bias), None
        if self.gated:
            h = _ops.geglu(h, bias, self.approximate)
        else:
            h = _ops.bias_gelu(h, bias, self.approximate)
        return self.wo(h).view(shape)

    def extra_repr(self) -> str:
        return f"gated={self.gated}, approximate={self.approximate!r}"


class AlibiSelfAttention(nn.Module):
    """Bidirectional multi-head self-attention with a fused QKV projection and optional ALiBi.

    Parameters: ``Wqkv = Linear(H, 3H)`` whose output row is ``[3, heads, head_dim]`` (q, k, v; HF's
    ``query``/``key``/``value`` weights concatenated in that order), ``out_proj = Linear(H, H)``. The ALiBi
    slopes are a non-persistent fp32 buffer ``[heads]`` (sized by heads, never by length, so a model
    trained at 128 tokens runs at any length); ``alibi=False`` gives plain softmax attention.
    ``window_size=(left, right)`` makes it local attention (query i sees keys ``i - left .. i + right``;
    -1: unbounded; flash-attn's convention), ``(-1, -1)`` (default) global.

    Two entry points:
      * ``forward(x [T, H], cu_seqlens [B+1] int32, max_seqlen)`` -> ``[T, H]``: unpadded, through
        ``fastbert.ops.flash_attn_varlen_alibi``; q/k/v are strided views of the QKV output (no copy).
        No attention dropout (the varlen kernels have none).
      * ``forward_padded(x [B, S, H], attention_mask [B, S])`` -> ``[B, S, H]``: the padded baseline with
        ``F.scaled_dot_product_attention``, pads masked out of the keys, ALiBi as an additive bias,
        ``attention_dropout`` applied in training.
    """

    def __init__(self, hidden_size: int, num_heads: int, alibi: bool = True, attention_dropout: float = 0.0,
                 bias: bool = True, device=None, dtype=None, window_size=(-1, -1)):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        self.window_size = _ref.check_window_size(window_size)
        kw = dict(device=device, dtype=dtype)
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.attention_dropout = float(attention_dropout)
        self.Wqkv = nn.Linear(hidden_size, 3 * hidden_size, bias=bias, **kw)
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=bias, **kw)
        if alibi:
            self.register_buffer("alibi_slopes", _ops.alibi_slopes(num_heads).to(device), persistent=False)
        else:
            self.alibi_slopes = None

    def _slopes(self) -> Optional[Tensor]:
        # model.to(bf16) casts float buffers too; the ops take fp32 slopes.
        return None if self.alibi_slopes is None else self.alibi_slopes.float()

    def forward(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(f"x: expected [T, {self.hidden_size}], got shape {tuple(x.shape)}")
        if self.training and self.attention_dropout > 0:
            raise ValueError("attention_dropout > 0 is only supported by forward_padded (padded SDPA)")
        T = x.shape[0]
        qkv = self.Wqkv(x).view(T, 3, self.num_heads, self.head_dim)
        out = _ops.flash_attn_varlen_alibi(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, max_seqlen,
                                           alibi_slopes=self._slopes(), window_size=self.window_size)
        return self.out_proj(out.reshape(T, self.hidden_size))

    def forward_padded(self, x: Tensor, attention_mask: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[2] != self.hidden_size:
            raise ValueError(f"x: expected [B, S, {self.hidden_size}], got shape {tuple(x.shape)}")
        B, S, _ = x.shape
        if attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask: expected shape {(B, S)}, got {tuple(attention_mask.shape)}")
        qkv = self.Wqkv(x).view(B, S, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, S, D]
        # A finite large negative (not -inf) keeps a fully padded row finite, as HF does.
        neg = torch.finfo(q.dtype).min
        bias = torch.zeros((B, 1, 1, S), dtype=q.dtype, device=x.device)
        bias = bias.masked_fill(~attention_mask.bool()[:, None, None, :], neg)
        slopes = self._slopes()
        if slopes is not None:
            pos = torch.arange(S, device=x.device, dtype=torch.float32)
            dist = (pos[:, None] - pos[None, :]).abs()
            bias = (bias + (-slopes[:, None, None] * dist).to(q.dtype)).clamp_min(neg)  # [B, heads, S, S]
        band = _ref.window_mask(self.window_size, S, x.device)  # [S, S] or None
        if band is not None:
            bias = bias.masked_fill(~band, neg)
        p = self.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        return self.out_proj(out.transpose(1, 2).reshape(B, S, self.hidden_size))

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
                f"alibi={self.alibi_slopes is not None}, attention_dropout={self.attention_dropout}, "
                f"window_size={self.window_size}")


class SparseMLMLoss(nn.Module):
    """Masked-LM cross-entropy over labelled rows only (the full ``[T, V]`` logits are never built).

    ``forward(hidden [T, H], labels [T] int64, weight [V, H], bias [V] or None, max_labelled=None)`` -> fp32
    scalar, the mean over rows whose label is not ``ignore_index`` (0 when there are none); ``max_labelled``:
    an upper bound on the labelled rows that spares the op a host sync (see ``fastbert.ops.sparse_mlm_loss``). ``weight`` is usually the tied
    word embedding; it is cast to ``hidden.dtype`` when they differ (under autocast).
    """

    def __init__(self, ignore_index: int = -100):
        super().__init__()
        self.ignore_index = int(ignore_index)

    def forward(self, hidden: Tensor, labels: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                max_labelled: Optional[int] = None) -> Tensor:
        if weight.dtype != hidden.dtype:
            weight = weight.to(hidden.dtype)
        if bias is not None and bias.dtype != hidden.dtype:
            bias = bias.to(hidden.dtype)
        return _ops.sparse_mlm_loss(hidden, labels, weight, bias, ignore_index=self.ignore_index,
                                    max_labelled=max_labelled)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}"


__all__ = ["LayerNorm", "BiasGELU", "GatedMLP", "AlibiSelfAttention", "SparseMLMLoss"]
