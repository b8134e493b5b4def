"""The quickstart's SST-2 step: the settings that make it robust over seeds, and the 5-seed check itself.

Why (measured, README "Pretraining"): after the quickstart's 250-step MLM pretraining the [CLS] state is
almost the same for every sentence (its spread is 13% of its norm; the mean of the token states spreads
64%), because MLM without next-sentence prediction never makes [CLS] a target. A [CLS] classifier trained
for one epoch (125 steps) then scores 0.62-0.67 over seeds at LR 5e-4 (0.509 = the majority class in
the issue's run) and 0.509 for every seed at 1e-4..2e-4. The fix: pool the token mean, and train the
recipe's 3 epochs.

``test_five_seeds_reach_the_promised_accuracy`` pretrains and finetunes 5 seeds (several CPU-minutes): it
runs only with ``FASTBERT_TEST_QUICKSTART=1``; the same check by hand is
``python -m train.quickstart --seeds 5 --min-accuracy 0.65``.
"""
import json
import os

import pytest

from train import glue, quickstart
from train.config import data_root


def test_sst2_step_classifies_from_the_token_mean(tmp_path):
    """Guards the fix: the quickstart's classifier pools the token mean, and the GLUE harness builds it so."""
    from fastbert.models import BertConfig, BertForMaskedLM

    assert quickstart.GLUE_OVERRIDES["classifier_pooling"] == "mean"
    s = glue.resolve_settings(["sst2"], quickstart.GLUE_OVERRIDES)["sst2"]
    assert s["classifier_pooling"] == "mean" and s["lr"] >= 5e-4  # at 1e-4..2e-4 every seed stayed at the majority
    assert s["epochs"] * s["max_train_examples"] // s["batch_size"] >= 375  # 125 steps were too few
    ckpt = tmp_path / "ckpt"
    BertForMaskedLM(BertConfig.preset("tiny", vocab_size=64, hidden_size=64, intermediate_size=128)).save_pretrained(
        str(ckpt))
    (ckpt / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefgh")))
    model = glue.load_model_source(ckpt).build(2, s["classifier_pooling"])
    assert model.config.classifier_pooling == "mean"
    with pytest.raises(ValueError, match="classifier_pooling"):
        glue.resolve_settings(["sst2"], {"classifier_pooling": "max"})


def test_finished_quickstart_is_reported_not_redone(tmp_path, capsys, monkeypatch):
    """A rerun on a finished output folder: no training, the earlier SST-2 results and the MLM loss line."""
    summary = {"already_finished": True, "output_dir": str(tmp_path / "pretrain"), "final_dir": str(tmp_path / "final"),
               "metrics": "m", "first_eval": {"eval_loss": 9.0, "eval_acc": 0.0, "step": 0},
               "last_eval": {"eval_loss": 6.8, "eval_acc": 0.09, "step": 250}}
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "model.safetensors").write_bytes(b"x")
    glue_out = tmp_path / "glue"
    glue_out.mkdir()
    res = {"tasks": {"sst2": {"num_seeds": 1, "metrics": {"accuracy": 0.7}, "seeds": [
        {"seed": 19, "metrics": {"accuracy": 0.7}}]}}}
    (glue_out / "results.json").write_text(json.dumps(res))
    monkeypatch.setattr(glue, "run", lambda *a, **k: pytest.fail("finetuned again"))
    got, err = quickstart.finetune_sst2(summary["final_dir"], tmp_path, glue_out, 1, 1, reuse=True)
    assert err is None and got == res
    quickstart.report(summary, got, glue_out, 1.0, 0.5)
    out = capsys.readouterr().out
    assert "already finished" in out and "9.000 -> 6.800" in out and "accuracy 0.7000" in out


DATA = data_root()
needs_data = pytest.mark.skipif(not (DATA / "corpus" / "wiki2015-00.jsonl.gz").is_file()
                                or not (DATA / "glue" / "SST-2").is_dir(),
                                reason=f"needs the shared data under {DATA}; set FASTBERT_DATA")


@pytest.mark.slow
@needs_data
@pytest.mark.skipif(os.environ.get("FASTBERT_TEST_QUICKSTART") != "1",
                    reason="several CPU-minutes: set FASTBERT_TEST_QUICKSTART=1 (or run "
                           "`python -m train.quickstart --seeds 5 --min-accuracy 0.65`)")
def test_five_seeds_reach_the_promised_accuracy(tmp_path, capsys):
    rc = quickstart.main(["--output-dir", str(tmp_path / "qs"), "--seeds", "5", "--min-accuracy", "0.65"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "SST-2 dev accuracy" in out and "seed 23" in out
