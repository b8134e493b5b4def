"""How setup.py builds the CUDA extension ``fastbert._C`` (imported by setup.py; no torch import at module
level so setup.py controls when torch loads).

* ``why_not_build(torch)``: None when the installed torch is a CUDA build and a usable CUDA toolkit is
  found, else one line saying why the extension is skipped.
* ``extension(torch, repo_root)``: ``(ext_modules, cmdclass)`` for setuptools.

Toolkit choice: ``CUDA_HOME`` (or ``CUDA_PATH``) when set, used as given. Otherwise the first toolkit that
has ``bin/nvcc`` AND the headers torch's CUDA headers include (cuBLAS, cuSPARSE, cuda_runtime):
the pip toolkit next to torch (``<site-packages>/nvidia/cu<major>``, from ``cuda-toolkit[nvcc,cccl]``)
first, then ``/usr/local/cuda``, the ``nvcc`` on PATH, and ``/usr/local/cuda-*``. A toolkit with nvcc
but without those headers (a bare ``/usr/local/cuda`` on some machines) compiles our torch-free .cu
files but not the binding, so it is passed over, and the choice is printed. The pip toolkit ships only
``libcudart.so.<major>``; the linker wants ``libcudart.so``, so a build-local symlink is made.

Flags: ``-O3 -lineinfo`` for nvcc, ``-O3`` for the host compiler (torch adds the C++ standard its headers
need); no
``--use_fast_math``: the pointwise kernels' erf/exp/tanh/division are compared against PyTorch's own
rounding error and the fast approximations would exceed it, so kernels opt into approximate
intrinsics (``__expf``, ``exp2f`` in attention) explicitly where the error is acceptable.
``TORCH_CUDA_ARCH_LIST`` defaults to ``8.0;9.0``; ``MAX_JOBS`` bounds ninja's parallel compiles;
``FASTBERT_CUDA_DEBUG=1`` adds ``-DFASTBERT_CUDA_DEBUG`` (synchronise and check after every launch).
"""
from __future__ import annotations

import glob
import os
import shutil
import sys
from typing import List, Optional

REQUIRED_HEADERS = ("cuda_runtime.h", "cublas_v2.h", "cusparse.h", "cuda_bf16.h", "cuda_fp16.h")
DEFAULT_ARCH_LIST = "8.0;9.0"


def _say(msg: str) -> None:
    print(f"fastbert setup: {msg}", file=sys.stderr)


def _include_dirs(home: str) -> List[str]:
    return [d for d in (os.path.join(home, "include"), os.path.join(home, "targets", "x86_64-linux", "include"))
            if os.path.isdir(d)]


def missing_headers(home: str) -> List[str]:
    """Headers of REQUIRED_HEADERS that the toolkit at ``home`` lacks."""
    dirs = _include_dirs(home)
    return [h for h in REQUIRED_HEADERS if not any(os.path.isfile(os.path.join(d, h)) for d in dirs)]


def _site_dirs(torch) -> List[str]:
    dirs = [os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))]
    try:
        import site
        dirs += site.getsitepackages() + [site.getusersitepackages()]
    except Exception:  # noqa: BLE001 - virtualenvs without site helpers
        pass
    dirs += [p for p in sys.path if p.endswith("site-packages")]
    seen, out = set(), []
    for d in dirs:
        if d and d not in seen:
            seen.add(d)
            out.append(d)
    return out


def candidate_toolkits(torch) -> List[str]:
    """Toolkit roots to try, best first (see the module docstring)."""
    major = (torch.version.cuda or "").split(".")[0]
    cands = []
    if major:
        cands += [os.path.join(d, "nvidia", f"cu{major}") for d in _site_dirs(torch)]
    cands.append("/usr/local/cuda")
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    cands += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    seen, out = set(), []
    for c in cands:
        r = os.path.realpath(c)
        if r not in seen and os.path.isdir(r):
            seen.add(r)
            out.append(c)
    return out


