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

from fastbert._cuda_common import unsupported  # noqa: F401 - the backend's unsupported(), shared with cuda_host
from fastbert.reference import check_window_size


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
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:  # the build targets sm_80+: bf16 mma.sync, > 48 KiB of shared memory per block
        return f"fastbert._C needs a GPU of compute capability 8.0 or newer, got {major}.{minor}"
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


def cross_entropy_rows(logits, targets, bias, grad, grad_scale):
    """The MLM row kernel (contract: ``fastbert.ops.mlm_chunked``): per-row loss ``[n]`` fp32 of
    ``logits + bias``; writes ``grad_scale * (softmax - onehot)`` into ``grad`` when it is given."""
    return _C().cross_entropy_rows(logits, targets, bias, grad, float(grad_scale))


def sparse_mlm_loss_fwd(hidden, labels, weight, bias, ignore_index, compute_grad, max_labelled=None):
    from fastbert.ops.mlm_chunked import chunked_sparse_mlm_loss
    return chunked_sparse_mlm_loss(hidden, labels, weight, bias, ignore_index, compute_grad,
                                   row_kernel=cross_entropy_rows, max_labelled=max_labelled)


# ---- attention (csrc/flash_attn.cu: tensor-core mma.sync, bf16/fp16 only) ---------------------------
def flash_attn_fwd(q, k, v, cu_seqlens, max_seqlen, alibi_slopes=None, softmax_scale=None, window_size=(-1, -1)):
    left, right = check_window_size(window_size)
    if q.shape[0] == 0:  # no tokens (also no sequences: the binding wants batch >= 1)
        return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((q.shape[1], 0),
                                                                                       dtype=torch.float32)
    return tuple(_C().flash_attn_fwd(q, k, v, cu_seqlens, int(max_seqlen), alibi_slopes,
                                     None if softmax_scale is None else float(softmax_scale), left, right))


def flash_attn_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, alibi_slopes=None, softmax_scale=None,
                   window_size=(-1, -1)):
    left, right = check_window_size(window_size)
    if q.shape[0] == 0:
        return tuple(torch.empty_like(q, memory_format=torch.contiguous_format) for _ in range(3))
    return tuple(_C().flash_attn_bwd(dout.contiguous(), q, k, v, out, lse, cu_seqlens, int(max_seqlen), alibi_slopes,
                                     None if softmax_scale is None else float(softmax_scale), left, right))
