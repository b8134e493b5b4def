"""Triton ALiBi flash attention (kernels/attention.py) against the reference, forward and backward.

Runs on CPU under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py when no GPU is visible;
set here too so the file also runs alone). Shapes are small: the interpreter executes every program as
numpy ops. Long sequences on real hardware are in the ``gpu``-marked tests at the end.
"""
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from fastbert import reference as R  # noqa: E402
from fastbert.testing import assert_close, poison_  # noqa: E402

A = pytest.importorskip("fastbert.kernels.attention")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the launchers allocate (outputs, lse, the delta scratch) starts as NaN, so an element
    a kernel fails to write shows up as non-finite instead of a stale value from the allocator."""
    monkeypatch.setattr(A, "_empty", lambda shape, dtype, device: poison_(torch.empty(shape, dtype=dtype,
                                                                                        device=device)))


def _cu(seqlens, device=DEVICE):
    return torch.tensor([0] + list(torch.tensor(seqlens, dtype=torch.int64).cumsum(0)), dtype=torch.int32,
                        device=device)


def _inputs(seqlens, H, D, dtype):
    """Fresh random q, k, v, dout (conftest seeds torch's RNG per test and prints the seed)."""
    T = sum(seqlens)
    return tuple(torch.randn(T, H, D).to(dtype).to(DEVICE) for _ in range(4))


def _slopes(kind, B, H):
    if kind is None:
        return None
    if kind == "alibi":  # the model's slopes, the same for every sequence
        return R.alibi_slopes(H)[None].expand(B, H).contiguous().to(DEVICE)
    # per-sequence slopes (the [B, H] form): catches a kernel that indexes slopes by head only
    return (torch.rand(B, H) * 0.5 + 0.01).to(DEVICE)


def _check_against_reference(seqlens, H, D, dtype, slope_kind, max_seqlen=None, make_qkv=None):
    """Forward and backward of the Triton kernels vs the reference in fp64, with the reference run in the
    same dtype as the peer of the tolerance rule (factor 2 forward, 3 gradients)."""
    cu = _cu(seqlens)
    ms = max(seqlens) if max_seqlen is None else max_seqlen
    q, k, v, do = _inputs(seqlens, H, D, dtype)
    if make_qkv is not None:
        q, k, v = make_qkv(q, k, v)
    slopes = _slopes(slope_kind, len(seqlens), H)
    scale = 1.0 / math.sqrt(D)
    inputs = (q, k, v, do, cu, slopes)
    before = [t.clone() for t in inputs if t is not None]

    out, lse = A.flash_attn_fwd(q, k, v, cu, ms, slopes, scale)
    dq, dk, dv = A.flash_attn_bwd(do, q, k, v, out, lse, cu, ms, slopes, scale)
    for t, b in zip([t for t in inputs if t is not None], before):
        assert torch.equal(t, b), "a kernel wrote into its inputs"

    f64 = [t.double() for t in (q, k, v, do)]
    ref_out, ref_lse = R.flash_attn_fwd(*f64[:3], cu, ms, slopes, scale)
    ref_grads = R.flash_attn_bwd(f64[3], *f64[:3], ref_out, ref_lse, cu, ms, slopes, scale)
    peer_out, peer_lse = R.flash_attn_fwd(q, k, v, cu, ms, slopes, scale)
    peer_grads = R.flash_attn_bwd(do, q, k, v, peer_out, peer_lse, cu, ms, slopes, scale)

    assert out.dtype == dtype and out.is_contiguous() and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (H, q.shape[0])
    assert_close(out, ref_out, peer=peer_out, factor=2, name="out")
    assert_close(lse, ref_lse, peer=peer_lse, factor=2, name="lse")
    for name, g, r, p in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, peer_grads):
        assert g.dtype == dtype and g.shape == q.shape
        assert_close(g, r, peer=p, factor=3, name=name)
    return q, k, v, do, cu, ms, slopes, scale, (dq, dk, dv)


@pytest.mark.parametrize("seqlens,H,D,dtype,slope_kind", [
    ([1, 7, 33, 64, 130], 3, 32, torch.float32, "alibi"),     # H not a power of two
    ([1, 7, 33, 64, 130], 3, 64, torch.bfloat16, "alibi"),
    ([5, 0, 70, 0], 4, 64, torch.float32, "per_seq"),          # empty sequences, also the last one
    ([2, 0, 45, 1], 4, 32, torch.bfloat16, "alibi"),           # H a power of two
    ([9, 40], 2, 32, torch.float16, "alibi"),
    ([3, 21], 2, 16, torch.float32, None),
], ids=lambda x: str(x).replace("torch.", "").replace(" ", ""))
def test_matches_reference(seqlens, H, D, dtype, slope_kind):
    _check_against_reference(seqlens, H, D, dtype, slope_kind)


