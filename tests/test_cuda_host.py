"""The CUDA kernels of csrc/ executed on the CPU through the host emulation (the ``cuda_host`` backend),
against the reference: odd sizes, fp32/bf16 (fp16 where it matters), forward and backward, every output
buffer the primitive allocates NaN-poisoned, tolerance by fastbert.testing's rule (2x / 3x PyTorch's
own error in the same dtype against fp64). Inputs, outputs and workspaces sit between guard zones
(fastbert.memcheck: a write outside a tensor fails the test). The LayerNorm tests run on the checking
build (``check_mode``: shared-memory races, uninitialised shared reads, guard zones touched), the rest on
the fast build; a subset runs again in the debug mode (shuffled thread order, poisoned shared memory).

The first test to run builds the library with g++ (~10-20 s, cached by source hash).
"""
import functools
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fastbert import reference as R
from fastbert._cuda_common import LN_MAX_N
from fastbert.memcheck import GuardPool
from fastbert.testing import assert_close, double_or_none as _d, poisoned_allocations

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to build the cuda_host backend")

H = pytest.importorskip("fastbert.cuda_host_backend")


@pytest.fixture(scope="module", autouse=True)
def _built():
    """Build (or load the cached) library once; report the build time."""
    H.load()
    if H.build_seconds() is not None:
        print(f"cuda_host: g++ build took {H.build_seconds():.1f}s")


def _pool(B):
    """Guard zones around the tensors of a CPU backend's calls; on a GPU, poisoning only."""
    return GuardPool() if B is H else None


def _put(pool, t, name):
    return pool.put(t, name) if pool is not None and t is not None else t


def _allocs(pool):
    """Outputs and workspaces poisoned, and guarded for a CPU backend (guards verified on exit)."""
    return pool.allocations() if pool is not None else poisoned_allocations()


def _check_grads(got, ref, peer, names, factor=3):
    for g, r, p, n in zip(got, ref, peer, names):
        if r is None:
            assert g is None, n
            continue
        assert g.dtype == p.dtype, n
        assert_close(g, r, peer=p, factor=factor, name=n)


# ------------------------------------------------------------------------------------------------
# LayerNorm
# ------------------------------------------------------------------------------------------------
LN_CASES = [  # (M, N, dtype, residual, affine); N picks 1/2/4/8 warps per row, vector or scalar loads
    (1, 768, torch.bfloat16, True, "fp32"),
    (7, 1000, torch.float32, False, "same"),
    (7, 1000, torch.bfloat16, True, "same"),
    (37, 64, torch.bfloat16, False, "fp32"),
    (37, 63, torch.float32, True, "none"),
    (5, 96, torch.float16, False, "weight_only"),
    (3, 2500, torch.bfloat16, True, "same"),  # 256 threads per row: cross-warp reduction
    (2, 4099, torch.float32, False, "same"),  # odd N, scalar loads, 512 threads per row
]


def _ln_params(N, dtype, affine):
    if affine == "none":
        return None, None
    pdt = torch.float32 if affine == "fp32" else dtype
    w = (1.0 + 0.5 * torch.randn(N)).to(pdt)
    b = (0.5 * torch.randn(N)).to(pdt) if affine != "weight_only" else None
    return w, b


def _run_layer_norm(M, N, dtype, residual, affine, B=None):
    B = B or H
    eps = 1e-5
    pool = _pool(B)
    x = _put(pool, torch.randn(M, N).mul_(2).add_(0.3).to(dtype), "x")
    r = _put(pool, torch.randn(M, N).to(dtype), "residual") if residual else None
    w, b = (_put(pool, t, n) for t, n in zip(_ln_params(N, dtype, affine), ("weight", "bias")))
    with _allocs(pool):
        y, z, mean, rstd = B.layer_norm_fwd(x, w, b, r, eps)
    assert (z is None) == (r is None)
    assert y.dtype == dtype and mean.dtype == torch.float32 and rstd.dtype == torch.float32
    if r is not None:
        assert_close(z, R.layer_norm_fwd(_d(x), None, None, _d(r), eps)[1],
                     peer=R.layer_norm_fwd(x, None, None, r, eps)[1], name="z")
        assert torch.equal(z, R.layer_norm_fwd(x, None, None, r, eps)[1]), "z must be x + residual rounded once"
    zin = x if z is None else z
    y_ref, _, mean_ref, rstd_ref = R.layer_norm_fwd(_d(zin), _d(w), _d(b), None, eps)
    y_peer, _, mean_peer, rstd_peer = R.layer_norm_fwd(zin, w, b, None, eps)
    assert_close(y, y_ref, peer=y_peer, name="y")
    assert_close(mean, mean_ref, peer=mean_peer, name="mean")
    assert_close(rstd, rstd_ref, peer=rstd_peer, name="rstd")

    dy = _put(pool, torch.randn(M, N).to(dtype), "dy")
    dze = _put(pool, torch.randn(M, N).to(dtype), "dz_extra") if residual else None
    has_bias = b is not None
    with _allocs(pool):
        got = B.layer_norm_bwd(dy, zin, w, has_bias, mean, rstd, dze)
    ref = R.layer_norm_bwd(_d(dy), _d(zin), _d(w), has_bias, mean_ref, rstd_ref, _d(dze))
    peer = R.layer_norm_bwd(dy, zin, w, has_bias, mean, rstd, dze)
    _check_grads(got, ref, peer, ("dz", "dweight", "dbias"))


