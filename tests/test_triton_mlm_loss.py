"""Sparse MLM loss: the chunked driver (fastbert/ops/mlm_chunked.py) with the Triton row kernel
(kernels/mlm_loss.py) against the reference, under the interpreter on CPU.

Loss and all three gradients (fp32, compared after rounding to the parameters' dtype, which is what the
op hands to autograd) are checked against the fp64 reference with the reference in the same dtype as the
peer; chunk sizes that do and do not divide the labelled rows; all-ignored labels; labels at V-1; the row
kernel alone on extreme logits. The row-kernel contract and the -inf / fp16 / max_labelled kinds on every
backend: tests/test_mlm_loss.py.
"""
import os

import torch

if not torch.cuda.is_available():  # conftest does the same; kept so the file runs on its own
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastbert.kernels.mlm_loss as K  # noqa: E402
from fastbert import reference as R  # noqa: E402
from fastbert.ops.mlm_chunked import chunked_sparse_mlm_loss, default_chunk_rows  # noqa: E402
from fastbert.testing import assert_close, double_or_none as _d, poisoned_allocations  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _problem(T, H, V, dtype, bias, frac_labelled=0.3, ignore_index=-100):
    hidden = torch.randn(T, H, device=DEV).to(dtype)
    weight = (torch.randn(V, H, device=DEV) / H ** 0.5 * 2.0).to(dtype)
    b = torch.randn(V, device=DEV).to(dtype) if bias else None
    labels = torch.randint(0, V, (T,), device=DEV)
    labels[torch.rand(T, device=DEV) > frac_labelled] = ignore_index
    labels[0] = V - 1  # always one label at the last vocabulary entry
    return hidden, labels, weight, b


def _check(out, hidden, labels, weight, b, ignore_index=-100):
    ref = R.sparse_mlm_loss_fwd(_d(hidden), labels, _d(weight), _d(b), ignore_index, True)
    peer = R.sparse_mlm_loss_fwd(hidden, labels, weight, b, ignore_index, True)
    loss, dh, dw, db = out
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, ref[0], peer=peer[0], name="loss")
    assert dh.dtype == dw.dtype == torch.float32  # rounded to the parameters' dtype by the op's backward
    assert_close(dh.to(hidden.dtype), ref[1], peer=peer[1].to(hidden.dtype), factor=3, name="dhidden")
    assert_close(dw.to(weight.dtype), ref[2], peer=peer[2].to(weight.dtype), factor=3, name="dweight")
    if b is None:
        assert db is None
    else:
        assert_close(db.to(b.dtype), ref[3], peer=peer[3].to(b.dtype), factor=3, name="dbias")
    unlabelled = labels == ignore_index
    assert (dh[unlabelled] == 0).all()


@pytest.mark.parametrize("T,H,V,dtype,bias,chunk_rows", [
    (37, 64, 1000, torch.float32, True, 5),      # several chunks, the last one partial
    (37, 96, 1000, torch.bfloat16, True, None),  # default chunking
    (20, 64, 4099, torch.bfloat16, False, 3),    # V spans two vocabulary blocks plus a 3-column tail
    (1, 64, 257, torch.float32, False, None),    # one row
])
def test_sparse_mlm_loss(T, H, V, dtype, bias, chunk_rows):
    hidden, labels, weight, b = _problem(T, H, V, dtype, bias)
    h0, w0 = hidden.clone(), weight.clone()
    with poisoned_allocations():
        out = K.sparse_mlm_loss_fwd(hidden, labels, weight, b, -100, True, chunk_rows=chunk_rows)
    _check(out, hidden, labels, weight, b)
    assert torch.equal(hidden, h0) and torch.equal(weight, w0)
    loss_only = K.sparse_mlm_loss_fwd(hidden, labels, weight, b, -100, False)
    assert loss_only[1:] == (None, None, None)
    # same loss without the gradient pass (chunking may differ: fp32 summation order only)
    assert abs(loss_only[0].item() - out[0].item()) <= 1e-6 * max(1.0, abs(out[0].item()))


