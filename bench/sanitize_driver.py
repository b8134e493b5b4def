"""One call of every kernel of a backend, forward and backward, for compute-sanitizer and ncu.

    python -m bench.sanitize_driver [--backend cuda] [--shapes small|bert] [--dtypes fp32,fp16,bf16]
                                    [--device cuda] [--no-poison] [--list]

``bench.gpu_run`` runs it under ``compute-sanitizer --tool memcheck|racecheck|initcheck|synccheck``
(``--shapes small``: every template instance of every CUDA kernel, i.e. each dtype, the vectorised and
the scalar path (aligned and odd widths), every head dim, empty and length-1 sequences) and under ``ncu``
(``--shapes bert``: one call per op at BERT-base shapes, bf16). It calls the backend's primitives directly
(the functions of ``fastbert.registry.PRIMITIVES``, plus ``cross_entropy_rows`` where the backend has it),
so nothing but the kernels under test runs between the markers it prints:

    FB-CASE <name>                 before a case
    FB-CASE-OK <name> <ms>         after it, synchronised
    FB-CASE-NA <name> <reason>     the backend does not run these inputs (its ``unsupported()`` says why)
    FB-CASE-FAIL <name> <error>    it raised, or left an output non-finite (outputs start poisoned)
    FB-DRIVER-DONE ok=N na=N fail=N

Exit status 0 unless a case failed. ``--list`` prints the cases and the CUDA kernels each one launches.
Without a GPU (the dry run, CI) it runs on CPU with ``--backend torch`` (the reference), which checks the
driver itself.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Tuple

from bench.checkout import ensure_importable

ensure_importable()
import torch  # noqa: E402

from fastbert import registry  # noqa: E402
from fastbert import reference as R  # noqa: E402
from fastbert.testing import poisoned_allocations  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LN, LN_BWD, REDUCE = "fb::layer_norm_fwd_kernel", "fb::layer_norm_bwd_kernel", "fb::reduce_partials_kernel"


class NotApplicable(Exception):
    """The backend does not run these inputs."""


@dataclass
class Ctx:
    backend: str
    device: str
    dtype: torch.dtype
    bert: bool

    def mod(self, family: str):
        if self.backend == "cuda":
            return importlib.import_module("fastbert.cuda_backend")
        if self.backend == "cuda_host":
            return importlib.import_module("fastbert.cuda_host_backend")
        return importlib.import_module(registry.BACKENDS[self.backend].module.format(family=family))

    def prim(self, family: str, name: str, *args):
        mod = self.mod(family)
        fn = getattr(mod, name, None)
        if fn is None:
            raise NotApplicable(f"{self.backend} has no {name}")
        why = getattr(mod, "unsupported", lambda *a: None)(name, *args)
        if why:
            raise NotApplicable(why)
        return fn(*args)

    def randn(self, *shape, scale=1.0):
        return (torch.randn(*shape, device=self.device) * scale).to(self.dtype)


@dataclass
class DriverCase:
    name: str
    family: str
    kernels: Tuple[str, ...]          # CUDA kernels (base names) it launches on the cuda backend
    run: Callable[[Ctx], list]        # returns the outputs to check
    dtype_free: bool = False          # runs once (uint8 rows), not once per dtype


def _layer_norm(N, residual, affine):
    def run(c: Ctx):
        M = 4096 if c.bert else 9
        x, r = c.randn(M, N), (c.randn(M, N) if residual else None)
        w = torch.randn(N, device=c.device) if affine else None
        b = torch.randn(N, device=c.device) if affine == "both" else None
        y, z, mean, rstd = c.prim("layer_norm", "layer_norm_fwd", x, w, b, r, 1e-12)
        dy = c.randn(M, N)
        zz = z if z is not None else x
        grads = c.prim("layer_norm", "layer_norm_bwd", dy, zz, w, b is not None, mean, rstd,
                       c.randn(M, N) if residual else None)
        return [y, z, mean, rstd, *grads]
    return run


def _pointwise(family, N, bias, approximate):
    def run(c: Ctx):
        M = 4096 if c.bert else 9
        width = 2 * N if family == "geglu" else N
        x = c.randn(M, width)
        bv = torch.randn(width, device=c.device).to(c.dtype) if bias else None
        y = c.prim(family, f"{family}_fwd", x, bv, approximate)
        grads = c.prim(family, f"{family}_bwd", c.randn(*y.shape), x, bv, approximate)
        return [y, *grads]
    return run


def _padding(F, dtype=None):
    def run(c: Ctx):
        R_, T = (8192, 4096) if c.bert else (11, 7)
        dt = dtype or c.dtype
        x = torch.randint(0, 100, (R_, F), device=c.device).to(dt)
        idx = torch.randperm(R_, device=c.device)[:T].sort().values
        g = c.prim("padding", "index_gather_fwd", x, idx)
        s = c.prim("padding", "index_scatter_fwd", g, idx, R_)
        rest = torch.ones(R_, dtype=torch.bool, device=c.device)
        rest[idx] = False
        if not torch.equal(s[idx], x[idx]) or not torch.equal(g, x[idx]) or bool(s[rest].any()):
            raise AssertionError("gather/scatter did not copy the indexed rows (or left the others non-zero)")
        return []
    return run


def _ce_rows(V, grad):
    def run(c: Ctx):
        n = 1228 if c.bert else 5
        logits = c.randn(n, V, scale=2.0)
        t = torch.randint(0, V, (n,), device=c.device)
        mod = c.mod("mlm_loss")
        if not hasattr(mod, "cross_entropy_rows"):
            raise NotApplicable(f"{c.backend} has no cross_entropy_rows")
        return [mod.cross_entropy_rows(logits, t, 1.0 / n if grad else None), logits]
    return run


def _mlm(c: Ctx):
    T, H, V = (4096, 768, 30528) if c.bert else (20, 64, 100)
    h = c.randn(T, H)
    w, b = c.randn(V, H, scale=0.05), c.randn(V, scale=0.05)
    labels = torch.randint(0, V, (T,), device=c.device)
    labels[torch.rand(T, device=c.device) > 0.3] = -100
    return [t for t in c.prim("mlm_loss", "sparse_mlm_loss_fwd", h, labels, w, b, -100, True) if t is not None]


def _attention(D, alibi=True, window=None, long=False, bert_len=512):
    """long: a sequence past 128 tokens, so the CUDA backward takes its two-pass kernels (dq, dkdv) instead
    of the one-block-per-sequence kernel. bert_len: the longest sequence of the BERT shapes (lengths spread
    over [bert_len / 4, bert_len]; 8 sequences at 512, 32 at 128)."""
    def run(c: Ctx):
        if c.bert:
            g = torch.Generator().manual_seed(0)
            n = 8 * 512 // (4 * bert_len) if bert_len < 512 else 8
            seqlens, H = torch.randint(bert_len // 4, bert_len + 1, (n,), generator=g).tolist(), 12
        else:
            seqlens, H = ([150, 17, 1, 0] if long else [17, 1, 0, 40]), 2
        cu = torch.zeros(len(seqlens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(seqlens, dtype=torch.int32), 0)
        cu = cu.to(c.device)
        T, ms = int(cu[-1]), max(seqlens)
        q, k, v = (c.randn(T, H, D) for _ in range(3))
        slopes = R.alibi_slopes(H).to(c.device).expand(len(seqlens), H).contiguous() if alibi else None
        extra = ()
        if window is not None:
            if "window_size" not in inspect.signature(getattr(c.mod("attention"), "flash_attn_fwd")).parameters:
                raise NotApplicable(f"{c.backend}'s flash_attn_fwd has no window_size yet")
            extra = (window,)
        out, lse = c.prim("attention", "flash_attn_fwd", q, k, v, cu, ms, slopes, D ** -0.5, *extra)
        grads = c.prim("attention", "flash_attn_bwd", c.randn(T, H, D), q, k, v, out, lse, cu, ms, slopes,
                       D ** -0.5, *extra)
        return [out, lse, *grads]
    return run


ATT_FWD = "fb::attn::flash_attn_fwd_kernel"
ATT = (ATT_FWD, "fb::attn::flash_attn_bwd_dq_kernel", "fb::attn::flash_attn_bwd_dkdv_kernel")  # two-pass backward
ATT_SHORT = (ATT_FWD, "fb::attn::flash_attn_bwd_short_kernel")  # max_seqlen <= 128, head dim <= 64
PW = {f: (f"fb::{f}_fwd_kernel", f"fb::{f}_bwd_kernel", REDUCE) for f in ("bias_gelu", "geglu")}
SMALL_CASES: List[DriverCase] = [
    DriverCase("layer_norm/residual+affine/N64", "layer_norm", (LN, LN_BWD, REDUCE), _layer_norm(64, True, "both")),
    DriverCase("layer_norm/weight-only/N37", "layer_norm", (LN, LN_BWD, REDUCE), _layer_norm(37, False, "weight")),
    DriverCase("bias_gelu/bias/N64", "bias_gelu", PW["bias_gelu"], _pointwise("bias_gelu", 64, True, "none")),
    DriverCase("bias_gelu/tanh-nobias/N37", "bias_gelu", PW["bias_gelu"][:2], _pointwise("bias_gelu", 37, False, "tanh")),
    DriverCase("geglu/bias/N64", "geglu", PW["geglu"], _pointwise("geglu", 64, True, "none")),
    DriverCase("geglu/tanh-nobias/N37", "geglu", PW["geglu"][:2], _pointwise("geglu", 37, False, "tanh")),
    DriverCase("padding/F64", "padding", ("fb::copy_rows_kernel",), _padding(64)),
    # 16-, 8-, 4-, 2- and 1-byte copies (uint8 rows; checked exactly, not poisoned: uint8 has no poison value)
    *[DriverCase(f"padding/bytes{b}", "padding", ("fb::copy_rows_kernel",), _padding(b, torch.uint8), True)
      for b in (32, 24, 12, 6, 3)],
    DriverCase("ce_rows/V64/grad", "mlm_loss", ("fb::cross_entropy_rows_kernel",), _ce_rows(64, True)),
    DriverCase("ce_rows/V37/loss-only", "mlm_loss", ("fb::cross_entropy_rows_kernel",), _ce_rows(37, False)),
    DriverCase("mlm_loss/sparse", "mlm_loss", ("fb::cross_entropy_rows_kernel",), _mlm),
    *[DriverCase(f"attention/D{d}", "attention", ATT_SHORT, _attention(d)) for d in (32, 64)],
    DriverCase("attention/D128", "attention", ATT, _attention(128)),
    *[DriverCase(f"attention/D{d}/long", "attention", ATT, _attention(d, long=True)) for d in (32, 64)],
    DriverCase("attention/D64/no-alibi", "attention", ATT_SHORT, _attention(64, alibi=False)),
    DriverCase("attention/D64/window", "attention", ATT_SHORT, _attention(64, window=(8, 8))),
    DriverCase("attention/D64/window/long", "attention", ATT, _attention(64, window=(8, 8), long=True)),
]
BERT_CASES: List[DriverCase] = [
    DriverCase("layer_norm+residual/768", "layer_norm", (LN, LN_BWD, REDUCE), _layer_norm(768, True, "both")),
    DriverCase("bias_gelu/3072", "bias_gelu", PW["bias_gelu"], _pointwise("bias_gelu", 3072, True, "none")),
    DriverCase("geglu/3072", "geglu", PW["geglu"], _pointwise("geglu", 3072, True, "none")),
    DriverCase("padding/768", "padding", ("fb::copy_rows_kernel",), _padding(768)),
    DriverCase("ce_rows/30528", "mlm_loss", ("fb::cross_entropy_rows_kernel",), _ce_rows(30528, True)),
    DriverCase("mlm_loss/sparse/30528", "mlm_loss", ("fb::cross_entropy_rows_kernel",), _mlm),
    DriverCase("attention/D64/S512", "attention", ATT, _attention(64)),
    DriverCase("attention/D64/S128", "attention", ATT_SHORT, _attention(64, bert_len=128)),
]


def cases(shapes: str) -> List[DriverCase]:
    return BERT_CASES if shapes == "bert" else SMALL_CASES


def run_case(case: DriverCase, c: Ctx, poison: bool) -> Tuple[str, str]:
    """("ok", ms) | ("na", reason) | ("fail", error)."""
    t0 = time.perf_counter()
    poison = poison and not case.dtype_free
    try:
        with (poisoned_allocations() if poison else _nothing()):
            outs = case.run(c)
        if c.device == "cuda":
            torch.cuda.synchronize()
    except NotApplicable as e:
        return "na", str(e)
    except Exception as e:  # noqa: BLE001 - reported per case; the driver goes on with the next one
        return "fail", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
    for i, t in enumerate(outs):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            return "fail", f"output {i} has non-finite values (unwritten or overflow)"
    return "ok", f"{(time.perf_counter() - t0) * 1e3:.1f}"


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sanitize_driver", description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="cuda", help="comma-separated backends (cuda, triton, torch, cuda_host)")
    ap.add_argument("--shapes", choices=("small", "bert"), default="small")
    ap.add_argument("--dtypes", default=None, help="comma-separated of fp32,fp16,bf16 (default: all; bert: bf16)")
    ap.add_argument("--device", default=None, help="default: cuda when a GPU is visible, else cpu")
    ap.add_argument("--no-poison", action="store_true", help="do not poison outputs (initcheck must see unwritten memory)")
    ap.add_argument("--repeat", type=int, default=1, help="calls per case (ncu: 2, so Triton's compile is not profiled alone)")
    ap.add_argument("--list", action="store_true", help="print the cases and the CUDA kernels each launches, as JSON")
    args = ap.parse_args(argv)
    todo = cases(args.shapes)
    if args.list:
        print(json.dumps([{"name": c.name, "family": c.family, "kernels": list(c.kernels)} for c in todo], indent=1))
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dts = (args.dtypes or ("bf16" if args.shapes == "bert" else "fp32,fp16,bf16")).split(",")
    counts = {"ok": 0, "na": 0, "fail": 0}
    torch.manual_seed(0)
    for backend in args.backend.split(","):
        for case in todo:
            for dt in (dts[:1] if case.dtype_free else dts):
                name = f"{backend}:{case.name}:{'u8' if case.dtype_free else dt}"
                ctx = Ctx(backend, device, DTYPES[dt], args.shapes == "bert")
                for _ in range(max(args.repeat, 1)):
                    print(f"FB-CASE {name}", flush=True)
                    status, detail = run_case(case, ctx, poison=not args.no_poison)
                    print(f"FB-CASE-{status.upper()} {name} {detail}", flush=True)
                counts[status] += 1
    print(f"FB-DRIVER-DONE ok={counts['ok']} na={counts['na']} fail={counts['fail']}", flush=True)
    return 1 if counts["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