@pytest.mark.parametrize("M,N,dtype,residual,affine", LN_CASES)
def test_layer_norm(M, N, dtype, residual, affine):
    with H.check_mode(seed=M + N):
        _run_layer_norm(M, N, dtype, residual, affine)


def test_layer_norm_many_partials():
    """More rows than partial blocks (each block loops over rows) and inputs left untouched."""
    M, N = 300, 40
    x = torch.randn(M, N)
    w, b = _ln_params(N, torch.float32, "same")
    x0, w0 = x.clone(), w.clone()
    y, _, mean, rstd = H.layer_norm_fwd(x, w, b, None, 1e-12)
    dy = torch.randn(M, N)
    dy0 = dy.clone()
    assert H.load().fbh_layer_norm_bwd_num_partials(M, N) < M // 4
    got = H.layer_norm_bwd(dy, x, w, True, mean, rstd, None)
    assert torch.equal(x, x0) and torch.equal(w, w0) and torch.equal(dy, dy0)
    ref = R.layer_norm_bwd(_d(dy), _d(x), _d(w), True, mean.double(), rstd.double(), None)
    peer = R.layer_norm_bwd(dy, x, w, True, mean, rstd, None)
    _check_grads(got, ref, peer, ("dz", "dweight", "dbias"))


def test_layer_norm_unaligned_params_and_wide_rows():
    """Weight/bias views that are not 16-byte aligned take the scalar path (the vector path would misread
    them); a row of 1024 threads (one row per block: the partial row written straight from registers)."""
    M, N = 9, 64
    x = torch.randn(M, N, dtype=torch.bfloat16)
    w, b = torch.randn(N + 1)[1:], torch.randn(N + 1)[1:]  # fp32, 4 bytes past an aligned allocation
    assert w.data_ptr() % 16 and b.data_ptr() % 16
    with poisoned_allocations():
        y, _, mean, rstd = H.layer_norm_fwd(x, w, b, None, 1e-5)
        got = H.layer_norm_bwd(torch.ones_like(x), x, w, True, mean, rstd, None)
    y_ref, _, mean_ref, rstd_ref = R.layer_norm_fwd(_d(x), _d(w), _d(b), None, 1e-5)
    assert_close(y, y_ref, peer=R.layer_norm_fwd(x, w, b, None, 1e-5)[0], name="y")
    ref = R.layer_norm_bwd(_d(torch.ones_like(x)), _d(x), _d(w), True, mean_ref, rstd_ref, None)
    _check_grads(got, ref, R.layer_norm_bwd(torch.ones_like(x), x, w, True, mean, rstd, None), ("dz", "dw", "db"))
    _run_layer_norm(5, 9000, torch.bfloat16, True, "same")


def test_layer_norm_limits_agree():
    assert H.load().fbh_layer_norm_max_n() == LN_MAX_N
    assert "16384" in H.unsupported("layer_norm_fwd", torch.randn(1, 16385), None, None, None, 1e-5)
    assert H.unsupported("layer_norm_fwd", torch.randn(1, 16384), None, None, None, 1e-5) is None
    assert "float64" in H.unsupported("layer_norm_fwd", torch.randn(2, 8, dtype=torch.float64), None, None, None, 1e-5)


