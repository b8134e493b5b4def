"""csrc/flash_attn.cu (tensor-core ALiBi varlen flash attention) executed on the CPU through the host
emulation (the ``cuda_host`` backend), against the reference.

The emulated ``mma.sync.m16n8k16`` (csrc/mma.cuh) reassembles the operands from the documented per-lane
fragment layout, so these tests check the kernels' fragment indexing, not just their arithmetic.
Inputs: fused-QKV strided views, several sequences including empty and length-1 ones, bf16 and fp16,
ALiBi slopes and none; every buffer the primitive allocates is NaN-poisoned, and inputs and outputs sit
between guard zones (fastbert.memcheck). Tolerance: fp64 reference, the reference run in the same low
dtype as the peer, factor 2 forward / 3 gradients.

Every test here runs on the emulation's checking build (``check_mode``: shared-memory race,
initialisation and bounds checks, threads switched at every shared access in a seeded order, guard
zones reported at the first touch); in the ASan subprocess (tests/test_cuda_host_memcheck.py) on the
sanitizer build instead. Emulated 128-thread blocks are slow (three warp barriers per mma), so shapes
stay tiny.
"""
import math
import shutil

import pytest
import torch

from fastbert import reference as R
from fastbert.memcheck import GuardPool
from fastbert.testing import assert_close

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to build the cuda_host backend")

CH = pytest.importorskip("fastbert.cuda_host_backend")


@pytest.fixture(scope="module", autouse=True)
def _built():
    CH.load()


@pytest.fixture(autouse=True)
def _checked(request):
    """The checking build for every CPU test of this module (GPU tests use the real extension)."""
    if "gpu" in request.keywords:
        yield
        return
    with CH.check_mode(seed=11):
        yield


def _inputs(seqlens, H, D, dtype, layout="fused", pool=None):
    """q, k, v [T, H, D] as views of one buffer (guarded by ``pool`` when given) and cu_seqlens."""
    cu = torch.tensor([0] + torch.tensor(seqlens).cumsum(0).tolist(), dtype=torch.int32)
    T = int(cu[-1])
    put = pool.put if pool is not None else (lambda t, name: t)
    if layout == "fused":  # views of a [T, 3, H, D] QKV projection: token stride 3*H*D
        qkv = put(torch.randn(T, 3, H, D).to(dtype), "qkv")
        q, k, v = qkv.unbind(1)
    else:  # "odd": token stride H*(D+3), not a multiple of 8 elements: the scalar-load path
        base = put(torch.randn(3, T, H, D + 3).to(dtype), "qkv")
        q, k, v = (base[i, :, :, :D] for i in range(3))
    return q, k, v, cu


def _check(seqlens, H, D, dtype, slopes_kind, layout="fused", max_seqlen=None, before_bwd=None):
    pool = GuardPool()
    q, k, v, cu = _inputs(seqlens, H, D, dtype, layout, pool)
    B = len(seqlens)
    ms = max_seqlen if max_seqlen is not None else max(seqlens)
    slopes = None
    if slopes_kind == "alibi":
        slopes = R.alibi_slopes(H).expand(B, H).contiguous()
    elif slopes_kind == "per_seq":  # [B, H] with a different slope per sequence
        slopes = (R.alibi_slopes(H)[None] * torch.rand(B, 1) * 2).contiguous()
    elif isinstance(slopes_kind, float):  # one given slope
        slopes = torch.full((B, H), slopes_kind)
    scale = 1.0 / math.sqrt(D) * 1.3  # not the default, to catch a dropped scale
    do = pool.put(torch.randn(q.shape).to(dtype), "dout")

    with pool.allocations():  # outputs and workspaces guarded + poisoned; guards verified after each call
        out, lse = CH.flash_attn_fwd(q, k, v, cu, ms, slopes, scale)
    if before_bwd is not None:  # tests: switch a planted bug on for the backward alone
        before_bwd()
    with pool.allocations():
        dq, dk, dv = CH.flash_attn_bwd(do, q, k, v, out, lse, cu, ms, slopes, scale)

    d = [t.double() for t in (q, k, v, do)]
    ref_out, ref_lse = R.flash_attn_fwd(d[0], d[1], d[2], cu, ms, slopes, scale)
    ref_grads = R.flash_attn_bwd(d[3], d[0], d[1], d[2], ref_out, ref_lse, cu, ms, slopes, scale)
    peer_out, peer_lse = R.flash_attn_fwd(q, k, v, cu, ms, slopes, scale)
    peer_grads = R.flash_attn_bwd(do, q, k, v, peer_out, peer_lse, cu, ms, slopes, scale)

    assert out.dtype == dtype and out.shape == q.shape and lse.dtype == torch.float32
    assert_close(out, ref_out, peer=peer_out, factor=2, name="out")
    assert_close(lse, ref_lse, peer=peer_lse, factor=2, name="lse")
    for name, g, r, p in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, peer_grads):
        assert g.dtype == dtype and g.shape == q.shape, name
        assert_close(g, r, peer=p, factor=3, name=name)


