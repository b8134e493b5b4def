"""fastbert.nn modules against plain PyTorch formulas (fp64 reference, fp32 eager peer), forward and backward,
plus state-dict compatibility with their PyTorch counterparts."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastbert.nn as fnn
from fastbert.testing import assert_close


def _grads(params):
    return [p.grad.detach().clone() for p in params]


# ----------------------------------------------------------------------------------------------
# LayerNorm
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_residual", [False, True])
def test_layer_norm_matches_torch(with_residual):
    N = 67
    ref_ln = torch.nn.LayerNorm(N, eps=1e-12)
    with torch.no_grad():
        ref_ln.weight.normal_()
        ref_ln.bias.normal_()
    ln = fnn.LayerNorm(N, eps=1e-12)
    ln.load_state_dict(ref_ln.state_dict())  # same keys both ways
    ref_ln.load_state_dict(ln.state_dict())
    x = torch.randn(3, 5, N)
    r = torch.randn(3, 5, N) if with_residual else None
    dy = torch.randn(3, 5, N)

    def run(mod, dtype, fused):
        mod = mod.to(dtype)
        xx = x.to(dtype).clone().requires_grad_()
        rr = r.to(dtype).clone().requires_grad_() if r is not None else None
        if fused and rr is not None:
            y, z = mod(xx, residual=rr)
            assert torch.equal(z.detach(), (xx + rr).detach())
        else:
            y = mod(xx if rr is None else xx + rr)
        y.backward(dy.to(dtype))
        grads = [xx.grad, mod.weight.grad, mod.bias.grad] + ([rr.grad] if rr is not None else [])
        return y.detach(), [g.detach().clone() for g in grads]

    ref64 = torch.nn.LayerNorm(N, eps=1e-12, dtype=torch.float64)
    ref64.load_state_dict(ref_ln.state_dict())
    y64, g64 = run(ref64, torch.float64, False)
    y_peer, g_peer = run(ref_ln, torch.float32, False)
    y, g = run(ln, torch.float32, True)
    assert_close(y, y64, peer=y_peer, factor=2, name="y")
    for name, a, b, c in zip(["dx", "dweight", "dbias", "dresidual"], g, g64, g_peer):
        assert_close(a, b, peer=c, factor=3, name=name)


def test_layer_norm_from_torch_shares_parameters_and_checks_shape():
    ref = torch.nn.LayerNorm(16, eps=1e-6)
    ln = fnn.LayerNorm.from_torch(ref)
    assert ln.weight is ref.weight and ln.bias is ref.bias and ln.eps == 1e-6
    assert set(ln.state_dict()) == {"weight", "bias"}
    assert fnn.LayerNorm(8).eps == 1e-5  # torch.nn.LayerNorm's default, so it is a drop-in
    with pytest.raises(ValueError, match="x"):
        ln(torch.randn(2, 15))
    with pytest.raises(ValueError, match="residual"):
        ln(torch.randn(2, 16), residual=torch.randn(3, 16))
    with pytest.raises(ValueError, match="normalized_shape"):
        fnn.LayerNorm((4, 4))


# ----------------------------------------------------------------------------------------------
# GELU, MLP
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu_matches_torch(approximate):
    x = torch.randn(7, 37, dtype=torch.float64)
    b = torch.randn(37, dtype=torch.float64)
    dy = torch.randn(7, 37, dtype=torch.float64)

    def run(fn, dtype):
        xx, bb = x.to(dtype).clone().requires_grad_(), b.to(dtype).clone().requires_grad_()
        y = fn(xx, bb)
        y.backward(dy.to(dtype))
        return y.detach(), xx.grad, bb.grad

    torch_fn = lambda xx, bb: F.gelu(xx + bb, approximate=approximate)  # noqa: E731
    ref = run(torch_fn, torch.float64)
    peer = run(torch_fn, torch.float32)
    out = run(fnn.BiasGELU(approximate), torch.float32)
    for name, o, r, p, f in zip(["y", "dx", "dbias"], out, ref, peer, [2, 3, 3]):
        assert_close(o, r, peer=p, factor=f, name=name)
    with pytest.raises(ValueError, match="approximate"):
        fnn.BiasGELU("fast")


@pytest.mark.parametrize("gated", [True, False])
def test_gated_mlp_matches_formula(gated):
    H, I = 24, 40
    mlp = fnn.GatedMLP(H, I, gated=gated)
    assert set(mlp.state_dict()) == {"wi.weight", "wi.bias", "wo.weight", "wo.bias"}
    assert mlp.wi.out_features == (2 * I if gated else I)
    x = torch.randn(2, 9, H)
    dy = torch.randn(2, 9, H)

    def formula(m, xx):
        h = m.wi(xx)
        if gated:
            a, g = h[..., :I], h[..., I:]  # MosaicBERT layout: GELU half first, gate second
            h = F.gelu(a) * g
        else:
            h = F.gelu(h)
        return m.wo(h)

    def run(fn, m, dtype):
        m = m.to(dtype)
        for p in m.parameters():
            p.grad = None
        xx = x.to(dtype).clone().requires_grad_()
        y = fn(m, xx)
        y.backward(dy.to(dtype))
        return [y.detach(), xx.grad] + _grads(m.parameters())

    ref64 = fnn.GatedMLP(H, I, gated=gated).to(torch.float64)
    ref64.load_state_dict(mlp.state_dict())
    peer = fnn.GatedMLP(H, I, gated=gated)
    peer.load_state_dict(mlp.state_dict())
    r = run(formula, ref64, torch.float64)
    p = run(formula, peer, torch.float32)
    o = run(lambda m, xx: m(xx), mlp, torch.float32)
    for i, (a, b, c) in enumerate(zip(o, r, p)):
        assert_close(a, b, peer=c, factor=2 if i == 0 else 3, name=f"tensor {i}")


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------
def _explicit_attention(attn, x, seqlens, alibi):
    """Independent fp64 formula: per sequence, softmax(q k^T / sqrt(D) - slope |i-j|) v, then out_proj."""
    W, b = attn.Wqkv.weight.double(), attn.Wqkv.bias.double()
    Hh, D = attn.num_heads, attn.head_dim
    qkv = (x.double() @ W.t() + b).view(-1, 3, Hh, D)
    slopes = torch.tensor([2 ** (-8 * (h + 1) / Hh) for h in range(Hh)], dtype=torch.float64)  # Hh power of 2
    outs, start = [], 0
    for L in seqlens:
        q, k, v = (qkv[start:start + L, i].transpose(0, 1) for i in range(3))  # [H, L, D]
        s = q @ k.transpose(-1, -2) / math.sqrt(D)
        if alibi:
            pos = torch.arange(L, dtype=torch.float64)
            s = s - slopes[:, None, None] * (pos[:, None] - pos[None, :]).abs()
        outs.append((torch.softmax(s, -1) @ v).transpose(0, 1).reshape(L, Hh * D))
        start += L
    o = torch.cat(outs)
    return o @ attn.out_proj.weight.double().t() + attn.out_proj.bias.double()


@pytest.mark.parametrize("alibi", [True, False])
def test_alibi_attention_unpadded_and_padded_match_formula(alibi):
    Hd, heads = 64, 2  # head dim 32
    attn = fnn.AlibiSelfAttention(Hd, heads, alibi=alibi)
    seqlens = [5, 1, 9]
    B, S = len(seqlens), max(seqlens)
    mask = torch.zeros(B, S, dtype=torch.bool)
    for i, L in enumerate(seqlens):
        mask[i, :L] = True
    xp = torch.randn(B, S, Hd)
    x = xp[mask]  # [T, Hd] in row-major order
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    ref = _explicit_attention(attn, x, seqlens, alibi)
    # peer: the same formula in fp32 eager (through the padded SDPA path)
    peer = attn.forward_padded(xp, mask)[mask].detach()
    out = attn(x, cu, S)
    assert_close(out.detach(), ref, peer=peer, factor=2, name="unpadded")
    assert_close(peer, ref, peer=out.detach(), factor=2, name="padded")
    # gradients of the two entry points agree (the unpadded one goes through the fastbert op's backward)
    g = torch.randn_like(out)
    out.backward(g)
    gu = _grads(attn.parameters())
    attn.zero_grad()
    gp = torch.zeros(B, S, Hd)
    gp[mask] = g
    attn.forward_padded(xp, mask).backward(gp)
    attn64 = fnn.AlibiSelfAttention(Hd, heads, alibi=alibi).double()
    attn64.load_state_dict(attn.state_dict())
    _explicit_attention(attn64, x, seqlens, alibi).backward(g.double())
    # factor 3 over the error of the padded SDPA path (PyTorch eager, fp32)
    for a, b, c in zip(gu, _grads(attn64.parameters()), _grads(attn.parameters())):
        assert_close(a, b, peer=c, factor=3, name="grad")


def test_alibi_slopes_buffer_sized_by_heads_and_not_saved():
    attn = fnn.AlibiSelfAttention(96, 3)
    assert attn.alibi_slopes.shape == (3,) and attn.alibi_slopes.dtype == torch.float32
    assert set(attn.state_dict()) == {"Wqkv.weight", "Wqkv.bias", "out_proj.weight", "out_proj.bias"}
    assert fnn.AlibiSelfAttention(64, 2, alibi=False).alibi_slopes is None
    with pytest.raises(ValueError, match="x"):
        attn(torch.randn(4, 95), torch.tensor([0, 4], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="attention_mask"):
        attn.forward_padded(torch.randn(2, 4, 96), torch.ones(2, 5))
    with pytest.raises(ValueError, match="divisible"):
        fnn.AlibiSelfAttention(100, 3)


# ----------------------------------------------------------------------------------------------
# sparse MLM loss
# ----------------------------------------------------------------------------------------------
def test_sparse_mlm_loss_matches_dense_cross_entropy():
    T, H, V = 23, 16, 131
    hidden = torch.randn(T, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64) * 0.3
    bias = torch.randn(V, dtype=torch.float64)
    labels = torch.full((T,), -100, dtype=torch.long)
    labels[[0, 3, 4, 11, 22]] = torch.tensor([5, 0, 130, 17, 5])

    def run(fn, dtype):
        h, w, b = (t.to(dtype).clone().requires_grad_() for t in (hidden, weight, bias))
        loss = fn(h, w, b)
        loss.backward()
        return loss.detach(), h.grad, w.grad, b.grad

    dense = lambda h, w, b: F.cross_entropy(h @ w.t() + b, labels, ignore_index=-100)  # noqa: E731
    ref = run(dense, torch.float64)
    peer = run(dense, torch.float32)
    out = run(lambda h, w, b: fnn.SparseMLMLoss()(h, labels, w, b), torch.float32)
    assert out[0].dtype == torch.float32 and out[0].dim() == 0
    for name, o, r, p, f in zip(["loss", "dhidden", "dweight", "dbias"], out, ref, peer, [2, 3, 3, 3]):
        assert_close(o, r, peer=p, factor=f, name=name)
    # rows without a label get exactly zero gradient: they never reach the vocabulary projection
    assert torch.all(out[1][labels == -100] == 0)