# ------------------------------------------------------------------------------------------------
# bias + GELU, GeGLU
# ------------------------------------------------------------------------------------------------
ACT_CASES = [  # (M, N, dtype, has_bias, approximate)
    (1, 7, torch.float32, True, "none"),
    (33, 130, torch.bfloat16, True, "none"),
    (33, 130, torch.float32, False, "tanh"),
    (70, 256, torch.bfloat16, True, "tanh"),  # vector loads, several row chunks
    (9, 264, torch.float16, True, "none"),
]


def _act_inputs(M, N, dtype, has_bias, width):
    x = (torch.randn(M, width * N) * 2).to(dtype)
    bias = torch.randn(width * N).to(dtype) if has_bias else None
    dy = torch.randn(M, N).to(dtype)
    return x, bias, dy


def _run_activation(op, M, N, dtype, has_bias, approximate, B=None):
    """op "bias_gelu" (x ``[M, N]``) or "geglu" (x ``[M, 2N]``): forward and backward vs the reference."""
    B = B or H
    pool = _pool(B)
    x, bias, dy = (_put(pool, t, n) for t, n in zip(_act_inputs(M, N, dtype, has_bias, 2 if op == "geglu" else 1),
                                                     ("x", "bias", "dy")))
    fwd, bwd = getattr(B, f"{op}_fwd"), getattr(B, f"{op}_bwd")
    ref_fwd, ref_bwd = getattr(R, f"{op}_fwd"), getattr(R, f"{op}_bwd")
    with _allocs(pool):
        y = fwd(x, bias, approximate)
    assert y.shape == (M, N)
    assert_close(y, ref_fwd(_d(x), _d(bias), approximate), peer=ref_fwd(x, bias, approximate), name="y")
    with _allocs(pool):
        got = bwd(dy, x, bias, approximate)
    ref = ref_bwd(_d(dy), _d(x), _d(bias), approximate)
    peer = ref_bwd(dy, x, bias, approximate)
    _check_grads(got, ref, peer, ("dx", "dbias"))


@pytest.mark.parametrize("op", ["bias_gelu", "geglu"])
@pytest.mark.parametrize("M,N,dtype,has_bias,approximate", ACT_CASES)
def test_activation(op, M, N, dtype, has_bias, approximate):
    _run_activation(op, M, N, dtype, has_bias, approximate)


def test_activation_many_partials():
    """More partial rows (one per 32 rows) than the reduction's 16 row-threads: every partial row summed once."""
    _run_activation("bias_gelu", 1000, 8, torch.float32, True, "none")
    _run_activation("geglu", 700, 12, torch.bfloat16, True, "tanh")


def test_pointwise_empty_batch():
    x = torch.empty(0, 16)
    b = torch.randn(16)
    assert H.bias_gelu_fwd(x, b, "none").shape == (0, 16)
    dx, db = H.bias_gelu_bwd(x, x, b, "none")
    assert dx.shape == (0, 16) and torch.equal(db, torch.zeros(16))
    dx, db = H.geglu_bwd(torch.empty(0, 8), x, b, "none")
    assert dx.shape == (0, 16) and torch.equal(db, torch.zeros(16))


# ------------------------------------------------------------------------------------------------
# unpad / repad
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("F,dtype", [(8, torch.float32), (3, torch.bfloat16), (5, torch.float32),
                                     (17, torch.int64), (5, torch.bool)])
def test_index_gather_scatter(F, dtype):
    _run_index_gather_scatter(F, dtype)


def _run_index_gather_scatter(F, dtype, B=None):
    B = B or H
    mask = torch.rand(5, 7) < 0.6
    mask[0] = False  # an empty sequence
    mask[1] = False
    mask[1, 3] = True  # a length-1 sequence
    indices, _, _ = R.unpad_indices(mask)
    rows = mask.numel()
    pool = _pool(B)
    x = (torch.randn(rows, F) * 100).to(dtype) if dtype != torch.bool else torch.rand(rows, F) < 0.5
    x, indices = _put(pool, x, "x"), _put(pool, indices, "indices")
    with _allocs(pool):
        g = B.index_gather_fwd(x, indices)
    assert torch.equal(g, R.index_gather_fwd(x, indices))
    with _allocs(pool):
        s = B.index_scatter_fwd(g, indices, rows)
    assert torch.equal(s, R.index_scatter_fwd(g, indices, rows))
    empty = torch.empty(0, dtype=torch.int64)
    assert B.index_gather_fwd(x, empty).shape == (0, F)
    with _allocs(pool):  # an out-of-range index never reads or writes out of bounds
        bad = B.index_gather_fwd(x, _put(pool, torch.tensor([1, rows, -1]), "bad indices"))
    assert torch.equal(bad[0], x[1]) and not bad[1:].to(torch.float64).any()
    assert torch.equal(B.index_scatter_fwd(x[:0], empty, 4), torch.zeros(4, F, dtype=dtype))


