"""Degenerate sizes on every op, forward and backward, on every backend (issue 22.5).

Zero tokens, zero sequences (``cu_seqlens == [0]``), all sequences empty, zero labelled rows, rows of
width 1: each gives an empty or zero result equal to the reference's, never an exception from a stride,
grid or launch check. The sweep runs every registered backend that is available on the device
(``fastbert.registry.BACKENDS``), so a new backend is swept without editing this file; the CUDA device
runs with the ``gpu`` mark.
"""
import pytest
import torch

import fastbert
from fastbert import ops as O
from fastbert import registry
from fastbert.testing import assert_close

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
_PREFERRED_DTYPES = (torch.float32, torch.bfloat16)  # the first one a backend takes for the op


def _backends(device):
    return [name for name, be in registry.BACKENDS.items() if be.why_not(torch.device(device)) is None]


def _case_attention(dev, dt, cu, ms, H=2, D=32, slopes=True):
    cu = torch.tensor(cu, dtype=torch.int32, device=dev)
    T = int(cu[-1])
    q, k, v = (torch.randn(T, H, D, device=dev).to(dt).requires_grad_() for _ in range(3))
    s = O.alibi_slopes(H, dev) if slopes else None
    out = O.flash_attn_varlen_alibi(q, k, v, cu, ms, s)
    return out, (q, k, v)


def _case_unpad_pad(dev, dt, B, S, F, fill):
    hidden = torch.randn(B, S, F, device=dev).to(dt).requires_grad_()
    mask = torch.full((B, S), fill, dtype=torch.bool, device=dev)
    if fill and B and S:
        mask[0, -1] = False
    x, idx, cu, ms = O.unpad_input(hidden, mask)
    assert cu.shape == (B + 1,) and ms == (mask.sum(1).max().item() if B else 0)
    return O.pad_input(x * 2, idx, B, S), (hidden,)


def _case_pointwise(op, dev, dt, M, N, bias=True):
    x = torch.randn(M, N, device=dev).to(dt).requires_grad_()
    b = torch.randn(N, device=dev).requires_grad_() if bias else None
    return getattr(O, op)(x, b), (x,) + ((b,) if bias else ())


def _case_layer_norm(dev, dt, M, N, residual=True):
    x = torch.randn(M, N, device=dev).to(dt).requires_grad_()
    w, b = torch.randn(N, device=dev).requires_grad_(), torch.randn(N, device=dev).requires_grad_()
    if residual:
        r = torch.randn(M, N, device=dev).to(dt).requires_grad_()
        y, z = O.layer_norm(x, w, b, 1e-5, residual=r)
        return y + z, (x, w, b, r)
    return O.layer_norm(x, w, b, 1e-5), (x, w, b)


def _case_mlm(dev, dt, T, Hd, V, n_labelled, bias=True):
    h = torch.randn(T, Hd, device=dev).to(dt).requires_grad_()
    w = torch.randn(V, Hd, device=dev).to(dt).requires_grad_()
    b = torch.randn(V, device=dev).to(dt).requires_grad_() if bias else None
    lab = torch.full((T,), -100, dtype=torch.long, device=dev)
    lab[:n_labelled] = torch.randint(0, V, (n_labelled,), device=dev)
    return O.sparse_mlm_loss(h, lab, w, b), (h, w) + ((b,) if bias else ())


