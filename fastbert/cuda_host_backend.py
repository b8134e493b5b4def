"""The ``cuda_host`` backend: fastbert's CUDA kernel sources (``csrc/*.cu``) compiled as host C++ and run on
CPU tensors, for tests only (``auto`` never picks it).

``csrc/host_entry.cpp`` includes ``csrc/cuda_host_emu.h`` (a small emulation of the CUDA execution model:
blocks on worker threads, a block's threads as fibers with real ``__syncthreads``/warp-shuffle barriers,
per-block shared memory) and the kernel files themselves, and exposes each launcher as an ``extern "C"``
function. On first use it is built with g++ (``-O2 -std=c++17 -pthread``) into
``$FASTBERT_CACHE/cuda_host/<hash of the sources and flags>/libfastbert_host.so``
and loaded with ctypes. The primitives below have exactly the signatures of ``fastbert/reference.py``;
they allocate their outputs with torch and hand the kernels raw pointers, as the real ``cuda`` backend's
binding (``csrc/bindings.cpp``) does on a GPU.

Debug mode (``FASTBERT_EMU_DEBUG=1``, or ``with debug_mode():``): emulated threads start and resume in a
shuffled order and shared memory is poisoned with NaN bytes before each block, so races and reads of
unwritten shared memory show up. ``FASTBERT_EMU_WORKERS`` sets how many blocks run in parallel.
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
from fastbert.ops.mlm_chunked import chunked_sparse_mlm_loss

CXX_FLAGS = ["-O2", "-std=c++17", "-pthread", "-fPIC", "-shared", "-fno-strict-aliasing", "-Wall",
             "-Wno-unknown-pragmas"]
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # fb::DType in csrc/common.cuh

_c_p = ctypes.c_void_p
_c_i = ctypes.c_int
_c_i64 = ctypes.c_int64
_c_f = ctypes.c_float
# extern "C" entry points of csrc/host_entry.cpp: name -> (argtypes, restype). Entries returning
# c_char_p return NULL on success or an error message.
ENTRY_POINTS = {
    "fbh_reload_config": ([], None),
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
    "fbh_cross_entropy_rows": ([_c_i, _c_p, _c_p, _c_p, _c_i, _c_i, _c_f, _c_i], ctypes.c_char_p),
    "fbh_flash_attn_fwd": ([_c_i, _c_p, _c_p, _c_p] + [_c_i64] * 6 + [_c_p, _c_p, _c_p, _c_p, _c_i, _c_i, _c_i,
                                                                       _c_i64, _c_i, _c_f], ctypes.c_char_p),
    "fbh_flash_attn_bwd": ([_c_i, _c_p, _c_p, _c_p, _c_p] + [_c_i64] * 6 + [_c_p] * 8 + [_c_i, _c_i, _c_i, _c_i64,
                                                                                    _c_i, _c_f], ctypes.c_char_p),
}

_lock = threading.Lock()
_state = {"lib": None, "error": None, "build_s": None, "path": None}


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


def build(verbose: bool = False) -> Path:
    """Compile ``csrc/host_entry.cpp`` (cached by source hash) and return the shared library's path."""
    src = csrc_dir()
    cxx = _compiler()
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no host C++ compiler {cxx!r} found to build the cuda_host test backend")
    flags = CXX_FLAGS + [f"-I{src}"]
    key = _source_hash(src, [cxx] + flags)
    out_dir = cache_root() / key
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


def load():
    """The loaded ctypes library (built on first use). Raises RuntimeError saying why it cannot be."""
    with _lock:
        if _state["lib"] is not None:
            return _state["lib"]
        if _state["error"] is not None:
            raise RuntimeError(_state["error"])
        try:
            path = build()
            lib = ctypes.CDLL(str(path))
            for name, (argtypes, restype) in ENTRY_POINTS.items():
                fn = getattr(lib, name)
                fn.argtypes = argtypes
                fn.restype = restype
        except (RuntimeError, OSError, AttributeError) as e:
            _state["error"] = f"the cuda_host backend could not be built or loaded: {e}"
            raise RuntimeError(_state["error"]) from e
        _state["lib"], _state["path"] = lib, path
        return lib


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
def debug_mode(seed: int = 12345, workers: Optional[int] = None):
    """Run the emulated kernels with shuffled thread order and poisoned shared memory inside the block."""
    lib = load()
    keys = ("FASTBERT_EMU_DEBUG", "FASTBERT_EMU_SEED", "FASTBERT_EMU_WORKERS")
    old = {k: os.environ.get(k) for k in keys}
    os.environ["FASTBERT_EMU_DEBUG"] = "1"
    os.environ["FASTBERT_EMU_SEED"] = str(seed)
    if workers is not None:
        os.environ["FASTBERT_EMU_WORKERS"] = str(workers)
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


