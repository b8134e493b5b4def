"""ALiBi attention over unpadded variable-length batches, against every PyTorch way of doing it.

Peers on the same batch (same lengths, same heads, head dim 64):

* ``sdpa-flash-nobias``: ``F.scaled_dot_product_attention`` with the flash backend on the *padded*
  batch, no bias, no mask: the speed of light for PyTorch (it computes the pads and has no ALiBi, so it
  is not the same function; it bounds what a fused kernel can reach).
* ``sdpa-alibi-bias``: SDPA on the padded batch with a materialised ``[B, H, S, S]`` ALiBi + padding bias
  (built once, outside the timing): what a user without a fused kernel does.
* ``flex-alibi``: FlexAttention (compiled) on the packed batch with an ALiBi ``score_mod``
  (symmetric ``-slope * |i - j|``) and a document ``block_mask`` (tokens attend within their sequence).
* ``reference``: fastbert's spec (eager, padded, fp32).

Every row's TFLOP/s counts only real tokens: ``4 * sum(s_i^2) * H * D`` forward, 2.5x that backward.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.common import (ATTN_SHAPES, DEVICE, DTYPE, FASTBERT_BACKENDS, PASSES, SMOKE, Case, Missing, bench,
                          compiled, fastbert_fn, rand)
from fastbert import reference as ref

PROVIDERS = [f"fastbert-{b}" for b in FASTBERT_BACKENDS] + ["sdpa-flash-nobias", "sdpa-alibi-bias",
                                                             "flex-alibi", "reference"]


def _shape_name(batch, H, D):
    return f"{batch.name}xH{H}xD{D}"


def _packed_inputs(batch, H, D):
    T = batch.tokens

    def make(i):
        return {n: rand(T, H, D, grad=True, seed=10 * i + j) for j, n in enumerate("qkv")}
    return make


def _padded_inputs(batch, H, D):
    def make(i):
        return {n: rand(batch.B, H, batch.S, D, grad=True, seed=10 * i + j) for j, n in enumerate("qkv")}
    return make


def _alibi_padding_bias(batch, slopes):
    """``[B, H, S, S]`` bf16: ``-slope * |i - j|`` and ``-inf`` at padded keys."""
    S = batch.S
    ar = torch.arange(S, device=DEVICE, dtype=torch.float32)
    dist = (ar[:, None] - ar[None, :]).abs()
    bias = -slopes.to(DEVICE)[None, :, None, None] * dist
    keep = batch.mask()[:, None, None, :]
    return bias.masked_fill(~keep, float("-inf")).to(DTYPE)


_FLEX = {}


def _compiled_flex(flex_attention):
    if "fn" not in _FLEX:  # one compiled wrapper for every shape (static shapes, one graph each)
        _FLEX["fn"] = compiled(flex_attention)
    return _FLEX["fn"]


def _flex(batch, H, slopes, pass_, window=(-1, -1)):
    """FlexAttention on the packed batch: ALiBi ``score_mod``, a document ``block_mask`` (and, with a
    ``window``, ``i - left <= j <= i + right``: FlexAttention then skips the blocks outside it)."""
    if DEVICE.type == "cpu" and pass_ != "fwd":
        raise Missing("FlexAttention has no backward on CPU")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        raise Missing(f"FlexAttention is not available in torch {torch.__version__}: {e}")
    T = batch.tokens
    cu = batch.cu_seqlens(DEVICE).long()
    doc = torch.bucketize(torch.arange(T, device=DEVICE), cu[1:], right=True)
    s = slopes.to(DEVICE)

    def score_mod(score, b, h, q_idx, kv_idx):
        # Sequences are contiguous in the packed batch, so |q_idx - kv_idx| is the in-sequence distance.
        return score - s[h] * (q_idx - kv_idx).abs()

    left, right = window

    def mask_mod(b, h, q_idx, kv_idx):
        same = doc[q_idx] == doc[kv_idx]
        if window == (-1, -1):
            return same
        rel = kv_idx - q_idx
        return same & (rel >= -left) & (rel <= right)

    block_mask = create_block_mask(mask_mod, 1, None, T, T, device=str(DEVICE))
    # Compiled is how FlexAttention is meant to run; eager (smoke mode) only checks the code path.
    attn = flex_attention if SMOKE else _compiled_flex(flex_attention)

    def fn(d):
        q, k, v = (d[n].transpose(0, 1).unsqueeze(0) for n in "qkv")  # [1, H, T, D]
        if DEVICE.type == "cpu":  # CPU FlexAttention refuses inputs that require grad
            q, k, v = q.detach(), k.detach(), v.detach()
        return attn(q, k, v, score_mod=score_mod, block_mask=block_mask).squeeze(0).transpose(0, 1)
    return fn


def _attention(provider, batch, H, D, pass_) -> Case:
    slopes = ref.alibi_slopes(H)
    fwd_flops = 4.0 * batch.sum_sq * H * D
    kw = dict(op="attention", shape=_shape_name(batch, H, D), kind="compute", flops=fwd_flops,
              bwd_flops=2.5 * fwd_flops, tokens=batch.tokens, extra={"heads": H, "head_dim": D})
    if provider.startswith("fastbert-") or provider == "reference":
        cu, S = batch.cu_seqlens(DEVICE), batch.S
        sl = slopes.to(DEVICE)
        f = ref.flash_attn_varlen_alibi if provider == "reference" else \
            fastbert_fn(provider, "attention", "flash_attn_varlen_alibi")
        return Case(provider=provider, role="fastbert" if provider != "reference" else "peer",
                    make_inputs=_packed_inputs(batch, H, D), fn=lambda d: f(d["q"], d["k"], d["v"], cu, S, sl), **kw)
    if provider == "sdpa-flash-nobias":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def fn(d):
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F.scaled_dot_product_attention(d["q"], d["k"], d["v"])
        return Case(provider=provider, role="peer", make_inputs=_padded_inputs(batch, H, D), fn=fn, **kw)
    if provider == "sdpa-alibi-bias":
        bias = _alibi_padding_bias(batch, slopes)
        return Case(provider=provider, role="peer", make_inputs=_padded_inputs(batch, H, D),
                    fn=lambda d: F.scaled_dot_product_attention(d["q"], d["k"], d["v"], attn_mask=bias), **kw)
    if provider == "flex-alibi":
        return Case(provider=provider, role="peer", make_inputs=_packed_inputs(batch, H, D),
                    fn=_flex(batch, H, slopes, pass_), **kw)
    raise ValueError(provider)


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=[_shape_name(*s) for s in ATTN_SHAPES])
def test_attention(benchmark, shape, provider, pass_):
    batch, H, D = shape
    bench(benchmark, lambda: _attention(provider, batch, H, D, pass_), "attention", _shape_name(batch, H, D),
          provider, pass_)