# (name, family, builder(device, dtype) -> (output, leaves needing grads))
CASES = [
    ("attn_no_sequences", "attention", lambda d, t: _case_attention(d, t, [0], 0)),
    ("attn_all_empty", "attention", lambda d, t: _case_attention(d, t, [0, 0, 0, 0], 0)),
    ("attn_all_empty_hint_4", "attention", lambda d, t: _case_attention(d, t, [0, 0, 0], 4, slopes=False)),
    ("attn_one_token", "attention", lambda d, t: _case_attention(d, t, [0, 0, 1, 1], 1)),
    ("pad_no_sequences", "padding", lambda d, t: _case_unpad_pad(d, t, 0, 5, 3, True)),
    ("pad_zero_length", "padding", lambda d, t: _case_unpad_pad(d, t, 3, 0, 3, True)),
    ("pad_all_masked", "padding", lambda d, t: _case_unpad_pad(d, t, 2, 4, 3, False)),
    ("pad_width_1", "padding", lambda d, t: _case_unpad_pad(d, t, 2, 3, 1, True)),
    ("bias_gelu_no_rows", "bias_gelu", lambda d, t: _case_pointwise("bias_gelu", d, t, 0, 8)),
    ("bias_gelu_width_1", "bias_gelu", lambda d, t: _case_pointwise("bias_gelu", d, t, 5, 1)),
    ("bias_gelu_no_rows_no_bias", "bias_gelu", lambda d, t: _case_pointwise("bias_gelu", d, t, 0, 1, False)),
    ("geglu_no_rows", "geglu", lambda d, t: _case_pointwise("geglu", d, t, 0, 8)),
    ("geglu_width_1", "geglu", lambda d, t: _case_pointwise("geglu", d, t, 5, 2)),
    ("layer_norm_no_rows", "layer_norm", lambda d, t: _case_layer_norm(d, t, 0, 16)),
    ("layer_norm_width_1", "layer_norm", lambda d, t: _case_layer_norm(d, t, 4, 1)),
    ("layer_norm_width_1_plain", "layer_norm", lambda d, t: _case_layer_norm(d, t, 3, 1, residual=False)),
    ("mlm_no_rows", "mlm_loss", lambda d, t: _case_mlm(d, t, 0, 8, 11, 0)),
    ("mlm_no_labelled_rows", "mlm_loss", lambda d, t: _case_mlm(d, t, 5, 8, 11, 0)),
    ("mlm_width_1", "mlm_loss", lambda d, t: _case_mlm(d, t, 4, 1, 3, 2)),
    ("mlm_vocab_1", "mlm_loss", lambda d, t: _case_mlm(d, t, 4, 8, 1, 3, bias=False)),
]


def _run(case, device, dtype, backend):
    """Output and input gradients of one case on one backend (inputs from a fixed seed, drawn in fp32 and
    cast, so every dtype sees the same values)."""
    torch.manual_seed(1234)
    with fastbert.use_backend(backend):
        out, leaves = case(device, dtype)
        g = torch.randn(out.shape, device=device).to(out.dtype)
        grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
    return out.detach(), grads


def _pick_dtype(case, device, backend):
    """The first dtype of _PREFERRED_DTYPES the backend takes for this case (degenerate sizes must never
    be the reason it refuses)."""
    reasons = []
    for dt in _PREFERRED_DTYPES:
        try:
            return dt, _run(case, device, dt, backend)
        except registry.BackendUnavailableError as e:
            reasons.append(str(e))
    pytest.fail(f"{backend} refused every dtype: {reasons}")


def _compare(out, ref64, peer, factor, where):
    assert out.shape == ref64.shape, f"{where}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    if out.numel():
        assert_close(out, ref64, peer=peer, factor=factor, name=where)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,family,case", CASES, ids=[c[0] for c in CASES])
def test_degenerate_sizes_every_backend(name, family, case, device):
    ref64, ref_grads = _run(case, device, torch.float64, "torch")
    for backend in _backends(device):
        dtype, (out, grads) = _pick_dtype(case, device, backend)
        peer, peer_grads = _run(case, device, dtype, "torch")
        where = f"{name} on {backend} ({dtype})"
        assert out.dtype == peer.dtype, where
        _compare(out, ref64, peer, 2, where)
        for i, (g, rg, pg) in enumerate(zip(grads, ref_grads, peer_grads)):
            assert (g is None) == (rg is None), f"{where}: grad {i}"
            if g is not None:
                _compare(g, rg, pg, 3, f"{where}: grad {i}")
