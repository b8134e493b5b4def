"""Recipe fidelity: decoupled weight decay, the LR schedules of the three papers, the wall-clock schedule's
first step, Cramming's batch-size ramp, the shipped configs (every value sourced), the GLUE recipe and the two
GLUE score definitions."""
import os
import re

import numpy as np
import pytest
import torch

from train import glue
from train import metrics as gm
from train.config import PretrainConfig, load_config
from train.pretrain import batch_size_at, budget_fraction, build_optimizer, lr_at

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train", "configs")
PAPER_CONFIGS = ("mosaicbert-base", "bert-base-baseline", "24hbert-large", "cramming")


# ----------------------------------------------------------------------------------------------
# weight decay

@pytest.mark.parametrize("decay_all", [True, False])
def test_decoupled_weight_decay_per_step(decay_all):
    """With zero gradients Adam's update is 0, so each step only decays: w_t+1 = w_t * (1 - wd * lr_t / lr_0)
    (Composer's DecoupledAdamW), whatever the LR schedule does."""
    cfg = PretrainConfig()
    cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.decay_all_parameters = 5e-4, 1e-2, decay_all
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4)).double()
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    expect = 1.0
    for lr in (1e-4, 5e-4, 2.5e-4, 0.0, 5e-4):  # any schedule
        for group in opt.param_groups:
            group["lr"] = lr
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        expect *= 1 - 1e-2 * lr / 5e-4
    for (name, p), p0 in zip(model.named_parameters(), before):
        decayed = p.ndim >= 2 or decay_all
        torch.testing.assert_close(p.detach(), p0 * (expect if decayed else 1.0), rtol=1e-12, atol=0, msg=name)
    assert expect == pytest.approx((1 - 2e-3) * (1 - 1e-2) * (1 - 5e-3) * (1 - 1e-2))


def test_mosaicbert_weight_decay_is_not_numerically_zero():
    """The bug this replaces: torch's weight_decay=1e-5 times lr 5e-4 shrank by 5e-9 a step (below fp32
    resolution). Decoupled, 70k steps of MosaicBERT's schedule shrink a weight to about 0.70."""
    cfg = load_config(os.path.join(CONFIG_DIR, "mosaicbert-base.yaml"))
    o = cfg.optim
    factors = [1 - o.weight_decay * lr_at((s + 1) / 70000, o.lr, o.warmup, o.final_lr_ratio) / o.lr
               for s in range(0, 70000, 7)]  # every 7th step, x7
    total = float(np.prod(np.asarray(factors, dtype=np.float64) ** 7))
    assert 0.69 < total < 0.71, total
    lin = torch.nn.Linear(8, 8, bias=False)
    torch.nn.init.ones_(lin.weight)
    opt = build_optimizer(lin, cfg, torch.device("cpu"))  # at the peak LR
    lin.weight.grad = torch.zeros(8, 8)
    opt.step()
    assert float(lin.weight.detach()[0, 0]) == pytest.approx(1 - 1e-5, rel=1e-7)  # in fp32: 1 - 1e-5, not 1 - 5e-9 == 1


# ----------------------------------------------------------------------------------------------
# schedules and batch ramp

def test_lr_schedules_of_the_three_papers():
    # MosaicBERT: 6% warmup from 0, linear to 0.02 * peak
    assert lr_at(0.0, 5e-4, 0.06, 0.02) == 0.0
    assert lr_at(0.06, 5e-4, 0.06, 0.02) == pytest.approx(5e-4)
    assert lr_at(1.0, 5e-4, 0.06, 0.02) == pytest.approx(1e-5)
    # 24hBERT: linear to 0
    assert lr_at(1.0, 2e-3, 0.06, 0.0) == 0.0 and lr_at(0.53, 2e-3, 0.06, 0.0) == pytest.approx(1e-3)
    # Cramming budget-triangle2 (schedulers.py get_budget_triangle, base 0.25, falloff 0.25): min(0.25 + x, 4 - 4x)
    for x in np.linspace(0, 1, 41):
        assert lr_at(x, 1.0, 0.75, 0.0, 0.25) == pytest.approx(min(0.25 + x, 4 - 4 * x), abs=1e-12)


def test_wall_clock_schedule_starts_at_zero_and_skips_the_first_step():
    cfg = PretrainConfig(max_minutes=60.0)  # 3600 s, 6% warmup = 216 s
    assert budget_fraction(0, 0.0, cfg, 0.0) == 0.0
    assert lr_at(budget_fraction(0, 0.0, cfg, 0.0), 5e-4, 0.06, 0.02) == 0.0  # step 0 at LR exactly 0
    first = 300.0  # torch.compile + CUDA start-up: longer than the whole warmup
    assert budget_fraction(1, first, cfg, first) == 0.0
    # 21.6 s of training after the first step: 10% of the warmup, not "past the warmup"
    frac = budget_fraction(2, first + 0.1 * 216 * (3600 - first) / 3600, cfg, first)
    assert lr_at(frac, 5e-4, 0.06, 0.02) == pytest.approx(0.1 * 5e-4)
    assert budget_fraction(5, 3600.0, cfg, first) == pytest.approx(1.0)
    # a step budget: the fraction this step ends at
    assert budget_fraction(9, 123.0, PretrainConfig(max_steps=10), 50.0) == 1.0