def find_toolkit(torch):
    """``(cuda_home, None)`` or ``(None, reason)``."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        if not os.path.isfile(os.path.join(env, "bin", "nvcc")):
            return None, f"CUDA_HOME={env} has no bin/nvcc"
        return env, None
    tried = []
    for home in candidate_toolkits(torch):
        if not os.path.isfile(os.path.join(home, "bin", "nvcc")):
            tried.append(f"{home} (no bin/nvcc)")
            continue
        miss = missing_headers(home)
        if miss:
            tried.append(f"{home} (nvcc but no {', '.join(miss)})")
            continue
        return home, None
    return None, ("no CUDA toolkit with nvcc and the headers torch needs was found (tried: " +
                  ("; ".join(tried) or "nothing") + "); install one, e.g. pip install "
                  "\"cuda-toolkit[nvcc,cccl]\" matching torch's CUDA, or set CUDA_HOME")


def why_not_build(torch) -> Optional[str]:
    if not getattr(torch.version, "cuda", None):
        return f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    home, reason = find_toolkit(torch)
    return reason


def _lib_dir(home: str) -> Optional[str]:
    for d in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
        p = os.path.join(home, d)
        if glob.glob(os.path.join(p, "libcudart.so*")):
            return p
    return None


def cudart_link_dir(home: str, build_dir: str) -> Optional[str]:
    """A directory holding ``libcudart.so`` for the linker: None when the toolkit has it; else a
    build-local symlink to the versioned ``libcudart.so.<N>`` (the pip toolkit's layout)."""
    lib = _lib_dir(home)
    if lib is None or os.path.exists(os.path.join(lib, "libcudart.so")):
        return None
    versioned = sorted(glob.glob(os.path.join(lib, "libcudart.so.*")), key=len)
    if not versioned:
        return None
    os.makedirs(build_dir, exist_ok=True)
    link = os.path.join(build_dir, "libcudart.so")
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(versioned[0], link)
    _say(f"linking against {versioned[0]} through {link} (the toolkit has no unversioned libcudart.so)")
    return build_dir


def extension(torch, repo_root: str):
    """``(ext_modules, cmdclass)`` building ``fastbert._C`` from csrc/bindings.cpp and csrc/*.cu."""
    home, reason = find_toolkit(torch)
    if home is None:
        raise RuntimeError(f"cannot build fastbert._C: {reason}")
    _say(f"building fastbert._C with the CUDA toolkit at {home} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    os.environ["CUDA_HOME"] = home
    os.environ["PATH"] = os.path.join(home, "bin") + os.pathsep + os.environ.get("PATH", "")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    _say(f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, MAX_JOBS={os.environ.get('MAX_JOBS', '(all cores)')}")

    from torch.utils import cpp_extension
    cpp_extension.CUDA_HOME = home  # it was read at import; make sure the chosen toolkit wins

    csrc = os.path.join(repo_root, "csrc")
    sources = ["csrc/bindings.cpp"] + sorted(
        os.path.relpath(p, repo_root) for p in glob.glob(os.path.join(csrc, "*.cu")))
    debug = os.environ.get("FASTBERT_CUDA_DEBUG", "0") == "1"
    defines = ["-DFASTBERT_CUDA_DEBUG"] if debug else []
    # No -std here: torch's extension builder adds the standard its headers need (C++20 from torch 2.10;
    # the binding includes torch). The kernel files are plain C++17 CUDA and compile either way.
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"] + defines
    cxx = ["-O3"] + defines
    library_dirs = []
    link = cudart_link_dir(home, os.path.join(repo_root, "build", "fastbert_cudart"))
    if link:
        library_dirs.append(link)
    ext = cpp_extension.CUDAExtension(
        name="fastbert._C",
        sources=sources,
        include_dirs=[csrc] + _include_dirs(home),
        library_dirs=library_dirs,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
    )
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}
    return [ext], cmdclass