def _call(name: str, *args) -> None:
    err = getattr(load(), name)(*args)
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


def cross_entropy_rows(logits, targets, grad_scale):
    """The MLM row kernel: logits ``[n, V]`` contiguous (fp32/bf16/fp16), targets ``[n]`` int64.

    Returns the per-row loss ``[n]`` fp32 and, when ``grad_scale`` is a float, overwrites ``logits`` with
    ``grad_scale * (softmax(logits) - onehot(targets))``.
    """
    if not logits.is_contiguous():
        raise ValueError("logits: expected a contiguous [n, V] tensor (the row kernel writes it in place)")
    n, V = logits.shape
    loss = torch.empty(n, dtype=torch.float32)
    tgt = targets.contiguous()
    _call("fbh_cross_entropy_rows", _DTYPE_CODE[logits.dtype], _p(logits), _p(tgt), _p(loss), n, V,
          float(grad_scale) if grad_scale is not None else 0.0, int(grad_scale is not None))
    return loss


def sparse_mlm_loss_fwd(hidden, labels, weight, bias, ignore_index, compute_grad):
    return chunked_sparse_mlm_loss(hidden, labels, weight, bias, ignore_index, compute_grad,
                                   row_kernel=cross_entropy_rows)


# ---- attention (csrc/flash_attn.cu) ----------------------------------------------------------------
def _attn_common(q, cu_seqlens, alibi_slopes, softmax_scale):
    T, H, D = q.shape
    B = cu_seqlens.shape[0] - 1
    cu = cu_seqlens.to(torch.int32).contiguous()
    slopes = None
    if alibi_slopes is not None:  # [H] or [B, H] -> [B, H] fp32 contiguous
        slopes = alibi_slopes.to(torch.float32).expand(B, H).contiguous()
    scale = float(softmax_scale) if softmax_scale is not None else D ** -0.5
    return T, H, D, B, cu, slopes, scale


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def flash_attn_fwd(q, k, v, cu_seqlens, max_seqlen, alibi_slopes=None, softmax_scale=None):
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)  # token / head strides go to the kernel as they are
    T, H, D, B, cu, slopes, scale = _attn_common(q, cu_seqlens, alibi_slopes, softmax_scale)
    out = torch.empty((T, H, D), dtype=q.dtype)
    lse = torch.empty((H, T), dtype=torch.float32)
    _call("fbh_flash_attn_fwd", _DTYPE_CODE[q.dtype], _p(q), _p(k), _p(v), q.stride(0), q.stride(1), k.stride(0),
          k.stride(1), v.stride(0), v.stride(1), _p(out), _p(lse), _p(cu), _p(slopes), B, H, D, T, int(max_seqlen),
          scale)
    return out, lse


def flash_attn_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, alibi_slopes=None, softmax_scale=None):
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    T, H, D, B, cu, slopes, scale = _attn_common(q, cu_seqlens, alibi_slopes, softmax_scale)
    doc, oc, lsec = dout.contiguous(), out.contiguous(), lse.to(torch.float32).contiguous()
    dq = torch.empty((T, H, D), dtype=q.dtype)
    dk = torch.empty((T, H, D), dtype=q.dtype)
    dv = torch.empty((T, H, D), dtype=q.dtype)
    delta = torch.empty((H, T), dtype=torch.float32)  # workspace: rowsum(dout * out)
    _call("fbh_flash_attn_bwd", _DTYPE_CODE[q.dtype], _p(doc), _p(q), _p(k), _p(v), q.stride(0), q.stride(1),
          k.stride(0), k.stride(1), v.stride(0), v.stride(1), _p(oc), _p(lsec), _p(dq), _p(dk), _p(dv), _p(delta),
          _p(cu), _p(slopes), B, H, D, T, int(max_seqlen), scale)
    return dq, dk, dv
