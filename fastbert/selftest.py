"""``python -m fastbert.selftest``: every op on every backend that can run here, against the reference.

Each op runs forward and backward through ``fastbert.ops`` with the backend forced, on fresh random
inputs of awkward sizes, and is compared with the fp64 reference under the tolerance rule of
``fastbert.testing``. Prints a table; exits non-zero if any available backend disagrees.

On a machine without a GPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1 is set
here before triton is imported) and the CUDA kernels can be run through their host build with
``--cuda-host`` (compiles with g++ on first use).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from fastbert.testing import enable_triton_interpreter_if_no_gpu, patch_triton_interpreter_bf16_dot

_INTERPRET = enable_triton_interpreter_if_no_gpu()

import fastbert  # noqa: E402
from fastbert import ops as O  # noqa: E402
from fastbert import reference as R  # noqa: E402
from fastbert.registry import BackendUnavailableError  # noqa: E402
from fastbert.testing import assert_close, rel_error  # noqa: E402


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(t.is_floating_point()) for t in ts]


def _case_attention(dev, dtype):
    seqlens = [1, 7, 0, 33]
    cu = torch.tensor([0] + torch.tensor(seqlens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    T, H, D = sum(seqlens), 3, 64
    q, k, v = (torch.randn(T, H, D, device=dev).to(dtype) for _ in range(3))
    slopes = R.alibi_slopes(H).to(dev)
    return ((q, k, v), lambda a, b, c: O.flash_attn_varlen_alibi(a, b, c, cu, max(seqlens), slopes),
            lambda a, b, c: R.flash_attn_varlen_alibi(a, b, c, cu, max(seqlens), slopes))


def _case_attention_window(dev, dtype):
    """Local attention: a window smaller than the kernels' blocks, asymmetric, over several blocks."""
    seqlens = [1, 0, 150]
    cu = torch.tensor([0] + torch.tensor(seqlens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    q, k, v = (torch.randn(sum(seqlens), 2, 64, device=dev).to(dtype) for _ in range(3))
    slopes, w = R.alibi_slopes(2).to(dev), (9, 30)
    return ((q, k, v), lambda a, b, c: O.flash_attn_varlen_alibi(a, b, c, cu, 150, slopes, window_size=w),
            lambda a, b, c: R.flash_attn_varlen_alibi(a, b, c, cu, 150, slopes, window_size=w))


def _case_layer_norm(dev, dtype):
    x, r = (torch.randn(37, 1000, device=dev).to(dtype) for _ in range(2))
    w, b = torch.randn(1000, device=dev), torch.randn(1000, device=dev)

    def run(fn):
        return lambda x_, r_, w_, b_: torch.cat([t.flatten() for t in fn(x_, w_, b_, 1e-5, residual=r_)])
    return (x, r, w, b), run(O.layer_norm), run(R.layer_norm)


def _case_bias_gelu(dev, dtype):
    x, b = torch.randn(37, 768, device=dev).to(dtype), torch.randn(768, device=dev)
    return (x, b), lambda a, c: O.bias_gelu(a, c), lambda a, c: R.bias_gelu(a, c)


def _case_geglu(dev, dtype):
    x, b = torch.randn(37, 2 * 384, device=dev).to(dtype), torch.randn(2 * 384, device=dev)
    return (x, b), lambda a, c: O.geglu(a, c), lambda a, c: R.geglu(a, c)


def _case_padding(dev, dtype):
    mask = torch.rand(5, 19, device=dev) > 0.4
    mask[2] = False
    h = torch.randn(5, 19, 96, device=dev).to(dtype)

    def run(unpad, pad):
        def f(x):
            u, idx, _, _ = unpad(x, mask)
            return torch.cat([u.flatten(), pad(u * 2, idx, 5, 19).flatten()])
        return f
    return (h,), run(O.unpad_input, O.pad_input), run(R.unpad_input, R.pad_input)


def _case_mlm_loss(dev, dtype):
    h = torch.randn(61, 128, device=dev).to(dtype)
    W = (torch.randn(1000, 128, device=dev) * 0.05).to(dtype)
    labels = torch.where(torch.rand(61, device=dev) < 0.3, torch.randint(0, 1000, (61,), device=dev), -100)
    return (h, W), lambda a, c: O.sparse_mlm_loss(a, labels, c), lambda a, c: R.sparse_mlm_loss(a, labels, c)


CASES = {"attention": _case_attention, "attention_window": _case_attention_window, "layer_norm": _case_layer_norm,
         "bias_gelu": _case_bias_gelu, "geglu": _case_geglu, "padding": _case_padding, "mlm_loss": _case_mlm_loss}
FAMILY = {"attention_window": "attention"}  # cases that exercise an option of another family's op


def check(family: str, backend: str, dev: str, dtype: torch.dtype):
    """Run one op on one backend; returns (status, detail, seconds)."""
    inputs, fast, ref = CASES[family](dev, dtype)
    a = _leaves(*inputs)
    t0 = time.perf_counter()
    try:
        with fastbert.use_backend(**{FAMILY.get(family, family): backend}):
            out = fast(*a)
            grad_out = torch.randn_like(out.float()).to(out.dtype) if out.dim() else torch.ones_like(out)
            grads = torch.autograd.grad(out, [t for t in a if t.requires_grad], grad_out)
    except BackendUnavailableError as e:
        reason = str(e).split(f"on {dev}: ", 1)[-1]
        return "skip", reason.split(" (")[0].split(" [")[0][:100], 0.0
    dt = time.perf_counter() - t0
    r64 = _leaves(*[t.double() if t.is_floating_point() else t for t in inputs])
    ref_out = ref(*r64)
    ref_grads = torch.autograd.grad(ref_out, [t for t in r64 if t.requires_grad], grad_out.double())
    peer_in = _leaves(*inputs)
    peer_out = ref(*peer_in)
    peer_grads = torch.autograd.grad(peer_out, [t for t in peer_in if t.requires_grad], grad_out)
    try:
        assert_close(out, ref_out, peer_out, factor=2.0, name="forward")
        for i, (g, rg, pg) in enumerate(zip(grads, ref_grads, peer_grads)):
            assert_close(g, rg, pg, factor=3.0, name=f"grad[{i}]")
    except AssertionError as e:
        return "FAIL", str(e)[:200], dt
    err = max([rel_error(out, ref_out)] + [rel_error(g, rg) for g, rg in zip(grads, ref_grads)])
    return "ok", f"max rel err {err:.1e}", dt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cuda-host", action="store_true", help="also run the CUDA kernels' host build (g++)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    args = p.parse_args(argv)
    if _INTERPRET:
        patch_triton_interpreter_bf16_dot()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"fastbert {fastbert.__version__}, torch {torch.__version__}, device {dev}"
          + (" (Triton under the interpreter)" if _INTERPRET else ""))
    print(fastbert.backends(dev))
    names = ["torch", "cpu", "triton", "cuda"] + (["cuda_host"] if args.cuda_host else [])
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    rows, failed = [], 0
    for fam in CASES:
        for be in names:
            for dt in dtypes:
                torch.manual_seed(0)
                status, detail, secs = check(fam, be, dev, dt)
                failed += status == "FAIL"
                rows.append((fam, be, str(dt).replace("torch.", ""), status, detail, secs))
    print("\n| op | backend | dtype | status | detail | s |\n|---|---|---|---|---|---|")
    for fam, be, dt, st, det, secs in rows:
        print(f"| {fam} | {be} | {dt} | {st} | {det} | {secs:.2f} |")
    ran = sum(r[3] != "skip" for r in rows)
    print(f"\n{ran - failed} passed, {failed} failed, {len(rows) - ran} skipped (backend unavailable here)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
