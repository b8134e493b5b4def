"""One cache folder for everything fastbert builds or downloads: ``$FASTBERT_CACHE``."""
from pathlib import Path

import pytest

import fastbert
import fastbert.paths

REPO = Path(__file__).resolve().parents[1]


def test_one_cache_variable_for_everything(tmp_path, monkeypatch):
    from bench import compile_report
    from fastbert import cuda_host_backend
    from train import data

    monkeypatch.delenv("FASTBERT_CACHE_DIR", raising=False)
    monkeypatch.setenv("FASTBERT_CACHE", str(tmp_path / "c"))
    assert fastbert.cache_dir() == tmp_path / "c"
    assert cuda_host_backend.cache_root() == tmp_path / "c" / "cuda_host"
    assert data.default_cache_root() == str(tmp_path / "c")
    assert compile_report._cache_dir() == str(tmp_path / "c" / "compile_report")

    monkeypatch.delenv("FASTBERT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fastbert.cache_dir("x") == tmp_path / "home" / ".cache" / "fastbert" / "x"

    # the old name is still read, with a deprecation warning
    monkeypatch.setenv("FASTBERT_CACHE_DIR", str(tmp_path / "old"))
    monkeypatch.setattr(fastbert.paths, "_warned", False)
    with pytest.warns(DeprecationWarning, match="FASTBERT_CACHE"):
        assert fastbert.cache_dir("x") == tmp_path / "old" / "x"


def test_nothing_else_reads_the_old_variable():
    offenders = [str(p.relative_to(REPO)) for d in ("fastbert", "train", "bench", "tests", "kernels")
                 for p in (REPO / d).rglob("*.py")
                 if "FASTBERT_CACHE_DIR" in p.read_text() and p.name not in ("paths.py", "test_cache_dir.py")]
    assert not offenders, f"read the cache folder through fastbert.cache_dir(), not FASTBERT_CACHE_DIR: {offenders}"