def test_long_sequence_and_loose_max_seqlen():
    # one 300-token sequence (10 blocks of the interpreter config each way) next to a short one, with
    # max_seqlen larger than any sequence: the extra query blocks must exit without writing
    _check_against_reference([300, 3], 1, 32, torch.float32, "alibi", max_seqlen=333)


def test_fused_qkv_strided_views():
    # q, k, v as views of one [T, 3, H, D] projection output: token stride 3*H*D, read without a copy
    def fused(q, k, v):
        qkv = torch.stack([q, k, v], dim=1)  # [T, 3, H, D] contiguous
        q2, k2, v2 = qkv.unbind(1)
        assert not q2.is_contiguous() and q2.stride(0) == 3 * q.shape[1] * q.shape[2]
        return q2, k2, v2
    _check_against_reference([4, 37], 3, 32, torch.float32, "alibi", make_qkv=fused)


def test_head_strided_views():
    # [T, H, 3, D] layout: head stride 3*D, token stride 3*H*D
    def fused(q, k, v):
        qkv = torch.stack([q, k, v], dim=2)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    _check_against_reference([19, 33], 2, 32, torch.bfloat16, "alibi", make_qkv=fused)


def test_no_alibi_matches_sdpa_per_sequence():
    """slopes=None is plain softmax attention: compare with F.scaled_dot_product_attention run sequence by
    sequence (forward and, through autograd, backward), fp64 as reference and fp32 as the peer."""
    seqlens, H, D = [1, 17, 40], 3, 32
    cu = _cu(seqlens)
    q, k, v, do = _inputs(seqlens, H, D, torch.float32)
    scale = 0.3  # not 1/sqrt(D): checks the scale is used as given

    def sdpa(q, k, v, do):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        outs = []
        for b in range(len(seqlens)):
            s, e = int(cu[b]), int(cu[b + 1])
            qb, kb, vb = (t[s:e].transpose(0, 1) for t in leaves)  # [H, L, D]
            outs.append(F.scaled_dot_product_attention(qb, kb, vb, scale=scale).transpose(0, 1))
        out = torch.cat(outs)
        out.backward(do)
        return out.detach(), [t.grad for t in leaves]

    ref_out, ref_grads = sdpa(*(t.double() for t in (q, k, v, do)))
    peer_out, peer_grads = sdpa(q, k, v, do)
    out, lse = A.flash_attn_fwd(q, k, v, cu, max(seqlens), None, scale)
    grads = A.flash_attn_bwd(do, q, k, v, out, lse, cu, max(seqlens), None, scale)
    assert_close(out, ref_out, peer=peer_out, factor=2, name="out")
    for name, g, r, p in zip(("dq", "dk", "dv"), grads, ref_grads, peer_grads):
        assert_close(g, r, peer=p, factor=3, name=name)


def test_through_the_op_with_autograd():
    """The public op with the triton backend forced: [H] slopes expanded by the ops layer, a fused-QKV
    leaf, gradients through torch.autograd, against the reference op."""
    import fastbert
    from fastbert.ops import flash_attn_varlen_alibi
    cu = _cu([3, 0, 20])
    qkv = torch.randn(23, 3, 2, 32, device=DEVICE, requires_grad=True)
    slopes = R.alibi_slopes(2).to(DEVICE)
    w = torch.randn(23, 2, 32, device=DEVICE)
    with fastbert.use_backend(attention="triton"):
        out = flash_attn_varlen_alibi(*qkv.unbind(1), cu, 20, slopes)
    (grad,) = torch.autograd.grad((out * w).sum(), qkv)
    qkv64 = qkv.detach().double().requires_grad_()
    ref = R.flash_attn_varlen_alibi(*qkv64.unbind(1), cu, 20, slopes)
    (ref_grad,) = torch.autograd.grad((ref * w.double()).sum(), qkv64)
    peer = R.flash_attn_varlen_alibi(*qkv.unbind(1), cu, 20, slopes)
    (peer_grad,) = torch.autograd.grad((peer * w).sum(), qkv)
    assert_close(out, ref, peer=peer, factor=2, name="out")
    assert_close(grad, ref_grad, peer=peer_grad, factor=3, name="dqkv")


