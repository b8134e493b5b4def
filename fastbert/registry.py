"""Backend registry: which implementation of each op primitive runs, and why.

The op table is two small dicts. ``PRIMITIVES`` names, per kernel family, the primitive functions a
backend implements (signatures: the functions of the same name in ``fastbert/reference.py``, which is
the ``torch`` backend). ``BACKENDS`` says where each backend's implementation of a family lives and on
which devices it can run. A backend plugs in by providing a module with those function names; nothing
in the dispatch code changes.

A backend module may also define:

* ``why_not(device) -> str | None``: why it cannot run on that device right now (None: it can);
* ``unsupported(primitive, *args) -> str | None``: why it cannot run these particular inputs (for
  example fp32 attention on the CUDA extension), so ``auto`` moves on and a forced backend raises.

Selection: ``auto`` (default) picks, per call, the first backend of the family's order that can run the
inputs: ``AUTO_BY_GENERATION[(device type, GPU generation)][family]`` when the table has it (the order
chosen from evidence, with the reason), else ``AUTO_ORDER[device type]``. ``FASTBERT_BACKEND=name`` or ``with fastbert.use_backend("triton"):`` forces one for
every op (``use_backend(attention="triton")`` for a single family); a forced backend that cannot run
raises ``BackendUnavailableError`` saying why. It never silently falls back.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import shutil
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

PRIMITIVES: Dict[str, Tuple[str, ...]] = {
    "padding": ("index_gather_fwd", "index_scatter_fwd"),
    "attention": ("flash_attn_fwd", "flash_attn_bwd"),
    "bias_gelu": ("bias_gelu_fwd", "bias_gelu_bwd"),
    "geglu": ("geglu_fwd", "geglu_bwd"),
    "layer_norm": ("layer_norm_fwd", "layer_norm_bwd"),
    "mlm_loss": ("sparse_mlm_loss_fwd",),
}
FAMILY_OF = {prim: fam for fam, prims in PRIMITIVES.items() for prim in prims}


class BackendUnavailableError(RuntimeError):
    """A backend that was asked for by name cannot run the call."""


def _triton_why_not(device: torch.device) -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure makes the backend unusable
        return f"Triton is not importable ({type(e).__name__}: {e})"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA GPU is visible to torch"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return None
        return "CPU tensors run Triton only under the interpreter: set TRITON_INTERPRET=1 before importing triton"
    return f"Triton kernels do not run on device type {device.type!r}"


def _cuda_why_not(device: torch.device) -> Optional[str]:
    try:
        importlib.import_module("fastbert._C")
    except ImportError as e:
        return ("the CUDA extension fastbert._C is not built (install with a CUDA build of torch and nvcc: "
                f"pip install --no-build-isolation -e .) [{e}]")
    if not torch.cuda.is_available():
        return "fastbert._C is built but no CUDA GPU is visible to torch"
    if device.type != "cuda":
        return f"fastbert._C runs on CUDA tensors, got device {device}"
    return None


def _cuda_host_why_not(device: torch.device) -> Optional[str]:
    if device.type != "cpu":
        return f"cuda_host (the CUDA kernels built as host C++ for tests) runs on CPU tensors, got {device}"
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no host C++ compiler (g++) found to build the cuda_host test backend"
    return None


def _cpu_why_not(device: torch.device) -> Optional[str]:
    return None if device.type == "cpu" else f"the cpu backend runs on CPU tensors, got device {device}"


_LOW_PRECISION = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # "{family}" is replaced by the kernel family
    why_not: Callable[[torch.device], Optional[str]]
    description: str
    dtypes: Tuple[torch.dtype, ...] = _LOW_PRECISION


BACKENDS: Dict[str, Backend] = {
    "torch": Backend("torch", "fastbert.reference", lambda d: None,
                     "pure-PyTorch reference (the specification); any device",
                     _LOW_PRECISION + (torch.float64,)),
    "triton": Backend("triton", "fastbert.kernels.{family}", _triton_why_not,
                      "Triton kernels (kernels/); CUDA GPUs, or CPU under TRITON_INTERPRET=1"),
    "cuda": Backend("cuda", "fastbert.cuda_backend", _cuda_why_not,
                    "hand-written CUDA kernels (csrc/, built as fastbert._C); CUDA GPUs"),
    "cuda_host": Backend("cuda_host", "fastbert.cuda_host_backend", _cuda_host_why_not,
                         "the csrc/ kernels compiled as host C++ through an emulation header; tests only"),
    "cpu": Backend("cpu", "fastbert.cpu_backend", _cpu_why_not,
                   "PyTorch's fused CPU kernels (ATen flash attention per sequence, gelu, native_layer_norm); "
                   "auto's first choice on CPU: faster than the reference, which pads and composes its "
                   "derivatives for clarity (fp64 stays on the reference)"),
}

# auto's preference per device type, for every family that AUTO_BY_GENERATION does not cover, and why;
# cuda_host is for tests and never chosen automatically.
AUTO_ORDER: Dict[str, Tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("cpu", "torch"),
}
_DEFAULT_ORDER = ("torch",)
_AUTO_WHY: Dict[str, str] = {
    "cpu": "ATen's fused CPU kernels on the unpadded tokens: a tiny train step at 1.11x HF BERT's speed, the "
           "reference at 0.60x (bench/test_bench_cpu.py, issue 18); fp64 and what cpu cannot run go to the reference",
}

# auto's order per op family on each CUDA GPU generation ("sm_80": capability 8.x, "sm_90": 9.0 and newer),
# chosen from evidence with the reason recorded: today the static throughput model's predictions
# (python -m bench.perf_model: bench/results/perf-model.md, "auto order implied"); GPU measurements replace
# them when they exist. tests/test_perf_model.py fails when the model predicts the other backend clearly
# faster than the one listed first here.
_MODEL = "bench.perf_model prediction, not a measurement: fwd+bwd at BERT base/large, seq 128/512"
_TRITON = ("triton", "cuda", "torch")
_CUDA = ("cuda", "triton", "torch")
AUTO_BY_GENERATION: Dict[Tuple[str, str], Dict[str, Tuple[Tuple[str, ...], str]]] = {
    ("cuda", "sm_90"): {
        "attention": (_TRITON, f"cuda and triton within 5% on H100 (triton 1.04x; cuda faster at seq 128 with its "
                               f"one-block backward, slower at 512): triton kept until a GPU run of the new CUDA "
                               f"paths ({_MODEL})"),
        "layer_norm": (_TRITON, f"triton 1.39x faster on H100: the CUDA forward and backward are issue-bound at BERT "
                                f"widths, the Triton ones memory-bound ({_MODEL})"),
        "bias_gelu": (_TRITON, f"triton 1.34x faster on H100: fewer instructions per element ({_MODEL})"),
        "geglu": (_TRITON, f"triton 1.20x faster on H100 ({_MODEL})"),
        "padding": (_TRITON, f"triton 1.30x faster on H100: 2-D tiles instead of a strided row loop ({_MODEL})"),
        "mlm_loss": (_CUDA, f"cuda and triton within 5% on H100 (cuda 1.04x): both share the same GEMMs and one "
                            f"fused row kernel each; hand-written CUDA kept ({_MODEL})"),
    },
    ("cuda", "sm_80"): {
        "attention": (_CUDA, f"cuda 1.51x faster on A100: both mma.sync with cp.async, the CUDA loops with ~5 "
                             f"other instructions per mma, and its 5-matmul one-block backward at seq <= 128 ({_MODEL})"),
        "layer_norm": (_TRITON, f"triton 1.24x faster on A100 ({_MODEL})"),
        "bias_gelu": (_TRITON, f"triton 1.35x faster on A100 ({_MODEL})"),
        "geglu": (_TRITON, f"triton 1.16x faster on A100 ({_MODEL})"),
        "padding": (_TRITON, f"triton 1.34x faster on A100 ({_MODEL})"),
        "mlm_loss": (_CUDA, f"cuda and triton within 5% on A100 (cuda 1.02x): hand-written CUDA kept ({_MODEL})"),
    },
}


def gpu_generation(device: torch.device) -> Optional[str]:
    """``"sm_90"`` (capability 9.0+), ``"sm_80"`` (8.x) or None, for a CUDA device."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    major, _ = torch.cuda.get_device_capability(device)
    return "sm_90" if major >= 9 else ("sm_80" if major == 8 else None)


