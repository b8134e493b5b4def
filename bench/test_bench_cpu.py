"""CPU benchmark: fastbert's MosaicBERT (``auto``, i.e. the ``cpu`` backend) against Hugging Face BERT (SDPA)
of the same size, on the CPU, as a real measurement.

    FASTBERT_BENCH_CPU=1 python -m pytest bench/test_bench_cpu.py --benchmark-only \\
        --benchmark-json=/tmp/cpu.json && python -m bench.report /tmp/cpu.json

Per size (``tiny``, ``mini``, ``base`` presets; HF ``BertConfig`` with the same hidden size, layers, heads
and intermediate size) and pass: ``step`` is one training step of a sequence classifier (forward,
backward, AdamW; dropout as each model's default config), ``fwd`` the eval forward under
``torch.inference_mode``. One batch of 32 sequences with lengths uniform in [8, 66] (fixed seed), fp32.

The two models are timed in one process, interleaved A, B, B, A, ... so that load from other processes
on a shared machine lands on both; each round gives a paired ratio (HF time / fastbert time). Reported:
median wall ms (p20-p80) per model, the median paired ratio with its p20-p80 (the noise), the same from
process CPU time (less sensitive to other processes taking the cores), and the load average before and
after. ``FASTBERT_BENCH_CPU_THREADS`` (default 1: what the train harness uses on CPU),
``FASTBERT_BENCH_CPU_SIZES`` (default ``tiny,mini,base``) and ``FASTBERT_BENCH_CPU_SECONDS`` (timing budget per
group, default 40) tune a run.

Without ``FASTBERT_BENCH_CPU=1``: in smoke mode (no GPU, CI) each case runs once on ``tiny`` untimed (the code
path is checked, nothing is claimed); on a GPU machine the cases are reported as not run.
"""
from __future__ import annotations

import functools
import os
import statistics
import time
from typing import Dict

import pytest
import torch

from bench.common import CPU_BENCH, SMOKE, Missing, missing

SIZES = os.environ.get("FASTBERT_BENCH_CPU_SIZES", "tiny,mini,base").split(",") if CPU_BENCH else ["tiny"]
THREADS = int(os.environ.get("FASTBERT_BENCH_CPU_THREADS", "1"))
BUDGET_S = float(os.environ.get("FASTBERT_BENCH_CPU_SECONDS", "40"))
BATCH, MIN_LEN, MAX_LEN = 32, 8, 66
# fastbert-auto: the MosaicBERT recipe (GeGLU MLP: wi is H x 2I, so 1.33x HF's MLP FLOPs per token at the
# same intermediate size). fastbert-auto-gelu: the same model with the classic GELU MLP (mlp_type="mlp"),
# i.e. HF's FLOPs per token: what unpadding and the cpu backend buy at equal work.
PEER = "hf-bert-sdpa"
PROVIDERS = ("fastbert-auto", "fastbert-auto-gelu", PEER)
SHAPE = f"B{BATCH}xL{MIN_LEN}-{MAX_LEN}"

_results: Dict[tuple, dict] = {}  # (size, pass) -> both providers' numbers, measured together


def _batch(vocab: int):
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(MIN_LEN, MAX_LEN + 1, (BATCH,), generator=g)
    S = int(lens.max())
    mask = torch.arange(S)[None, :] < lens[:, None]
    ids = torch.randint(5, vocab, (BATCH, S), generator=g) * mask
    labels = torch.randint(0, 2, (BATCH,), generator=g)
    return {"input_ids": ids, "attention_mask": mask.long(), "labels": labels}, int(lens.sum())


@functools.lru_cache(maxsize=1)  # one size's models at a time, shared by its passes and providers
def _models(size: str):
    """``{provider: classifier}`` of the same size, random init, and the vocabulary size."""
    try:
        import transformers
    except ImportError as e:
        raise Missing(f"transformers is not installed: {e}")
    from fastbert.models import BertConfig, BertForSequenceClassification
    cfg = BertConfig.preset(size, num_labels=2)
    hcfg = transformers.BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                   num_hidden_layers=cfg.num_hidden_layers,
                                   num_attention_heads=cfg.num_attention_heads,
                                   intermediate_size=cfg.intermediate_size, num_labels=2,
                                   attn_implementation="sdpa")
    models = {"fastbert-auto": BertForSequenceClassification(cfg),
              "fastbert-auto-gelu": BertForSequenceClassification(BertConfig.preset(size, num_labels=2,
                                                                                    mlp_type="mlp")),
              PEER: transformers.BertForSequenceClassification(hcfg)}
    return models, cfg.vocab_size


def _runner(model, pass_: str, batch):
    if pass_ == "fwd":
        model.eval()
        inputs = {k: v for k, v in batch.items() if k != "labels"}

        def run():
            with torch.inference_mode():
                return model(**inputs).logits
        return run
    model.train()
    # fused AdamW (one vectorised kernel over all parameters) for both: the optimizer is common cost, and
    # the default for-each-parameter loop would add the same ~10% to both models at tiny size.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def run():
        opt.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        return loss
    return run


