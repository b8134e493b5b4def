"""Build script: everything is in pyproject.toml except the optional CUDA extension ``fastbert._C``.

The extension is built only when the installed torch is a CUDA build and a CUDA toolkit (nvcc) is
found; otherwise one line says why it was skipped and the pure-Python/Triton package installs.
Environment flags (as flash-attn users expect):
  FASTBERT_SKIP_CUDA_BUILD=1   never build the extension
  FASTBERT_FORCE_CUDA_BUILD=1  build it even when the checks above say no (fail loudly if it cannot)
  TORCH_CUDA_ARCH_LIST         e.g. "8.0;9.0" (the default)
  MAX_JOBS                     parallel compile jobs (ninja)
"""
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _say(msg):
    print(f"fastbert setup: {msg}", file=sys.stderr)


def cuda_extension():
    """(ext_modules, cmdclass) for fastbert._C, or ([], {}) with the reason printed."""
    if os.environ.get("FASTBERT_SKIP_CUDA_BUILD", "0") == "1":
        _say("skipping the CUDA extension fastbert._C (FASTBERT_SKIP_CUDA_BUILD=1)")
        return [], {}
    force = os.environ.get("FASTBERT_FORCE_CUDA_BUILD", "0") == "1"
    try:
        import torch
    except ImportError:
        _say("skipping the CUDA extension fastbert._C: torch is not installed in the build environment "
             "(install torch first, then pip install --no-build-isolation .)")
        return [], {}
    sys.path.insert(0, os.path.join(HERE, "csrc"))
    try:
        import build_ext_config  # csrc/build_ext_config.py: toolkit detection and the extension spec
    except ImportError:
        build_ext_config = None
    if build_ext_config is None:
        _say("skipping the CUDA extension fastbert._C: csrc/build_ext_config.py is missing")
        return [], {}
    reason = build_ext_config.why_not_build(torch)
    if reason and not force:
        _say(f"skipping the CUDA extension fastbert._C: {reason}")
        return [], {}
    return build_ext_config.extension(torch, HERE)


ext_modules, cmdclass = cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
