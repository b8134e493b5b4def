"""The public ops: dispatch, validation messages, torch.library registration, torch.compile."""
import math

import pytest
import torch

import fastbert
from fastbert import ops as O
from fastbert import reference as R
from fastbert.registry import BackendUnavailableError
from fastbert.testing import assert_close


def _attn_inputs(seqlens=(3, 0, 5), H=2, D=32, dtype=torch.float32, requires_grad=False):
    T = sum(seqlens)
    cu = torch.tensor([0] + list(torch.tensor(seqlens).cumsum(0)), dtype=torch.int32)
    q, k, v = (torch.randn(T, H, D, dtype=dtype, requires_grad=requires_grad) for _ in range(3))
    return q, k, v, cu, max(seqlens)


# ------------------------------------------------------------------ ops == reference, fwd and bwd (fp64)
def test_ops_gradcheck_fp64():
    q, k, v, cu, ms = _attn_inputs((2, 3), H=2, D=32, dtype=torch.float64, requires_grad=True)
    slopes = O.alibi_slopes(2)
    assert torch.autograd.gradcheck(lambda a, b, c: O.flash_attn_varlen_alibi(a, b, c, cu, ms, slopes), (q, k, v))
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: O.layer_norm(a[0], a[1], a[2], 1e-5, residual=a[3]), (x, w, b, r))
    assert torch.autograd.gradcheck(lambda a, c: O.bias_gelu(a, c), (x, b))
    assert torch.autograd.gradcheck(lambda a, c: O.geglu(a, c, "tanh"), (x, b))
    h = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    W = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(6, dtype=torch.float64, requires_grad=True)
    lab = torch.tensor([1, -100, 5, 0, -100])
    assert torch.autograd.gradcheck(lambda a, c, d: O.sparse_mlm_loss(a, lab, c, d), (h, W, bb))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    hid = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: O.pad_input(O.unpad_input(a, mask)[0] * 2, O.unpad_input(a, mask)[1], 2, 3), (hid,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_match_reference_in_low_precision(dtype):
    x = torch.randn(2, 7, 96).to(dtype)
    w, b = torch.randn(96), torch.randn(96)
    y = O.layer_norm(x, w, b, 1e-5)
    assert y.dtype == dtype
    ref = R.layer_norm(x.double(), w.double(), b.double(), 1e-5)
    assert_close(y, ref, peer=torch.nn.functional.layer_norm(x, (96,), w.to(dtype), b.to(dtype), 1e-5))


def test_unpad_one_sync_and_empty_sequence():
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    hidden = torch.randn(3, 4, 2, 5)
    x, idx, cu, ms = O.unpad_input(hidden, mask)
    assert x.shape == (4, 2, 5) and cu.tolist() == [0, 3, 3, 4] and ms == 3
    torch.testing.assert_close(x, hidden.flatten(0, 1)[idx])
    back = O.pad_input(x, idx, 3, 4)
    torch.testing.assert_close(back, hidden * mask[..., None, None])


# ------------------------------------------------------------------ bad input
def test_attention_bad_inputs():
    q, k, v, cu, ms = _attn_inputs()
    with pytest.raises(TypeError, match="cu_seqlens"):
        O.flash_attn_varlen_alibi(q, k, v, cu.long(), ms)
    with pytest.raises(ValueError, match=r"cu_seqlens\[0\]"):
        O.flash_attn_varlen_alibi(q, k, v, cu + 1, ms)
    with pytest.raises(ValueError, match="non-decreasing"):
        O.flash_attn_varlen_alibi(q, k, v, torch.tensor([0, 5, 3, 8], dtype=torch.int32), ms)
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\]"):
        O.flash_attn_varlen_alibi(q, k, v, torch.tensor([0, 3, 3, 7], dtype=torch.int32), ms)
    with pytest.raises(ValueError, match="max_seqlen"):
        O.flash_attn_varlen_alibi(q, k, v, cu, 2)
    with pytest.raises(TypeError, match="max_seqlen"):
        O.flash_attn_varlen_alibi(q, k, v, cu, torch.tensor(5))
    with pytest.raises(ValueError, match="head dim"):
        O.flash_attn_varlen_alibi(q[..., :20], k[..., :20], v[..., :20], cu, ms)
    with pytest.raises(TypeError, match="k: expected dtype"):
        O.flash_attn_varlen_alibi(q, k.half(), v, cu, ms)
    with pytest.raises(ValueError, match="v: expected shape"):
        O.flash_attn_varlen_alibi(q, k, v[:-1], cu, ms)
    with pytest.raises(ValueError, match="q: expected a 3-D"):
        O.flash_attn_varlen_alibi(q[0], k, v, cu, ms)
    with pytest.raises(ValueError, match="q: expected the last dim to be contiguous"):
        qt = torch.randn(q.shape[0], q.shape[1], 64)[..., ::2]
        O.flash_attn_varlen_alibi(qt, k, v, cu, ms)
    with pytest.raises(ValueError, match="alibi_slopes"):
        O.flash_attn_varlen_alibi(q, k, v, cu, ms, torch.ones(5))
    with pytest.raises(TypeError, match="alibi_slopes"):
        O.flash_attn_varlen_alibi(q, k, v, cu, ms, torch.ones(2, dtype=torch.float64))
    with pytest.raises(TypeError, match="q: expected dtype"):
        O.flash_attn_varlen_alibi(q.long(), k.long(), v.long(), cu, ms)


