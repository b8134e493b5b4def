"""What the ``csrc/`` kernels can and cannot run, shared by the two backends built from those sources:
``cuda`` (``fastbert.cuda_backend``: ``fastbert._C`` on a GPU) and ``cuda_host`` (``fastbert.cuda_host_backend``:
the same kernels compiled as host C++ for tests). Both run the same kernel code, so they refuse the same
inputs with the same words. Pure Python and torch: importing this never needs the extension or a compiler.
"""
from __future__ import annotations

from typing import Optional

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # fb::DType in csrc/common.cuh
LN_MAX_N = 16384  # kLnMaxN in csrc/layer_norm.cu (tests/test_cuda_host.py checks the two agree)
ATTN_DTYPES = (torch.float16, torch.bfloat16)  # csrc/flash_attn.cu: tensor-core mma.sync
ATTN_HEAD_DIMS = (32, 64, 128)


GRID_YZ_MAX = 65535  # CUDA's limit on grid axes y and z
INT32_MAX = 2**31 - 1  # the launchers take sizes as int (csrc/launchers.h)


def unsupported(primitive: str, *args) -> Optional[str]:
    """Why the CUDA kernels cannot run these inputs (None: they can). ``args``: the primitive's arguments
    as in ``fastbert/reference.py``."""
    if primitive in ("index_gather_fwd", "index_scatter_fwd"):
        return None  # rows are copied as bytes with 64-bit sizes and a grid-stride loop: any dtype, any size
    if primitive.startswith("flash_attn"):
        return attn_unsupported(primitive, *args)
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.dtype not in KERNEL_DTYPES:
        return f"the CUDA kernels support fp32/bf16/fp16 for {primitive}, got {x.dtype}"
    if primitive.startswith("layer_norm") and isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[1] > LN_MAX_N:
        return f"the CUDA LayerNorm keeps a row in registers: N <= {LN_MAX_N}, got {x.shape[1]}"
    if primitive == "sparse_mlm_loss_fwd":  # hidden [T, H], weight [V, H]: the row kernel takes n, V as int
        named = (("hidden", args[0]), ("weight", args[2]))
    else:  # pointwise and LayerNorm launchers take M, N as int
        named = tuple((f"{primitive} input", t) for t in args[:2] if isinstance(t, torch.Tensor))
    for name, t in named:
        if t.dim() == 2 and max(t.shape) > INT32_MAX:
            return f"the CUDA launchers take sizes as 32-bit ints: {name} has shape {tuple(t.shape)}"
    return None


def attn_unsupported(primitive: str, *args) -> Optional[str]:
    """``unsupported`` for ``flash_attn_fwd`` (q first) and ``flash_attn_bwd`` (dout first, then q)."""
    q = args[1] if primitive == "flash_attn_bwd" else args[0]
    cu = args[6] if primitive == "flash_attn_bwd" else args[3]
    if isinstance(q, torch.Tensor):
        if q.dtype not in ATTN_DTYPES:
            return (f"the CUDA attention kernels run float16 and bfloat16 on tensor cores, got q.dtype {q.dtype} "
                    f"(cast q, k, v to bf16/fp16 or use the torch/triton backend)")
        if q.dim() == 3 and q.shape[-1] not in ATTN_HEAD_DIMS:
            return f"the CUDA attention kernels support head dim {ATTN_HEAD_DIMS}, got {q.shape[-1]}"
        T, H, D = q.shape
        if T == 0:
            return None  # nothing is launched
        B = cu.shape[0] - 1
        if B > GRID_YZ_MAX:
            return f"the CUDA attention grid puts sequences on axis z: at most {GRID_YZ_MAX} sequences, got {B}"
        if H > GRID_YZ_MAX:
            return f"the CUDA attention grid puts heads on axis y: at most {GRID_YZ_MAX} heads, got {H}"
        at = 9 if primitive == "flash_attn_bwd" else 6
        scale = args[at] if len(args) > at else None
        if scale is not None and not (0.0 < float(scale) < float("inf")):
            # csrc/flash_attn_tiles.cuh keeps scores in units of q.k and takes the row max before scaling
            return f"the CUDA attention kernels need a finite softmax_scale > 0, got {scale}"
        if T * H * D > INT32_MAX:
            # csrc/flash_attn.cu forms ((start + i) * heads + h) * D in int for dq/dk/dv (the forward uses int64)
            return (f"the CUDA attention backward indexes [T, H, D] gradients with 32-bit offsets: T * H * D < 2^31, "
                    f"got {T * H * D}")
    return None
