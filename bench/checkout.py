"""Import fastbert from a plain checkout, with nothing installed (how ``bench.gpu_run`` runs on a lent GPU
machine: no package registry there, so no ``pip install``).

``fastbert`` itself imports from the repository root (``python -m`` puts the working directory on
``sys.path``), but two of its subpackages live elsewhere in the tree (pyproject's ``package-dir``):
``fastbert.kernels`` is ``kernels/`` and ``fastbert.csrc`` is ``csrc/``. Appending the repository root
to ``fastbert.__path__`` lets Python find them exactly where an editable install would. The extension
``fastbert._C`` is built in place (``setup.py build_ext --inplace``) into ``fastbert/``.
"""
from __future__ import annotations

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ensure_importable() -> str:
    """Make ``fastbert`` and its subpackages importable from this checkout; returns how
    (``"installed"``: an installed or editable fastbert already provides them; ``"checkout"``: the
    repository root was added to ``fastbert.__path__``)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import fastbert
    if not _here(fastbert.__file__):
        raise ImportError(f"fastbert is imported from {fastbert.__file__}, not from this checkout {ROOT}; "
                          "run from the checkout's root (python -m ...) or put it first on PYTHONPATH")
    spec = importlib.util.find_spec("fastbert.kernels")
    if spec is not None and _here(spec.origin):
        return "installed"
    # Not found, or found in another tree (an editable install of another checkout): the path finder
    # consults fastbert.__path__ before setuptools' editable finder, so this checkout's kernels/ wins.
    if ROOT not in fastbert.__path__:
        fastbert.__path__.append(ROOT)
    spec = importlib.util.find_spec("fastbert.kernels")
    if spec is None or not _here(spec.origin):
        raise ImportError(f"fastbert.kernels is not importable from {ROOT}/kernels")
    return "checkout"


def _here(path) -> bool:
    return bool(path) and os.path.realpath(path).startswith(os.path.realpath(ROOT) + os.sep)
