"""torch.compile(fullgraph=True) of whole unpadding models (issue 14.2) and what a compiled call does with
a bad value that the eager checks would have caught (issue 22.4).

Under compile ``max_seqlen``, the token count and the number of labelled rows are data-dependent
(unbacked SymInts); the value checks the public ops run eagerly are skipped while tracing and run instead
inside each custom op's real implementation, which executes eagerly in the compiled graph. Each bad value
below is shown to raise the error naming the argument on every backend available here, never to return
a silently wrong result. ``aot_eager`` traces forward and backward exactly as inductor does, without
spending CI time in the C++ compiler.
"""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fastbert
from fastbert import ops as O
from fastbert import registry
from fastbert.models import BertConfig, BertForMaskedLM, BertForSequenceClassification
from fastbert.ops import _checks

_CFG = dict(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
            hidden_dropout_prob=0.0)


def _batch(B, S, V, lengths):
    ids = torch.randint(5, V, (B, S))
    mask = torch.zeros(B, S, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    labels = torch.full((B, S), -100)
    sel = (torch.rand(B, S) < 0.4) & mask.bool()
    sel[0, 0] = True
    labels[sel] = torch.randint(0, V, (int(sel.sum()),))
    return ids, mask, labels


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cls", [BertForMaskedLM, BertForSequenceClassification])
def test_whole_model_fullgraph_forward_backward(cls):
    model = cls(BertConfig.preset("tiny", **_CFG))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    mlm = cls is BertForMaskedLM
    # same shapes, different lengths and label counts: the data-dependent sizes need no recompile
    for lengths in ((7, 3, 5), (2, 7, 1)):
        ids, mask, labels = _batch(3, 7, 128, lengths)
        if not mlm:
            labels = torch.randint(0, 2, (3,))
        model.zero_grad()
        out = compiled(ids, mask, labels=labels)
        out.loss.backward()
        got = _grads(model)
        model.zero_grad()
        ref = model(ids, mask, labels=labels)
        ref.loss.backward()
        want = _grads(model)
        torch.testing.assert_close(out.loss, ref.loss)
        torch.testing.assert_close(out.logits, ref.logits)
        assert got.keys() == want.keys() and len(got) > 10
        for name in want:
            torch.testing.assert_close(got[name], want[name], msg=lambda m, n=name: f"grad of {n}: {m}")
        if mlm:
            assert out.n_masked == ref.n_masked == int((labels != -100).sum())
    # input errors the eager model raises as ValueError become asserts in the graph, same message
    if mlm:
        mask[1, 5:] = 0  # shorten sequence 1 and leave a label on one of its new pads
        labels[1, 5] = 5
        with pytest.raises(RuntimeError, match="labels: some labelled positions are padding"):
            compiled(ids, mask, labels=labels)
        labels[1, 5:] = -100
        labels[0, 0] = 128  # outside the vocabulary: the loss op's own check, run inside the graph
        with pytest.raises(ValueError, match=r"labels: expected values in \[0, 128\)"):
            compiled(ids, mask, labels=labels)
    else:
        with pytest.raises(RuntimeError, match="every sequence is empty"):
            compiled(ids, torch.zeros_like(mask), labels=labels)
    assert counter.frame_count == 1, "a batch with other lengths recompiled the model"
    model.eval()  # the eval path: logits of the labelled rows (MLM) / of the batch (classification)
    ids, mask, labels = _batch(2, 5, 128, (5, 2))
    kw = {"labels": labels} if mlm else {}
    torch.testing.assert_close(compiled(ids, mask, **kw).logits, model(ids, mask, **kw).logits)


# ------------------------------------------------------------------ bad values inside a compiled graph
def _available_backends():
    return [name for name, be in registry.BACKENDS.items() if be.why_not(torch.device("cpu")) is None]


def _attn_fn(q, k, v, cu, max_seqlen):
    return O.flash_attn_varlen_alibi(q, k, v, cu, max_seqlen, O.alibi_slopes(q.shape[1]))


_attn_c = torch.compile(_attn_fn, fullgraph=True, backend="aot_eager", dynamic=True)
_loss_c = torch.compile(lambda h, lab, w: O.sparse_mlm_loss(h, lab, w), fullgraph=True, backend="aot_eager",
                        dynamic=True)
_pad_c = torch.compile(lambda x, idx: O.pad_input(x, idx, 2, 3), fullgraph=True, backend="aot_eager")


def _attn_dtype(backend):
    """fp32 where the backend runs it, else bf16 (the CUDA kernels are tensor-core only)."""
    cu = torch.tensor([0, 1], dtype=torch.int32)
    for dt in (torch.float32, torch.bfloat16):
        q = torch.zeros(1, 1, 32, dtype=dt)
        if registry._impl_or_reason("flash_attn_fwd", backend, q.device, (q, q, q, cu, 1, None, 1.0), dt)[0]:
            return dt
    raise AssertionError(f"{backend} runs no attention dtype")


@pytest.mark.parametrize("backend", _available_backends())
def test_compiled_attention_bad_hint_raises_on_every_backend(backend):
    dt = _attn_dtype(backend)
    q, k, v = (torch.randn(8, 2, 32).to(dt).requires_grad_() for _ in range(3))
    cu = torch.tensor([0, 5, 8], dtype=torch.int32)
    with fastbert.use_backend(backend):
        good = _attn_c(q, k, v, cu, 5)  # the right hint: the right answer, forward and backward
        torch.testing.assert_close(good, _attn_fn(q, k, v, cu, 5), atol=0, rtol=0)
        good.sum().backward()
        # what the issue saw: uninitialised rows past max_seqlen on triton and cuda_host
        with pytest.raises(ValueError, match=r"max_seqlen: expected at least the longest sequence \(5\), got 4"):
            _attn_c(q, k, v, cu.clone(), 4)
        for bad, what in (([1, 5, 8], r"cu_seqlens\[0\] == 0"), ([0, 6, 5], "non-decreasing"),
                          ([0, 5, 7], r"cu_seqlens\[-1\] == 8")):
            with pytest.raises(ValueError, match=what):
                _attn_c(q, k, v, torch.tensor(bad, dtype=torch.int32), 6)


@pytest.mark.parametrize("backend", _available_backends())
def test_compiled_loss_and_padding_bad_values_raise_on_every_backend(backend):
    h, w = torch.randn(4, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    x = torch.randn(3, 4)
    with fastbert.use_backend(backend):
        _loss_c(h, torch.tensor([1, -100, 9, 0]), w).backward()
        for bad in ([1, 10, -100, 0], [-3, 1, 2, 3]):
            with pytest.raises(ValueError, match=r"labels: expected values in \[0, 10\) or ignore_index=-100"):
                _loss_c(h, torch.tensor(bad), w)
        torch.testing.assert_close(_pad_c(x, torch.tensor([0, 4, 5])), O.pad_input(x, torch.tensor([0, 4, 5]), 2, 3))
        for bad in ([0, 4, 6], [-1, 0, 1]):  # 6 rows: index 6 is one past the end
            with pytest.raises(ValueError, match=r"indices: expected row indices in \[0, 6\)"):
                _pad_c(x, torch.tensor(bad))
            with pytest.raises(ValueError, match=r"indices: expected row indices in \[0, 6\)"):
                O.pad_input(x, torch.tensor(bad), 2, 3)  # eagerly too (this check is new)


def test_value_check_cache_follows_the_tensor_not_its_address():
    q = k = v = torch.randn(6, 1, 32)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    O.flash_attn_varlen_alibi(q, k, v, cu, 4)
    assert _checks._already_checked("cu_seqlens", cu, (6, 4))
    cu[1] = 1  # changed in place: checked again (and now too long for the hint)
    with pytest.raises(ValueError, match="max_seqlen"):
        O.flash_attn_varlen_alibi(q, k, v, cu, 4)
    del cu  # a new tensor, even at the same address, is a new tensor
    cu2 = torch.tensor([0, 1, 6], dtype=torch.int32)
    assert not _checks._already_checked("cu_seqlens", cu2, (6, 4))
    with pytest.raises(ValueError, match="max_seqlen"):
        O.flash_attn_varlen_alibi(q, k, v, cu2, 4)
