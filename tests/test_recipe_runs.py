"""End-to-end pretraining runs of the recipe features on CPU, on synthetic text (no shared data, no network):
a streamed run (the local stand-in for C4 through ``datasets`` streaming) that passes its data twice, warns
once, reports passes and resumes exactly; ``mini`` pre-LN and post-LN models (and the Cramming layout with its
batch ramp and triangle schedule) training without NaN."""
import gzip
import json
import math
import os
import shutil

import pytest
import torch

from train.pretrain import main
from train.utils import read_metrics

from tests.test_data import make_docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("recipe-runs")
    for name, n, seed in (("train.jsonl.gz", 40, 11), ("valid.jsonl.gz", 4, 12)):
        with gzip.open(d / name, "wt") as f:
            for i, doc in enumerate(make_docs(n, seed=seed)):
                f.write(json.dumps({"id": i, "text": doc}) + "\n")
    return d


def overrides(corpus, out, **kw):
    base = {"data.train": corpus / "train.jsonl.gz", "data.valid": corpus / "valid.jsonl.gz",
            "data.tokenizer": "train", "data.train_vocab_size": 300, "data.cache_dir": corpus / "cache",
            "data.max_len": 32, "data.num_workers": 1, "model.preset": "tiny",
            "model.overrides.hidden_size": 64, "model.overrides.intermediate_size": 128,
            "global_batch_size": 8, "micro_batch_size": 8, "optim.lr": 2e-3, "optim.warmup": 0.1,
            "log_every": 1, "eval_every": 0, "eval_sequences": 8, "progress": "false", "plot": "false",
            "threads": 1, "output_dir": out}
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


def rows(out, split="train"):
    return {r["step"]: r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if r["split"] == split}


def test_streamed_pretraining_counts_passes_warns_once_and_resumes(corpus, tmp_path, capsys):
    kw = {"data.streaming": "true", "data.sequence_mode": "truncate", "data.stream_chunk_documents": 6,
          "max_steps": 12, "checkpoint_every": 6, "keep_checkpoints": 3}  # 96 sequences of 40 documents
    ref = tmp_path / "ref"
    assert main(overrides(corpus, ref, **kw)) == 0
    out = capsys.readouterr().out
    assert out.count("WARNING: starting pass 2") == 1 and "pass 3" not in out
    r = rows(ref)
    assert [r[s]["data_pass"] for s in (1, 5, 6, 11, 12)] == [1, 1, 2, 3, 3]  # 40 documents, 8 a step
    assert r[12]["passes"] == pytest.approx(96 / 40) and r[12]["sequences"] == 96
    assert all(math.isfinite(x["loss"]) for x in r.values())
    # resume from the step-6 checkpoint (inside the second pass) in a fresh folder: the same losses
    run = tmp_path / "run"
    shutil.copytree(ref / "checkpoints" / "step-0000006", run / "checkpoints" / "step-0000006")
    assert main(overrides(corpus, run, **kw)) == 0
    b = rows(run)
    for s in range(7, 13):
        assert math.isclose(r[s]["loss"], b[s]["loss"], rel_tol=1e-6), (s, r[s]["loss"], b[s]["loss"])
    state = torch.load(ref / "checkpoints" / "step-0000012" / "trainer_state.pt", weights_only=False)
    assert state["data"]["sequences_consumed"] == 96 and state["data"]["readers"][0]["kind"] == "stream"


@pytest.mark.parametrize("layout", ["post-LN", "pre-LN", "cramming"])
def test_mini_model_trains_without_nan(corpus, tmp_path, layout):
    kw = {"model.preset": "mini", "model.overrides.hidden_size": 256, "model.overrides.intermediate_size": 512,
          "max_steps": 10}
    if layout == "pre-LN":
        kw["model.overrides.layer_norm_position"] = "pre"
    if layout == "cramming":  # bias-free pre-LN, headless decoder, concat blocks, triangle LR, batch ramp, clipping
        kw.update({"model.overrides.layer_norm_position": "pre", "model.overrides.linear_bias": "false",
                   "model.overrides.mlm_head_transform": "false", "model.overrides.mlm_decoder_bias": "false",
                   "model.overrides.position_embedding_type": "sinusoidal", "data.sequence_mode": "concat",
                   "optim.warmup": 0.75, "optim.initial_lr_ratio": 0.25, "optim.final_lr_ratio": 0.0,
                   "optim.grad_clip": 0.5, "batch_size_ramp": 0.5, "global_batch_size": 16, "micro_batch_size": 4,
                   "model.preset": "tiny", "model.overrides.hidden_size": 64, "model.overrides.intermediate_size": 128,
                   "max_steps": 14, "model.finetune_overrides.hidden_dropout_prob": 0.1})
    out = tmp_path / layout
    assert main(overrides(corpus, out, **kw)) == 0
    r = rows(out)
    losses = [r[s]["loss"] for s in sorted(r)]
    assert len(losses) == kw["max_steps"] and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    ev = rows(out, "valid")
    assert all(math.isfinite(e["eval_loss"]) for e in ev.values())
    if layout == "cramming":
        assert [r[s]["batch_size"] for s in (1, 4, 8, 14)] == [4, 12, 16, 16]  # min(int(x / 0.5 * 16 / 4) * 4 + 4, 16)
        assert r[1]["lr"] == pytest.approx(2e-3 * (0.25 + 1 / 14))  # triangle at the fraction step 1 ends at
        saved = json.loads((out / "final" / "config.json").read_text())
        assert saved["extra"]["finetune_overrides"] == {"hidden_dropout_prob": 0.1} and saved["linear_bias"] is False
