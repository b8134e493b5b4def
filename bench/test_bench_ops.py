"""Row-wise and loss ops: unpad/pad, bias+GELU, GeGLU, LayerNorm (+residual), sparse MLM loss.

Each group: fastbert (every backend) next to the eager PyTorch way of writing the op, the fastbert
reference (the spec, eager), and ``torch.compile`` of the reference; the loss also against dense
logits + ``F.cross_entropy`` (eager and compiled). All providers get the same inputs.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.common import (DEVICE, FASTBERT_BACKENDS, HIDDENS, MLM_BATCH, MLM_FRACTION, PASSES, ROW_BATCH, VOCAB,
                          Case, bench, compiled, fastbert_fn, rand)
from fastbert import reference as ref

FB = [f"fastbert-{b}" for b in FASTBERT_BACKENDS]
ES = 2  # bytes per bf16 element


def _case(provider, fn, **kw) -> Case:
    return Case(provider=provider, role="fastbert" if provider.startswith("fastbert-") else "peer", fn=fn, **kw)


# ----------------------------------------------------------------------------------------------
# bias + GELU (the MLP activation: N = 4 * hidden)
# ----------------------------------------------------------------------------------------------
def _gelu_shape(hidden):
    return ROW_BATCH.tokens, 4 * hidden


def _bias_gelu(provider, hidden) -> Case:
    M, N = _gelu_shape(hidden)

    def make(i):
        return {"x": rand(M, N, grad=True, seed=i), "bias": rand(N, grad=True, seed=1000 + i)}
    kw = dict(op="bias_gelu", shape=f"M{M}xN{N}", make_inputs=make, kind="bandwidth", tokens=M,
              bytes=2 * M * N * ES, bwd_bytes=3 * M * N * ES)  # fwd: x in, y out; bwd: dy, x in, dx out
    if provider.startswith("fastbert-"):
        fn = fastbert_fn(provider, "bias_gelu", "bias_gelu")
        return _case(provider, lambda d: fn(d["x"], d["bias"]), **kw)
    if provider == "eager":
        return _case(provider, lambda d: F.gelu(d["x"] + d["bias"]), **kw)
    if provider == "reference":
        return _case(provider, lambda d: ref.bias_gelu(d["x"], d["bias"]), **kw)
    if provider == "compile":
        fn = compiled(ref.bias_gelu)
        return _case(provider, lambda d: fn(d["x"], d["bias"]), **kw)
    raise ValueError(provider)


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("provider", FB + ["eager", "reference", "compile"])
@pytest.mark.parametrize("hidden", HIDDENS)
def test_bias_gelu(benchmark, hidden, provider, pass_):
    M, N = _gelu_shape(hidden)
    bench(benchmark, lambda: _bias_gelu(provider, hidden), "bias_gelu", f"M{M}xN{N}", provider, pass_)


# ----------------------------------------------------------------------------------------------
# GeGLU (MosaicBERT's gated MLP: x [M, 2N] -> [M, N], N = 4 * hidden)
# ----------------------------------------------------------------------------------------------
def _eager_geglu(x, bias):
    a, g = (x + bias).chunk(2, dim=-1)
    return F.gelu(a) * g


def _geglu(provider, hidden) -> Case:
    M, N = _gelu_shape(hidden)

    def make(i):
        return {"x": rand(M, 2 * N, grad=True, seed=i), "bias": rand(2 * N, grad=True, seed=1000 + i)}
    kw = dict(op="geglu", shape=f"M{M}x2N{2 * N}", make_inputs=make, kind="bandwidth", tokens=M,
              bytes=3 * M * N * ES, bwd_bytes=5 * M * N * ES)  # fwd: 2N in, N out; bwd: N + 2N in, 2N out
    if provider.startswith("fastbert-"):
        fn = fastbert_fn(provider, "geglu", "geglu")
        return _case(provider, lambda d: fn(d["x"], d["bias"]), **kw)
    if provider == "eager":
        return _case(provider, lambda d: _eager_geglu(d["x"], d["bias"]), **kw)
    if provider == "reference":
        return _case(provider, lambda d: ref.geglu(d["x"], d["bias"]), **kw)
    if provider == "compile":
        fn = compiled(ref.geglu)
        return _case(provider, lambda d: fn(d["x"], d["bias"]), **kw)
    raise ValueError(provider)


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("provider", FB + ["eager", "reference", "compile"])
@pytest.mark.parametrize("hidden", HIDDENS)
def test_geglu(benchmark, hidden, provider, pass_):
    M, N = _gelu_shape(hidden)
    bench(benchmark, lambda: _geglu(provider, hidden), "geglu", f"M{M}x2N{2 * N}", provider, pass_)


# ----------------------------------------------------------------------------------------------
# LayerNorm, with and without the fused residual add
# ----------------------------------------------------------------------------------------------
def _eager_ln(x, w, b, residual):
    if residual is None:
        return F.layer_norm(x, (x.shape[-1],), w, b, 1e-12)
    z = x + residual
    return F.layer_norm(z, (x.shape[-1],), w, b, 1e-12), z


def _layer_norm(provider, hidden, residual: bool) -> Case:
    M, N = ROW_BATCH.tokens, hidden
    op = "layer_norm+residual" if residual else "layer_norm"

    def make(i):
        d = {"x": rand(M, N, grad=True, seed=i), "weight": rand(N, grad=True, seed=1000 + i),
             "bias": rand(N, grad=True, seed=2000 + i)}
        d["residual"] = rand(M, N, grad=True, seed=3000 + i) if residual else None
        return d
    # fwd: x (+res) in, y (+z) out; bwd: dy, z in, dz out (+ the grad of z in with a residual)
    kw = dict(op=op, shape=f"M{M}xN{N}", make_inputs=make, kind="bandwidth", tokens=M,
              bytes=(4 if residual else 2) * M * N * ES, bwd_bytes=(4 if residual else 3) * M * N * ES)

    def args(d):
        return d["x"], d["weight"], d["bias"], 1e-12, d["residual"]
    if provider.startswith("fastbert-"):
        fn = fastbert_fn(provider, "layer_norm", "layer_norm")
        return _case(provider, lambda d: fn(*args(d)), **kw)
    if provider == "eager":
        return _case(provider, lambda d: _eager_ln(d["x"], d["weight"], d["bias"], d["residual"]), **kw)
    if provider == "reference":
        return _case(provider, lambda d: ref.layer_norm(*args(d)), **kw)
    if provider == "compile":
        fn = compiled(ref.layer_norm)
        return _case(provider, lambda d: fn(*args(d)), **kw)
    raise ValueError(provider)


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("provider", FB + ["eager", "reference", "compile"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("hidden", HIDDENS)
def test_layer_norm(benchmark, hidden, residual, provider, pass_):
    op = "layer_norm+residual" if residual else "layer_norm"
    bench(benchmark, lambda: _layer_norm(provider, hidden, residual), op, f"M{ROW_BATCH.tokens}xN{hidden}",
          provider, pass_)


# ----------------------------------------------------------------------------------------------
# unpad / pad (the model boundary: [B, S, hidden] <-> [T, hidden])
# ----------------------------------------------------------------------------------------------
def _padding(provider, hidden, which: str) -> Case:
    Bt = ROW_BATCH
    B, S, T = Bt.B, Bt.S, Bt.tokens
    mask = Bt.mask()
    indices = torch.nonzero(mask.flatten()).flatten()

    if which == "unpad":
        def make(i):
            return {"hidden": rand(B, S, hidden, grad=True, seed=i), "mask": mask}
        # fwd: T rows gathered (read + write); bwd: T rows read, B*S rows written (zeros at pads)
        kw = dict(bytes=2 * T * hidden * ES, bwd_bytes=(T + B * S) * hidden * ES)

        def wrap(f):
            return lambda d: f(d["hidden"], d["mask"])[0]
        opname, ref_fn = "unpad_input", ref.unpad_input
    else:
        def make(i):
            return {"x": rand(T, hidden, grad=True, seed=i), "indices": indices}
        kw = dict(bytes=(T + B * S) * hidden * ES, bwd_bytes=2 * T * hidden * ES)

        def wrap(f):
            return lambda d: f(d["x"], d["indices"], B, S)
        opname, ref_fn = "pad_input", ref.pad_input
    kw.update(op=which, shape=f"B{B}xS{S}xH{hidden}(T{T})", make_inputs=make, kind="bandwidth", tokens=T)
    if provider.startswith("fastbert-"):
        return _case(provider, wrap(fastbert_fn(provider, "padding", opname)), **kw)
    if provider == "reference":
        return _case(provider, wrap(ref_fn), **kw)
    if provider == "compile":
        return _case(provider, wrap(compiled(ref_fn)), **kw)
    raise ValueError(provider)


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("provider", FB + ["reference", "compile"])
@pytest.mark.parametrize("which", ["unpad", "pad"])
@pytest.mark.parametrize("hidden", HIDDENS)
def test_padding(benchmark, hidden, which, provider, pass_):
    Bt = ROW_BATCH
    bench(benchmark, lambda: _padding(provider, hidden, which), which,
          f"B{Bt.B}xS{Bt.S}xH{hidden}(T{Bt.tokens})", provider, pass_)


# ----------------------------------------------------------------------------------------------
# sparse MLM loss vs dense logits + cross-entropy
# ----------------------------------------------------------------------------------------------
def _mlm_inputs(hidden):
    T = MLM_BATCH.tokens
    g = torch.Generator().manual_seed(7)
    labels = torch.randint(0, VOCAB, (T,), generator=g)
    labels[torch.rand(T, generator=g) >= MLM_FRACTION] = -100
    return T, labels, int((labels != -100).sum())


def _dense_loss(hidden, labels, weight, bias):
    logits = F.linear(hidden, weight, bias)  # [T, V] in bf16: what an unfused MLM head does
    return F.cross_entropy(logits.float(), labels, ignore_index=-100)


def _mlm(provider, hidden) -> Case:
    T, labels_cpu, n = _mlm_inputs(hidden)
    labels = labels_cpu.to(DEVICE)

    def make(i):
        return {"hidden": rand(T, hidden, grad=True, seed=i), "labels": labels,
                "weight": rand(VOCAB, hidden, grad=True, scale=0.02, seed=1000 + i),
                "bias": rand(VOCAB, grad=True, scale=0.02, seed=2000 + i)}

    def args(d):
        return d["hidden"], d["labels"], d["weight"], d["bias"]
    # Useful work: the labelled rows' projection only (fwd 2nHV; bwd dhidden + dweight 4nHV).
    kw = dict(op="mlm_loss", shape=f"T{T}(n{n})xH{hidden}xV{VOCAB}", make_inputs=make, kind="compute",
              flops=2.0 * n * hidden * VOCAB, bwd_flops=4.0 * n * hidden * VOCAB, tokens=T,
              extra={"labelled": n})
    if provider.startswith("fastbert-"):
        fn = fastbert_fn(provider, "mlm_loss", "sparse_mlm_loss")  # max_labelled = n: no host sync (as the model)
        return _case(provider, lambda d: fn(*args(d), -100, n), **kw)
    if provider == "dense":
        return _case(provider, lambda d: _dense_loss(*args(d)), **kw)
    if provider == "dense-compile":
        fn = compiled(_dense_loss)
        return _case(provider, lambda d: fn(*args(d)), **kw)
    if provider == "reference":
        return _case(provider, lambda d: ref.sparse_mlm_loss(*args(d)), **kw)
    if provider == "compile":
        fn = compiled(ref.sparse_mlm_loss)
        return _case(provider, lambda d: fn(*args(d)), **kw)
    raise ValueError(provider)


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("provider", FB + ["dense", "dense-compile", "reference", "compile"])
@pytest.mark.parametrize("hidden", HIDDENS)
def test_mlm_loss(benchmark, hidden, provider, pass_):
    T, _, n = _mlm_inputs(hidden)
    bench(benchmark, lambda: _mlm(provider, hidden), "mlm_loss", f"T{T}(n{n})xH{hidden}xV{VOCAB}", provider, pass_)
