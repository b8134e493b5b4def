"""A Hugging Face encoder three ways: ``attn_implementation="fastbert"``, ``apply_fastbert(model)`` and
``apply_fastbert(model, unpad=True)``, beside the same model under SDPA (and FlashAttention-2 where
``flash_attn`` is installed). ``BertForMaskedLM`` at BERT-base size (tiny in smoke mode), random init from a
config (nothing downloaded), attention dropout 0 for every provider (the unpadded kernels have none; MosaicBERT
trains without it), 30% of the real tokens labelled, bf16 autocast on GPU.

Two passes per sequence length (128 and 512, lengths uniform in [S/4, S], 16384 padded tokens per batch):
``fwd`` (eval, MLM loss under ``no_grad``) and ``step`` (train mode: forward, backward, AdamW). FLOPs are the
useful work on real tokens (as in ``test_bench_train``), so a provider that computes pads gets no credit.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from bench.common import DEVICE, MLM_FRACTION, SMOKE, Batch, Case, Missing, bench

PROVIDERS = ["fastbert-attn", "fastbert-patch", "fastbert-unpad", "hf-sdpa", "hf-fa2"]
BATCHES = [Batch(3, 16)] if SMOKE else [Batch(16384 // S, S) for S in (128, 512)]
_MODEL = {}


def _hf_base():
    """One randomly initialised BertForMaskedLM per process (each provider gets a deep copy)."""
    try:
        import transformers
    except ImportError as e:
        raise Missing(f"transformers is not installed: {e}")
    if "m" not in _MODEL:
        size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                    vocab_size=128) if SMOKE else dict(vocab_size=30528)  # BERT-base otherwise
        cfg = transformers.BertConfig(attention_probs_dropout_prob=0.0, max_position_embeddings=512, **size)
        _MODEL["m"] = transformers.BertForMaskedLM(cfg)
    return _MODEL["m"]


def _model(provider: str):
    model = copy.deepcopy(_hf_base())
    if provider == "hf-fa2":
        try:
            import flash_attn  # noqa: F401
        except ImportError as e:
            raise Missing(f"flash_attn is not installed ({e})")
        if DEVICE.type != "cuda":
            raise Missing("FlashAttention-2 needs a CUDA GPU")
        model.set_attn_implementation("flash_attention_2")
    elif provider == "hf-sdpa":
        model.set_attn_implementation("sdpa")
    else:
        from fastbert import hf
        from fastbert.patch import apply_fastbert
        if provider == "fastbert-attn":
            model.set_attn_implementation(hf.register())
        else:
            apply_fastbert(model, unpad=provider == "fastbert-unpad")
    return model.to(DEVICE)


def _inputs(b: Batch, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b.B, b.S), generator=g)
    mask = b.mask("cpu")
    labels = torch.where(torch.rand(b.B, b.S, generator=g) < MLM_FRACTION, ids, torch.full_like(ids, -100))
    labels[~mask], ids[~mask] = -100, 0
    return {"input_ids": ids.to(DEVICE), "attention_mask": mask.long().to(DEVICE), "labels": labels.to(DEVICE)}


def _case(provider: str, b: Batch, pass_: str) -> Case:
    model = _model(provider)
    cfg = model.config
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if DEVICE.type == "cuda" else contextlib.nullcontext
    n_masked = int((_inputs(b, cfg.vocab_size, 0)["labels"] != -100).sum())
    lin = sum(m.weight.numel() for m in model.modules()
              if isinstance(m, torch.nn.Linear) and m.out_features < cfg.vocab_size)
    H, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    fwd_flops = 2.0 * b.tokens * lin + L * 4.0 * b.sum_sq * H + 2.0 * n_masked * H * V
    if pass_ == "fwd":
        model.eval()

        def fn(d):
            with amp():
                return model(**d).loss
        flops = fwd_flops
    else:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=DEVICE.type == "cuda")

        def fn(d):
            opt.zero_grad(set_to_none=True)
            with amp():
                loss = model(**d).loss
            loss.backward()
            opt.step()
            return loss.detach()
        flops = 3.0 * fwd_flops + 1.5 * L * 4.0 * b.sum_sq * H  # backward: 2x linear, 2.5x attention
    return Case(op="hf_encoder", shape=b.name, provider=provider, role="fastbert" if provider.startswith("fastbert")
                else "peer", make_inputs=lambda i: _inputs(b, V, i), fn=fn, kind="compute", flops=flops,
                tokens=b.tokens, extra={"n_masked": n_masked, "model": f"hf BertForMaskedLM H{H} L{L}"})


@pytest.mark.parametrize("pass_", ["fwd", "step"])
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: b.name)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_hf_encoder(benchmark, provider, batch, pass_):
    bench(benchmark, lambda: _case(provider, batch, pass_), "hf_encoder", batch.name, provider, pass_)
