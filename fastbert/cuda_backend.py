"""The ``cuda`` backend: fastbert's hand-written CUDA kernels (``csrc/``), built as ``fastbert._C``.

Importing this module never needs the extension: ``fastbert._C`` is imported inside the functions, and
``why_not(device)`` says why the backend cannot run (not built, no GPU, CPU tensors). The primitives
have exactly the signatures of ``fastbert/reference.py``; the binding (``csrc/bindings.cpp``) checks the
inputs, allocates the outputs and launches on the current CUDA stream.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LN_MAX_N = 16384  # kLnMaxN in csrc/layer_norm.cu (also fastbert._C.layer_norm_max_n)


def _C():
    return importlib.import_module("fastbert._C")


def why_not(device) -> Optional[str]:
    """None when the extension is built, a GPU is visible and ``device`` is a CUDA device; else why not."""
    try:
        _C()
    except ImportError as e:
        return ("the CUDA extension fastbert._C is not built (install with a CUDA build of torch and nvcc: "
                f"pip install --no-build-isolation .) [{e}]")
    if not torch.cuda.is_available():
        return "fastbert._C is built but no CUDA GPU is visible to torch"
    if torch.device(device).type != "cuda":
        return f"fastbert._C runs on CUDA tensors, got device {device}"
    return None


def unsupported(primitive: str, *args) -> Optional[str]:
    """Why the CUDA kernels cannot run these inputs (None: they can)."""
    if primitive in ("index_gather_fwd", "index_scatter_fwd"):
        return None  # rows are copied as bytes: any dtype
    if primitive.startswith("flash_attn"):
        return _attn_unsupported(primitive, *args)
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.dtype not in _KERNEL_DTYPES:
        return f"the CUDA kernels support fp32/bf16/fp16 for {primitive}, got {x.dtype}"
    if primitive.startswith("layer_norm") and isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[1] > _LN_MAX_N:
        return f"the CUDA LayerNorm keeps a row in registers: N <= {_LN_MAX_N}, got {x.shape[1]}"
    return None


def index_gather_fwd(x, indices):
    return _C().index_gather_fwd(x, indices)


def index_scatter_fwd(x, indices, num_rows):
    return _C().index_scatter_fwd(x, indices, int(num_rows))


def bias_gelu_fwd(x, bias, approximate):
    return _C().bias_gelu_fwd(x, bias, approximate)


def bias_gelu_bwd(dy, x, bias, approximate):
    return tuple(_C().bias_gelu_bwd(dy.contiguous(), x, bias, approximate))


def geglu_fwd(x, bias, approximate):
    return _C().geglu_fwd(x, bias, approximate)


def geglu_bwd(dy, x, bias, approximate):
    return tuple(_C().geglu_bwd(dy.contiguous(), x, bias, approximate))


def layer_norm_fwd(x, weight, bias, residual, eps):
    return tuple(_C().layer_norm_fwd(x, weight, bias, residual, float(eps)))


def layer_norm_bwd(dy, z, weight, has_bias, mean, rstd, dz_extra):
    return tuple(_C().layer_norm_bwd(dy.contiguous(), z, weight, bool(has_bias), mean, rstd, dz_extra))


def cross_entropy_rows(logits, targets, grad_scale):
    """The MLM row kernel (see ``fastbert.ops.mlm_chunked``): per-row loss ``[n]`` fp32; with a float
    ``grad_scale`` the logits are overwritten with ``grad_scale * (softmax - onehot)``."""
    return _C().cross_entropy_rows(logits, targets, None if grad_scale is None else float(grad_scale))


def sparse_mlm_loss_fwd(hidden, labels, weight, bias, ignore_index, compute_grad):
    from fastbert.ops.mlm_chunked import chunked_sparse_mlm_loss
    return chunked_sparse_mlm_loss(hidden, labels, weight, bias, ignore_index, compute_grad,
                                   row_kernel=cross_entropy_rows)


# ---- attention (csrc/flash_attn.cu: tensor-core mma.sync, bf16/fp16 only) ---------------------------
_ATTN_DTYPES = (torch.float16, torch.bfloat16)
_ATTN_HEAD_DIMS = (32, 64, 128)


def _attn_unsupported(primitive, *args) -> Optional[str]:
    q = args[1] if primitive == "flash_attn_bwd" else args[0]
    if isinstance(q, torch.Tensor):
        if q.dtype not in _ATTN_DTYPES:
            return (f"the CUDA attention kernels run float16 and bfloat16 on tensor cores, got q.dtype {q.dtype} "
                    f"(cast q, k, v to bf16/fp16 or use the torch/triton backend)")
        if q.dim() == 3 and q.shape[-1] not in _ATTN_HEAD_DIMS:
            return f"the CUDA attention kernels support head dim {_ATTN_HEAD_DIMS}, got {q.shape[-1]}"
    return None


def flash_attn_fwd(q, k, v, cu_seqlens, max_seqlen, alibi_slopes=None, softmax_scale=None):
    return tuple(_C().flash_attn_fwd(q, k, v, cu_seqlens, int(max_seqlen), alibi_slopes,
                                     None if softmax_scale is None else float(softmax_scale)))


def flash_attn_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, alibi_slopes=None, softmax_scale=None):
    return tuple(_C().flash_attn_bwd(dout.contiguous(), q, k, v, out, lse, cu_seqlens, int(max_seqlen), alibi_slopes,
                                     None if softmax_scale is None else float(softmax_scale)))