SEQLENS = [1, 7, 0, 33, 64]  # length 1, odd, empty, one partial and one full 64-row tile


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("slopes_kind", ["alibi", None])
def test_matches_reference_d64(dtype, slopes_kind):
    _check(SEQLENS, 3, 64, dtype, slopes_kind)


@pytest.mark.parametrize("D,dtype,slopes_kind", [
    (32, torch.bfloat16, "per_seq"),
    (32, torch.float16, None),
    (128, torch.bfloat16, "alibi"),  # key tiles of 32 (fwd) / 16 (dq), query tiles of 16 (dk/dv)
])
def test_other_head_dims(D, dtype, slopes_kind):
    _check([1, 0, 7, 40], 2, D, dtype, slopes_kind)


def test_several_tiles_per_sequence():
    """130 tokens: three query blocks and three key tiles in every kernel, online-softmax rescaling, a
    loose max_seqlen (extra blocks must exit cleanly)."""
    _check([130, 5], 1, 64, torch.bfloat16, "alibi", max_seqlen=150)


def test_whole_sequence_backward_with_linear_alibi_tiles():
    """max_seqlen <= 128: the backward's one-block-per-sequence kernel. A full 128-token sequence gives key
    chunks wholly right and wholly left of a warp's rows (the linear ALiBi forms) in it and in the forward,
    a 70-token one a chunk cut by the sequence end; slope 0.3 makes the bias matter."""
    _check([128, 70, 3], 2, 64, torch.bfloat16, 0.3)


@pytest.mark.parametrize("max_seqlen", [None, 140])
def test_scalar_load_path(max_seqlen):
    """Strides that are not multiples of 8 elements: the kernels fall back to element-wise loads (the short
    backward, and with a loose max_seqlen the two-pass one)."""
    _check([3, 17], 2, 32, torch.float16, "alibi", layout="odd", max_seqlen=max_seqlen)


def test_debug_mode_shuffled_threads_and_poisoned_shared_memory():
    """Shuffled emulated-thread order and NaN-poisoned shared memory: a missing barrier or a read of a
    never-written shared tile shows up as a wrong or NaN result."""
    with CH.debug_mode(seed=7):
        _check([1, 20, 0, 64], 2, 64, torch.float16, "alibi")


def test_all_empty_and_zero_tokens():
    q, k, v, cu = _inputs([0, 0], 2, 64, torch.bfloat16)
    out, lse = CH.flash_attn_fwd(q, k, v, cu, 0, None, 0.125)
    assert out.shape == (0, 2, 64) and lse.shape == (2, 0)
    dq, dk, dv = CH.flash_attn_bwd(torch.zeros_like(out), q, k, v, out, lse, cu, 0, None, 0.125)
    assert dq.shape == dk.shape == dv.shape == (0, 2, 64)


def test_unsupported_inputs_say_why():
    q = torch.randn(4, 2, 64)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    msg = CH.unsupported("flash_attn_fwd", q, q, q, cu, 4, None, 0.125)
    assert msg is not None and "torch.float32" in msg
    msg = CH.unsupported("flash_attn_bwd", q.half(), q, q, q, q, None, cu, 4, None, 0.125)
    assert msg is not None and "torch.float32" in msg
    msg = CH.unsupported("flash_attn_fwd", torch.randn(4, 2, 48).bfloat16(), None, None, cu, 4, None, 0.1)
    assert msg is not None and "48" in msg
    assert CH.unsupported("flash_attn_fwd", q.bfloat16(), q, q, cu, 4, None, 0.125) is None
    # the launcher itself rejects what the Python side would have filtered out
    with pytest.raises(RuntimeError, match="head dim 48"):
        x = torch.randn(4, 2, 48).bfloat16()
        CH.flash_attn_fwd(x, x, x, cu, 4, None, 0.1)