def test_backward_is_deterministic():
    # no atomics: two backward runs agree bit for bit
    seqlens, H, D = [20, 45], 2, 32
    cu = _cu(seqlens)
    q, k, v, do = _inputs(seqlens, H, D, torch.bfloat16)
    slopes = _slopes("alibi", 2, H)
    out, lse = A.flash_attn_fwd(q, k, v, cu, 45, slopes, 0.125)
    g1 = A.flash_attn_bwd(do, q, k, v, out, lse, cu, 45, slopes, 0.125)
    g2 = A.flash_attn_bwd(do, q, k, v, out, lse, cu, 45, slopes, 0.125)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_empty_batch():
    q = torch.randn(0, 2, 32, device=DEVICE)
    cu = torch.zeros(3, dtype=torch.int32, device=DEVICE)  # two empty sequences
    out, lse = A.flash_attn_fwd(q, q, q, cu, 0, None, 0.2)
    assert out.shape == (0, 2, 32) and lse.shape == (2, 0)
    grads = A.flash_attn_bwd(q, q, q, q, out, lse, cu, 0, None, 0.2)
    assert all(g.shape == (0, 2, 32) for g in grads)


def test_unsupported_inputs_say_why():
    q80 = torch.zeros(3, 2, 80)
    assert "head dims" in A.unsupported("flash_attn_fwd", q80, q80, q80)
    q64 = torch.zeros(3, 2, 32, dtype=torch.float64)
    assert "float64" in A.unsupported("flash_attn_bwd", q64, q64, q64, q64)
    assert A.unsupported("flash_attn_fwd", torch.zeros(3, 2, 64, dtype=torch.bfloat16)) is None
    with pytest.raises(ValueError, match="q: .*head dims"):
        A.flash_attn_fwd(q80, q80, q80, _cu([3]), 3, None, 0.1)


def test_compile_specs_cover_the_launch_table():
    specs = A.compile_specs()
    keys = {"name", "kernel", "signature", "constexprs", "num_warps", "num_stages", "hot", "kind", "note"}
    assert len(specs) == 2 * 3 * 3 * 3  # generations x kernels x head dims x (bf16, fp16, bf16 windowed)
    for sp in specs:
        assert keys <= set(sp)
        fn = sp["kernel"]
        assert list(sp["signature"]) == fn.arg_names
        const = [n for n, t in sp["signature"].items() if t == "constexpr"]
        assert set(const) == set(sp["constexprs"])
        kind = sp["name"].split(".")[1]
        gen = sp["name"].split(".")[-1]
        d = sp["constexprs"]["HEAD_DIM"]
        assert (sp["constexprs"]["BLOCK_M"], sp["constexprs"]["BLOCK_N"], sp["num_warps"],
                sp["num_stages"]) == A._CONFIGS[gen][kind][d]


_COMPILE_SCRIPT = r"""
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastbert.kernels import attention as A
for sp in A.compile_specs(("sm80", "sm90")):
    if ".d64.bf16." not in sp["name"]:
        continue
    k = triton.compile(ASTSource(sp["kernel"], sp["signature"], sp["constexprs"], sp["attrs"]),
                       target=GPUTarget("cuda", sp["capability"], 32),
                       options={"num_warps": sp["num_warps"], "num_stages": sp["num_stages"]})
    ptx = k.asm["ptx"]
    mma = "wgmma.mma_async" in ptx if sp["capability"] >= 90 else "mma.sync" in ptx
    print(sp["name"], "tensor-cores" if mma else "NO-MMA")
"""


def test_bert_kernels_compile_to_tensor_cores():
    """The D=64 bf16 kernels (fwd, dq, dkdv; global and windowed) at their sm_80 and sm_90 launch configs
    compile with the full Triton compiler (no GPU needed) to mma.sync / wgmma. Catches code the interpreter accepts but the
    compiler rejects. Runs in a subprocess because this process's Triton is in interpreter mode."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.split("\n")
    assert sum("tensor-cores" in ln for ln in lines) == 12, r.stdout


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_bert_shapes(D, dtype):
    H = 768 // max(D, 64)
    _check_against_reference([128, 1, 0, 512, 77, 300, 255], H, D, dtype, "alibi")


@pytest.mark.gpu
@gpu
def test_gpu_max_seqlen_2048():
    _check_against_reference([2048, 5, 1000], 4, 64, torch.bfloat16, "alibi")
