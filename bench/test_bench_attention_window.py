"""Local (sliding-window) ALiBi attention: a 128-token window (64 keys each side, ModernBERT's local layers)
at sequence lengths 512 / 1024 / 2048 / 8192, against every way PyTorch offers to compute it.

Peers on the same batch (``B`` full-length sequences, 12 heads, head dim 64, bf16):

* ``flex-window``: FlexAttention (compiled) with the ALiBi ``score_mod`` and a ``block_mask`` of
  ``same sequence and |i - j| <= 64``: FlexAttention skips the empty blocks, so it also scales linearly.
* ``sdpa-band-mask``: ``F.scaled_dot_product_attention`` on the padded batch with a materialised
  ``[B, H, S, S]`` bias (ALiBi, ``-inf`` outside the band), built outside the timing: what a user without
  a windowed kernel does; quadratic in time and memory.
* ``global-cuda`` / ``global-triton``: fastbert's own global attention on the same inputs (the window
  off): what the window saves.
* ``reference``: fastbert's spec (eager, padded, fp32; only up to 2048 tokens, it materialises the
  scores).

Useful FLOPs count only the scores inside the window: ``4 * H * D * sum_i |window(i)|`` forward, 2.5x
that backward, so TFLOP/s compare kernels that skip blocks with kernels that compute them. The report's
scaling table shows each provider's time against the length: a windowed kernel's time grows linearly
(ratio ~1 in the last column), a global one's quadratically.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import pytest
import torch
import torch.nn.functional as F

from bench.common import DEVICE, DTYPE, FASTBERT_BACKENDS, PASSES, SMOKE, Batch, Case, Missing, bench, fastbert_fn
from bench.test_bench_attention import _flex, _packed_inputs, _padded_inputs
from fastbert import reference as ref


@dataclass(frozen=True)
class FullBatch(Batch):
    """``B`` sequences of exactly ``S`` tokens (no length spread: the scaling in S stays clean)."""

    @property
    def lengths(self) -> List[int]:
        return [self.S] * self.B


if SMOKE:
    WINDOW = (4, 4)
    SHAPES = [(FullBatch(2, 16), 2, 32)]  # proves the code path; the length sweep is for the GPU
else:
    WINDOW = (64, 64)  # ModernBERT: local_attention = 128
    SHAPES = [(FullBatch(4, S), 12, 64) for S in (512, 1024, 2048, 8192)]
REFERENCE_MAX_S = 2048
PROVIDERS = [f"fastbert-{b}" for b in FASTBERT_BACKENDS] + ["global-cuda", "global-triton", "flex-window",
                                                             "sdpa-band-mask", "reference"]


def _name(batch, H, D):
    return f"B{batch.B}xS{batch.S}xH{H}xD{D}-w{WINDOW[0]}/{WINDOW[1]}"


def window_pairs(S: int, window=WINDOW) -> int:
    """Number of (query, key) pairs inside the window of one sequence of length ``S``."""
    left, right = window
    return sum(min(i + right, S - 1) - max(i - left, 0) + 1 for i in range(S))


def _band_bias(batch, slopes):
    """``[B, H, S, S]`` bias: ``-slope * |i - j|`` inside the window, ``-inf`` outside."""
    S = batch.S
    ar = torch.arange(S, device=DEVICE)
    rel = ar[None, :] - ar[:, None]
    bias = -slopes.to(DEVICE)[:, None, None] * rel.abs().float()
    bias = bias.masked_fill((rel < -WINDOW[0]) | (rel > WINDOW[1]), float("-inf"))
    return bias[None].expand(batch.B, -1, -1, -1).to(DTYPE).contiguous()


def _case(provider, batch, H, D, pass_) -> Case:
    slopes = ref.alibi_slopes(H)
    fwd_flops = 4.0 * window_pairs(batch.S) * batch.B * H * D
    kw = dict(op="attention_window", shape=_name(batch, H, D), kind="compute", flops=fwd_flops,
              bwd_flops=2.5 * fwd_flops, tokens=batch.tokens,
              extra={"heads": H, "head_dim": D, "seqlen": batch.S, "window": list(WINDOW)})
    cu, S, sl = batch.cu_seqlens(DEVICE), batch.S, slopes.to(DEVICE)
    if provider.startswith(("fastbert-", "global-")):
        backend = provider.split("-", 1)[1]
        window = WINDOW if provider.startswith("fastbert-") else (-1, -1)
        f = fastbert_fn(f"fastbert-{backend}", "attention", "flash_attn_varlen_alibi")
        return Case(provider=provider, role="fastbert" if window != (-1, -1) else "peer",
                    make_inputs=_packed_inputs(batch, H, D),
                    fn=lambda d: f(d["q"], d["k"], d["v"], cu, S, sl, window_size=window), **kw)
    if provider == "reference":
        if S > REFERENCE_MAX_S:
            raise Missing(f"the reference materialises [B, H, S, S] fp32 scores; run up to S = {REFERENCE_MAX_S}")
        return Case(provider=provider, role="peer", make_inputs=_packed_inputs(batch, H, D),
                    fn=lambda d: ref.flash_attn_varlen_alibi(d["q"], d["k"], d["v"], cu, S, sl, window_size=WINDOW),
                    **kw)
    if provider == "sdpa-band-mask":
        bias = _band_bias(batch, slopes)
        return Case(provider=provider, role="peer", make_inputs=_padded_inputs(batch, H, D),
                    fn=lambda d: F.scaled_dot_product_attention(d["q"], d["k"], d["v"], attn_mask=bias), **kw)
    if provider == "flex-window":
        return Case(provider=provider, role="peer", make_inputs=_packed_inputs(batch, H, D),
                    fn=_flex(batch, H, slopes, pass_, WINDOW), **kw)
    raise ValueError(provider)


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=[_name(*s) for s in SHAPES])
def test_attention_window(benchmark, shape, provider, pass_):
    batch, H, D = shape
    bench(benchmark, lambda: _case(provider, batch, H, D, pass_), "attention_window", _name(batch, H, D), provider,
          pass_)
