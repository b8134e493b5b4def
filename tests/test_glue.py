"""The GLUE harness: settings, optimizer/schedule, MNLI initialisation, a training loop that learns, and
end-to-end runs that write the results tables (fastbert and Hugging Face checkpoints), all on CPU."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from train import glue
from train import glue_data as gd

FIXTURES = Path(__file__).parent / "fixtures" / "glue"
REAL = gd.find_data_dir()
REAL_VOCAB = REAL.parent / "vocab" / "bert-base-uncased-vocab.txt" if REAL is not None else None
needs_real = pytest.mark.skipif(REAL is None or not REAL_VOCAB.is_file(),
                                reason="real GLUE data / vocab not found (set FASTBERT_DATA or put them at "
                                       "../shared/data beside the repo)")
QUICK = dict(max_seq_len=48, epochs=1, seeds=1, batch_size=8, eval_batch_size=32, progress=False)


@pytest.fixture(autouse=True)
def _one_thread():
    # On a loaded 2-core machine two OpenMP threads spin against each other: a tiny training step takes
    # 2 s with 2 threads and 0.08 s with 1 (measured). These tests run tiny shapes, so one thread it is.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _fixture_vocab(path: Path) -> Path:
    """A small WordPiece vocab from the fixture texts (so fixture-only tests need no downloaded vocab)."""
    words = set()
    for f in FIXTURES.glob("*/*.tsv"):
        for w in f.read_text().lower().replace("\t", " ").split():
            words.add(w.strip(".,?!'\"()"))
    chars = sorted({c for w in words for c in w})
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    path.write_text("\n".join(specials + sorted(w for w in words if w) + chars + ["##" + c for c in chars]) + "\n")
    return path


def _fastbert_ckpt(d: Path, vocab: Path, **cfg) -> Path:
    from fastbert.models import BertConfig, BertForMaskedLM

    n_vocab = sum(1 for _ in open(vocab))
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig.preset("tiny", vocab_size=n_vocab, hidden_size=64, intermediate_size=128,
                                              **cfg))
    model.save_pretrained(str(d))
    shutil.copy(vocab, d / "vocab.txt")
    return d


@pytest.fixture(scope="module")
def fixture_ckpt(tmp_path_factory):
    """A tiny random fastbert MLM checkpoint with the fixture vocab, no dropout (for the learning test)."""
    root = tmp_path_factory.mktemp("fb_fixture")
    return _fastbert_ckpt(root / "ckpt", _fixture_vocab(root / "vocab.txt"), hidden_dropout_prob=0.0)


# ---------------------------------------------------------------- settings

def test_overrides_and_precedence():
    ov = glue.parse_overrides(["seeds=1", "rte.lr=2e-5", "RTE.epochs=2", "save_checkpoints=true",
                               "max_train_examples=none", "mrpc.seeds=3,5,7"])
    assert ov == {"seeds": 1, "rte.lr": 2e-5, "RTE.epochs": 2, "save_checkpoints": True,
                  "max_train_examples": None, "mrpc.seeds": [3, 5, 7]}
    s = glue.resolve_settings(["mnli", "rte", "mrpc", "cola"], ov)
    assert s["rte"]["lr"] == 2e-5 and s["rte"]["epochs"] == 2 and s["rte"]["weight_decay"] == 1e-5
    assert s["mnli"]["lr"] == 5e-5 and s["mnli"]["epochs"] == 3  # other tasks keep the recipe
    assert s["cola"]["seeds"] == [19]  # global seeds=1 beats CoLA's 5
    assert s["mrpc"]["seeds"] == [3, 5, 7]  # a task override beats the global one
    assert s["mnli"]["max_seq_len"] == 256 and s["cola"]["batch_size"] == 32 and s["mnli"]["batch_size"] == 48
    assert glue.resolve_settings(["stsb"], None)["stsb"]["seeds"] == [19, 8364, 717, 10536, 90166]
    assert glue.resolve_settings(["stsb"], {"seeds": 2})["stsb"]["seeds"] == [19, 20]  # a count: seed, seed+1


@pytest.mark.parametrize("bad,match", [
    (["lrr=1"], "unknown setting 'lrr'"),
    (["squad.lr=1"], "unknown task 'squad'"),
    (["rte.lr=-1"], "rte.lr: expected a positive number"),
    (["batch_size=0"], "batch_size: expected a positive integer"),
    (["seeds=0"], "seeds: expected a count"),
    (["precision=fp8"], "precision: expected auto, bf16 or fp32"),
])
def test_bad_settings(bad, match):
    with pytest.raises(ValueError, match=match):
        glue.resolve_settings(["rte"], glue.parse_overrides(bad))
    with pytest.raises(ValueError, match="expected key=value"):
        glue.parse_overrides(["seeds"])


def test_decoupled_weight_decay_and_schedule():
    # With zero gradients Adam's step is 0, so one AdamW step shows only the decay: a decoupled decay
    # of 1e-2 must shrink the matrix by exactly 1 - 1e-2 at the full lr, whatever the lr.
    lin = torch.nn.Linear(4, 3)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    opt = torch.optim.AdamW(glue._param_groups(lin, lr=3e-4, decoupled_wd=1e-2), lr=3e-4)
    for p in lin.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(lin.weight.detach(), w0 * (1 - 1e-2))
    torch.testing.assert_close(lin.bias.detach(), b0)  # 1-D tensors are not decayed
    f = glue.lr_schedule(warmup=3, total=10)
    vals = [f(i) for i in range(10)]
    assert vals[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and vals[3] == 1.0
    assert all(a > b for a, b in zip(vals[3:], vals[4:])) and vals[-1] > 0 and f(10) == 0.0
    assert glue.lr_schedule(0, 4)(0) == 1.0


def test_mnli_weights_initialise_the_next_task(fixture_ckpt):
    src = glue.load_model_source(fixture_ckpt)
    torch.manual_seed(1)
    mnli = src.build(3)
    torch.manual_seed(2)
    rte = src.build(2)
    with torch.no_grad():  # make the MNLI encoder differ from the pretrained one
        for p in mnli.parameters():
            p.add_(torch.randn_like(p))
    head_before = rte.classifier.weight.detach().clone()
    n = glue._load_encoder_from(rte, mnli.state_dict())
    own = rte.state_dict()
    assert n == len(own) - 2  # everything but classifier.weight / classifier.bias
    for k, v in mnli.state_dict().items():
        if "classifier" not in k:
            torch.testing.assert_close(own[k], v, rtol=0, atol=0)
    torch.testing.assert_close(rte.classifier.weight.detach(), head_before, rtol=0, atol=0)


# ---------------------------------------------------------------- training

def test_training_loop_learns(fixture_ckpt):
    """Memorise 8 MNLI fixture pairs: a loop that does not update, mislabels or mis-shuffles fails this."""
    src = glue.load_model_source(fixture_ckpt)
    train, _ = gd.load_task("mnli", FIXTURES)
    enc = gd.encode(gd.load_tokenizer(src.vocab_file, True, 64), train)
    s = glue.resolve_settings(["mnli"], dict(lr=3e-3, weight_decay=0.0, epochs=30, batch_size=8, warmup_ratio=0.1,
                                             progress=False))["mnli"]
    d, device = glue._init_dist("cpu")
    metrics, info, _ = glue.finetune("mnli", 0, s, src, enc, {"train": enc}, None, device, d, None)
    assert metrics == {"accuracy": 1.0}, info
    assert info["steps"] == 30 and info["final_loss"] < 0.7  # chance level is ln 3 = 1.10


def test_end_to_end_mnli_then_rte_fixtures(fixture_ckpt, tmp_path):
    """MNLI + RTE on the fixtures: MNLI's two dev sets, RTE started from MNLI, median over seeds, tables."""
    out = tmp_path / "out"
    res = glue.run(fixture_ckpt, "rte,mnli", FIXTURES, out, dict(QUICK, **{"rte.seeds": 3, "save_checkpoints": True}))
    assert list(res["tasks"]) == ["mnli", "rte"]
    mnli, rte = res["tasks"]["mnli"], res["tasks"]["rte"]
    assert set(mnli["metrics"]) == {"matched_accuracy", "mismatched_accuracy"}
    assert mnli["score"] == pytest.approx(np.mean(list(mnli["metrics"].values())))
    assert [sd["init"] for sd in rte["seeds"]] == ["mnli"] * 3 and mnli["seeds"][0]["init"] == "pretrained"
    assert rte["seeds"][0]["init_tensors"] > 10
    assert rte["metrics"]["accuracy"] == pytest.approx(np.median([sd["metrics"]["accuracy"] for sd in rte["seeds"]]))
    # Every RTE dev prediction is right or wrong: accuracy on 4 examples is a multiple of 1/4.
    assert all(4 * sd["metrics"]["accuracy"] == int(4 * sd["metrics"]["accuracy"]) for sd in rte["seeds"])
    assert res["glue_score"] == pytest.approx((mnli["score"] + rte["score"]) / 2)
    assert "partial GLUE score over 2 of 8 tasks" in res["glue_note"]
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["tasks"]["rte"]["metrics"] == rte["metrics"]
    md = (out / "results.md").read_text()
    assert "| mnli |" in md and "| rte | 21 | mnli |" in md and "GLUE score" in md
    ck = out / "checkpoints" / "rte-seed19"
    assert (ck / "model.safetensors").is_file() and (ck / "vocab.txt").is_file()
    from fastbert.models import BertForSequenceClassification

    assert BertForSequenceClassification.from_pretrained(str(ck)).num_labels == 2
    # A later run starts RTE from the saved MNLI model without running MNLI again.
    res2 = glue.run(fixture_ckpt, "rte", FIXTURES, None,
                    dict(QUICK, mnli_checkpoint=str(out / "checkpoints" / "mnli-seed19")))
    assert res2["tasks"]["rte"]["seeds"][0]["init"] == "mnli"


