"""Triton row gather / scatter (kernels/padding.py) against the reference, under the interpreter on CPU.

Copies are exact, so the check is equality; outputs are NaN-poisoned so unwritten rows (including the
zero rows of the scatter) show up.
"""
import os

import torch

if not torch.cuda.is_available():  # conftest does the same; kept so the file runs on its own
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastbert.kernels.padding as K  # noqa: E402
from fastbert import reference as R  # noqa: E402
from fastbert.testing import count_calls, poisoned_allocations  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _mask(seqlens, S):
    return torch.arange(S, device=DEV)[None, :] < torch.tensor(seqlens, device=DEV)[:, None]


@pytest.mark.parametrize("seqlens,S,F,dtype", [
    ([3, 0, 5, 1], 7, 96, torch.bfloat16),     # one empty sequence
    ([1], 1, 768, torch.float32),              # a single token
    ([13, 2, 9], 16, 1000, torch.float16),     # non-power-of-two feature width
    ([40, 33, 1, 64, 0, 17, 50], 64, 64, torch.float32),  # several row blocks per program
])
def test_gather_scatter_roundtrip(seqlens, S, F, dtype):
    B = len(seqlens)
    mask = _mask(seqlens, S)
    hidden = torch.randn(B * S, F, device=DEV).to(dtype)
    indices, _, _ = R.unpad_indices(mask)
    with poisoned_allocations():
        x = K.index_gather_fwd(hidden, indices)
    assert x.dtype == dtype and x.shape == (sum(seqlens), F)
    assert torch.equal(x, R.index_gather_fwd(hidden, indices))
    with poisoned_allocations():
        back = K.index_scatter_fwd(x, indices, B * S)
    assert torch.equal(back, R.index_scatter_fwd(x, indices, B * S))  # zeros at pads, no NaN left
    assert back.data_ptr() != x.data_ptr()


def test_scatter_permuted_indices_and_integer_payload():
    """Indices need not be sorted (they are unique); integer rows copy bit-exactly."""
    num_rows, T, F = 11, 6, 40
    indices = torch.randperm(num_rows, device=DEV)[:T]
    x = torch.randint(-1000, 1000, (T, F), device=DEV, dtype=torch.int32)
    with poisoned_allocations():
        out = K.index_scatter_fwd(x, indices, num_rows)
    assert torch.equal(out, R.index_scatter_fwd(x, indices, num_rows))
    assert torch.equal(K.index_gather_fwd(out, indices), x)


def test_empty_cases():
    x = torch.randn(5, 8, device=DEV)
    empty_idx = torch.zeros(0, dtype=torch.int64, device=DEV)
    assert K.index_gather_fwd(x, empty_idx).shape == (0, 8)
    out = K.index_scatter_fwd(x[:0], empty_idx, 4)
    assert torch.equal(out, torch.zeros(4, 8, device=DEV))


def test_unsupported_dtype_reason():
    assert "x.dtype" in K.unsupported("index_gather_fwd", torch.zeros(2, 2, dtype=torch.complex64), None)
    assert K.unsupported("index_gather_fwd", torch.zeros(2, 2, dtype=torch.bfloat16), None) is None


def test_unpad_pad_through_ops_backend(monkeypatch):
    """End to end through fastbert.ops with the triton backend forced: unpad, repad, and both backwards."""
    import fastbert
    from fastbert.ops import pad_input, unpad_input

    calls = count_calls(monkeypatch, K, "index_gather_fwd", "index_scatter_fwd")
    B, S, F = 3, 5, 16
    mask = _mask([5, 0, 2], S)
    hidden = torch.randn(B, S, F, device=DEV, requires_grad=True)
    with fastbert.use_backend("triton"):
        x, indices, cu_seqlens, max_seqlen = unpad_input(hidden, mask)
        w = torch.randn_like(x)
        back = pad_input(x * 2.0, indices, B, S)
        (x * w).sum().add(back.square().sum()).backward()
    # forward: one gather + one scatter; backward: the scatter's (a gather) and the gather's (a scatter)
    assert calls == {"index_gather_fwd": 2, "index_scatter_fwd": 2}, calls
    x_ref, idx_ref, cu_ref, max_ref = R.unpad_input(hidden.detach(), mask)
    assert torch.equal(x, x_ref) and torch.equal(indices, idx_ref) and torch.equal(cu_seqlens, cu_ref)
    assert max_seqlen == max_ref == 5
    assert torch.equal(back, R.pad_input(x_ref * 2.0, idx_ref, B, S))
    # d/dhidden of sum(x*w) + sum((2x)^2) at real tokens is w + 8x; zero at pads
    expect = R.pad_input(w + 8.0 * x_ref, idx_ref, B, S)
    torch.testing.assert_close(hidden.grad, expect)
