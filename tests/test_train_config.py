"""Pretraining config: YAML + key=value overrides, typed by the dataclass; unknown keys are errors."""
import os

import pytest
import yaml

from train.config import PretrainConfig, apply_override, expand_path, load_config, save_config
from train.pretrain import config_from_args
from train.resume import lr_at

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train", "configs")


def write(tmp_path, d):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(d))
    return str(p)


def test_yaml_and_typed_overrides(tmp_path):
    path = write(tmp_path, {"model": {"preset": "mini"}, "optim": {"lr": "5e-4"}, "max_steps": 10})
    cfg = load_config(path, ["optim.lr=1e-3", "data.max_len=64", "compile=true", "optim.betas=0.8,0.9",
                             "model.overrides.num_hidden_layers=3", "data.train=007", "max_minutes=0"])
    assert cfg.model.preset == "mini"
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.data.max_len == 64 and isinstance(cfg.data.max_len, int)
    assert cfg.compile is True
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.model.overrides == {"num_hidden_layers": 3}
    assert cfg.data.train == "007"  # a str field keeps the text verbatim
    # the YAML's "5e-4" (a string to PyYAML) became a float before the override replaced it
    assert load_config(path).optim.lr == 5e-4


@pytest.mark.parametrize("where", ["yaml", "override"])
def test_unknown_key_is_an_error_naming_it(tmp_path, where):
    if where == "yaml":
        path = write(tmp_path, {"optim": {"lrr": 1e-3}, "max_steps": 1})
        with pytest.raises(ValueError, match=r"optim\.lrr"):
            load_config(path)
    else:
        with pytest.raises(ValueError, match=r"optim\.lrr"):
            load_config(None, ["max_steps=1", "optim.lrr=1e-3"])
        with pytest.raises(ValueError, match="key=value"):
            load_config(None, ["max_steps"])


def test_bad_values_name_the_key():
    with pytest.raises(ValueError, match="data.max_len"):
        load_config(None, ["max_steps=1", "data.max_len=abc"])
    with pytest.raises(ValueError, match="compile"):
        load_config(None, ["max_steps=1", "compile=maybe"])
    with pytest.raises(ValueError, match="budget"):
        load_config(None, [])  # neither budget
    with pytest.raises(ValueError, match="budget"):
        load_config(None, ["max_steps=5", "max_minutes=1"])
    with pytest.raises(ValueError, match="section"):
        apply_override(PretrainConfig(), "optim=3")


def test_shipped_configs_load_and_round_trip(tmp_path):
    names = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))
    assert {"tiny-cpu.yaml", "mosaicbert-base.yaml", "bert-base-baseline.yaml"} <= set(names)
    for name in names:
        cfg = load_config(os.path.join(CONFIG_DIR, name))
        out = str(tmp_path / name)
        save_config(cfg, out)
        assert load_config(out) == cfg
    base = load_config(os.path.join(CONFIG_DIR, "mosaicbert-base.yaml"))
    assert (base.data.max_len, base.global_batch_size, base.optim.lr, base.optim.warmup,
            base.data.mlm_probability) == (128, 4096, 5e-4, 0.06, 0.3)
    assert load_config(os.path.join(CONFIG_DIR, "bert-base-baseline.yaml")).data.mlm_probability == 0.15


def test_command_line(tmp_path):
    cfg = config_from_args(["--config", os.path.join(CONFIG_DIR, "tiny-cpu.yaml"), "--data", "/x/y.jsonl",
                            "--output-dir", str(tmp_path), "max_steps=7"])
    assert (cfg.data.train, cfg.output_dir, cfg.max_steps) == ("/x/y.jsonl", str(tmp_path), 7)


def test_expand_path_defaults_fastbert_data(monkeypatch):
    monkeypatch.setenv("FASTBERT_DATA", "/data/here")
    assert expand_path("${FASTBERT_DATA}/corpus") == "/data/here/corpus"
    monkeypatch.delenv("FASTBERT_DATA")
    assert expand_path("$FASTBERT_DATA/x").endswith(os.path.join("shared", "data", "x"))


def test_lr_schedule():
    peak = 1.0
    assert lr_at(0.0, peak, 0.1, 0.02) == 0.0
    assert lr_at(0.05, peak, 0.1, 0.02) == pytest.approx(0.5)
    assert lr_at(0.1, peak, 0.1, 0.02) == pytest.approx(1.0)
    assert lr_at(0.55, peak, 0.1, 0.02) == pytest.approx(0.02 + 0.98 * 0.5)
    assert lr_at(1.0, peak, 0.1, 0.02) == pytest.approx(0.02)
    assert lr_at(1.5, peak, 0.1, 0.02) == pytest.approx(0.02)  # past the budget: the floor
    assert lr_at(0.0, peak, 0.0, 0.1) == pytest.approx(1.0)    # no warmup


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    from train import pretrain, quickstart
    rc = pretrain.main(["--data", str(tmp_path / "nowhere" / "x.jsonl"), "--output-dir", str(tmp_path / "o"),
                        "max_steps=1", "data.valid="])
    assert rc == 2 and "--data" in capsys.readouterr().err
    rc = quickstart.main(["--data", str(tmp_path), "--output-dir", str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert rc == 2 and "wiki2015-00.jsonl.gz" in err and "FASTBERT_DATA" in err and "hub" in err
