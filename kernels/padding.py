"""Row gather / scatter for unpadding and repadding (Triton).

Primitives (signatures and semantics: ``fastbert/reference.py``):

* ``index_gather_fwd(x [R, F], indices [T] int64)`` -> ``[T, F]``, ``out[t] = x[indices[t]]``
* ``index_scatter_fwd(x [T, F], indices [T] int64, num_rows)`` -> ``[num_rows, F]``,
  ``out[indices[t]] = x[t]``, zeros in every other row. Each is the other's backward.

Both run the same kernel: every output row is written exactly once, as a contiguous (vectorised) copy of
one source row or as zeros. The scatter first inverts the index map (``inv[indices[t]] = t``, -1 elsewhere,
an int32 vector of ``num_rows``: a few bytes per row against ``F * itemsize`` bytes of payload), so the
output needs neither a zero-fill pass nor a second kernel for the pad rows.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import cdiv, spec, tile_config, tile_grid_reason

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8,
           torch.uint8)


@triton.jit
def _gather_rows_kernel(SRC, IDX, OUT, n_out, F, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """OUT[r, :] = SRC[IDX[r], :] where IDX[r] >= 0, else zeros. SRC/OUT rows are F elements, contiguous."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n_out
    cmask = cols < F
    src_row = tl.load(IDX + rows, mask=rmask, other=-1).to(tl.int64)
    take = (src_row >= 0)[:, None] & cmask[None, :]
    vals = tl.load(SRC + src_row[:, None] * F + cols[None, :], mask=take, other=0)
    tl.store(OUT + rows.to(tl.int64)[:, None] * F + cols[None, :], vals, mask=rmask[:, None] & cmask[None, :])


def unsupported(primitive: str, *args) -> Optional[str]:
    """Why these inputs cannot run on the Triton kernel (an element type it does not copy, a grid or int32
    limit)."""
    x = args[0]
    if x.dtype not in _DTYPES:
        return f"Triton row gather/scatter copies {[str(d) for d in _DTYPES]}, got x.dtype={x.dtype}"
    if primitive == "index_scatter_fwd" and x.shape[0] >= 2**31:
        return f"the Triton scatter inverts the index map into int32: fewer than 2^31 rows of x, got {x.shape[0]}"
    return tile_grid_reason(x.shape[1])


def _launch(src, idx, out):
    n_out, F = out.shape
    if out.numel() == 0:
        return out
    cfg = tile_config(F)
    grid = (cdiv(n_out, cfg["BLOCK_M"]), cdiv(F, cfg["BLOCK_N"]))
    _gather_rows_kernel[grid](src, idx, out, n_out, F, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                              num_warps=cfg["num_warps"])
    return out


def index_gather_fwd(x, indices):
    """x ``[R, F]``, indices ``[T]`` int64 in ``[0, R)`` -> ``x[indices]`` ``[T, F]``."""
    out = torch.empty((indices.shape[0], x.shape[1]), device=x.device, dtype=x.dtype)
    return _launch(x, indices, out)


def index_scatter_fwd(x, indices, num_rows):
    """x ``[T, F]``, indices ``[T]`` int64, unique, in ``[0, num_rows)`` -> ``[num_rows, F]`` with row
    ``indices[t]`` = ``x[t]`` and zeros elsewhere."""
    num_rows = int(num_rows)
    out = torch.empty((num_rows, x.shape[1]), device=x.device, dtype=x.dtype)
    inv = torch.full((num_rows,), -1, device=x.device, dtype=torch.int32)
    inv.index_copy_(0, indices, torch.arange(indices.shape[0], device=x.device, dtype=torch.int32))
    return _launch(x, inv, out)


def compile_specs():
    """The gather at BERT shapes (F = hidden 768 / 1024; bf16 / fp16), int64 indices for unpad and the
    int32 inverse map for repad, from the launcher's ``tile_config`` table."""
    specs = []
    for F in (768, 1024):
        cfg = tile_config(F)
        for dt in ("bf16", "fp16"):
            for idx_t, what in (("i64", "gather"), ("i32", "scatter")):
                specs.append(spec(f"index_{what}_{dt}_F{F}", _gather_rows_kernel,
                                  {"SRC": f"*{dt}", "IDX": f"*{idx_t}", "OUT": f"*{dt}", "n_out": "i32", "F": "i32"},
                                  {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]}, cfg["num_warps"],
                                  divisible=["SRC", "IDX", "OUT", "F"]))
    return specs
