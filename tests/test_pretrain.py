"""Pretraining loop on the real corpus (CPU, tiny): it learns, DDP (gloo) matches one process,
kill-and-resume reproduces, a NaN stops the run keeping the last good checkpoint, SIGTERM/SIGINT stop at
a step boundary with a checkpoint that resumes exactly, and a resume that does not fit is refused before
anything is written.

Needs the shared data (``$FASTBERT_DATA`` or ``../shared/data``: the first articles of
``corpus/wiki2015-valid.jsonl.gz`` and ``vocab/bert-base-uncased-vocab.txt``); skipped with the reason
when it is absent.
"""
import gzip
import math
import os
import shutil
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


REF_KW = dict(max_steps=10, checkpoint_every=3, keep_checkpoints=5)  # dropout stays on: RNG is restored


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """A finished 10-step run (checkpoints at 3, 6, 9, 10): the uninterrupted losses, and a run folder to
    rerun, extend or refuse. Tests copy it before writing into it."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(overrides(corpus, out, **REF_KW)) == 0
    return out


def snapshot(folder):
    """{relative path: (size, mtime_ns)} of every file under ``folder``: equal snapshots = nothing written."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


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


def test_kill_and_resume_reproduces_the_loss(corpus, reference, tmp_path):
    ref, run, kw = reference, tmp_path / "run", REF_KW
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


def test_torchrun_two_processes_gloo_matches_one_process_and_stops_on_sigterm(corpus, tmp_path):
    """2 ranks x 2 micro-steps of 2 sequences == 1 process x 4 micro-steps: same data, same masks
    (dropout off), so the losses agree up to reduction order. SIGTERM to torchrun mid-run (it forwards it to
    both ranks): every rank stops after the same step -- the checkpoint holds both ranks' RNG, gathered at
    that step -- and one process resumes it to the same losses."""
    kw = dict(max_steps=6, micro_batch_size=2, **{"model.overrides.hidden_dropout_prob": 0.0})
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "train.pretrain"] + overrides(corpus, ddp, debug_step_delay_s=0.5, **kw)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own group: on a failure the ranks die with it
    try:
        wait_for_step(proc, ddp, 1)
        proc.send_signal(signal.SIGTERM)  # to the launcher only, as a cluster scheduler would
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert "world size 2" in out + err and "stopped by SIGTERM" in out + err, err[-3000:]
    assert "pretrain.py" not in err, err[-3000:]  # no traceback through the training code
    (ckpt,) = os.listdir(ddp / "checkpoints")
    k = int(ckpt[5:])
    assert 1 <= k < 6 and not (ddp / "final").exists()
    state = torch.load(ddp / "checkpoints" / ckpt / "trainer_state.pt", weights_only=False)
    assert len(state["rng"]) == 2  # both ranks' RNG streams are kept

    assert main(overrides(corpus, ddp, resume="auto", **kw)) == 0  # one process continues the 2-rank run
    assert main(overrides(corpus, single, **kw)) == 0
    a, b = train_rows(ddp), train_rows(single)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for s in a:
        assert math.isclose(a[s]["loss"], b[s]["loss"], rel_tol=1e-4), (s, k, a[s]["loss"], b[s]["loss"])


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


# ----------------------------------------------------------------------------------------------
# Stopping on a signal, and what a rerun of an existing run folder does

def wait_for_step(proc, out, step, timeout=300):
    """Wait until the run in ``out`` has logged ``step`` (log_every=1)."""
    deadline = time.time() + timeout
    while max(train_rows(out), default=0) < step:
        if proc.poll() is not None:
            pytest.fail("the run ended before it was signalled:\n" + proc.communicate()[1][-3000:])
        assert time.time() < deadline, f"step {step} not reached within {timeout} s"
        time.sleep(0.02)


