"""The harness as a new user meets it: installed console scripts that work from any folder, --help that
lists the config keys, config errors before any data is read, a clear word when the hub is offline, a
warning when the GPU defaults would run on a CPU, and the opt-in CUDA build test."""
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train import pretrain, quickstart

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("fastbert-pretrain", "fastbert-glue", "fastbert-quickstart")
REINSTALL = "reinstall the package (pip install --no-build-isolation -e .) to get the console scripts"


def _script(name: str) -> str:
    path = Path(sys.executable).parent / name  # pip puts console scripts beside the interpreter
    if not path.is_file():
        pytest.fail(f"{name} is not installed in {path.parent}: {REINSTALL}")
    return str(path)


def _run(cmd, cwd, **env):
    e = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FASTBERT_DATA")}
    e.update(env)
    return subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=300)


def test_console_scripts_run_from_any_folder_and_say_when_the_hub_is_offline(tmp_path):
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    for name in SCRIPTS:
        assert name in eps, f"console script {name} is not registered: {REINSTALL}"
    assert eps["fastbert-pretrain"] == "fastbert.train.pretrain:main"
    from fastbert.train.config import data_root  # the installed harness still finds the checkout's data folder
    assert os.environ.get("FASTBERT_DATA") or data_root() == (REPO.parent / "shared" / "data").resolve()

    # From an empty folder (no train/ package in sight), offline, a hub dataset name: a clear error, not a
    # traceback (huggingface_hub reads HF_HUB_OFFLINE at import, hence a fresh process).
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]) + "\n")
    r = _run([_script("fastbert-pretrain"), "--config", "tiny-cpu", "--data", "someone/some-corpus",
              "--output-dir", "out", f"data.tokenizer={vocab}", "data.valid=", "data.cache_dir=cache",
              "progress=false"], tmp_path, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "someone/some-corpus" in r.stderr and "offline" in r.stderr and "HF_HUB_OFFLINE" in r.stderr, r.stderr
    assert not any((tmp_path / "cache").glob("tokens-*")), "a half-built cache was left behind"


def test_help_lists_every_config_key_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        pretrain.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for line in ("model.preset = 'tiny'", "data.max_len = 128", "optim.lr = 0.0005", "max_steps = 0",
                 "resume = 'auto'", "tiny-cpu"):
        assert line in out, line
    assert "(peak learning rate)" in out  # the field's comment comes along


def test_config_by_name(tmp_path):
    cfg = pretrain.config_from_args(["--config", "tiny-cpu", "--output-dir", str(tmp_path)])
    assert cfg.model.preset == "tiny" and cfg.max_steps == 250


@pytest.mark.parametrize("bad,says", [("model.preset=huge", "model.preset: name: unknown preset 'huge'"),
                                      ("model.overrides.hidden_sise=64", "hidden_sise"),
                                      ("model.overrides.num_attention_heads=3", "divisible")])
def test_bad_model_config_fails_before_any_data_is_read(tmp_path, capsys, bad, says):
    # the data paths do not exist: an error about them would mean the model was checked too late
    rc = pretrain.main(["--config", "tiny-cpu", "--data", str(tmp_path / "no.jsonl"), "--output-dir",
                        str(tmp_path / "out"), bad])
    err = capsys.readouterr().err
    assert rc == 2 and says in err and "no.jsonl" not in err, err
    rc = quickstart.main(["--data", str(tmp_path), "--output-dir", str(tmp_path / "q"), bad])
    err = capsys.readouterr().err
    assert rc == 2 and says in err and "wiki2015" not in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "q").exists()


def test_no_config_on_a_cpu_machine_warns_and_names_the_cpu_config(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = pretrain.main(["--data", str(tmp_path / "no.jsonl"), "--output-dir", str(tmp_path / "o"), "max_steps=1"])
    err = capsys.readouterr().err
    assert rc == 2 and "warning: no --config" in err and "--config tiny-cpu" in err, err
    pretrain.main(["--config", "tiny-cpu", "--data", str(tmp_path / "no.jsonl"), "--output-dir", str(tmp_path / "o")])
    assert "warning: no --config" not in capsys.readouterr().err


def test_cuda_build_test_is_opt_in_and_ci_opts_in(monkeypatch):
    """The 5.7 GB CUDA-build test runs only with FASTBERT_TEST_CUDA_BUILD=1; CI sets it; README names it."""
    import importlib.util

    def skip_mark():  # the module's skipif, evaluated afresh under the current environment
        spec = importlib.util.spec_from_file_location("cuda_build_opt_in", REPO / "tests" / "test_cuda_build.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.pytestmark.mark
    monkeypatch.delenv("FASTBERT_TEST_CUDA_BUILD", raising=False)
    mark = skip_mark()
    assert mark.name == "skipif" and mark.args[0] is True and "FASTBERT_TEST_CUDA_BUILD=1" in mark.kwargs["reason"]
    monkeypatch.setenv("FASTBERT_TEST_CUDA_BUILD", "1")
    assert skip_mark().args[0] is False
    ci = (REPO / ".ci" / "run").read_text()
    assert "export FASTBERT_TEST_CUDA_BUILD=1" in ci.split("# --- README test command (begin)")[0]
    assert "FASTBERT_TEST_CUDA_BUILD=1" in (REPO / "README.md").read_text()
