"""Every hard limit of a backend goes through its ``unsupported()`` (issue 22.5): ``auto`` moves on to a
backend that can run the call, and a forced backend raises ``BackendUnavailableError`` naming the limit,
never a launch failure deep inside a kernel.

Limits that cheap inputs reach (65,536 sequences, 65,536 heads) run end to end on real tensors. Limits
of 32-bit index arithmetic would need tensors of 2^31 elements: those go through the registry with
``meta`` tensors, which carry shapes and dtypes but no data (``unsupported`` reads only metadata).
"""
import sys
import types

import pytest
import torch

import fastbert
from fastbert import _cuda_common, registry
from fastbert import ops as O
from fastbert import reference as R

CPU = torch.device("cpu")
_CPU_BACKENDS = [n for n, be in registry.BACKENDS.items() if be.why_not(CPU) is None]


def _kernel_backends(*names):
    return [n for n in names if n in _CPU_BACKENDS]


def _resolve_forced(backend, primitive, args, dtype):
    with fastbert.use_backend(backend):
        return registry.resolve(primitive, CPU, args, dtype)


def _refuses(backend, primitive, args, dtype, match):
    """The forced backend refuses naming the limit; auto, trying it first, moves on to torch."""
    with pytest.raises(registry.BackendUnavailableError, match=match):
        _resolve_forced(backend, primitive, args, dtype)
    order = registry.AUTO_ORDER["cpu"]
    registry.AUTO_ORDER["cpu"] = (backend, "torch")
    try:
        assert registry.resolve(primitive, CPU, args, dtype) == "torch"
    finally:
        registry.AUTO_ORDER["cpu"] = order


def _attn_dtype(backend):
    return torch.bfloat16 if backend == "cuda_host" else torch.float32


# ------------------------------------------------------------------ grid axes y/z, end to end
@pytest.mark.parametrize("backend", _kernel_backends("triton", "cuda_host"))
def test_more_sequences_than_grid_axis_allows(backend, monkeypatch):
    dt = _attn_dtype(backend)
    B = 65536  # one token, then 65,535 empty sequences: cheap, and one past the limit
    cu = torch.ones(B + 1, dtype=torch.int32)
    cu[0] = 0
    q, k, v = (torch.randn(1, 2, 32).to(dt) for _ in range(3))
    with fastbert.use_backend(backend):
        with pytest.raises(registry.BackendUnavailableError, match="at most 65535 sequences, got 65536"):
            O.flash_attn_varlen_alibi(q, k, v, cu, 1)
    monkeypatch.setitem(registry.AUTO_ORDER, "cpu", (backend, "torch"))
    out = O.flash_attn_varlen_alibi(q, k, v, cu, 1)  # auto: the next backend runs it
    torch.testing.assert_close(out, R.flash_attn_varlen_alibi(q, k, v, cu, 1))


@pytest.mark.parametrize("backend", _kernel_backends("triton", "cuda_host"))
def test_more_heads_than_grid_axis_allows(backend, monkeypatch):
    dt = _attn_dtype(backend)
    q = torch.randn(1, 65536, 32).to(dt)
    cu = torch.tensor([0, 1], dtype=torch.int32)
    with fastbert.use_backend(backend):
        with pytest.raises(registry.BackendUnavailableError, match="at most 65535 heads, got 65536"):
            O.flash_attn_varlen_alibi(q, q, q, cu, 1)
    monkeypatch.setitem(registry.AUTO_ORDER, "cpu", (backend, "torch"))
    torch.testing.assert_close(O.flash_attn_varlen_alibi(q, q, q, cu, 1), q)  # one key: out = v


# ------------------------------------------------------------------ 32-bit index limits, with meta tensors
def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device="meta")


def _attn_args(T, H, D, B, dtype):
    q = _meta(T, H, D, dtype=dtype)
    return (q, q, q, _meta(B + 1, dtype=torch.int32), 1, None, 1.0)


def _attn_bwd_args(T, H, D, B, dtype):
    q = _meta(T, H, D, dtype=dtype)
    return (q, q, q, q, q, _meta(H, T, dtype=torch.float32), _meta(B + 1, dtype=torch.int32), 1, None, 1.0)