def auto_order(family: str, device: torch.device) -> Tuple[Tuple[str, ...], str]:
    """The backends ``auto`` tries for ``family`` on ``device``, in order, and why that order."""
    gen = gpu_generation(device)
    entry = AUTO_BY_GENERATION.get((device.type, gen), {}).get(family) if gen else None
    if entry is not None:
        return entry
    why = f"default order for {device.type}" + (f" ({gen}: no per-generation entry)" if gen else "")
    if device.type in _AUTO_WHY:
        why += f": {_AUTO_WHY[device.type]}"
    return AUTO_ORDER.get(device.type, _DEFAULT_ORDER), why


_forced: contextvars.ContextVar[Dict[str, str]] = contextvars.ContextVar("fastbert_backend", default={})
_module_cache: Dict[str, object] = {}


def _load_module(backend: str, family: str):
    """The backend's module for a family, or a string saying why there is none."""
    modname = BACKENDS[backend].module.format(family=family)
    if modname not in _module_cache:
        try:
            _module_cache[modname] = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name and (modname == e.name or modname.startswith(e.name + ".")):
                _module_cache[modname] = f"not implemented in {backend} (no module {modname})"
            else:
                _module_cache[modname] = f"importing {modname} failed: {type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 - report, do not crash dispatch
            _module_cache[modname] = f"importing {modname} failed: {type(e).__name__}: {e}"
    return _module_cache[modname]


