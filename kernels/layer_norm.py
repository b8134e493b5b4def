"""LayerNorm over the last dim with fp32 statistics and an optional fused residual add (Triton).

Primitives (signatures and semantics: ``fastbert/reference.py``):

* ``layer_norm_fwd(x [M, N], weight [N] | None, bias [N] | None, residual [M, N] | None, eps)``
  -> ``(y [M, N] x.dtype, z [M, N] x.dtype | None, mean [M] fp32, rstd [M] fp32)``
* ``layer_norm_bwd(dy, z, weight, has_bias, mean, rstd, dz_extra)`` -> ``(dz, dweight | None, dbias | None)``

Forward: a program owns ``BLOCK_M`` whole rows (``BLOCK_N`` = next power of two >= N, N <= 8192) held in
registers, so each element is read once and written once. With a residual it first forms
``z = x + residual`` rounded to x.dtype (the new residual stream, written out) and normalises that
rounded ``z``, exactly as the reference does.

Backward: the grid is a few row strips; each program walks its strip, writes dz row by row and keeps
fp32 running sums of ``dy * xhat`` and ``dy`` in registers, then writes ONE partial row each into
``[num_strips, N]`` fp32 buffers that are summed afterwards (no atomics on a single dW row, so the result
is deterministic).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import MAX_ROW, cdiv, check_float, num_strips, row_config, spec


@triton.jit
def _ln_fwd_kernel(X, R, W, B, Y, Z, MEAN, RSTD, M, N, eps,
                   HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    h = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        h = h + tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
        zq = h.to(Z.dtype.element_ty)
        tl.store(Z + offs, zq, mask=mask)
        h = zq.to(tl.float32)  # statistics of the rounded residual stream, as the reference
    mean = tl.sum(h, axis=1) / N
    hc = tl.where(mask, h - mean[:, None], 0.0)  # two-pass variance: exact 0 for constant rows
    var = tl.sum(hc * hc, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    y = hc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _ln_bwd_kernel(DY, Z, W, MEAN, RSTD, DZE, DZ, DW_PART, DB_PART, M, N, blocks_per_strip,
                   HAS_W: tl.constexpr, HAS_DB: tl.constexpr, HAS_DZE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    strip = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i in range(0, blocks_per_strip):
        rows = (strip * blocks_per_strip + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        z = tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = tl.where(mask, (z - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:
            dw_acc += g * xhat
        if HAS_DB:
            db_acc += g
        if HAS_W:
            g = g * w[None, :]
        c1 = tl.sum(g * xhat, axis=1) / N
        c2 = tl.sum(g, axis=1) / N
        dz = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_DZE:
            dz += tl.load(DZE + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DZ + offs, dz.to(DZ.dtype.element_ty), mask=mask)
    if HAS_W:
        tl.store(DW_PART + strip * N + cols, tl.sum(dw_acc, axis=0), mask=cmask)
    if HAS_DB:
        tl.store(DB_PART + strip * N + cols, tl.sum(db_acc, axis=0), mask=cmask)


def unsupported(primitive: str, *args) -> Optional[str]:
    """Why these inputs cannot run on the Triton kernels (a dtype other than fp32/bf16/fp16, N > 8192)."""
    for t in args:
        reason = check_float("tensors", t) if isinstance(t, torch.Tensor) and t.is_floating_point() else None
        if reason:
            return reason
    x = args[0] if primitive == "layer_norm_fwd" else args[1]  # x, or z for the backward
    if x.shape[-1] > MAX_ROW:
        return f"Triton LayerNorm keeps a row in registers: N={x.shape[-1]} > {MAX_ROW}"
    return None


def layer_norm_fwd(x, weight, bias, residual, eps):
    """x ``[M, N]`` (+ residual ``[M, N]`` same dtype), weight/bias ``[N]`` any float dtype or None ->
    ``(y [M, N] x.dtype, z [M, N] x.dtype or None, mean [M] fp32, rstd [M] fp32)``."""
    M, N = x.shape
    cfg = row_config(N)
    y = torch.empty_like(x)
    z = torch.empty_like(x) if residual is not None else None
    mean = torch.empty(M, device=x.device, dtype=torch.float32)
    rstd = torch.empty(M, device=x.device, dtype=torch.float32)
    if M == 0:
        return y, z, mean, rstd
    grid = (cdiv(M, cfg["BLOCK_M"]),)
    _ln_fwd_kernel[grid](x, residual, weight, bias, y, z, mean, rstd, M, N, float(eps),
                         HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None,
                         BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"])
    return y, z, mean, rstd


def layer_norm_bwd(dy, z, weight, has_bias, mean, rstd, dz_extra):
    """dy, z ``[M, N]``; weight ``[N]`` or None; mean/rstd ``[M]`` fp32; dz_extra ``[M, N]`` or None ->
    ``(dz [M, N] z.dtype, dweight [N] weight.dtype or None, dbias [N] (weight's dtype, else dy's) or None)``."""
    M, N = z.shape
    cfg = row_config(N)
    dz = torch.empty_like(z)
    has_w = weight is not None
    db_dtype = weight.dtype if has_w else dy.dtype
    row_blocks = cdiv(M, cfg["BLOCK_M"])
    if M == 0:
        dw = torch.zeros(N, device=z.device, dtype=weight.dtype) if has_w else None
        db = torch.zeros(N, device=z.device, dtype=db_dtype) if has_bias else None
        return dz, dw, db
    strips = num_strips(z.device, row_blocks)
    per_strip = cdiv(row_blocks, strips)
    strips = cdiv(row_blocks, per_strip)  # no empty strips
    dw_part = torch.empty((strips, N), device=z.device, dtype=torch.float32) if has_w else None
    db_part = torch.empty((strips, N), device=z.device, dtype=torch.float32) if has_bias else None
    _ln_bwd_kernel[(strips,)](dy, z, weight, mean, rstd, dz_extra, dz, dw_part, db_part, M, N, per_strip,
                              HAS_W=has_w, HAS_DB=bool(has_bias), HAS_DZE=dz_extra is not None,
                              BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"])
    dw = dw_part.sum(0).to(weight.dtype) if has_w else None
    db = db_part.sum(0).to(db_dtype) if has_bias else None
    return dz, dw, db


def compile_specs():
    """The launch configs used at BERT shapes (hidden 768 / 1024, bf16 and fp16, fp32 affine
    params), from the same ``row_config`` table the launchers use."""
    specs = []
    for N in (768, 1024):
        cfg = row_config(N)
        for dt in ("bf16", "fp16"):
            for res in (False, True):
                sig = {"X": f"*{dt}", "R": f"*{dt}" if res else "constexpr", "W": "*fp32", "B": "*fp32",
                       "Y": f"*{dt}", "Z": f"*{dt}" if res else "constexpr", "MEAN": "*fp32", "RSTD": "*fp32",
                       "M": "i32", "N": "i32", "eps": "fp32"}
                const = {"HAS_RES": res, "HAS_W": True, "HAS_B": True,
                         "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]}
                if not res:
                    const.update({"R": None, "Z": None})
                ptrs = [k for k in ("X", "R", "W", "B", "Y", "Z", "MEAN", "RSTD") if sig[k] != "constexpr"]
                specs.append(spec(f"layer_norm_fwd_{dt}_N{N}" + ("_residual" if res else ""), _ln_fwd_kernel,
                                  sig, const, cfg["num_warps"], divisible=ptrs + ["N"]))
            sig = {"DY": f"*{dt}", "Z": f"*{dt}", "W": "*fp32", "MEAN": "*fp32", "RSTD": "*fp32",
                   "DZE": f"*{dt}", "DZ": f"*{dt}", "DW_PART": "*fp32", "DB_PART": "*fp32", "M": "i32", "N": "i32",
                   "blocks_per_strip": "i32"}
            const = {"HAS_W": True, "HAS_DB": True, "HAS_DZE": True,
                     "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]}
            specs.append(spec(f"layer_norm_bwd_{dt}_N{N}", _ln_bwd_kernel, sig, const, cfg["num_warps"],
                              divisible=["DY", "Z", "W", "MEAN", "RSTD", "DZE", "DZ", "DW_PART", "DB_PART", "N"]))
    return specs