def test_pointwise_bad_inputs():
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="bias: expected shape"):
        O.bias_gelu(x, torch.randn(5))
    with pytest.raises(ValueError, match="approximate"):
        O.bias_gelu(x, None, "sigmoid")
    with pytest.raises(TypeError, match="x: expected dtype"):
        O.bias_gelu(x.long())
    with pytest.raises(ValueError, match="x: expected an even last dim"):
        O.geglu(torch.randn(4, 5))
    with pytest.raises(ValueError, match="weight: expected shape"):
        O.layer_norm(x, torch.ones(5), None)
    with pytest.raises(ValueError, match="residual: expected shape"):
        O.layer_norm(x, None, None, residual=torch.randn(4, 5))
    with pytest.raises(TypeError, match="residual: expected dtype"):
        O.layer_norm(x, None, None, residual=x.double())
    with pytest.raises(ValueError, match="eps"):
        O.layer_norm(x, None, None, eps=-1.0)


def test_padding_and_loss_bad_inputs():
    with pytest.raises(ValueError, match="attention_mask: expected shape"):
        O.unpad_input(torch.randn(2, 3, 4), torch.ones(2, 4))
    with pytest.raises(TypeError, match="attention_mask: expected a bool or integer"):
        O.unpad_input(torch.randn(2, 3, 4), torch.ones(2, 3))
    with pytest.raises(TypeError, match="indices: expected dtype"):
        O.pad_input(torch.randn(3, 4), torch.arange(3, dtype=torch.int32), 2, 2)
    with pytest.raises(ValueError, match="indices: expected shape"):
        O.pad_input(torch.randn(3, 4), torch.arange(2), 2, 2)
    h, W = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="labels: expected shape"):
        O.sparse_mlm_loss(h, torch.zeros(3, dtype=torch.long), W)
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 10\)"):
        O.sparse_mlm_loss(h, torch.tensor([0, 10, -100, 1]), W)
    with pytest.raises(TypeError, match="labels: expected dtype"):
        O.sparse_mlm_loss(h, torch.zeros(4), W)
    with pytest.raises(ValueError, match="weight: expected shape"):
        O.sparse_mlm_loss(h, torch.zeros(4, dtype=torch.long), torch.randn(10, 7))