def test_sigint_is_a_stop_request_and_only_a_late_second_one_aborts():
    """SIGINT is turned into a stop request (no KeyboardInterrupt mid-step); a repeat within the patience
    window (a launcher forwarding the group's signal) is ignored; the handlers are restored afterwards. The
    end-to-end path after the request is the one the SIGTERM test below runs."""
    from train.utils import Dist, StopSignals
    before = signal.getsignal(signal.SIGINT)
    with StopSignals(patience_s=60) as stop:
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)  # forwarded duplicate: ignored
        assert stop.signum == signal.SIGINT and stop.name == "SIGINT" and stop.agreed(Dist())
    assert signal.getsignal(signal.SIGINT) is before
    with pytest.raises(KeyboardInterrupt):
        with StopSignals(patience_s=0.0):
            signal.raise_signal(signal.SIGINT)
            time.sleep(0.01)
            signal.raise_signal(signal.SIGINT)  # the user insists: default behaviour, at once
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("sig", ["SIGTERM"])
def test_signal_checkpoints_the_step_and_resume_continues_exactly(corpus, reference, tmp_path, sig):
    run, signum = tmp_path / "run", getattr(signal, sig)
    kw = dict(REF_KW, checkpoint_every=0)  # so the only checkpoint before the end is the signal's
    cmd = [sys.executable, "-m", "train.pretrain"] + overrides(corpus, run, debug_step_delay_s=0.3, plot="true", **kw)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(proc, run, 2)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err and f"stopped by {sig}" in out, out[-2000:] + err[-3000:]
    (ckpt,) = os.listdir(run / "checkpoints")
    k = int(ckpt[5:])
    assert 2 <= k < 10 and not (run / "final").exists()
    assert sorted(train_rows(run)) == list(range(1, k + 1))  # metrics up to the stop, none lost
    assert (run / "loss.png").stat().st_size > 1000

    assert main(overrides(corpus, run, resume="auto", **kw)) == 0
    a, b = train_rows(reference), train_rows(run)
    assert sorted(b) == list(range(1, 11))
    for step in range(k + 1, 11):
        assert math.isclose(a[step]["loss"], b[step]["loss"], rel_tol=1e-5), (step, a[step], b[step])
    assert math.isclose(eval_rows(reference)[-1]["eval_loss"], eval_rows(run)[-1]["eval_loss"], rel_tol=1e-5)


@pytest.mark.parametrize("change,says", [
    ({"model.preset": "mini"}, ["model.preset: 'tiny' -> 'mini'", "new --output-dir"]),
    ({"optim.lr": 1e-3, "data.max_len": 32}, ["data.max_len: 64 -> 32", "optim.lr: 0.003 -> 0.001"]),
    ({"max_steps": 5}, ["beyond the new budget max_steps=5"]),
    ({"max_steps": 0, "max_minutes": 1}, ["cannot be swapped"]),
    ({"resume": "none"}, ["resume=none", "would overwrite it"]),
], ids=["preset", "optim-and-data", "smaller-budget", "budget-kind", "fresh-start-here"])
def test_incompatible_resume_is_refused_before_anything_is_written(corpus, reference, tmp_path, capsys, change,
                                                                  says):
    run = copy_run(reference, tmp_path / "run")
    before = snapshot(run)
    rc = main(overrides(corpus, run, **dict(REF_KW, **change)))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    for text in says:
        assert text in err, err
    assert snapshot(run) == before  # config.yaml, metrics, checkpoints, final/: untouched


def test_rerun_of_a_finished_run_says_so_and_writes_nothing(corpus, reference, tmp_path, capsys):
    from train.pretrain import config_from_args, train
    run = copy_run(reference, tmp_path / "run")
    before = snapshot(run)
    summary = train(config_from_args(overrides(corpus, run, progress="true", **REF_KW)))
    out = capsys.readouterr().out
    assert summary["already_finished"] and "already finished its budget (10 steps" in out, out
    assert (summary["first_eval"]["step"], summary["last_eval"]["step"]) == (0, 10)  # the MLM loss line
    assert summary["final_dir"] == str(run / "final")
    assert snapshot(run) == before


def test_extending_the_budget_continues_the_decay_without_warmup(corpus, reference, tmp_path, capsys):
    peak, floor = 3e-3, 3e-3 * 0.02  # overrides(): optim.lr=3e-3; final_lr_ratio default 0.02
    # A finished run is at its floor: two more steps stay there (before the fix: back up to 3.8e-4 style).
    run = copy_run(reference, tmp_path / "run")
    assert main(overrides(corpus, run, **dict(REF_KW, max_steps=12))) == 0
    assert "no new warmup" in capsys.readouterr().out
    rows = train_rows(run)
    assert sorted(rows) == list(range(1, 13))
    for s in (10, 11, 12):
        assert rows[s]["lr"] == pytest.approx(floor, rel=1e-9), (s, rows[s]["lr"])
    # Mid-run (step 6 of 10) to 20 steps, into a new folder: a straight line from the step-6 LR to the floor.
    ext = tmp_path / "ext"
    lr6 = train_rows(reference)[6]["lr"]
    step6 = reference / "checkpoints" / "step-0000006"
    assert main(overrides(corpus, ext, **dict(REF_KW, max_steps=20, resume=step6))) == 0
    rows = train_rows(ext)
    assert sorted(rows) == list(range(7, 21))
    for s in rows:
        expect = lr6 + (floor - lr6) * (s / 20 - 6 / 20) / (1 - 6 / 20)
        assert rows[s]["lr"] == pytest.approx(expect, rel=1e-9), (s, rows[s]["lr"], expect)
    assert lr6 < peak