def test_public_op_on_cuda_host_with_autograd():
    """flash_attn_varlen_alibi through the registry with cuda_host forced, forward and backward, [H]
    slopes expanded by the ops layer; fp32 inputs are refused with a message naming the dtype."""
    import fastbert
    from fastbert.ops import flash_attn_varlen_alibi

    seqlens, H, D, dtype = [5, 1, 12], 2, 64, torch.bfloat16
    q, k, v, cu = _inputs(seqlens, H, D, dtype)
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    slopes = R.alibi_slopes(H)
    do = torch.randn(q.shape).to(dtype)
    with fastbert.use_backend("cuda_host"):
        out = flash_attn_varlen_alibi(q, k, v, cu, max(seqlens), slopes)
        out.backward(do)
    got = [out.detach()] + [t.grad for t in (q, k, v)]
    d = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = R.flash_attn_varlen_alibi(d[0], d[1], d[2], cu, max(seqlens), slopes)
    ref.backward(do.double())
    p = [t.detach().requires_grad_(True) for t in (q, k, v)]
    peer = R.flash_attn_varlen_alibi(p[0], p[1], p[2], cu, max(seqlens), slopes)
    peer.backward(do)
    assert_close(got[0], ref.detach(), peer=peer.detach(), factor=2, name="out")
    for name, g, r, pp in zip(("dq", "dk", "dv"), got[1:], d, p):
        assert_close(g, r.grad, peer=pp.grad, factor=3, name=name)

    with fastbert.use_backend("cuda_host"), pytest.raises(Exception, match="float32"):
        x = torch.randn(6, H, D)
        flash_attn_varlen_alibi(x, x, x, torch.tensor([0, 6], dtype=torch.int32), 6)


# ------------------------------------------------------------------------------------------------
# the same kernels on a GPU through fastbert._C (skipped without one)
# ------------------------------------------------------------------------------------------------
def _cuda_reason():
    from fastbert import cuda_backend
    return cuda_backend.why_not("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("lengths", ["512", "128"])
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_cuda_backend_bert_shapes(D, dtype, lengths):
    """fastbert._C attention at BERT-like shapes (lengths up to 512 or up to 128 with spread, an empty and
    a length-1 sequence: the two-pass backward, and for head dims <= 64 the one-block-per-sequence one),
    against the fp64 reference with the low-dtype reference as the peer; the backward must be bitwise
    deterministic (no atomics in either)."""
    reason = _cuda_reason()
    if reason:
        pytest.skip(reason)
    from fastbert import cuda_backend as CB
    seqlens = [512, 1, 0, 300, 77, 128, 511] if lengths == "512" else [128, 1, 0, 100, 77, 128, 33, 64]
    H, dev = 12 if D == 64 else 8, "cuda"
    q, k, v, cu = (t.to(dev) for t in _inputs(seqlens, H, D, dtype))
    slopes = R.alibi_slopes(H).to(dev).expand(len(seqlens), H).contiguous()
    scale, ms = D ** -0.5, max(seqlens)
    do = torch.randn(q.shape, device=dev).to(dtype)
    out, lse = CB.flash_attn_fwd(q, k, v, cu, ms, slopes, scale)
    grads = CB.flash_attn_bwd(do, q, k, v, out, lse, cu, ms, slopes, scale)
    again = CB.flash_attn_bwd(do, q, k, v, out, lse, cu, ms, slopes, scale)
    for g, a in zip(grads, again):
        assert torch.equal(g, a)
    d = [t.double() for t in (q, k, v, do)]
    ref_out, ref_lse = R.flash_attn_fwd(d[0], d[1], d[2], cu, ms, slopes, scale)
    ref_grads = R.flash_attn_bwd(d[3], d[0], d[1], d[2], ref_out, ref_lse, cu, ms, slopes, scale)
    peer_out, peer_lse = R.flash_attn_fwd(q, k, v, cu, ms, slopes, scale)
    peer_grads = R.flash_attn_bwd(do, q, k, v, peer_out, peer_lse, cu, ms, slopes, scale)
    assert_close(out, ref_out, peer=peer_out, factor=2, name="out")
    assert_close(lse, ref_lse, peer=peer_lse, factor=2, name="lse")
    for name, g, r, p in zip(("dq", "dk", "dv"), grads, ref_grads, peer_grads):
        assert_close(g, r, peer=p, factor=3, name=name)


@pytest.mark.gpu
def test_gpu_cuda_backend_rejects_fp32_naming_the_dtype():
    reason = _cuda_reason()
    if reason:
        pytest.skip(reason)
    import fastbert._C as C
    x = torch.randn(4, 2, 64, device="cuda")
    cu = torch.tensor([0, 4], dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="torch.float32"):
        C.flash_attn_fwd(x, x, x, cu, 4, None, None)
