"""One training step (forward, backward, AdamW) of fastbert's MosaicBERT-base against a Hugging Face
``BertForMaskedLM`` (SDPA attention) of the same size, random init from a config (nothing downloaded),
bf16 autocast on GPU, on the same batch (real length spread, 30% of real tokens masked).

FLOPs are the *useful* work of each model on real tokens, so MFU compares work done, not work wasted on
pads: ``6 * T * (linear weights) + 3.5 * L * 4 * sum(s_i^2) * hidden`` (attention fwd + 2.5x bwd)
``+ 6 * n_masked * hidden * vocab`` (the decoder on labelled rows); the small MLM-head transform is
counted on every token (an over-count of well under 1%).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from bench.common import DEVICE, FASTBERT_BACKENDS, MLM_FRACTION, SMOKE, TRAIN_BATCH, Case, Missing, backend_reason, bench

# fastbert-auto: what a user gets (per op, the fastest backend that can run); the others force one backend.
PROVIDERS = [f"fastbert-{b}" for b in FASTBERT_BACKENDS + ("auto",)] + ["hf-bert-sdpa"]
SHAPE = f"{TRAIN_BATCH.name}"


def _batch_tensors(vocab: int, seed: int):
    b = TRAIN_BATCH
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b.B, b.S), generator=g)
    mask = b.mask("cpu")
    labels = torch.where(torch.rand(b.B, b.S, generator=g) < MLM_FRACTION, ids, torch.full_like(ids, -100))
    labels[~mask] = -100
    ids[~mask] = 0
    return {"input_ids": ids.to(DEVICE), "attention_mask": mask.to(DEVICE), "labels": labels.to(DEVICE)}


def _useful_flops(model: torch.nn.Module, hidden: int, layers: int, vocab: int, n_masked: int) -> float:
    lin = sum(m.weight.numel() for m in model.modules()
              if isinstance(m, torch.nn.Linear) and m.out_features < vocab)
    b = TRAIN_BATCH
    return 6.0 * b.tokens * lin + 3.5 * layers * 4.0 * b.sum_sq * hidden + 6.0 * n_masked * hidden * vocab


def _fastbert_config():
    try:
        from fastbert.models import BertConfig
    except Exception as e:  # noqa: BLE001
        raise Missing(f"fastbert.models is not importable: {type(e).__name__}: {e}")
    return BertConfig.preset("tiny" if SMOKE else "base")


def _hf_model(fb_cfg):
    try:
        import transformers
    except ImportError as e:
        raise Missing(f"transformers is not installed: {e}")
    cfg = transformers.BertConfig(vocab_size=fb_cfg.vocab_size, hidden_size=fb_cfg.hidden_size,
                                  num_hidden_layers=fb_cfg.num_hidden_layers,
                                  num_attention_heads=fb_cfg.num_attention_heads,
                                  intermediate_size=fb_cfg.intermediate_size, max_position_embeddings=512,
                                  attn_implementation="sdpa")
    return transformers.BertForMaskedLM(cfg)


def _train_case(provider) -> Case:
    cfg = _fastbert_config()
    if provider == "hf-bert-sdpa":
        model, force = _hf_model(cfg), contextlib.nullcontext
    else:
        backend = provider.split("-", 1)[1]
        reason = None if backend == "auto" else backend_reason(backend, "attention")
        if reason:
            raise Missing(reason)
        import fastbert
        from fastbert.models import BertForMaskedLM
        model = BertForMaskedLM(cfg)

        def force():
            return fastbert.use_backend(backend)
    model = model.to(DEVICE).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=DEVICE.type == "cuda")
    # bf16 autocast on GPU (how both are trained); fp32 on CPU where smoke mode only checks the code path.
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if DEVICE.type == "cuda" else contextlib.nullcontext
    vocab = cfg.vocab_size

    def step(d):
        opt.zero_grad(set_to_none=True)
        with force(), amp():
            out = model(input_ids=d["input_ids"], attention_mask=d["attention_mask"], labels=d["labels"])
            loss = out.loss if hasattr(out, "loss") else out[0]
            loss.backward()
        opt.step()
        return loss.detach()

    n_masked = int((_batch_tensors(vocab, 0)["labels"] != -100).sum())
    flops = _useful_flops(model, cfg.hidden_size, cfg.num_hidden_layers, vocab, n_masked)
    params = sum(p.numel() for p in model.parameters())
    return Case(op="train_step", shape=SHAPE, provider=provider,
                role="fastbert" if provider.startswith("fastbert-") else "peer",
                make_inputs=lambda i: _batch_tensors(vocab, i), fn=step, kind="compute", flops=flops,
                tokens=TRAIN_BATCH.tokens, extra={"params": params, "n_masked": n_masked,
                                                  "model": "mosaicbert" if provider != "hf-bert-sdpa" else "hf-bert"})


@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_step(benchmark, provider):
    bench(benchmark, lambda: _train_case(provider), "train_step", SHAPE, provider, "step")