def test_batch_size_ramp_follows_cramming():
    """torch_default.py schedule_batch_size: min((int(x / ramp * B / unit) + 1) * unit, B), unit = micro x ranks."""
    cfg = PretrainConfig(max_minutes=1.0, global_batch_size=8192, micro_batch_size=128, batch_size_ramp=0.6)
    assert batch_size_at(0.0, cfg, 1) == 128
    assert batch_size_at(0.3, cfg, 1) == 33 * 128  # half-way: 32 increments + the first micro-batch
    assert batch_size_at(0.6, cfg, 1) == batch_size_at(0.9, cfg, 1) == 8192
    sizes = [batch_size_at(x, cfg, 2) for x in np.linspace(0, 1, 101)]
    assert sizes == sorted(sizes) and all(s % 256 == 0 for s in sizes) and sizes[0] == 256
    for x in np.linspace(0, 0.59, 30):
        steps = int(x / 0.6 * 8192 / 128)
        assert batch_size_at(x, cfg, 1) == min((steps + 1) * 128, 8192)
    assert batch_size_at(0.0, PretrainConfig(max_steps=1, global_batch_size=64), 4) == 64  # no ramp


# ----------------------------------------------------------------------------------------------
# shipped configs

def _leaf_lines(path):
    """(key, line) of every scalar/list ``key: value`` line of a YAML file."""
    out = []
    for line in open(path):
        m = re.match(r"^\s*([A-Za-z_]\w*):\s*(\S.*)?$", line.split(" #")[0].rstrip())
        if m and m.group(2):
            out.append((m.group(1), line.rstrip("\n")))
    return out


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_every_value_of_a_paper_config_names_its_source(name):
    path = os.path.join(CONFIG_DIR, f"{name}.yaml")
    head = open(path).read().split("\n", 3)[:3]
    assert any(re.search(r"(19|20)\d\d", h) for h in head), "the header names the paper (authors, year)"
    unsourced = [line for key, line in _leaf_lines(path) if " # " not in line]
    assert not unsourced, f"{name}: values without a source comment: {unsourced}"
    load_config(path)  # parses and validates


def test_paper_configs_carry_the_papers_values():
    mb = load_config(os.path.join(CONFIG_DIR, "mosaicbert-base.yaml"))
    assert (mb.data.train, mb.data.hub_config, mb.data.streaming, mb.data.sequence_mode) == ("allenai/c4", "en",
                                                                                              True, "truncate")
    assert (mb.optim.grad_clip, mb.optim.decay_all_parameters, mb.max_steps * mb.global_batch_size) == \
        (0.0, True, 286_720_000)
    bl = load_config(os.path.join(CONFIG_DIR, "bert-base-baseline.yaml"))
    assert bl.model.preset == "base-baseline" and bl.data.mlm_probability == 0.15 and bl.compile
    h24 = load_config(os.path.join(CONFIG_DIR, "24hbert-large.yaml"))
    assert (h24.model.preset, h24.model.overrides["layer_norm_position"], h24.global_batch_size, h24.optim.lr,
            h24.optim.warmup, h24.optim.final_lr_ratio, h24.max_minutes) == ("large", "pre", 4096, 2e-3, 0.06, 0.0, 1440)
    cr = load_config(os.path.join(CONFIG_DIR, "cramming.yaml"))
    o = cr.model.overrides
    assert (o["layer_norm_position"], o["linear_bias"], o["mlm_head_transform"], o["mlm_decoder_bias"]) == \
        ("pre", False, False, False)
    assert (cr.optim.grad_clip, cr.batch_size_ramp, cr.data.sequence_mode, cr.max_minutes) == (0.5, 0.6, "concat", 1440)
    assert cr.model.finetune_overrides["hidden_dropout_prob"] == 0.1 and o["hidden_dropout_prob"] == 0.0


# ----------------------------------------------------------------------------------------------
# GLUE recipe and scores

