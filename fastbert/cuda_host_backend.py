"""The ``cuda_host`` backend: fastbert's CUDA kernel sources (``csrc/*.cu``) compiled as host C++ and run on
CPU tensors, for tests only (``auto`` never picks it).

``csrc/host_entry.cpp`` includes ``csrc/cuda_host_emu.h`` (a small emulation of the CUDA execution model:
blocks on worker threads, a block's threads as fibers with real ``__syncthreads``/warp-shuffle barriers,
per-block shared memory) and the kernel files themselves, and exposes each launcher as an ``extern "C"``
function. On first use it is built with g++ (``-O2 -std=c++17 -pthread``) into
``$FASTBERT_CACHE/cuda_host/<flavour>-<hash of the sources and flags>/libfastbert_host.so``
and loaded with ctypes. The primitives below have exactly the signatures of ``fastbert/reference.py``;
they allocate their outputs with torch and hand the kernels raw pointers, as the real ``cuda`` backend's
binding (``csrc/bindings.cpp``) does on a GPU.

Modes (what each proves: README, "Races and out-of-bounds accesses without a GPU"):

* fast (default): threads of a block switch only at barriers, in order.
* debug (``FASTBERT_EMU_DEBUG=1`` or ``with debug_mode():``): the same build; threads start and resume in a
  shuffled order and shared memory is poisoned with NaN bytes before each block.
* check (``FASTBERT_EMU_CHECK=1`` or ``with check_mode():``): a separately built library
  (``csrc/cuda_host_check.h``, g++ ``-fsanitize=kernel-address`` hooks) that checks every shared-memory
  access for races (RAW/WAR/WAW between threads no barrier orders), reads of never-written shared memory,
  cp.async destinations read before their wait and out-of-bounds shared accesses, switches threads at
  shared accesses in a seeded random order, and reports any access to the guard zones of
  :mod:`fastbert.memcheck`. A report fails the call with a RuntimeError naming the kernel, block,
  threads, shared array + offset and source lines.
* asan (``FASTBERT_EMU_SANITIZE=1``): built with AddressSanitizer + UndefinedBehaviorSanitizer; the
  process must start with the ASan runtime preloaded (:func:`sanitizer_env` gives the environment; the
  tests run it in a subprocess). An out-of-bounds access or undefined behaviour aborts with ASan's report.

``FASTBERT_EMU_SEED`` seeds the shuffled orders, ``FASTBERT_EMU_WORKERS`` sets how many blocks run in parallel,
``FASTBERT_EMU_REPORT=0`` keeps the checking build's scheduling but silences its reports (``check_mode(report=False)``).
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import torch

from fastbert._cuda_common import unsupported  # noqa: F401 - the backend's unsupported(), shared with cuda
from fastbert.reference import WINDOW_UNBOUNDED, check_window_size
from fastbert.testing import VisitLog
from fastbert.ops.mlm_chunked import chunked_sparse_mlm_loss

CXX_FLAGS = ["-O2", "-std=c++17", "-pthread", "-fPIC", "-shared", "-fno-strict-aliasing", "-Wall",
             "-Wno-unknown-pragmas"]
# Extra g++ flags of each build flavour (one cache entry each).
FLAVORS = {
    "fast": [],
    # every load/store calls the hooks of csrc/cuda_host_check.h (no sanitizer runtime); -g for addr2line's
    # inline chains (without variable tracking, which costs compile time and is never read)
    "check": ["-g", "-fno-var-tracking", "-fno-omit-frame-pointer", "-DFB_EMU_CHECK", "-fsanitize=kernel-address", "--param=asan-instrumentation-with-call-threshold=0",
              "--param=asan-stack=0", "--param=asan-globals=0", "-fno-sanitize-address-use-after-scope"],
    "asan": ["-O1", "-g", "-fno-var-tracking", "-DFB_EMU_ASAN", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
             "-fno-omit-frame-pointer"],
}
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # fb::DType in csrc/common.cuh

_c_p = ctypes.c_void_p
_c_i = ctypes.c_int
_c_i64 = ctypes.c_int64
_c_f = ctypes.c_float
# extern "C" entry points of csrc/host_entry.cpp: name -> (argtypes, restype). Entries returning
# c_char_p return NULL on success or an error message.
ENTRY_POINTS = {
    "fbh_reload_config": ([], None),
    "fbh_memcheck_set": ([ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(_c_i), ctypes.POINTER(ctypes.c_char_p), _c_i],
                         _c_i),
    "fbh_pointwise_partials": ([_c_i64], _c_i),
    "fbh_layer_norm_max_n": ([], _c_i),
    "fbh_layer_norm_bwd_num_partials": ([_c_i, _c_i], _c_i),
    "fbh_index_gather": ([_c_p, _c_p, _c_p, _c_i64, _c_i64, _c_i64], ctypes.c_char_p),
    "fbh_index_scatter": ([_c_p, _c_p, _c_p, _c_i64, _c_i64, _c_i64], ctypes.c_char_p),
    "fbh_bias_gelu_fwd": ([_c_i, _c_p, _c_p, _c_p, _c_i, _c_i, _c_i], ctypes.c_char_p),
    "fbh_bias_gelu_bwd": ([_c_i, _c_p, _c_p, _c_p, _c_p, _c_p, _c_p, _c_i, _c_i, _c_i], ctypes.c_char_p),
    "fbh_geglu_fwd": ([_c_i, _c_p, _c_p, _c_p, _c_i, _c_i, _c_i], ctypes.c_char_p),
    "fbh_geglu_bwd": ([_c_i, _c_p, _c_p, _c_p, _c_p, _c_p, _c_p, _c_i, _c_i, _c_i], ctypes.c_char_p),
    "fbh_layer_norm_fwd": ([_c_i, _c_p, _c_p, _c_p, _c_p, _c_p, _c_p, _c_p, _c_p, _c_i, _c_i, _c_f],
                           ctypes.c_char_p),
    "fbh_layer_norm_bwd": ([_c_i, _c_p, _c_p, _c_p, _c_p, _c_p, _c_p, _c_p, _c_p, _c_p, _c_p, _c_p, _c_i, _c_i,
                            _c_i], ctypes.c_char_p),
    "fbh_cross_entropy_rows": ([_c_p, _c_p, _c_p, _c_p, _c_i, _c_p, _c_i, _c_i, _c_f], ctypes.c_char_p),
    "fbh_flash_attn_fwd": ([_c_i, _c_p, _c_p, _c_p] + [_c_i64] * 6 + [_c_p, _c_p, _c_p, _c_p, _c_i, _c_i, _c_i,
                                                                       _c_i64, _c_i, _c_f, _c_i, _c_i, _c_p],
                           ctypes.c_char_p),
    "fbh_flash_attn_bwd": ([_c_i, _c_p, _c_p, _c_p, _c_p] + [_c_i64] * 6 + [_c_p] * 7 + [_c_i, _c_i, _c_i, _c_i64,
                                                                                    _c_i, _c_f, _c_i, _c_i, _c_p],
                           ctypes.c_char_p),
}

_lock = threading.Lock()
_state = {"libs": {}, "errors": {}, "build_s": None}
_override = threading.local()  # .lib: the library check_mode() / use_library() selected for this thread


# ------------------------------------------------------------------------------------------------
# build and load
# ------------------------------------------------------------------------------------------------
def csrc_dir() -> Path:
    """The kernel sources: ``<repo>/csrc`` (editable install) or the installed ``fastbert/csrc`` package."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "csrc", here / "csrc"):
        if (cand / "host_entry.cpp").is_file():
            return cand
    import importlib.util
    spec = importlib.util.find_spec("fastbert.csrc")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if (Path(loc) / "host_entry.cpp").is_file():
                return Path(loc)
    raise FileNotFoundError("fastbert's CUDA sources (csrc/host_entry.cpp) were not found next to the package")


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