# ------------------------------------------------------------------------------------------------
# sparse MLM loss
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,Hd,V,dtype,has_bias", [(10, 16, 50, torch.float32, True),
                                                   (23, 24, 97, torch.bfloat16, False),
                                                   (6, 8, 30, torch.float32, False)])
def test_sparse_mlm_loss(T, Hd, V, dtype, has_bias):
    _run_sparse_mlm_loss(T, Hd, V, dtype, has_bias)


def _run_sparse_mlm_loss(T, Hd, V, dtype, has_bias, B=None):
    B = B or H
    hidden = torch.randn(T, Hd).to(dtype)
    weight = (torch.randn(V, Hd) * 0.5).to(dtype)
    bias = torch.randn(V).to(dtype) if has_bias else None
    labels = torch.randint(0, V, (T,))
    labels[torch.rand(T) < 0.5] = -100
    labels[0] = 3
    pool = _pool(B)
    hidden, weight, bias = _put(pool, hidden, "hidden"), _put(pool, weight, "weight"), _put(pool, bias, "bias")
    with _allocs(pool):
        got = B.sparse_mlm_loss_fwd(hidden, labels, weight, bias, -100, True)
    ref = R.sparse_mlm_loss_fwd(_d(hidden), labels, _d(weight), _d(bias), -100, True)
    peer = R.sparse_mlm_loss_fwd(hidden, labels, weight, bias, -100, True)
    assert_close(got[0], ref[0], peer=peer[0], name="loss")
    # fp32 gradients of the mean loss; compared in the parameters' dtype (what the op's backward returns)
    assert all(g is None or g.dtype == torch.float32 for g in got[1:])
    cast = [None if g is None else g.to(dtype) for g in got[1:]]
    _check_grads(cast, ref[1:], [None if p is None else p.to(dtype) for p in peer[1:]],
                 ("dhidden", "dweight", "dbias"))
    loss_only = B.sparse_mlm_loss_fwd(hidden, labels, weight, bias, -100, False)
    assert loss_only[1:] == (None, None, None)
    assert_close(loss_only[0], ref[0], peer=peer[0], name="loss (no grad)")


def test_sparse_mlm_loss_no_labels():
    hidden, weight = torch.randn(4, 8), torch.randn(11, 8)
    labels = torch.full((4,), -100)
    loss, dh, dw, db = H.sparse_mlm_loss_fwd(hidden, labels, weight, None, -100, True)
    assert loss.item() == 0.0 and not dh.any() and not dw.any() and db is None


# ------------------------------------------------------------------------------------------------
# debug mode: shuffled thread order, poisoned shared memory
# ------------------------------------------------------------------------------------------------
def test_debug_mode_subset():
    """The kernels with shared memory and cross-warp barriers, again with the emulation's race detectors on."""
    with H.debug_mode(seed=7, workers=2):
        _run_layer_norm(7, 1000, torch.bfloat16, True, "same")  # 2 rows x 64 threads, partial combine in smem
        _run_layer_norm(3, 2500, torch.float32, False, "same")  # 256 threads per row: smem reduction
        _run_activation("bias_gelu", 33, 130, torch.float32, True, "none")
        _run_activation("geglu", 70, 256, torch.bfloat16, True, "tanh")


def test_check_mode_other_kernels():
    """The kernels outside the full checking runs (bias-GELU, GeGLU, gather / scatter, the partial-sum
    reduction; the MLM row kernel: tests/test_mlm_loss.py) once each on the checking build: no race, no
    uninitialised shared read, no guard zone touched."""
    with H.check_mode(seed=5):
        _run_activation("bias_gelu", 33, 130, torch.float32, True, "none")
        _run_activation("geglu", 70, 256, torch.bfloat16, True, "tanh")
        _run_index_gather_scatter(5, torch.float32)


