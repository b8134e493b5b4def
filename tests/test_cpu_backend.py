"""The ``cpu`` backend (fastbert/cpu_backend.py: ATen's fused CPU kernels) against the reference.

Same checks as every backend: fresh random inputs of odd sizes, forward and backward, fp32/bf16/fp16,
every buffer the primitive allocates NaN-poisoned (``poisoned_allocations``), inputs left untouched,
tolerance by ``fastbert.testing.assert_close`` (fp64 reference, the reference in the same dtype as the
peer, factor 2 forward / 3 gradients). Degenerate sizes (no tokens, no sequences, length-1 sequences,
no labelled rows) return empty or zero results. Then the public ops with ``cpu`` forced
(``torch.library.opcheck``, autograd), ``auto``'s choice on CPU, and a whole model against the reference.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fastbert
from fastbert import cpu_backend as C
from fastbert import reference as R
from fastbert import registry
from fastbert.testing import assert_close, poisoned_allocations
# The backend-agnostic check helpers of the cuda_host tests (``B=`` is the backend module under test).
from test_cuda_host import _check_grads, _run_activation, _run_layer_norm, _run_sparse_mlm_loss


# ------------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------------
def _attn_inputs(seqlens, H, D, dtype, layout="fused"):
    cu = torch.tensor([0] + torch.tensor(seqlens, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)
    T = int(cu[-1])
    if layout == "fused":  # views of a [T, 3, H, D] QKV projection (how the model calls it)
        q, k, v = torch.randn(T, 3, H, D).to(dtype).unbind(1)
    else:  # "odd": token stride H*(D+3), head stride D+3
        base = torch.randn(3, T, H, D + 3).to(dtype)
        q, k, v = (base[i, :, :, :D] for i in range(3))
    return q, k, v, cu


def _slopes(kind, B, H):
    if kind == "alibi":
        return R.alibi_slopes(H).expand(B, H).contiguous()
    if kind == "per_seq":  # distinct rows: catches a backend that reads only the first sequence's slopes
        return (R.alibi_slopes(H)[None] * (torch.rand(B, 1) * 2 + 0.1)).contiguous()
    return None


def _check_attention(seqlens, H, D, dtype, slopes_kind, layout="fused", max_seqlen=None, window=(-1, -1)):
    q, k, v, cu = _attn_inputs(seqlens, H, D, dtype, layout)
    ms = max(seqlens) if max_seqlen is None else max_seqlen
    slopes = _slopes(slopes_kind, len(seqlens), H)
    scale = 1.3 / math.sqrt(D)  # not the default: a dropped scale shows
    do = torch.randn(q.shape).to(dtype)
    before = [t.clone() for t in (q, k, v, do)]
    with poisoned_allocations():
        out, lse = C.flash_attn_fwd(q, k, v, cu, ms, slopes, scale, window)
        dq, dk, dv = C.flash_attn_bwd(do, q, k, v, out, lse, cu, ms, slopes, scale, window)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v, do), before)), "a primitive wrote into its inputs"

    d = [t.double() for t in (q, k, v, do)]
    ref_out, ref_lse = R.flash_attn_fwd(d[0], d[1], d[2], cu, ms, slopes, scale, window)
    ref_grads = R.flash_attn_bwd(d[3], d[0], d[1], d[2], ref_out, ref_lse, cu, ms, slopes, scale, window)
    peer_out, peer_lse = R.flash_attn_fwd(q, k, v, cu, ms, slopes, scale, window)
    peer_grads = R.flash_attn_bwd(do, q, k, v, peer_out, peer_lse, cu, ms, slopes, scale, window)
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == (H, q.shape[0])
    assert_close(out, ref_out, peer=peer_out, factor=2, name="out")
    assert_close(lse, ref_lse, peer=peer_lse, factor=2, name="lse")
    for name, g, r, p in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, peer_grads):
        assert g.dtype == dtype and g.shape == q.shape, name
        assert_close(g, r, peer=p, factor=3, name=name)


@pytest.mark.parametrize("seqlens,H,D,dtype,slopes_kind,layout", [
    ([1, 7, 0, 33, 64], 3, 64, torch.float32, "alibi", "fused"),   # length 1, empty, H not a power of 2
    ([1, 7, 0, 33, 64], 3, 64, torch.bfloat16, "alibi", "fused"),
    ([5, 0, 40, 0], 4, 32, torch.float32, "per_seq", "fused"),     # empty last sequence, per-sequence slopes
    ([9, 23], 2, 32, torch.float16, None, "odd"),                  # no ALiBi, odd strides
    ([130, 3], 1, 128, torch.bfloat16, "per_seq", "fused"),
], ids=lambda x: str(x).replace("torch.", "").replace(" ", ""))
def test_attention_matches_reference(seqlens, H, D, dtype, slopes_kind, layout):
    _check_attention(seqlens, H, D, dtype, slopes_kind, layout)


def test_attention_ignores_a_loose_max_seqlen():
    # max_seqlen is a bound, not the length: a larger one must not change anything
    _check_attention([4, 11], 2, 32, torch.float32, "alibi", max_seqlen=40)


@pytest.mark.parametrize("window,slopes_kind,dtype", [((3, 5), "alibi", torch.float32), ((0, -1), None, torch.float32),
                                                ((-1, 2), "per_seq", torch.bfloat16), ((40, 40), "alibi", torch.float32)])
def test_attention_sliding_window(window, slopes_kind, dtype):
    """window_size=(left, right): query i sees keys i-left..i+right of its own sequence (-1: unbounded; a
    window wider than every sequence is global attention)."""
    _check_attention([1, 12, 0, 30], 2, 32, dtype, slopes_kind, window=window)


def test_attention_bad_window_and_public_op():
    q, k, v, cu = _attn_inputs([3, 5], 2, 32, torch.float32)
    for bad in ((-2, 1), (1,), (1.5, 2)):
        with pytest.raises((TypeError, ValueError), match="window_size"):
            C.flash_attn_fwd(q, k, v, cu, 5, None, 0.1, bad)
    from fastbert.ops import flash_attn_varlen_alibi
    with fastbert.use_backend("cpu"):
        out = flash_attn_varlen_alibi(q, k, v, cu, 5, R.alibi_slopes(2), window_size=(1, 0))
    ref = R.flash_attn_varlen_alibi(q, k, v, cu, 5, R.alibi_slopes(2), window_size=(1, 0))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_attention_no_tokens():
    for seqlens in ([0], [0, 0, 0]):
        q, k, v, cu = _attn_inputs(seqlens, 2, 64, torch.float32)
        with poisoned_allocations():
            out, lse = C.flash_attn_fwd(q, k, v, cu, 0, None, 0.125)
            dq, dk, dv = C.flash_attn_bwd(torch.zeros_like(out), q, k, v, out, lse, cu, 0, None, 0.125)
        assert out.shape == (0, 2, 64) and lse.shape == (2, 0)
        assert dq.shape == dk.shape == dv.shape == (0, 2, 64)


# ------------------------------------------------------------------------------------------------
# pointwise families, padding, MLM loss
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("M,N,dtype,residual,affine", [
    (1, 1, torch.float32, True, "same"),        # width 1: zero variance
    (7, 1000, torch.float32, False, "same"),
    (37, 63, torch.bfloat16, True, "fp32"),     # bf16 activations, fp32 parameters (autocast)
    (37, 64, torch.bfloat16, False, "none"),
    (5, 96, torch.float16, True, "weight_only"),
])
def test_layer_norm(M, N, dtype, residual, affine):
    _run_layer_norm(M, N, dtype, residual, affine, B=C)


def test_layer_norm_rows_with_large_mean():
    """Rows of 1 + 0.01 * noise (mean 100x the spread, eps 1e-12 as BERT): ATen's one-pass variance and its
    uncentred backward would lose digits here that the two-pass reference keeps."""
    x = 1 + 0.01 * torch.randn(16, 768)
    w, b, dy = torch.randn(768), torch.randn(768), torch.randn(16, 768)
    y, _, mean, rstd = C.layer_norm_fwd(x, w, b, None, 1e-12)
    ref = R.layer_norm_fwd(x.double(), w.double(), b.double(), None, 1e-12)
    peer = R.layer_norm_fwd(x, w, b, None, 1e-12)
    for name, i, o in (("y", 0, y), ("mean", 2, mean), ("rstd", 3, rstd)):
        assert_close(o, ref[i], peer=peer[i], name=name)
    got = C.layer_norm_bwd(dy, x, w, True, mean, rstd, None)
    _check_grads(got, R.layer_norm_bwd(dy.double(), x.double(), w.double(), True, ref[2], ref[3], None),
                 R.layer_norm_bwd(dy, x, w, True, peer[2], peer[3], None), ("dz", "dweight", "dbias"))


def test_layer_norm_no_rows():
    x = torch.empty(0, 16)
    w, b = torch.randn(16), torch.randn(16)
    with poisoned_allocations():
        y, z, mean, rstd = C.layer_norm_fwd(x, w, b, x, 1e-5)
        dz, dw, db = C.layer_norm_bwd(x, z, w, True, mean, rstd, x)
    assert y.shape == z.shape == dz.shape == (0, 16) and mean.shape == rstd.shape == (0,)
    assert torch.equal(dw, torch.zeros(16)) and torch.equal(db, torch.zeros(16))


@pytest.mark.parametrize("op", ["bias_gelu", "geglu"])
@pytest.mark.parametrize("M,N,dtype,has_bias,approximate", [
    (1, 7, torch.float32, True, "none"),
    (33, 130, torch.bfloat16, True, "none"),
    (33, 129, torch.float32, False, "tanh"),
    (9, 64, torch.float16, True, "tanh"),
])
def test_activation(op, M, N, dtype, has_bias, approximate):
    _run_activation(op, M, N, dtype, has_bias, approximate, B=C)


def test_activation_inputs_untouched_and_no_rows():
    x, b, dy = torch.randn(6, 10), torch.randn(10), torch.randn(6, 5)
    x0 = x.clone()
    C.geglu_fwd(x, None, "none")  # no bias: the halves are views of x, the product must not land in x
    C.geglu_bwd(dy, x, None, "none")
    C.bias_gelu_fwd(x, None, "tanh")
    assert torch.equal(x, x0)
    e = torch.empty(0, 10)
    with poisoned_allocations():
        assert C.bias_gelu_fwd(e, b, "none").shape == (0, 10)
        dx, db = C.bias_gelu_bwd(e, e, b, "none")
        assert dx.shape == (0, 10) and torch.equal(db, torch.zeros(10))
        assert C.geglu_fwd(e, b, "none").shape == (0, 5)
        dx, db = C.geglu_bwd(torch.empty(0, 5), e, b, "none")
        assert dx.shape == (0, 10) and torch.equal(db, torch.zeros(10))


def test_padding_reuses_the_reference():
    """The reference's gather/scatter already are ``index_select`` / ``index_copy_`` (golden-value tests in
    test_reference.py, degenerate sizes for every backend in test_degenerate.py): reused, not copied."""
    assert C.index_gather_fwd is R.index_gather_fwd and C.index_scatter_fwd is R.index_scatter_fwd


# The row kernel (bias, gradient dtypes, padding and out-of-range targets, -inf blocks): tests/test_mlm_loss.py
# runs it with the other backends' (test_row_kernel[cpu-...], test_neg_inf_blocks[cpu-...], ...).


@pytest.mark.parametrize("T,Hd,V,dtype,has_bias", [(10, 16, 50, torch.float32, True),
                                                   (23, 24, 97, torch.bfloat16, False),
                                                   (7, 8, 33, torch.float16, True)])
def test_sparse_mlm_loss(T, Hd, V, dtype, has_bias):
    _run_sparse_mlm_loss(T, Hd, V, dtype, has_bias, B=C)


def test_sparse_mlm_loss_no_labelled_rows():
    for T in (0, 4):
        hidden, weight, bias = torch.randn(T, 8), torch.randn(11, 8), torch.randn(11)
        with poisoned_allocations():
            loss, dh, dw, db = C.sparse_mlm_loss_fwd(hidden, torch.full((T,), -100), weight, bias, -100, True)
        assert loss.item() == 0.0 and dh.shape == (T, 8) and not dh.any() and not dw.any() and not db.any()


# ------------------------------------------------------------------------------------------------
# through the public ops: auto's choice, opcheck, autograd, a whole model
# ------------------------------------------------------------------------------------------------
def test_auto_picks_cpu_on_cpu_and_the_reference_for_fp64():
    assert registry.AUTO_ORDER["cpu"][:2] == ("cpu", "torch")
    x = torch.randn(3, 8)
    assert registry.resolve("bias_gelu_fwd", x.device, (x, None, "none"), x.dtype) == "cpu"
    assert registry.resolve("bias_gelu_fwd", x.device, (x.double(), None, "none"), torch.float64) == "torch"
    rep = fastbert.backends("cpu")
    assert rep["cpu"]["available"] and set(rep["cpu"]["families"].values()) == {"ok"}
    text = str(rep)
    for fam in registry.PRIMITIVES:
        order, why = registry.auto_order(fam, x.device)
        assert order == ("cpu", "torch") and f"auto {fam:10s} cpu > torch: {why}" in text and "reference" in why
    assert "cpu" in fastbert.backends("meta")["cpu"]["reason"]


def _opcheck_cases():
    seqlens = (3, 0, 6)
    q, k, v, cu = _attn_inputs(seqlens, 2, 32, torch.float32)
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    slopes = R.alibi_slopes(2).expand(3, 2).contiguous()
    x = torch.randn(5, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    d = lambda t: t.detach().clone()  # noqa: E731
    ops = torch.ops.fastbert
    yield ops.flash_attn_fwd.default, (q, k, v, cu, 6, slopes, 0.2, -1, -1, "cpu")
    out, lse = ops.flash_attn_fwd(d(q), d(k), d(v), cu, 6, slopes, 0.2, 2, 1, "cpu")
    yield ops.flash_attn_bwd.default, (torch.randn_like(out), d(q), d(k), d(v), out, lse, cu, 6, slopes, 0.2, 2, 1,
                                       "cpu")
    yield ops.layer_norm_fwd.default, (x, w, d(w).requires_grad_(), d(x).requires_grad_(), 1e-5, "cpu")
    y, z, mean, rstd = ops.layer_norm_fwd(d(x), d(w), None, d(x), 1e-5, "cpu")
    yield ops.layer_norm_bwd.default, (torch.randn_like(y), z, d(w), True, mean, rstd, torch.randn_like(z), "cpu")
    yield ops.bias_gelu_fwd.default, (x, w, "none", "cpu")
    yield ops.geglu_bwd.default, (torch.randn(5, 8), d(x), d(w), "tanh", "cpu")
    yield ops.index_gather.default, (x, torch.tensor([4, 0, 2]), "cpu")
    yield ops.sparse_mlm_loss_fwd.default, (x, torch.tensor([1, -100, 3, 0, -100]),
                                            torch.randn(7, 16, requires_grad=True), None, -100, True, "cpu")


@pytest.mark.parametrize("case", range(8))
def test_opcheck(case):
    op, args = list(_opcheck_cases())[case]
    torch.library.opcheck(op, args)


def test_public_attention_with_autograd():
    """flash_attn_varlen_alibi with ``cpu`` forced, [H] slopes (expanded by the ops layer), bf16."""
    from fastbert.ops import flash_attn_varlen_alibi

    seqlens, H, D, dtype = [5, 1, 0, 12], 2, 64, torch.bfloat16
    q, k, v, cu = _attn_inputs(seqlens, H, D, dtype)
    slopes = R.alibi_slopes(H)
    do = torch.randn(q.shape).to(dtype)

    def run(fn, dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, cu, max(seqlens), slopes)
        out.backward(do.to(dt))
        return [out.detach()] + [t.grad for t in leaves]

    with fastbert.use_backend("cpu"):
        got = run(flash_attn_varlen_alibi, dtype)
    ref = run(R.flash_attn_varlen_alibi, torch.float64)
    peer = run(R.flash_attn_varlen_alibi, dtype)
    for name, g, r, p in zip(("out", "dq", "dk", "dv"), got, ref, peer):
        assert_close(g, r, peer=p, factor=2 if name == "out" else 3, name=name)


def test_model_matches_reference_backend():
    """A MosaicBERT MLM step on ``auto`` (= cpu) against the reference backend: fp64 reference model, the
    fp32 reference-backend model as the peer."""
    from fastbert.models import BertConfig, BertForMaskedLM

    cfg = BertConfig.preset("tiny", vocab_size=97, hidden_size=64, num_attention_heads=2, intermediate_size=96,
                            hidden_dropout_prob=0.0)
    model = BertForMaskedLM(cfg)
    mask = torch.arange(13)[None] < torch.tensor([13, 1, 7, 10])[:, None]
    ids = torch.randint(5, 97, mask.shape) * mask
    labels = torch.where((torch.rand(mask.shape) < 0.4) & mask, ids, -100)
    labels[0, 0] = ids[0, 0]

    def run(backend, dtype):
        m = model.to(dtype)
        m.zero_grad(set_to_none=True)
        with fastbert.use_backend(backend):
            out = m(ids, mask, labels=labels)
            out.loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
        return out.loss.detach(), grads

    ref_loss, ref_g = run("torch", torch.float64)
    peer_loss, peer_g = run("torch", torch.float32)
    loss, g = run("auto", torch.float32)
    assert_close(loss, ref_loss, peer=peer_loss, factor=2, name="loss")
    assert set(g) == set(ref_g)
    _check_grads([g[n] for n in ref_g], [ref_g[n] for n in ref_g], [peer_g[n] for n in ref_g], list(ref_g))


def test_cpu_benchmark_report_table():
    """bench.report's CPU table (bench/test_bench_cpu.py rows) on hand-made numbers: paired ratios and
    their spread are printed as measured, the peer row has none."""
    from bench.report import cpu_markdown

    common = {"op": "cpu_tiny", "shape": "B32xL8-66", "pass": "step", "kind": "cpu", "timed": True, "rounds": 9,
              "threads": 1, "load_before": 1.5, "load_after": 2.0, "p20_ms": 1.0, "p80_ms": 3.0}
    rows = [dict(common, provider="hf-bert-sdpa", role="peer", variant="HF BERT", params=4.4e6, median_ms=150.0),
            dict(common, provider="fastbert-auto", role="fastbert", variant="MosaicBERT (GeGLU)", params=4.5e6,
                 median_ms=100.0, paired_speedup=1.52, paired_p20=1.41, paired_p80=1.63, cpu_paired_speedup=1.5,
                 cpu_paired_p20=1.45, cpu_paired_p80=1.55),
            dict(common, op="matmul", kind="compute")]  # not a CPU-benchmark row: ignored
    lines = cpu_markdown(rows).splitlines()
    assert len(lines) == 4
    assert "MosaicBERT (GeGLU) | 4.5M | 100.0 (1.0-3.0) | **1.52x** (1.41-1.63) | 1.50x (1.45-1.55) | 9 | 1 | 1.5 -> 2.0" \
        in lines[2]
    assert "HF BERT | 4.4M | 150.0 (1.0-3.0) | - | - |" in lines[3]
    assert cpu_markdown(rows[2:]) == ""


def test_model_forward_under_inference_mode():
    """torch.inference_mode (CPU inference services): inference tensors have no version counter, so the
    ops' checked-values cache must not ask for one; results equal no_grad's."""
    from fastbert.models import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig.preset("tiny", vocab_size=97, num_labels=3)).eval()
    mask = torch.arange(9)[None] < torch.tensor([9, 2, 5])[:, None]
    ids = torch.randint(5, 97, mask.shape) * mask
    with torch.no_grad():
        ref = model(ids, mask).logits
    for _ in range(2):  # the second call would hit the cache
        with torch.inference_mode():
            out = model(ids, mask).logits
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