def _impl_or_reason(primitive: str, backend: str, device: torch.device, args: tuple,
                    dtype: Optional[torch.dtype] = None):
    be = BACKENDS[backend]
    reason = be.why_not(device)
    if reason:
        return None, reason
    if dtype is not None and dtype not in be.dtypes:
        return None, f"{backend} kernels take {[str(d) for d in be.dtypes]}, got {dtype}"
    mod = _load_module(backend, FAMILY_OF[primitive])
    if isinstance(mod, str):
        return None, mod
    mod_why = getattr(mod, "why_not", None)
    if mod_why is not None:
        reason = mod_why(device)
        if reason:
            return None, reason
    fn = getattr(mod, primitive, None)
    if fn is None:
        return None, f"{backend} does not implement {primitive}"
    unsupported = getattr(mod, "unsupported", None)
    if unsupported is not None and args:
        reason = unsupported(primitive, *args)
        if reason:
            return None, reason
    return fn, None


def forced_backend(family: str) -> Optional[str]:
    """The backend forced for a family by ``use_backend`` or ``FASTBERT_BACKEND``, or None (auto)."""
    forced = _forced.get()
    name = forced.get(family) or forced.get("*") or os.environ.get("FASTBERT_BACKEND") or "auto"
    if name == "auto":
        return None
    if name not in BACKENDS:
        raise ValueError(f"unknown fastbert backend {name!r}; expected 'auto' or one of {sorted(BACKENDS)}")
    return name


def resolve(primitive: str, device: torch.device, args: tuple = (), dtype: Optional[torch.dtype] = None) -> str:
    """Name of the backend that runs ``primitive`` on ``device`` for these args (of this dtype).

    Raises ``BackendUnavailableError`` when a forced backend cannot run it.
    """
    family = FAMILY_OF[primitive]
    name = forced_backend(family)
    if name is not None:
        fn, reason = _impl_or_reason(primitive, name, device, args, dtype)
        if fn is None:
            raise BackendUnavailableError(f"fastbert backend {name!r} was requested for {family} but cannot run "
                                          f"{primitive} on {device}: {reason}")
        return name
    reasons = []
    for cand in auto_order(family, device)[0]:
        fn, reason = _impl_or_reason(primitive, cand, device, args, dtype)
        if fn is not None:
            return cand
        reasons.append(f"{cand}: {reason}")
    raise BackendUnavailableError(f"no fastbert backend can run {primitive} on {device}: " + "; ".join(reasons))


def implementation(primitive: str, backend: str) -> Callable:
    """The function implementing ``primitive`` in ``backend`` (no device checks: resolve() did them)."""
    mod = _load_module(backend, FAMILY_OF[primitive])
    if isinstance(mod, str):
        raise BackendUnavailableError(mod)
    fn = getattr(mod, primitive, None)
    if fn is None:
        raise BackendUnavailableError(f"{backend} does not implement {primitive}")
    return fn


@contextlib.contextmanager
def use_backend(name: Optional[str] = None, **families: str):
    """Force a backend inside a ``with`` block: ``use_backend("triton")`` for every op, or
    ``use_backend(attention="triton", layer_norm="cuda")`` per family (``"auto"`` restores the default)."""
    for fam, be in list(families.items()) + ([("*", name)] if name else []):
        if fam != "*" and fam not in PRIMITIVES:
            raise ValueError(f"unknown op family {fam!r}; expected one of {sorted(PRIMITIVES)}")
        if be != "auto" and be not in BACKENDS:
            raise ValueError(f"unknown fastbert backend {be!r}; expected 'auto' or one of {sorted(BACKENDS)}")
    new = dict(_forced.get())
    if name:
        new = {"*": name}
    new.update(families)
    token = _forced.set(new)
    try:
        yield
    finally:
        _forced.reset(token)


class BackendReport(dict):
    """``{backend: status}`` that prints as a readable table; ``auto`` maps each family to the order ``auto``
    tries on the report's device and the reason for it."""

    auto: Dict[str, Tuple[Tuple[str, ...], str]] = {}

    def __str__(self) -> str:
        lines = [f"auto {fam:10s} {' > '.join(order)}: {why}" for fam, (order, why) in self.auto.items()]
        for name, st in self.items():
            head = "available" if st["available"] else "unavailable"
            lines.append(f"{name:9s} {head} on {st['device']}: {st['description']}")
            if st["reason"]:
                lines.append(f"          why not: {st['reason']}")
            for fam, fs in st["families"].items():
                lines.append(f"          {fam:10s} {fs}")
        return "\n".join(lines)


def backends(device: Optional[str] = None) -> Dict[str, dict]:
    """What each backend is, whether it can run here, and why not.

    Returns ``{name: {"available": bool, "device": str, "reason": str | None, "families": {family: status},
    "description": str}}`` for ``device`` (default: ``cuda`` when a GPU is visible, else ``cpu``).
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    report = {}
    for name, be in BACKENDS.items():
        reason = be.why_not(dev)
        fams = {}
        for fam, prims in PRIMITIVES.items():
            mod = _load_module(name, fam)
            if isinstance(mod, str):
                fams[fam] = mod
            else:
                missing = [p for p in prims if not hasattr(mod, p)]
                fams[fam] = "ok" if not missing else f"missing {', '.join(missing)}"
        report[name] = {"available": reason is None, "device": str(dev), "reason": reason,
                        "families": fams, "description": be.description}
    out = BackendReport(report)
    out.auto = {fam: auto_order(fam, dev) for fam in PRIMITIVES}
    return out
