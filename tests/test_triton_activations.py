"""Triton bias-GELU and GeGLU (kernels/bias_gelu.py, kernels/geglu.py) against the reference, under the
interpreter on CPU: forward and backward, erf and tanh GELU, with and without the fused bias, outputs
NaN-poisoned, tolerance per fastbert.testing (peer: the reference in the same dtype)."""
import os

import torch

if not torch.cuda.is_available():  # conftest does the same; kept so the file runs on its own
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastbert.kernels.bias_gelu as BG  # noqa: E402
import fastbert.kernels.geglu as GG  # noqa: E402
from fastbert import reference as R  # noqa: E402
from fastbert.testing import assert_close, count_calls, double_or_none as _d, poisoned_allocations  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


# (M, N, dtype, approximate, bias): odd row counts, hidden sizes incl. non-powers of two, and
# N > 1024 so a row spans several column tiles.
CASES = [
    (1, 768, torch.bfloat16, "none", True),
    (7, 1000, torch.float32, "none", True),
    (7, 1000, torch.bfloat16, "tanh", True),
    (257, 64, torch.float32, "tanh", False),
    (257, 96, torch.bfloat16, "none", True),
    (3, 1500, torch.float32, "none", False),
]


def _inputs(M, N, dtype, bias):
    x = (2.0 * torch.randn(M, N, device=DEV)).to(dtype)
    b = torch.randn(N, device=DEV).to(dtype) if bias else None
    dy = torch.randn(M, N, device=DEV).to(dtype)
    return x, b, dy


@pytest.mark.parametrize("M,N,dtype,approximate,bias", CASES)
def test_bias_gelu(M, N, dtype, approximate, bias):
    x, b, dy = _inputs(M, N, dtype, bias)
    x0 = x.clone()
    with poisoned_allocations():
        y = BG.bias_gelu_fwd(x, b, approximate)
    ref = R.bias_gelu_fwd(_d(x), _d(b), approximate)
    # peer: PyTorch's eager GELU in the same dtype on the same pre-activation
    peer = F.gelu(x + b if b is not None else x, approximate=approximate)
    assert_close(y, ref, peer=peer, name="y")
    assert y.dtype == dtype

    with poisoned_allocations():
        dx, db = BG.bias_gelu_bwd(dy, x, b, approximate)
    ref_dx, ref_db = R.bias_gelu_bwd(_d(dy), _d(x), _d(b), approximate)
    peer_dx, peer_db = R.bias_gelu_bwd(dy, x, b, approximate)
    assert_close(dx, ref_dx, peer=peer_dx, factor=3, name="dx")
    if b is None:
        assert db is None
    else:
        assert db.dtype == b.dtype
        assert_close(db, ref_db, peer=peer_db, factor=3, name="dbias")
    assert torch.equal(x, x0)


@pytest.mark.parametrize("M,N,dtype,approximate,bias", CASES)
def test_geglu(M, N, dtype, approximate, bias):
    x, b, _ = _inputs(M, 2 * N, dtype, bias)
    dy = torch.randn(M, N, device=DEV).to(dtype)
    with poisoned_allocations():
        y = GG.geglu_fwd(x, b, approximate)
    ref = R.geglu_fwd(_d(x), _d(b), approximate)
    h = x + b if b is not None else x
    peer = F.gelu(h[:, :N], approximate=approximate) * h[:, N:]  # eager PyTorch in the same dtype
    assert_close(y, ref, peer=peer, name="y")
    assert y.shape == (M, N) and y.dtype == dtype

    with poisoned_allocations():
        dx, db = GG.geglu_bwd(dy, x, b, approximate)
    ref_dx, ref_db = R.geglu_bwd(_d(dy), _d(x), _d(b), approximate)
    peer_dx, peer_db = R.geglu_bwd(dy, x, b, approximate)
    assert dx.shape == (M, 2 * N)
    assert_close(dx[:, :N], ref_dx[:, :N], peer=peer_dx[:, :N], factor=3, name="dx (gelu half)")
    assert_close(dx[:, N:], ref_dx[:, N:], peer=peer_dx[:, N:], factor=3, name="dx (gate half)")
    if b is None:
        assert db is None
    else:
        assert_close(db, ref_db, peer=peer_db, factor=3, name="dbias")


def test_gelu_extremes_saturate():
    """Large |x|: the tanh written through exp must saturate (no inf/inf NaN), erf likewise."""
    x = torch.tensor([[-100.0, -30.0, -8.0, -1e-4, 0.0, 1e-4, 8.0, 30.0, 100.0]], device=DEV)
    for approximate in ("none", "tanh"):
        y = BG.bias_gelu_fwd(x, None, approximate)
        ref = R.bias_gelu_fwd(x.double(), None, approximate)
        assert_close(y, ref, peer=F.gelu(x, approximate=approximate), name=f"gelu {approximate}")
        dx, _ = BG.bias_gelu_bwd(torch.ones_like(x), x, None, approximate)
        ref_dx, _ = R.bias_gelu_bwd(torch.ones_like(x).double(), x.double(), None, approximate)
        assert_close(dx, ref_dx, peer=R.bias_gelu_bwd(torch.ones_like(x), x, None, approximate)[0],
                     factor=3, name=f"gelu' {approximate}")


def test_bf16_rounds_to_nearest_even():
    """bias-GELU of bf16 [[3.0]] is exactly 3.0 (gelu(3) = 2.99595 rounds up), as on a GPU: the interpreter
    truncated fp32 -> bf16 (2.984375) until tests/conftest.py patched its conversions (issue 22.6)."""
    x = torch.tensor([[3.0, -0.5, 1.0e-3, 80.0]], device=DEV).to(torch.bfloat16)
    y = BG.bias_gelu_fwd(x, None, "none")
    assert y[0, 0].item() == 3.0
    assert torch.equal(y, F.gelu(x.float()).to(torch.bfloat16))  # PyTorch: fp32 math, one RNE rounding


def test_bad_arguments():
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match="approximate"):
        BG.bias_gelu_fwd(x, None, "erf")
    with pytest.raises(ValueError, match="x: GeGLU needs an even last dim"):
        GG.geglu_fwd(torch.randn(2, 5), None, "none")
    assert "fp32/bf16/fp16" in BG.unsupported("bias_gelu_fwd", x.double(), None, "none")


def test_activations_through_ops_backend(monkeypatch):
    """End to end through fastbert.ops with the triton backend forced: forward and autograd."""
    import fastbert
    from fastbert.ops import bias_gelu, geglu

    bg_calls = count_calls(monkeypatch, BG, "bias_gelu_fwd", "bias_gelu_bwd")
    gg_calls = count_calls(monkeypatch, GG, "geglu_fwd", "geglu_bwd")
    x = torch.randn(2, 3, 64, device=DEV, requires_grad=True)
    b = torch.randn(64, device=DEV, requires_grad=True)
    for op, ref_op, n_out in ((bias_gelu, R.bias_gelu, 64), (geglu, R.geglu, 32)):
        w = torch.randn(n_out, device=DEV)
        with fastbert.use_backend("triton"):
            y = op(x, b)
            (y * w).sum().backward()
        gx, gb = x.grad.clone(), b.grad.clone()
        x.grad = None
        b.grad = None
        y2 = ref_op(x, b)
        (y2 * w).sum().backward()
        torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gb, b.grad, rtol=1e-4, atol=1e-4)
        x.grad = None
        b.grad = None
    assert bg_calls == {"bias_gelu_fwd": 1, "bias_gelu_bwd": 1}, bg_calls
    assert gg_calls == {"geglu_fwd": 1, "geglu_bwd": 1}, gg_calls