def test_qqp_qnli_fixtures_run_and_report_skips(fixture_ckpt, tmp_path):
    res = glue.run(fixture_ckpt, ["qqp", "qnli"], FIXTURES, tmp_path, QUICK)
    assert set(res["tasks"]["qqp"]["metrics"]) == {"f1", "accuracy"}
    assert res["tasks"]["qqp"]["skipped_malformed_lines"] == {"train": 2}
    assert "Malformed lines skipped: qqp" in (tmp_path / "results.md").read_text()


@needs_real
def test_end_to_end_sst2_rte_real_data(tmp_path, capsys):
    """The issue's acceptance run: a tiny random fastbert checkpoint finetuned on SST-2 and RTE subsets."""
    ckpt = _fastbert_ckpt(tmp_path / "ckpt", REAL_VOCAB)
    out = tmp_path / "glue"
    res = glue.run(ckpt, "sst2,rte", REAL, out, dict(QUICK, max_train_examples=48, max_eval_examples=40,
                                                     **{"rte.seeds": 2}))
    for task in ("sst2", "rte"):
        r = res["tasks"][task]
        assert 0.0 <= r["metrics"]["accuracy"] <= 1.0 and r["seeds"][0]["train_examples"] == 48
        assert r["seeds"][0]["eval_examples"] == {"dev": 40}
    assert res["tasks"]["rte"]["num_seeds"] == 2 and res["model_kind"] == "fastbert"
    assert (out / "results.json").is_file() and "| sst2 |" in (out / "results.md").read_text()
    assert capsys.readouterr().err.count("WARNING: rte starts from the pretrained encoder") == 1  # no MNLI ran
    assert res["glue_score_mosaicbert"] is not None and "MNLI-m" in res["score_definitions"]["mosaicbert"]