# ------------------------------------------------------------------------------------------------
# through the public ops: registry, validation, autograd
# ------------------------------------------------------------------------------------------------
def test_ops_dispatch_to_cuda_host():
    import fastbert
    from fastbert.ops import bias_gelu, layer_norm

    assert fastbert.backends()["cuda_host"]["available"]
    x = torch.randn(2, 3, 40, requires_grad=True)
    w = torch.randn(40, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    with fastbert.use_backend("cuda_host"):
        y = layer_norm(bias_gelu(x, b), w, None, 1e-5)
        y.pow(2).sum().backward()
    got = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    y2 = R.layer_norm(R.bias_gelu(x, b), w, None, 1e-5)
    y2.pow(2).sum().backward()
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    for g, t in zip(got, (x, w, b)):
        torch.testing.assert_close(g, t.grad, rtol=1e-4, atol=1e-4)


def test_ops_bad_input_messages_on_cuda_host():
    """Bad input through the public ops with cuda_host forced: the same messages as every backend."""
    import fastbert
    from fastbert.ops import bias_gelu, geglu, layer_norm

    with fastbert.use_backend("cuda_host"):
        with pytest.raises(ValueError, match="bias"):
            bias_gelu(torch.randn(4, 8), torch.randn(7))
        with pytest.raises(ValueError, match="approximate"):
            bias_gelu(torch.randn(4, 8), None, approximate="fast")
        with pytest.raises(ValueError, match="x: expected an even last dim"):
            geglu(torch.randn(4, 7))
        with pytest.raises(ValueError, match="weight"):
            layer_norm(torch.randn(4, 8), torch.randn(9), None, 1e-5)
        with pytest.raises(Exception, match="float64"):
            bias_gelu(torch.randn(4, 8, dtype=torch.float64), None)


# ------------------------------------------------------------------------------------------------
# the emulation itself
# ------------------------------------------------------------------------------------------------
SELFTEST = Path(__file__).resolve().parent / "cuda_host_driver" / "emu_selftest.cpp"
SELFTEST_CHECKS = ("warp_shuffles", "syncthreads_shared_memory", "divergent_barrier_reported",
                   "dynamic_smem_atomics_multi_block", "bf16_half_round_to_nearest_even",
                   "cp_async_copy_and_zero_fill", "cp_async_commit_groups_wait_n")


def test_emulation_selftest():
    """tests/cuda_host_driver/emu_selftest.cpp on the fast build: shuffles (with widths), ballot, barriers,
    shared and dynamic shared memory, atomics across blocks, deadlock detection, debug mode exposing a
    race, bf16/half RNE, cp.async (zero-fill, commit groups, wait<N>, data landing at the wait)."""
    exe = H.build_executable(SELFTEST, "fast")
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    print(r.stdout)
    assert r.returncode == 0 and "SELFTEST OK" in r.stdout, r.stdout + r.stderr
    for name in SELFTEST_CHECKS + ("debug_mode_exposes_race", "cp_async_lands_at_wait_not_before"):
        assert f"PASS {name}" in r.stdout


# ------------------------------------------------------------------------------------------------
# the same checks on a GPU through the real extension (pytest -m gpu)
# ------------------------------------------------------------------------------------------------
GPU_CASES = [
    ("layer_norm", (7, 1000, torch.bfloat16, True, "same")),
    ("layer_norm", (64, 768, torch.bfloat16, True, "fp32")),
    ("layer_norm", (33, 1024, torch.float16, False, "same")),
    ("layer_norm", (5, 4099, torch.float32, True, "same")),
    ("layer_norm", (3, 12000, torch.bfloat16, False, "same")),  # 1024 threads, > 48 KiB shared memory
    ("bias_gelu", (300, 3072, torch.bfloat16, True, "none")),
    ("bias_gelu", (33, 130, torch.float32, True, "tanh")),
    ("geglu", (300, 3072, torch.bfloat16, True, "none")),
    ("geglu", (9, 264, torch.float16, False, "tanh")),
    ("padding", (768, torch.bfloat16)),
    ("padding", (5, torch.float32)),
    ("mlm", (200, 64, 1000, torch.bfloat16, True)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("kind,args", GPU_CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(GPU_CASES)])
def test_cuda_backend_on_gpu(kind, args):
    """Each CUDA kernel through fastbert._C on the GPU against the reference (same checks as above)."""
    import fastbert.cuda_backend as C

    reason = C.why_not("cuda")
    if reason:
        pytest.skip(reason)
    run = {"layer_norm": _run_layer_norm, "bias_gelu": functools.partial(_run_activation, "bias_gelu"),
           "geglu": functools.partial(_run_activation, "geglu"),
           "padding": _run_index_gather_scatter, "mlm": _run_sparse_mlm_loss}[kind]
    with torch.device("cuda"):
        run(*args, B=C)