# ------------------------------------------------------------------ backend selection
def test_forcing_an_unavailable_backend_raises_with_reason(monkeypatch):
    x = torch.randn(4, 8)
    with fastbert.use_backend("cuda"):
        with pytest.raises(BackendUnavailableError, match="cuda"):
            O.bias_gelu(x)
    monkeypatch.setenv("FASTBERT_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="requested"):
        O.bias_gelu(x)
    monkeypatch.setenv("FASTBERT_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown fastbert backend"):
        O.bias_gelu(x)
    monkeypatch.delenv("FASTBERT_BACKEND")
    with fastbert.use_backend(bias_gelu="torch"):
        O.bias_gelu(x)
    with pytest.raises(ValueError, match="unknown op family"):
        with fastbert.use_backend(attn="torch"):
            pass


def test_backends_report_explains_each_backend():
    rep = fastbert.backends("cpu")
    assert set(rep) >= {"torch", "triton", "cuda", "cuda_host"}
    assert rep["torch"]["available"]
    if not torch.cuda.is_available():
        assert not rep["cuda"]["available"] and rep["cuda"]["reason"]
    text = str(rep)
    assert "why not" in text or all(r["available"] for r in rep.values())


def test_fp64_only_on_the_torch_backend():
    x = torch.randn(3, 4, dtype=torch.float64)
    with fastbert.use_backend("triton"):
        with pytest.raises(BackendUnavailableError, match="float64"):
            O.bias_gelu(x)


# ------------------------------------------------------------------ torch.library + torch.compile
def _opcheck_cases():
    q, k, v, cu, ms = _attn_inputs((3, 0, 6), requires_grad=True)
    slopes = O.alibi_slopes(2).expand(3, 2).contiguous()
    x = torch.randn(5, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    lab = torch.tensor([1, -100, 3, 0, -100])
    W = torch.randn(7, 16, requires_grad=True)
    yield torch.ops.fastbert.flash_attn_fwd.default, (q, k, v, cu, ms, slopes, 1 / math.sqrt(32), -1, -1, "torch")
    yield torch.ops.fastbert.layer_norm_fwd.default, (x, w, w.detach().clone().requires_grad_(), x.detach().clone().requires_grad_(), 1e-5, "torch")
    yield torch.ops.fastbert.layer_norm_fwd.default, (x, None, None, None, 1e-5, "torch")
    yield torch.ops.fastbert.bias_gelu_fwd.default, (x, w, "none", "torch")
    yield torch.ops.fastbert.geglu_fwd.default, (x, w, "tanh", "torch")
    yield torch.ops.fastbert.index_gather.default, (x, torch.tensor([4, 0, 2]), "torch")
    yield torch.ops.fastbert.index_scatter.default, (x, torch.tensor([4, 0, 2, 6, 7]), 9, "torch")
    yield torch.ops.fastbert.sparse_mlm_loss_fwd.default, (x, lab, W, None, -100, True, "torch")
    # backward ops (no autograd of their own)
    out, lse = torch.ops.fastbert.flash_attn_fwd(q, k, v, cu, ms, slopes, 0.2, 2, 1, "torch")  # window (2, 1)
    d = lambda t: t.detach().clone()  # noqa: E731
    yield torch.ops.fastbert.flash_attn_bwd.default, (torch.randn_like(out), d(q), d(k), d(v), d(out), d(lse), cu, ms, slopes, 0.2, 2, 1, "torch")
    y, z, mean, rstd = torch.ops.fastbert.layer_norm_fwd(d(x), d(w), None, d(x), 1e-5, "torch")
    yield torch.ops.fastbert.layer_norm_bwd.default, (torch.randn_like(y), z, d(w), True, mean, rstd, torch.randn_like(z), "torch")
    yield torch.ops.fastbert.bias_gelu_bwd.default, (torch.randn(5, 16), d(x), d(w), "tanh", "torch")
    yield torch.ops.fastbert.geglu_bwd.default, (torch.randn(5, 8), d(x), None, "none", "torch")


@pytest.mark.parametrize("case", list(range(12)))
def test_opcheck(case):
    op, args = list(_opcheck_cases())[case]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_layer_stack():
    class Layer(torch.nn.Module):
        def __init__(self, H=2, D=32):
            super().__init__()
            self.qkv = torch.nn.Linear(H * D, 3 * H * D)
            self.ln = torch.nn.LayerNorm(H * D)
            self.up = torch.nn.Linear(H * D, 4 * H * D)
            self.H, self.D = H, D
            self.register_buffer("slopes", O.alibi_slopes(H))

        def forward(self, x, cu, ms):
            qkv = self.qkv(x).view(-1, 3, self.H, self.D)
            a = O.flash_attn_varlen_alibi(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, ms, self.slopes)
            h, _ = O.layer_norm(a.reshape(x.shape), self.ln.weight, self.ln.bias, 1e-12, residual=x)
            return O.geglu(self.up(h), None)

    model = Layer()
    x = torch.randn(9, 64, requires_grad=True)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    eager = model(x, cu, 5)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x, cu, 5)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