def test_hugging_face_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=sum(1 for _ in open(_fixture_vocab(tmp_path / "v.txt"))),
                                  hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    d = tmp_path / "hf"
    transformers.BertForMaskedLM(cfg).save_pretrained(str(d))
    shutil.copy(tmp_path / "v.txt", d / "vocab.txt")
    res = glue.run(d, "rte", FIXTURES, tmp_path / "out", QUICK)
    assert res["model_kind"] == "hf" and 0.0 <= res["tasks"]["rte"]["score"] <= 1.0


def test_missing_task_fails_before_any_training(fixture_ckpt, tmp_path):
    # SST-2 has no fixture: the run must stop before finetuning MNLI, naming the folder.
    with pytest.raises(gd.GlueDataError, match=r"SST-2: task folder for sst2 not found"):
        glue.run(fixture_ckpt, "mnli,sst2", FIXTURES, tmp_path / "out", QUICK)
    assert not (tmp_path / "out").exists()


def test_tasks_all_names_every_missing_task_and_available_runs_the_rest(fixture_ckpt, tmp_path, capsys):
    data = tmp_path / "glue"  # a glue_data folder with RTE only (like ../shared/data/glue, which lacks MNLI/QNLI/QQP)
    shutil.copytree(FIXTURES / "RTE", data / "RTE")
    assert glue.main(["--model", str(fixture_ckpt), "--tasks", "all", "--data", str(data)]) == 2
    err = capsys.readouterr().err
    for name in ("mnli (MNLI)", "qnli (QNLI)", "qqp (QQP)", "sst2 (SST-2)", "--tasks available", "(rte)"):
        assert name in err, err
    res = glue.run(fixture_ckpt, "available", data, tmp_path / "out", QUICK)
    assert list(res["tasks"]) == ["rte"]
    with pytest.raises(gd.GlueDataError, match="no GLUE task folder"):
        glue.run(fixture_ckpt, "available", tmp_path / "empty", None, QUICK)