def _source_hash(src: Path, cmd: list) -> str:
    h = hashlib.sha256()
    for p in sorted(src.iterdir()):
        if p.suffix in (".cu", ".cuh", ".h", ".cpp") and p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    h.update(" ".join(cmd).encode())
    try:
        h.update(subprocess.run([_compiler(), "--version"], capture_output=True, text=True, timeout=30).stdout.encode())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return h.hexdigest()[:16]


def cache_root() -> Path:
    from fastbert.paths import cache_dir
    return cache_dir("cuda_host")


def build(verbose: bool = False, flavor: str = "fast", src: Optional[Path] = None) -> Path:
    """Compile ``<src>/host_entry.cpp`` (default: :func:`csrc_dir`) as the given flavour (``FLAVORS``),
    cached by a hash of the sources and flags, and return the shared library's path."""
    src = Path(src) if src is not None else csrc_dir()
    cxx = _compiler()
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no host C++ compiler {cxx!r} found to build the cuda_host test backend")
    flags = CXX_FLAGS + FLAVORS[flavor] + [f"-I{src}"]
    key = _source_hash(src, [cxx] + flags)
    out_dir = cache_root() / f"{flavor}-{key}"
    lib = out_dir / "libfastbert_host.so"
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build per cache entry, even across processes
        if lib.is_file():
            return lib
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        cmd = [cxx] + flags + [str(src / "host_entry.cpp"), "-o", tmp]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if proc.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"building the cuda_host backend failed ({shlex.join(cmd)}):\n{proc.stderr[-6000:]}")
        os.replace(tmp, lib)  # atomic: other processes see the whole library or none
        _state["build_s"] = dt
        if verbose or os.environ.get("FASTBERT_VERBOSE_BUILD"):
            print(f"cuda_host: built {lib} in {dt:.1f}s")
    return lib