LIMITS = [
    # (backend, primitive, args, dtype, the words of the reason)
    ("cuda_host", "flash_attn_bwd", _attn_bwd_args(2**24, 2, 64, 1, torch.bfloat16), torch.bfloat16,
     r"32-bit offsets: T \* H \* D < 2\^31"),
    ("cuda_host", "flash_attn_fwd", _attn_args(2**24, 2, 64, 1, torch.bfloat16), torch.bfloat16,
     r"T \* H \* D < 2\^31"),  # the forward refuses too: its backend runs the backward
    ("cuda_host", "flash_attn_fwd", _attn_args(8, 2, 64, 1, torch.float32), torch.float32, "float16 and bfloat16"),
    ("cuda_host", "flash_attn_fwd", _attn_args(8, 2, 64, 1, torch.bfloat16)[:6] + (-0.5,), torch.bfloat16,
     "softmax_scale > 0, got -0.5"),
    ("cuda_host", "flash_attn_bwd", _attn_bwd_args(8, 2, 64, 1, torch.bfloat16)[:9] + (0.0,), torch.bfloat16,
     "softmax_scale > 0, got 0.0"),
    ("cuda_host", "bias_gelu_fwd", (_meta(2**31, 1), None, "none"), torch.bfloat16, "32-bit ints"),
    ("cuda_host", "geglu_bwd", (_meta(1, 2**31), _meta(1, 2**32), None, "none"), torch.bfloat16, "32-bit ints"),
    ("cuda_host", "layer_norm_fwd", (_meta(2**31, 8), None, None, None, 1e-5), torch.bfloat16, "32-bit ints"),
    ("cuda_host", "layer_norm_fwd", (_meta(4, _cuda_common.LN_MAX_N + 1), None, None, None, 1e-5), torch.bfloat16,
     f"N <= {_cuda_common.LN_MAX_N}"),
    ("cuda_host", "sparse_mlm_loss_fwd", (_meta(4, 8), _meta(4, dtype=torch.int64), _meta(2**31, 8), None, -100,
                                          True), torch.bfloat16, "weight has shape"),
    ("cuda_host", "bias_gelu_fwd", (_meta(4, 8, dtype=torch.float64), None, "none"), torch.float64, "float64"),
    ("triton", "flash_attn_fwd", _attn_args(2**30, 2, 32, 1, torch.bfloat16), torch.bfloat16,
     r"lse \[H, T\] with 32-bit offsets"),
    ("triton", "flash_attn_bwd", _attn_bwd_args(2**30, 2, 32, 1, torch.bfloat16), torch.bfloat16,
     r"H \* T < 2\^31"),
    ("triton", "bias_gelu_fwd", (_meta(1, 65535 * 1024 + 1), None, "none"), torch.bfloat16,
     "column tiles on grid axis 1"),
    ("triton", "geglu_fwd", (_meta(1, 2 * (65535 * 1024 + 1)), None, "none"), torch.bfloat16, "grid axis 1"),
    ("triton", "index_gather_fwd", (_meta(4, 65535 * 1024 + 1), _meta(2, dtype=torch.int64)), torch.bfloat16,
     "grid axis 1"),
    ("triton", "index_scatter_fwd", (_meta(2**31, 1), _meta(2**31, dtype=torch.int64), 2**31), torch.bfloat16,
     "int32"),
    ("triton", "layer_norm_fwd", (_meta(4, 8193), None, None, None, 1e-5), torch.bfloat16, "8192"),
    ("triton", "bias_gelu_fwd", (_meta(4, 8, dtype=torch.float64), None, "none"), torch.float64, "float64"),
]


@pytest.mark.parametrize("backend,primitive,args,dtype,match", [c for c in LIMITS if c[0] in _CPU_BACKENDS],
                         ids=[f"{c[0]}-{c[1]}-{c[4][:24]}" for c in LIMITS if c[0] in _CPU_BACKENDS])
def test_limit_goes_through_unsupported(backend, primitive, args, dtype, match):
    _refuses(backend, primitive, args, dtype, match)


def test_limits_just_inside_are_accepted():
    """The limits are not off by one: the largest accepted size of each passes."""
    assert _cuda_common.attn_unsupported("flash_attn_fwd", *_attn_args(2**24 - 1, 2, 64, 65535, torch.bfloat16)) is None
    assert _cuda_common.unsupported("bias_gelu_fwd", _meta(2**31 - 1, 1), None, "none") is None
    from fastbert.kernels import _common, attention
    assert attention.unsupported("flash_attn_fwd", *_attn_args(2**30 - 1, 2, 32, 65535, torch.bfloat16)) is None
    assert _common.unsupported_elementwise("bias_gelu_fwd", _meta(1, 65535 * 1024), None, "none") is None


def test_cuda_needs_sm80(monkeypatch):
    """The extension is built for sm_80 / sm_90: an older GPU is refused by why_not, not by a launch error."""
    from fastbert import cuda_backend
    monkeypatch.setitem(sys.modules, "fastbert._C", types.ModuleType("fastbert._C"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert "compute capability 8.0 or newer, got 7.5" in cuda_backend.why_not(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert cuda_backend.why_not(torch.device("cuda")) is None