def test_hub_while_offline_says_offline(fixture_ckpt, tmp_path, capsys, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def unreachable(*args, **kwargs):  # what datasets raises offline with an empty cache (no network here)
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)")
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert glue.main(["--model", str(fixture_ckpt), "--tasks", "rte", "--data", "hub",
                      "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--data hub" in err and "offline mode is on" in err and "nyu-mll/glue" in err, err


@pytest.mark.slow
def test_ddp_two_cpu_ranks(fixture_ckpt, tmp_path):
    """torchrun with 2 gloo ranks: sharded training, gathered eval, one results file from rank 0."""
    import os
    import signal
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    # --standalone: the rendezvous store binds port 0 itself and keeps it. A port picked free here and passed
    # as --master_port stays unbound until torchrun has started (seconds under load); any process on a shared
    # machine that takes it meanwhile makes the launcher fail with EADDRINUSE.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "train.glue", "--model", str(fixture_ckpt), "--tasks", "mnli,rte", "--data", str(FIXTURES),
           "--output-dir", str(tmp_path), "max_seq_len=32", "epochs=1", "seeds=1", "batch_size=4",
           "progress=false"]
    # Own session, so that on a timeout the launcher and both ranks are killed together.
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        _, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        _, err = p.communicate()
        pytest.fail("torchrun did not finish in 300 s: " + err[-3000:])
    assert p.returncode == 0, err[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["world_size"] == 2 and res["tasks"]["rte"]["seeds"][0]["init"] == "mnli"
    # Eval is gathered from both ranks: 5 matched examples, so the accuracy is a multiple of 1/5.
    acc = res["tasks"]["mnli"]["metrics"]["matched_accuracy"]
    assert abs(5 * acc - round(5 * acc)) < 1e-9
    assert res["tasks"]["mnli"]["seeds"][0]["eval_examples"] == {"matched": 5, "mismatched": 5}


def test_cli_errors(tmp_path, capsys):
    assert glue.main(["--model", str(tmp_path), "--tasks", "rte", "--data", str(FIXTURES)]) == 2
    assert "config.json not found" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "fastbert"}))
    assert glue.main(["--model", str(tmp_path), "--tasks", "rte", "--data", str(FIXTURES)]) == 2
    assert "vocab.txt not found" in capsys.readouterr().err
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    assert glue.main(["--model", str(tmp_path), "--tasks", "rte", "--data", str(tmp_path)]) == 2
    assert "task folder for rte not found" in capsys.readouterr().err
    assert glue.main(["--model", str(tmp_path), "--tasks", "rte", "lr"]) == 2
    assert "expected key=value" in capsys.readouterr().err
