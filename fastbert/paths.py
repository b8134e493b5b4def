"""Where fastbert keeps files it builds or downloads: one cache root for everything.

``$FASTBERT_CACHE`` (default ``~/.cache/fastbert``) holds tokenized data shards (``tokens-*``), trained
vocabularies (``wordpiece-*``), the ``cuda_host`` test backend's builds (``cuda_host/``), the compile
report's and the nvcc checks' results (``compile_report/``, ``nvcc_reports/``) and the CUDA-build test's
virtual environment (``cuda_build_venv/``, opt-in). The older name ``FASTBERT_CACHE_DIR`` is still read,
with a deprecation warning, when ``FASTBERT_CACHE`` is unset.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

ENV = "FASTBERT_CACHE"
_OLD_ENV = "FASTBERT_CACHE_DIR"
_warned = False


def cache_dir(*parts: str) -> Path:
    """``$FASTBERT_CACHE/<parts...>`` (not created). ``$FASTBERT_CACHE_DIR`` is the deprecated fallback."""
    global _warned
    root = os.environ.get(ENV)
    if not root and os.environ.get(_OLD_ENV):
        root = os.environ[_OLD_ENV]
        if not _warned:
            _warned = True
            warnings.warn(f"{_OLD_ENV} is deprecated; set {ENV} instead (one cache folder for all of fastbert)",
                          DeprecationWarning, stacklevel=2)
    base = Path(os.path.expanduser(root)) if root else Path.home() / ".cache" / "fastbert"
    return base.joinpath(*parts)
