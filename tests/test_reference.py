"""The reference is the specification: check it against independent formulas, in fp64."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastbert import reference as R


def test_alibi_slopes_power_of_two():
    s = R.alibi_slopes(8)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, torch.tensor([2.0 ** -(i + 1) for i in range(8)]))


def test_alibi_slopes_not_power_of_two():
    # the ALiBi paper's rule: 4 slopes of the 4-series, then every other slope of the 8-series
    four = [2.0 ** (-2 * (i + 1)) for i in range(4)]
    eight = [2.0 ** -(i + 1) for i in range(8)]
    torch.testing.assert_close(R.alibi_slopes(6), torch.tensor(four + eight[0::2][:2]))
    assert R.alibi_slopes(12).shape == (12,)
    with pytest.raises(ValueError, match="n_heads"):
        R.alibi_slopes(0)


def test_unpad_golden():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    hidden = torch.arange(8.0).view(2, 4, 1)
    x, idx, cu, ms = R.unpad_input(hidden, mask)
    assert idx.tolist() == [0, 1, 4, 5, 6]
    assert cu.tolist() == [0, 2, 5] and cu.dtype == torch.int32
    assert ms == 3
    assert x.flatten().tolist() == [0.0, 1.0, 4.0, 5.0, 6.0]
    back = R.pad_input(x, idx, 2, 4)
    assert back.flatten().tolist() == [0, 1, 0, 0, 4, 5, 6, 0]


def _naive_attention(q, k, v, cu, slopes, scale):
    """Independent form: a Python loop over sequences, heads and query rows."""
    out = torch.zeros_like(q)
    for b in range(cu.numel() - 1):
        s, e = int(cu[b]), int(cu[b + 1])
        for h in range(q.shape[1]):
            for i in range(s, e):
                scores = torch.stack([(q[i, h] * k[j, h]).sum() * scale
                                      - (slopes[h] * abs(i - j) if slopes is not None else 0.0)
                                      for j in range(s, e)])
                p = torch.softmax(scores, 0)
                out[i, h] = (p[:, None] * v[s:e, h]).sum(0)
    return out


@pytest.mark.parametrize("with_slopes", [True, False])
def test_attention_matches_naive_loop(with_slopes):
    cu = torch.tensor([0, 1, 1, 4, 9], dtype=torch.int32)
    q, k, v = (torch.randn(9, 3, 8, dtype=torch.float64) for _ in range(3))
    slopes = R.alibi_slopes(3).double() if with_slopes else None
    out = R.flash_attn_varlen_alibi(q, k, v, cu, 5, slopes)
    torch.testing.assert_close(out, _naive_attention(q, k, v, cu, slopes, 1 / math.sqrt(8)))


def test_attention_no_slopes_matches_sdpa_per_sequence():
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    q, k, v = (torch.randn(20, 2, 16, dtype=torch.float64) for _ in range(3))
    out = R.flash_attn_varlen_alibi(q, k, v, cu, 13)
    for b in range(2):
        s, e = int(cu[b]), int(cu[b + 1])
        ref = F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
        torch.testing.assert_close(out[s:e], ref)


def test_attention_lse_and_backward_primitive():
    cu = torch.tensor([0, 3, 3, 11], dtype=torch.int32)
    q, k, v = (torch.randn(11, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    slopes = R.alibi_slopes(2).double()
    out, lse = R.flash_attn_fwd(q, k, v, cu, 8, slopes, 0.3)
    # lse against an explicit logsumexp of one row
    i, h = 5, 1
    j = torch.arange(3, 11)
    row = (q[i, h] * k[3:11, h]).sum(-1) * 0.3 - slopes[h] * (i - j).abs()
    torch.testing.assert_close(lse[h, i].double(), torch.logsumexp(row, 0).detach(), rtol=1e-6, atol=1e-6)
    dout = torch.randn_like(out)
    ref = torch.autograd.grad(R.flash_attn_varlen_alibi(q, k, v, cu, 8, slopes, 0.3), (q, k, v), dout)
    # lse is fp32 by contract; at fp64 tolerances its rounding (2^-24 relative in P) would show, so the
    # backward formula is checked with the exact lse of each row
    lse64 = torch.empty(2, 11, dtype=torch.float64)
    for b in range(3):
        s, e = int(cu[b]), int(cu[b + 1])
        for h in range(2):
            pos = torch.arange(e - s)
            rows = (q[s:e, h] @ k[s:e, h].T) * 0.3 - slopes[h] * (pos[:, None] - pos[None, :]).abs()
            lse64[h, s:e] = torch.logsumexp(rows, 1).detach()
    got = R.flash_attn_bwd(dout, q, k, v, out.detach(), lse64, cu, 8, slopes, 0.3)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r)


def test_attention_spec_gradcheck():
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    q, k, v = (torch.randn(5, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    slopes = R.alibi_slopes(2).double()
    assert torch.autograd.gradcheck(lambda a, b, c: R.flash_attn_varlen_alibi(a, b, c, cu, 3, slopes), (q, k, v))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_family(approximate):
    x = torch.randn(7, 10, dtype=torch.float64, requires_grad=True)
    b = torch.randn(10, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(R.bias_gelu(x, b, approximate), F.gelu(x + b, approximate=approximate))
    a, g = (x + b).chunk(2, -1)
    torch.testing.assert_close(R.geglu(x, b, approximate), F.gelu(a, approximate=approximate) * g)
    dy = torch.randn(7, 10, dtype=torch.float64)
    ref = torch.autograd.grad(F.gelu(x + b, approximate=approximate), (x, b), dy)
    got = R.bias_gelu_bwd(dy, x, b, approximate)
    for u, w in zip(got, ref):
        torch.testing.assert_close(u, w)
    dy2 = torch.randn(7, 5, dtype=torch.float64)
    ref = torch.autograd.grad(F.gelu(a, approximate=approximate) * g, (x, b), dy2)
    got = R.geglu_bwd(dy2, x, b, approximate)
    for u, w in zip(got, ref):
        torch.testing.assert_close(u, w)


def test_layer_norm_matches_functional_and_backward():
    x = torch.randn(9, 24, dtype=torch.float64, requires_grad=True)
    r = torch.randn(9, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(24, dtype=torch.float64, requires_grad=True)
    b = torch.randn(24, dtype=torch.float64, requires_grad=True)
    y, z = R.layer_norm(x, w, b, 1e-5, residual=r)
    torch.testing.assert_close(z, x + r)
    torch.testing.assert_close(y, F.layer_norm(x + r, (24,), w, b, 1e-5))
    y2, z2, mean, rstd = R.layer_norm_fwd(x, w, b, r, 1e-5)
    torch.testing.assert_close(y2, y)
    dy, dz = torch.randn_like(y), torch.randn_like(y)
    ref = torch.autograd.grad(F.layer_norm(x + r, (24,), w, b, 1e-5), (x, w, b), dy)
    dzz, dw, db = R.layer_norm_bwd(dy, z2.detach(), w, True, mean, rstd, dz)
    torch.testing.assert_close(dzz, ref[0] + dz)
    torch.testing.assert_close(dw, ref[1])
    torch.testing.assert_close(db, ref[2])


def test_sparse_mlm_loss_matches_dense_cross_entropy():
    hidden = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(17, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(17, dtype=torch.float64, requires_grad=True)
    labels = torch.full((13,), -100)
    labels[[1, 4, 5, 12]] = torch.tensor([0, 16, 3, 16])
    dense = F.cross_entropy(hidden @ weight.t() + bias, labels, ignore_index=-100)
    torch.testing.assert_close(R.sparse_mlm_loss(hidden, labels, weight, bias), dense)
    ref = torch.autograd.grad(dense, (hidden, weight, bias))
    loss, dh, dw, db = R.sparse_mlm_loss_fwd(hidden, labels, weight, bias, -100, True)
    torch.testing.assert_close(loss, dense.detach())
    for u, w in zip((dh, dw, db), ref):
        torch.testing.assert_close(u, w)


def test_sparse_mlm_loss_no_labels_is_zero_not_nan():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(5, 8, requires_grad=True)
    labels = torch.full((4,), -100)
    loss = R.sparse_mlm_loss(hidden, labels, weight)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)
    l2, dh, dw, _ = R.sparse_mlm_loss_fwd(hidden, labels, weight, None, -100, True)
    assert l2.item() == 0.0 and torch.all(dh == 0) and torch.all(dw == 0)