def build_executable(source: Path, flavor: str = "fast", include: tuple = ()) -> Path:
    """Compile a standalone driver (e.g. tests/cuda_host_driver/emu_selftest.cpp) against csrc/ with the
    flags of ``flavor`` (cached by a hash of csrc/, the driver's folder and the flags); return its path."""
    source = Path(source)
    src = csrc_dir()
    cxx = _compiler()
    flags = [f for f in CXX_FLAGS if f not in ("-fPIC", "-shared")] + FLAVORS[flavor]
    flags += ["-Wno-unused-function", f"-I{src}", f"-I{source.parent}"] + [f"-I{i}" for i in include]
    h = hashlib.sha256(_source_hash(src, [cxx] + flags).encode())
    for p in sorted(source.parent.iterdir()):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    exe = cache_root() / f"{source.stem}-{flavor}-{h.hexdigest()[:16]}"
    if not exe.is_file():
        exe.parent.mkdir(parents=True, exist_ok=True)
        tmp = exe.with_suffix(f".{os.getpid()}.tmp")
        cmd = [cxx] + flags + [str(source), "-o", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building {source.name} failed ({shlex.join(cmd)}):\n{proc.stderr[-6000:]}")
        os.replace(tmp, exe)
    return exe


def _env_flavor() -> str:
    if os.environ.get("FASTBERT_EMU_SANITIZE", "0") not in ("", "0"):
        return "asan"
    if os.environ.get("FASTBERT_EMU_CHECK", "0") not in ("", "0"):
        return "check"
    return "fast"


def asan_loaded() -> bool:
    """Whether the AddressSanitizer runtime is loaded in this process (needed by the ``asan`` flavour)."""
    return hasattr(ctypes.CDLL(None), "__asan_init")


def open_library(path) -> ctypes.CDLL:
    """Load a built cuda_host library (any flavour, e.g. one built from a patched copy of csrc/)."""
    lib = ctypes.CDLL(str(path))
    for name, (argtypes, restype) in ENTRY_POINTS.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = restype
    return lib


def load(flavor: Optional[str] = None):
    """The loaded ctypes library of ``flavor`` (default: the one ``check_mode``/``use_library`` selected
    for this thread, else the FASTBERT_EMU_* variables'), built on first use. Raises RuntimeError saying
    why it cannot be."""
    if flavor is None:
        lib = getattr(_override, "lib", None)
        if lib is not None:
            return lib
        flavor = _env_flavor()
    with _lock:
        if flavor in _state["libs"]:
            return _state["libs"][flavor]
        if flavor in _state["errors"]:
            raise RuntimeError(_state["errors"][flavor])
        try:
            if flavor == "asan" and not asan_loaded():
                raise RuntimeError("the asan flavour needs the ASan runtime preloaded: start the process with "
                                   "fastbert.cuda_host_backend.sanitizer_env() (LD_PRELOAD of libasan and libstdc++)")
            lib = open_library(build(flavor=flavor))
        except (RuntimeError, OSError, AttributeError) as e:
            _state["errors"][flavor] = f"the cuda_host backend ({flavor}) could not be built or loaded: {e}"
            raise RuntimeError(_state["errors"][flavor]) from e
        _state["libs"][flavor] = lib
        return lib


def sanitizer_env(base: Optional[dict] = None) -> dict:
    """Environment for a subprocess that runs cuda_host under ASan + UBSan (``FASTBERT_EMU_SANITIZE=1``).

    Python is not built with ASan, so its runtime must come first in the process: LD_PRELOAD of g++'s
    libasan, and of libstdc++ too (ASan hooks ``__cxa_throw`` only if libstdc++ is loaded when it
    starts; the launchers throw C++ exceptions for bad arguments). Loading an ASan-built library into a
    process without the runtime fails, and a ``-static-libasan`` library would not see torch's heap
    allocations, so the sanitized run is a separate process. Leak detection is off (Python keeps memory
    until exit).
    """
    env = dict(os.environ if base is None else base)

    def lib_path(name):
        out = subprocess.run([_compiler(), f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        if not out or not os.path.isabs(out):
            raise RuntimeError(f"{_compiler()} does not know where {name} is (is the sanitizer runtime installed?)")
        return os.path.realpath(out)

    env["LD_PRELOAD"] = " ".join([lib_path("libasan.so"), lib_path("libstdc++.so")])
    env["ASAN_OPTIONS"] = "detect_leaks=0:halt_on_error=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    env["FASTBERT_EMU_SANITIZE"] = "1"
    env.pop("FASTBERT_EMU_CHECK", None)
    return env


def build_seconds() -> Optional[float]:
    """Seconds the g++ build took in this process (None when the cached library was reused)."""
    return _state["build_s"]


def why_not(device) -> Optional[str]:
    if torch.device(device).type != "cpu":
        return f"cuda_host runs on CPU tensors, got {device}"
    try:
        load()
    except RuntimeError as e:
        return str(e)
    return None


@contextlib.contextmanager
def _env(values: dict, lib):
    keys = ("FASTBERT_EMU_DEBUG", "FASTBERT_EMU_SEED", "FASTBERT_EMU_WORKERS", "FASTBERT_EMU_REPORT")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    lib.fbh_reload_config()
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        lib.fbh_reload_config()


@contextlib.contextmanager
def debug_mode(seed: int = 12345, workers: Optional[int] = None):
    """Run the emulated kernels with shuffled thread order and poisoned shared memory inside the block."""
    with _env({"FASTBERT_EMU_DEBUG": "1", "FASTBERT_EMU_SEED": str(seed),
               "FASTBERT_EMU_WORKERS": None if workers is None else str(workers)}, load()):
        yield


@contextlib.contextmanager
def use_library(lib, seed: Optional[int] = None):
    """Run this thread's primitive calls on ``lib`` (from :func:`open_library`, e.g. a planted copy)."""
    prev = getattr(_override, "lib", None)
    _override.lib = lib
    try:
        with _env({"FASTBERT_EMU_SEED": None if seed is None else str(seed)}, lib):
            yield lib
    finally:
        _override.lib = prev


@contextlib.contextmanager
def check_mode(seed: int = 12345, library=None, report: bool = True):
    """Run this thread's primitive calls on the checking build (race, initialisation and bounds checks,
    threads switched at shared-memory accesses in an order seeded by ``seed``); ``library``: a library
    from ``open_library(build(flavor="check", src=...))`` instead of the one built from csrc/;
    ``report=False`` keeps only the interleaved scheduling (to see what a race does to the results)."""
    if library is None and _env_flavor() == "asan":
        # The checking build's hooks and ASan's instrumentation do not mix: in the sanitizer process
        # (FASTBERT_EMU_SANITIZE=1) the same tests run on the ASan build instead.
        yield load("asan")
        return
    lib = library if library is not None else load("check")
    with use_library(lib, seed=seed), _env({"FASTBERT_EMU_REPORT": None if report else "0"}, lib):
        yield lib


def _set_guards(lib) -> None:
    """Hand the guard zones of the active ``fastbert.memcheck.guarded()`` contexts to a checking build."""
    from fastbert import memcheck

    zones = memcheck.active_guard_zones()
    n = len(zones)
    lo_hi = (ctypes.c_uint64 * (2 * n))(*[v for z in zones for v in (z.lo, z.hi)])
    after = (_c_i * n)(*[int(z.after) for z in zones])
    what = (ctypes.c_char_p * n)(*[z.what.encode() for z in zones])
    lib.fbh_memcheck_set(lo_hi, after, what, n)


def _call(name: str, *args) -> None:
    lib = load()
    if lib.fbh_memcheck_set(None, None, None, -1):  # -1 asks: is this a checking build?
        _set_guards(lib)
    err = getattr(lib, name)(*args)
    if err is not None:
        raise RuntimeError(f"cuda_host {name[4:]}: {err.decode(errors='replace')}")


def _p(t: Optional[torch.Tensor]) -> Optional[int]:
    """A tensor's data pointer for the C side. The caller must hold a reference to ``t`` until the call
    returns (never pass ``_p(t.to(...))``: the temporary would be freed before the kernel runs)."""
    return None if t is None else t.data_ptr()


def _f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Small parameter vectors go to the kernels as fp32 (converted once per call)."""
    return None if t is None else t.to(torch.float32).contiguous()


# ------------------------------------------------------------------------------------------------
# primitives (signatures: fastbert/reference.py)
# ------------------------------------------------------------------------------------------------
def index_gather_fwd(x, indices):
    x = x.contiguous()
    idx = indices.contiguous()
    T, R = idx.shape[0], x.shape[0]
    out = torch.empty((T,) + tuple(x.shape[1:]), dtype=x.dtype)
    row_bytes = x[0].numel() * x.element_size() if R else 0
    _call("fbh_index_gather", _p(x), _p(out), _p(idx), T, R, row_bytes)
    return out


def index_scatter_fwd(x, indices, num_rows):
    x = x.contiguous()
    idx = indices.contiguous()
    T = idx.shape[0]
    out = torch.empty((num_rows,) + tuple(x.shape[1:]), dtype=x.dtype)
    row_bytes = out[0].numel() * out.element_size() if num_rows else 0
    _call("fbh_index_scatter", _p(x), _p(out), _p(idx), T, num_rows, row_bytes)
    return out


def bias_gelu_fwd(x, bias, approximate):
    M, N = x.shape
    y = torch.empty_like(x)
    b32 = _f32(bias)  # keep every converted tensor alive until the call returns
    _call("fbh_bias_gelu_fwd", _DTYPE_CODE[x.dtype], _p(x), _p(b32), _p(y), M, N, int(approximate == "tanh"))
    return y


def _activation_bwd(entry, dy, x, bias, approximate, N):
    """bias-GELU / GeGLU backward: ``dx`` like ``x [M, W]`` and, with a bias, ``dbias [W]`` reduced from
    per-block fp32 partial sums over all ``W`` columns. ``N``: the kernel's output width (``W`` for
    bias-GELU, ``W // 2`` for GeGLU)."""
    M, W = x.shape
    dx = torch.empty_like(x)
    part = db32 = None
    if bias is not None:
        part = torch.empty(load().fbh_pointwise_partials(M) * W, dtype=torch.float32)
        db32 = torch.empty(W, dtype=torch.float32)
    dyc, b32 = dy.contiguous(), _f32(bias)
    _call(entry, _DTYPE_CODE[x.dtype], _p(dyc), _p(x), _p(b32), _p(dx), _p(part),
          _p(db32), M, N, int(approximate == "tanh"))
    return dx, (db32.to(bias.dtype) if bias is not None else None)


def bias_gelu_bwd(dy, x, bias, approximate):
    return _activation_bwd("fbh_bias_gelu_bwd", dy, x, bias, approximate, x.shape[1])


def geglu_fwd(x, bias, approximate):
    M, N2 = x.shape
    N = N2 // 2
    y = torch.empty((M, N), dtype=x.dtype)
    b32 = _f32(bias)
    _call("fbh_geglu_fwd", _DTYPE_CODE[x.dtype], _p(x), _p(b32), _p(y), M, N, int(approximate == "tanh"))
    return y


def geglu_bwd(dy, x, bias, approximate):
    return _activation_bwd("fbh_geglu_bwd", dy, x, bias, approximate, x.shape[1] // 2)


def layer_norm_fwd(x, weight, bias, residual, eps):
    M, N = x.shape
    y = torch.empty_like(x)
    z = torch.empty_like(x) if residual is not None else None
    mean = torch.empty(M, dtype=torch.float32)
    rstd = torch.empty(M, dtype=torch.float32)
    res = residual.contiguous() if residual is not None else None
    w32, b32 = _f32(weight), _f32(bias)
    _call("fbh_layer_norm_fwd", _DTYPE_CODE[x.dtype], _p(x), _p(res), _p(w32), _p(b32), _p(y), _p(z),
          _p(mean), _p(rstd), M, N, float(eps))
    return y, z, mean, rstd


def layer_norm_bwd(dy, z, weight, has_bias, mean, rstd, dz_extra):
    M, N = z.shape
    lib = load()
    G = lib.fbh_layer_norm_bwd_num_partials(M, N)
    dz = torch.empty_like(z)
    part_dw = torch.empty(G * N, dtype=torch.float32) if weight is not None else None
    part_db = torch.empty(G * N, dtype=torch.float32) if has_bias else None
    dw32 = torch.empty(N, dtype=torch.float32) if weight is not None else None
    db32 = torch.empty(N, dtype=torch.float32) if has_bias else None
    dze = dz_extra.contiguous() if dz_extra is not None else None
    dyc, w32, mean32, rstd32 = dy.contiguous(), _f32(weight), _f32(mean), _f32(rstd)
    _call("fbh_layer_norm_bwd", _DTYPE_CODE[z.dtype], _p(dyc), _p(z), _p(w32), _p(mean32), _p(rstd32), _p(dze),
          _p(dz), _p(part_dw), _p(part_db), _p(dw32), _p(db32), M, N, G)
    dweight = dw32.to(weight.dtype) if weight is not None else None
    dbias = db32.to(weight.dtype if weight is not None else dy.dtype) if has_bias else None
    return dz, dweight, dbias


def cross_entropy_rows(logits, targets, bias, grad, grad_scale):
    """The MLM row kernel (contract: ``fastbert.ops.mlm_chunked``): logits ``[n, V]`` fp32 contiguous
    (without the bias), targets ``[n]`` int64, bias ``[V]`` fp32 or None, grad ``[n, V]`` contiguous
    (fp32/bf16/fp16, may be ``logits``) or None, written with ``grad_scale * (softmax - onehot)``.
    Returns the per-row loss ``[n]`` fp32."""
    if logits.dtype != torch.float32 or not logits.is_contiguous():
        raise ValueError("logits: expected a contiguous fp32 [n, V] tensor")
    if grad is not None and (grad.shape != logits.shape or not grad.is_contiguous()):
        raise ValueError(f"grad: expected a contiguous tensor of shape {tuple(logits.shape)}")
    n, V = logits.shape
    loss = torch.empty(n, dtype=torch.float32)
    tgt = targets.contiguous()
    b32 = _f32(bias)
    gcode = _DTYPE_CODE[grad.dtype] if grad is not None else 0
    _call("fbh_cross_entropy_rows", _p(logits), _p(b32), _p(tgt), _p(loss), gcode, _p(grad), n, V, float(grad_scale))
    return loss


def sparse_mlm_loss_fwd(hidden, labels, weight, bias, ignore_index, compute_grad, max_labelled=None):
    return chunked_sparse_mlm_loss(hidden, labels, weight, bias, ignore_index, compute_grad,
                                   row_kernel=cross_entropy_rows, max_labelled=max_labelled)


# ---- attention (csrc/flash_attn.cu) ----------------------------------------------------------------
def _attn_common(q, cu_seqlens, alibi_slopes, softmax_scale, window_size):
    T, H, D = q.shape
    B = cu_seqlens.shape[0] - 1
    cu = cu_seqlens.to(torch.int32).contiguous()
    slopes = None
    if alibi_slopes is not None:  # [H] or [B, H] -> [B, H] fp32 contiguous
        slopes = alibi_slopes.to(torch.float32).expand(B, H).contiguous()
    scale = float(softmax_scale) if softmax_scale is not None else D ** -0.5
    # flash-attn's convention (-1: unbounded) goes to the launcher; sides past any sequence are clamped to
    # fit a C int
    window = tuple(w if w < 0 else min(w, WINDOW_UNBOUNDED) for w in check_window_size(window_size))
    return T, H, D, B, cu, slopes, scale, window


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


_VISITS = VisitLog()


def record_visits():
    """Test hook: inside ``with record_visits() as log:`` the attention kernels record, per block, how many
    tiles their loops visited: ``log[kind]`` int32 ``[H, B, blocks]`` for ``kind`` in fwd, dq (both of its
    loops), dkdv; 0 for blocks that exited at once (``record_visits`` in csrc/flash_attn.cu)."""
    return _VISITS.record()


def _visits(kinds, H, B, max_seqlen) -> Optional[torch.Tensor]:
    """A zeroed int32 ``[len(kinds), H, B, blocks]`` buffer for the launcher while recording, else None."""
    if _VISITS.log is None:
        return None
    blocks = -(-int(max_seqlen) // 64)  # kRows in csrc/flash_attn.cu
    buf = torch.zeros((len(kinds), H, B, blocks), dtype=torch.int32)
    for i, kind in enumerate(kinds):
        _VISITS.log[kind] = buf[i]
    return buf


def flash_attn_fwd(q, k, v, cu_seqlens, max_seqlen, alibi_slopes=None, softmax_scale=None, window_size=(-1, -1)):
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)  # token / head strides go to the kernel as they are
    T, H, D, B, cu, slopes, scale, (wl, wr) = _attn_common(q, cu_seqlens, alibi_slopes, softmax_scale, window_size)
    out = torch.empty((T, H, D), dtype=q.dtype)
    lse = torch.empty((H, T), dtype=torch.float32)
    visits = _visits(("fwd",), H, B, max_seqlen)
    _call("fbh_flash_attn_fwd", _DTYPE_CODE[q.dtype], _p(q), _p(k), _p(v), q.stride(0), q.stride(1), k.stride(0),
          k.stride(1), v.stride(0), v.stride(1), _p(out), _p(lse), _p(cu), _p(slopes), B, H, D, T, int(max_seqlen),
          scale, wl, wr, _p(visits))
    return out, lse


def flash_attn_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, alibi_slopes=None, softmax_scale=None,
                   window_size=(-1, -1)):
    """``out`` is not read: the kernels form delta from P and dP (see fastbert.reference.flash_attn_bwd)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    T, H, D, B, cu, slopes, scale, (wl, wr) = _attn_common(q, cu_seqlens, alibi_slopes, softmax_scale, window_size)
    doc, lsec = dout.contiguous(), lse.to(torch.float32).contiguous()
    dq = torch.empty((T, H, D), dtype=q.dtype)
    dk = torch.empty((T, H, D), dtype=q.dtype)
    dv = torch.empty((T, H, D), dtype=q.dtype)
    delta = torch.empty((H, T), dtype=torch.float32)  # workspace: sum_j P dP / sum_j P per row
    visits = _visits(("dq", "dkdv"), H, B, max_seqlen)
    _call("fbh_flash_attn_bwd", _DTYPE_CODE[q.dtype], _p(doc), _p(q), _p(k), _p(v), q.stride(0), q.stride(1),
          k.stride(0), k.stride(1), v.stride(0), v.stride(1), _p(lsec), _p(dq), _p(dk), _p(dv), _p(delta),
          _p(cu), _p(slopes), B, H, D, T, int(max_seqlen), scale, wl, wr, _p(visits))
    return dq, dk, dv