def test_glue_recipe_is_mosaicberts_finetuning_code():
    """finetuning_jobs.py (batch size, lr, weight decay, epochs) and mosaic-bert-base-uncased.yaml (seeds)."""
    code = {"mnli": (48, 5e-5, 5e-6, 3, 1), "rte": (16, 1e-5, 1e-5, 3, 5), "qqp": (16, 3e-5, 3e-6, 5, 1),
            "cola": (32, 5e-5, 5e-6, 10, 4), "mrpc": (32, 8e-5, 8e-6, 10, 5), "qnli": (16, 1e-5, 1e-6, 10, 1),
            "sst2": (16, 3e-5, 3e-6, 3, 3), "stsb": (32, 3e-5, 3e-6, 10, 5)}
    s = glue.resolve_settings(list(code), None)
    for task, (bs, lr, wd, ep, n_seeds) in code.items():
        got = s[task]
        assert (got["batch_size"], got["lr"], got["weight_decay"], got["epochs"], len(got["seeds"])) == \
            (bs, lr, wd, ep, n_seeds), task
        assert got["seeds"] == [19, 8364, 717, 10536, 90166][:n_seeds] and got["grad_clip"] == 0.0


def test_both_glue_score_definitions():
    seeds = {
        "mnli": [{"matched_accuracy": 0.80, "mismatched_accuracy": 0.70}],
        "mrpc": [{"f1": 0.90, "accuracy": 0.80}, {"f1": 0.80, "accuracy": 0.70}, {"f1": 1.0, "accuracy": 0.9}],
        "stsb": [{"pearson": 0.90, "spearman": 0.80}],
        "cola": [{"matthews_corr": 0.5}, {"matthews_corr": 0.1}],
    }
    paper, per_task = gm.paper_glue_score(seeds)
    assert per_task == pytest.approx({"mnli": 0.80, "mrpc": 0.80, "stsb": 0.80, "cola": 0.30})  # means over seeds
    assert paper == pytest.approx(0.675)
    # the leaderboard definition: mean of a task's metrics, median over seeds
    board = {t: float(np.median([gm.task_score(m) for m in v])) for t, v in seeds.items()}
    assert board == pytest.approx({"mnli": 0.75, "mrpc": 0.85, "stsb": 0.85, "cola": 0.30})
    assert gm.glue_score(board)[0] == pytest.approx(0.6875)
    assert "MNLI-m" in gm.SCORE_DEFINITIONS["mosaicbert"] and "79.6" in gm.SCORE_DEFINITIONS["mosaicbert"]
    results = {"tasks": {t: {"score": board[t], "metrics": v[0], "num_seeds": len(v),
                             "seeds": [{"metrics": m, "seed": i, "init": "pretrained", "score": 0.0,
                                        "train_examples": 1, "steps": 1, "train_seconds": 0.0} for i, m in enumerate(v)]}
                         for t, v in seeds.items()},
               "model": "m", "model_kind": "fastbert", "data": "d", "device": "cpu", "world_size": 1}
    glue._update_glue(results)
    assert results["glue_score"] == pytest.approx(0.6875) and results["glue_score_mosaicbert"] == pytest.approx(0.675)
    md = glue.results_markdown(results)
    assert "GLUE score (leaderboard metrics): 68.75" in md and "GLUE score (MosaicBERT paper's definition): 67.50" in md


def test_mnli_warning_names_the_reason():
    assert "MNLI did not run" in glue.mnli_warning("rte", True)
    assert "init_from_mnli=false" in glue.mnli_warning("mrpc", False)
    assert "not comparable with the paper" in glue.mnli_warning("stsb", True)


def test_finetune_overrides_turn_dropout_back_on(tmp_path):
    """Cramming pretrains without dropout; its checkpoint asks GLUE finetuning to switch it back on."""
    from fastbert.models import BertConfig, BertForMaskedLM
    cfg = BertConfig.preset("tiny", vocab_size=64, hidden_dropout_prob=0.0, layer_norm_position="pre",
                            extra={"finetune_overrides": {"hidden_dropout_prob": 0.1,
                                                          "attention_probs_dropout_prob": 0.1,
                                                          "attention_impl": "padded_sdpa"}})
    BertForMaskedLM(cfg).save_pretrained(str(tmp_path))
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"]) + "\n")
    src = glue.load_model_source(tmp_path)
    clf = src.build(3)
    c = clf.config
    assert (c.hidden_dropout_prob, c.attention_probs_dropout_prob, c.attention_impl) == (0.1, 0.1, "padded_sdpa")
    assert clf.dropout.p == 0.1 and c.layer_norm_position == "pre" and c.num_labels == 3
    # the pretraining config checks them (tests/test_recipe_runs.py: they reach final/config.json)
    pc = PretrainConfig(max_steps=1)
    pc.model.finetune_overrides = {"hidden_dropout_prob": 0.1}
    pc.validate()
    pc.model.finetune_overrides = {"hiden_dropout": 0.1}
    with pytest.raises(ValueError, match="finetune_overrides: unknown BertConfig field"):
        pc.validate()
