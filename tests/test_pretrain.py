"""Pretraining loop on the real corpus (CPU, tiny): it learns, DDP (gloo) matches one process,
kill-and-resume reproduces, a NaN stops the run keeping the last good checkpoint.

Needs the shared data (``$FASTBERT_DATA`` or ``../shared/data``: the first articles of
``corpus/wiki2015-valid.jsonl.gz`` and ``vocab/bert-base-uncased-vocab.txt``); skipped with the reason
when it is absent.
"""
import gzip
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from train.config import data_root
from train.pretrain import main
from train.utils import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = data_root()
CORPUS = DATA / "corpus" / "wiki2015-valid.jsonl.gz"
VOCAB = DATA / "vocab" / "bert-base-uncased-vocab.txt"

pytestmark = pytest.mark.skipif(not (CORPUS.is_file() and VOCAB.is_file()),
                                reason=f"needs the shared data ({CORPUS} and {VOCAB}); set FASTBERT_DATA")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The first 24 articles as training data, the next 4 as the held-out file; one token cache."""
    d = tmp_path_factory.mktemp("corpus")
    with gzip.open(CORPUS, "rt") as f:
        lines = [next(f) for _ in range(28)]
    (d / "train.jsonl").write_text("".join(lines[:24]))
    (d / "valid.jsonl").write_text("".join(lines[24:]))
    return d


def overrides(corpus, out, **kw):
    base = {"data.train": corpus / "train.jsonl", "data.valid": corpus / "valid.jsonl", "data.tokenizer": VOCAB,
            "data.cache_dir": corpus / "cache", "data.max_len": 64, "data.num_workers": 1,
            "model.preset": "tiny", "model.overrides.hidden_size": 64, "model.overrides.intermediate_size": 128,
            "global_batch_size": 8, "micro_batch_size": 4, "optim.lr": 3e-3, "optim.warmup": 0.1,
            "log_every": 1, "eval_every": 0, "eval_sequences": 32, "progress": "false", "plot": "false",
            "threads": 1, "output_dir": out}  # 1 thread: cheapest on a shared CI box, same in every process
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


def train_rows(out):
    return {r["step"]: r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if r["split"] == "train"}


def eval_rows(out):
    return [r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if r["split"] == "valid"]


def test_tiny_pretrain_lowers_held_out_loss(corpus, tmp_path):
    from fastbert.models import BertForMaskedLM
    out = tmp_path / "run"
    assert main(overrides(corpus, out, max_steps=30, plot="true")) == 0
    ev = eval_rows(out)
    assert ev[0]["step"] == 0 and ev[-1]["step"] == 30
    assert ev[-1]["eval_loss"] < ev[0]["eval_loss"] - 1.5, ev  # starts near ln(30522) = 10.3
    rows = train_rows(out)
    assert sorted(rows) == list(range(1, 31))
    assert rows[30]["loss"] < rows[1]["loss"] and rows[30]["mfu"] is None and rows[30]["tokens_per_s"] > 0
    for name in ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json"):
        assert (out / "final" / name).is_file(), name
    assert (out / "loss.png").stat().st_size > 1000 and (out / "config.yaml").is_file()
    model = BertForMaskedLM.from_pretrained(str(out / "final"))
    assert model.config.hidden_size == 64 and model.config.vocab_size == 30522


def test_kill_and_resume_reproduces_the_loss(corpus, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    kw = dict(max_steps=10, checkpoint_every=3, keep_checkpoints=5)  # dropout stays on: RNG is restored
    assert main(overrides(corpus, ref, **kw)) == 0

    cmd = [sys.executable, "-m", "train.pretrain"] + overrides(corpus, run, debug_step_delay_s=0.4, **kw)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = run / "checkpoints" / "step-0000003"
    deadline = time.time() + 300
    try:
        while not target.is_dir():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert not (run / "final").exists(), "the run finished before it was killed"
    done = sorted(os.listdir(run / "checkpoints"))
    assert done and done[-1].startswith("step-") and int(done[-1][5:]) < 10

    assert main(overrides(corpus, run, resume="auto", **kw)) == 0
    a, b = train_rows(ref), train_rows(run)
    assert sorted(b) == list(range(1, 11))  # the killed run's rows after its checkpoint were replaced
    for step in (int(done[-1][5:]) + 1, 10):
        assert math.isclose(a[step]["loss"], b[step]["loss"], rel_tol=1e-5), (step, a[step], b[step])
    assert math.isclose(eval_rows(ref)[-1]["eval_loss"], eval_rows(run)[-1]["eval_loss"], rel_tol=1e-5)


def test_nan_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path, capsys):
    from fastbert.models import BertForMaskedLM
    out = tmp_path / "run"
    rc = main(overrides(corpus, out, max_steps=8, checkpoint_every=2, keep_checkpoints=5, debug_nan_at_step=5))
    err = capsys.readouterr().err
    assert rc == 3
    assert "diverged at step 5" in err and "step-0000004" in err, err
    assert sorted(os.listdir(out / "checkpoints")) == ["step-0000002", "step-0000004"]
    assert not (out / "final").exists()
    model = BertForMaskedLM.from_pretrained(str(out / "checkpoints" / "step-0000004"))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert max(train_rows(out)) == 4


def test_torchrun_two_processes_gloo_matches_one_process(corpus, tmp_path):
    """2 ranks x 2 micro-steps of 2 sequences == 1 process x 4 micro-steps: same data, same masks
    (dropout off), so the losses agree up to reduction order."""
    kw = dict(max_steps=4, micro_batch_size=2, checkpoint_every=2, **{"model.overrides.hidden_dropout_prob": 0.0})
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "train.pretrain"] + overrides(corpus, ddp, **kw)
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "world size 2" in res.stdout + res.stderr
    assert (ddp / "final" / "model.safetensors").is_file()
    assert sorted(os.listdir(ddp / "checkpoints")) == ["step-0000002", "step-0000004"]
    state = torch.load(ddp / "checkpoints" / "step-0000004" / "trainer_state.pt", weights_only=False)
    assert len(state["rng"]) == 2  # both ranks' RNG streams are kept

    assert main(overrides(corpus, single, **kw)) == 0
    a, b = train_rows(ddp), train_rows(single)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert math.isclose(a[s]["loss"], b[s]["loss"], rel_tol=1e-4), (s, a[s]["loss"], b[s]["loss"])


def test_wall_clock_budget_drives_the_schedule(corpus, tmp_path):
    out = tmp_path / "run"
    assert main(overrides(corpus, out, max_minutes=0.02, **{"optim.warmup": 0.0, "optim.final_lr_ratio": 0.0})) == 0
    rows = train_rows(out)
    steps = sorted(rows)
    assert len(steps) >= 2 and (out / "final" / "model.safetensors").is_file()
    last = rows[steps[-1]]
    assert last["elapsed_s"] >= 1.2  # ran until the 1.2 s budget was spent
    # the LR of each step is peak * (1 - elapsed fraction at its start), the clock started after the first
    # step (whose time, compilation included, must not eat the warmup): it falls with the clock, not the step
    first = rows[1]["elapsed_s"]
    assert rows[1]["lr"] == rows[2]["lr"] == 3e-3
    for s in steps[2:]:
        frac = (rows[s - 1]["elapsed_s"] - first) / (1.2 - first)
        assert math.isclose(rows[s]["lr"], 3e-3 * (1 - frac), rel_tol=1e-6, abs_tol=1e-12)