def test_all_ignored_labels():
    hidden, labels, weight, b = _problem(9, 64, 300, torch.float32, True)
    labels[:] = 7
    loss, dh, dw, db = K.sparse_mlm_loss_fwd(hidden, labels, weight, b, 7, True)  # custom ignore_index
    assert loss.item() == 0.0 and torch.isfinite(loss)
    assert torch.equal(dh, torch.zeros_like(hidden)) and torch.equal(dw, torch.zeros_like(weight))
    assert torch.equal(db, torch.zeros_like(b))
    assert K.sparse_mlm_loss_fwd(hidden, labels, weight, None, 7, False)[0].item() == 0.0


def test_custom_ignore_index_and_last_label():
    hidden, labels, weight, b = _problem(15, 64, 130, torch.float32, True, ignore_index=0)
    labels[3] = 129
    out = K.sparse_mlm_loss_fwd(hidden, labels, weight, b, 0, True, chunk_rows=4)
    _check(out, hidden, labels, weight, b, ignore_index=0)


def test_row_kernel_extreme_logits():
    """Large, spread logits: the max in the last, partial block, a very negative one; resident and streamed."""
    rows, V = 4, 5000
    logits = torch.randn(rows, V, device=DEV) * 30.0
    logits[1, 4999] = 400.0
    logits[2, 0] = -400.0
    targets = torch.tensor([0, 4999, 0, 2500], device=DEV)
    expect_loss = F.cross_entropy(logits.double(), targets, reduction="none")
    expect_grad = (torch.softmax(logits.double(), -1) - F.one_hot(targets, V).double()) * 0.25
    peer_loss = F.cross_entropy(logits, targets, reduction="none")
    peer_grad = (torch.softmax(logits, -1) - F.one_hot(targets, V).float()) * 0.25
    for resident in (K.MAX_RESIDENT, 1024):
        K.MAX_RESIDENT, saved = resident, K.MAX_RESIDENT
        try:
            buf = logits.clone()
            loss = K.triton_ce_rows(buf, targets, None, buf, 0.25)
        finally:
            K.MAX_RESIDENT = saved
        assert_close(loss, expect_loss, peer=peer_loss, name="loss rows")
        assert_close(buf, expect_grad, peer=peer_grad, factor=3, name="dlogits")


def test_driver_is_backend_agnostic():
    """The chunked driver with a plain-PyTorch row kernel gives the reference result (the contract the
    CUDA backend's row kernel also implements)."""
    def torch_rows(logits, targets, bias, grad, grad_scale):
        x = logits + bias if bias is not None else logits
        lse = torch.logsumexp(x, -1)
        loss = lse - x.gather(1, targets[:, None]).squeeze(1)
        if grad is not None:
            p = torch.exp(x - lse[:, None]) * grad_scale
            p[torch.arange(x.shape[0]), targets] -= grad_scale
            grad.copy_(p)
        return loss

    hidden, labels, weight, b = _problem(23, 64, 200, torch.float32, True)
    out = chunked_sparse_mlm_loss(hidden, labels, weight, b, -100, True, torch_rows, chunk_rows=4)
    _check(out, hidden, labels, weight, b)
    assert default_chunk_rows(10, 30528, 768) == 10


def test_mlm_loss_through_ops_backend(monkeypatch):
    """End to end through fastbert.ops with the triton backend forced: loss and autograd."""
    import fastbert
    from fastbert.ops import sparse_mlm_loss

    calls = []
    real = K.sparse_mlm_loss_fwd
    monkeypatch.setattr(K, "sparse_mlm_loss_fwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    hidden, labels, weight, b = _problem(2 * 7, 64, 150, torch.float32, True)
    hidden = hidden.view(2, 7, 64).requires_grad_()
    weight.requires_grad_()
    b.requires_grad_()
    with fastbert.use_backend("triton"):
        loss = sparse_mlm_loss(hidden, labels.view(2, 7), weight, b)
        (loss * 3.0).backward()
    assert calls, "the triton primitive was not called"
    got = [t.grad.clone() for t in (hidden, weight, b)]
    for t in (hidden, weight, b):
        t.grad = None
    loss2 = R.sparse_mlm_loss(hidden.view(14, 64), labels, weight, b)
    (loss2 * 3.0).backward()
    torch.testing.assert_close(loss, loss2, rtol=1e-5, atol=1e-6)
    for g, t in zip(got, (hidden, weight, b)):
        torch.testing.assert_close(g, t.grad, rtol=1e-4, atol=1e-6)