def _q(xs, p):
    return statistics.quantiles(xs, n=10, method="inclusive")[p // 10 - 1] if len(xs) > 1 else xs[0]


def _paired(xs, ys) -> dict:
    r = [y / x for x, y in zip(xs, ys)]
    return {"median": statistics.median(r), "p20": _q(r, 20), "p80": _q(r, 80)}


def _measure(size: str, pass_: str) -> dict:
    """Time every provider on the same batch, interleaved; ``{"per_provider": {p: numbers}, ...}``."""
    key = (size, pass_)
    if key in _results:
        return _results[key]
    _results.clear()  # one group's optimizer states at a time (three base models with AdamW: ~7 GB)
    models, vocab = _models(size)
    batch, tokens = _batch(vocab)
    runs = {p: _runner(m, pass_, batch) for p, m in models.items()}
    prev = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        load0 = os.getloadavg()
        for run in list(runs.values()) * 2:  # warm-up: allocator, one-time dispatch, optimizer state
            run()
        wall = {p: [] for p in runs}
        cpu = {p: [] for p in runs}
        t_end = time.perf_counter() + BUDGET_S
        rounds = 0
        while rounds < 6 or (time.perf_counter() < t_end and rounds < 60):
            order = PROVIDERS if rounds % 2 == 0 else PROVIDERS[::-1]  # A B C, C B A, ...: drift cancels
            for p in order:
                c0, w0 = time.process_time(), time.perf_counter()
                runs[p]()
                wall[p].append(time.perf_counter() - w0)
                cpu[p].append(time.process_time() - c0)
            rounds += 1
        load1 = os.getloadavg()
    finally:
        torch.set_num_threads(prev)
    res = {"tokens": tokens, "padded_tokens": BATCH * int(batch["input_ids"].shape[1]), "rounds": rounds,
           "threads": THREADS, "load_before": round(load0[0], 2), "load_after": round(load1[0], 2),
           "per_provider": {}, "runs": runs}
    for p in runs:
        ms = [1e3 * t for t in wall[p]]
        mine = {"median_ms": statistics.median(ms), "p20_ms": _q(ms, 20), "p80_ms": _q(ms, 80), "min_ms": min(ms),
                "n_timed": len(ms), "cpu_median_ms": 1e3 * statistics.median(cpu[p]),
                "params": sum(t.numel() for t in models[p].parameters())}
        if p != PEER:  # per-round ratios against HF: their spread is the run's noise
            for name, src in (("paired", wall), ("cpu_paired", cpu)):
                pr = _paired(src[p], src[PEER])
                mine.update({f"{name}_speedup": pr["median"], f"{name}_p20": pr["p20"], f"{name}_p80": pr["p80"]})
        res["per_provider"][p] = mine
    _results[key] = res
    return res


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("pass_", ["step", "fwd"])
@pytest.mark.parametrize("size", SIZES)
def test_cpu_model(benchmark, size, pass_, provider):
    op = f"cpu_{size}"
    benchmark.group = f"{op} | {SHAPE} | {pass_}"
    info = benchmark.extra_info
    info.update({"op": op, "shape": SHAPE, "pass": pass_, "provider": provider, "kind": "cpu", "mode": "cpu",
                 "role": "fastbert" if provider.startswith("fastbert-") else "peer", "timed": False,
                 "flops": 0.0, "bytes": 0.0, "model": "mosaicbert" if provider.startswith("fastbert") else "hf-bert"})
    if not (CPU_BENCH or SMOKE):
        missing(op, SHAPE, pass_, provider, "the CPU benchmark runs with FASTBERT_BENCH_CPU=1 (or in smoke mode)")
    if not CPU_BENCH:  # smoke: one untimed call of each model, to prove the code path
        try:
            models, vocab = _models(size)
        except Missing as e:
            missing(op, SHAPE, pass_, provider, str(e))
        run = _runner(models[provider], pass_, _batch(vocab)[0])
        benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
        return
    try:
        res = _measure(size, pass_)
    except Missing as e:
        missing(op, SHAPE, pass_, provider, str(e))
    mine = res["per_provider"][provider]
    info.update({k: v for k, v in res.items() if k not in ("per_provider", "runs")})
    info["variant"] = {"fastbert-auto": "MosaicBERT (GeGLU)", "fastbert-auto-gelu": "MosaicBERT, GELU MLP",
                       PEER: "HF BERT"}[provider]
    info.update(mine)
    info["timed"] = True
    prev = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:  # pytest-benchmark's own table: one more call of this provider alone
        benchmark.pedantic(res["runs"][provider], rounds=1, iterations=1, warmup_rounds=0)
    finally:
        torch.set_num_threads(prev)
