"""Shared machinery of the benchmark suite: run mode, shapes, providers, timing and the record format.

Every benchmark is one pytest-benchmark test for one ``(op, shape, pass, provider)``. Tests of the same
``(op, shape, pass)`` share a pytest-benchmark *group*, so fastbert's backends and the PyTorch peers sit
next to each other on the same inputs. The measured numbers (ours, ``do_bench`` style) go into the
test's ``extra_info``; ``bench.report`` reads them from the ``--benchmark-json`` file.

Modes:

* ``gpu``: a CUDA GPU is visible. Real BERT shapes, CUDA-event timing after warm-up (median, p20, p80),
  input sets rotated when they would sit in L2, peak memory per call.
* ``smoke``: no GPU (CI). Tiny shapes, one round, reference + Triton-interpreter backends. Proves the
  benchmark code runs; takes no timings (``extra_info["timed"] = False``) and makes no speed claim.

A provider that cannot run (not built, no GPU, no such op yet) is *reported*: the test is skipped with
the reason and the reason is written to the JSON (``fastbert.missing``) by ``bench/conftest.py``.
"""
from __future__ import annotations

import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
# FASTBERT_BENCH_SMOKE=1 forces smoke mode on a GPU machine too (a quick check that the suite runs).
SMOKE = (not HAS_GPU) or os.environ.get("FASTBERT_BENCH_SMOKE", "0") == "1"
# FASTBERT_BENCH_CPU=1: bench/test_bench_cpu.py measures on the CPU (the other files keep their mode).
CPU_BENCH = os.environ.get("FASTBERT_BENCH_CPU", "0") == "1"
MODE = "smoke" if SMOKE else "gpu"
if CPU_BENCH and not HAS_GPU:
    MODE = "cpu"
DEVICE = torch.device("cuda" if (HAS_GPU and not SMOKE) else "cpu")
DTYPE = torch.bfloat16

# fastbert backends benchmarked. On CPU only the reference and the Triton interpreter can run; cuda is
# still listed so the report says why it did not run.
FASTBERT_BACKENDS = ("cuda", "triton", "torch")
PASSES = ("fwd", "bwd", "fwdbwd")

# Providers that were asked for but could not run: filled by ``missing`` and written into the JSON.
MISSING: List[dict] = []


class Missing(Exception):
    """A provider that cannot run here; carries the reason."""


# ----------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Batch:
    """A padded batch with real length spread: ``B`` sequences of max length ``S``, lengths uniform in
    ``[S/4, S]`` (fixed seed, so every provider sees the same batch)."""
    B: int
    S: int
    seed: int = 0

    @property
    def lengths(self) -> List[int]:
        g = torch.Generator().manual_seed(self.seed + self.S)
        lo = max(1, self.S // 4)
        return torch.randint(lo, self.S + 1, (self.B,), generator=g).tolist()

    def mask(self, device=None) -> torch.Tensor:
        """``[B, S]`` bool, True at real tokens (left-aligned)."""
        ar = torch.arange(self.S)
        return (ar[None, :] < torch.tensor(self.lengths)[:, None]).to(device or DEVICE)

    def cu_seqlens(self, device=None) -> torch.Tensor:
        cu = torch.zeros(self.B + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(self.lengths, dtype=torch.int32), 0)
        return cu.to(device or DEVICE)

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def sum_sq(self) -> int:
        return sum(s * s for s in self.lengths)

    @property
    def name(self) -> str:
        return f"B{self.B}xS{self.S}(T{self.tokens})"


if SMOKE:
    ATTN_SHAPES = [(Batch(3, 16), 2, 32)]          # (batch, heads, head_dim)
    ROW_BATCH = Batch(3, 16)                         # tokens for the row-wise ops
    HIDDENS = (64,)
    VOCAB = 128
    MLM_BATCH = Batch(3, 16)
    TRAIN_BATCH = Batch(2, 16)
else:
    # 16384 padded tokens per batch at every sequence length; ~62% of them real.
    ATTN_SHAPES = [(Batch(16384 // S, S), hidden // 64, 64) for hidden in (768, 1024) for S in (128, 256, 512)]
    ROW_BATCH = Batch(32, 512)
    HIDDENS = (768, 1024)
    VOCAB = 30528
    MLM_BATCH = Batch(128, 128)
    TRAIN_BATCH = Batch(128, 128)
MLM_FRACTION = 0.3  # MosaicBERT masks 30% of the tokens


# ----------------------------------------------------------------------------------------------
# providers
# ----------------------------------------------------------------------------------------------
def missing(op: str, shape: str, pass_: str, provider: str, reason: str):
    """Record a provider that cannot run and skip its test (it is reported, never silently dropped)."""
    MISSING.append({"op": op, "shape": shape, "pass": pass_, "provider": provider, "reason": reason})
    pytest.skip(f"{provider} missing: {reason}")


def fastbert_op(name: str) -> Callable:
    """``fastbert.ops.<name>`` or ``Missing`` saying it does not exist yet."""
    try:
        import fastbert.ops as ops
    except Exception as e:  # noqa: BLE001 - any import failure means the provider is missing
        raise Missing(f"import fastbert.ops failed: {type(e).__name__}: {e}")
    fn = getattr(ops, name, None)
    if fn is None:
        raise Missing(f"fastbert.ops.{name} does not exist")
    return fn


def backend_reason(backend: str, family: str) -> Optional[str]:
    """Why ``backend`` cannot run ``family`` on the bench device, or None."""
    import fastbert
    info = fastbert.backends(DEVICE.type).get(backend)
    if info is None:
        return f"unknown fastbert backend {backend!r}"
    if not info["available"]:
        return info["reason"]
    fam = info["families"].get(family, "unknown family")
    return None if fam == "ok" else fam


def with_backend(backend: str, fn: Callable) -> Callable:
    """``fn`` run with ``fastbert.use_backend(backend)`` forced (a forced backend never falls back)."""
    import fastbert

    def call(*args, **kwargs):
        with fastbert.use_backend(backend):
            return fn(*args, **kwargs)
    return call


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)``; in smoke mode compile peers are reported missing (Inductor needs minutes
    of CPU per graph, longer than the whole CI budget of the suite)."""
    if SMOKE:
        raise Missing("torch.compile peers are not run in smoke mode (Inductor compile takes minutes on CPU)")
    # Each (shape, grad mode) gets its own static-shape graph: no automatic dynamic shapes after the first
    # recompile, and enough cache entries that dynamo never falls back to eager for a later shape.
    import torch._dynamo.config as dcfg
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(dcfg, name):
            setattr(dcfg, name, max(getattr(dcfg, name), 256))
    return torch.compile(fn, dynamic=False)


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One benchmark: ``fn(inputs) -> tensor or tuple`` on inputs from ``make_inputs(i)`` (the i-th
    rotated copy; tensors that get gradients have ``requires_grad``). ``flops``/``bytes`` are the useful
    work of one forward; ``bwd_flops``/``bwd_bytes`` of one backward (the report picks per pass)."""
    op: str
    shape: str
    provider: str
    role: str                       # "fastbert" | "peer"
    make_inputs: Callable[[int], Dict[str, object]]
    fn: Callable[[Dict[str, object]], object]
    kind: str = "bandwidth"         # "bandwidth" | "compute"
    flops: float = 0.0
    bwd_flops: float = 0.0
    bytes: float = 0.0
    bwd_bytes: float = 0.0
    tokens: int = 0
    extra: Dict[str, object] = field(default_factory=dict)


def _tensors(obj) -> List[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    out = [getattr(obj, k) for k in ("loss",) if isinstance(getattr(obj, k, None), torch.Tensor)]
    return out


def _leaves(inputs: Dict[str, object]) -> List[torch.Tensor]:
    return [t for t in _tensors(inputs) if t.is_leaf and t.requires_grad]


def _nbytes(inputs) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(inputs))


def _prepare(case: Case, pass_: str, n_sets: int):
    """States to rotate over and the callable timed on one state."""
    states = []
    if pass_ == "step":  # a whole training step (forward, backward, optimizer) is the case's fn itself
        return [case.make_inputs(i) for i in range(n_sets)], case.fn
    for i in range(n_sets):
        inp = case.make_inputs(i)
        if pass_ == "fwd":
            states.append(inp)
            continue
        outs = [t for t in _tensors(case.fn(inp)) if t.requires_grad]
        if not outs:
            raise RuntimeError(f"{case.provider} {case.op}: no output requires grad, cannot time a backward")
        gouts = [torch.ones_like(o) if o.dim() == 0 else torch.randn_like(o) for o in outs]
        leaves = _leaves(inp)
        if pass_ == "bwd":
            states.append((outs, leaves, gouts))
        else:
            states.append((inp, leaves, gouts))
            del outs

    if pass_ == "fwd":
        def call(inp):
            with torch.no_grad():
                return case.fn(inp)
    elif pass_ == "bwd":
        def call(st):
            outs, leaves, gouts = st
            return torch.autograd.grad(outs, leaves, gouts, retain_graph=True)
    else:
        def call(st):
            inp, leaves, gouts = st
            outs = [t for t in _tensors(case.fn(inp)) if t.requires_grad]
            return torch.autograd.grad(outs, leaves, gouts)
    return states, call


def _quantiles(times: Sequence[float]) -> Dict[str, float]:
    qs = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return {"median_ms": statistics.median(times), "p20_ms": qs[1], "p80_ms": qs[7],
            "min_ms": min(times), "n_timed": len(times)}


def _gpu_time(call, states, warmup_ms: float = 25.0, rep_ms: float = 100.0) -> Dict[str, float]:
    """do_bench-style timing: one untimed call (compile/autotune), an estimate, warm-up, then one CUDA
    event pair per call so the quantiles are of single calls. States rotate so small inputs are not
    served from L2."""
    n = len(states)
    call(states[0])
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for i in range(5):
        call(states[i % n])
    e.record()
    torch.cuda.synchronize()
    est = max(s.elapsed_time(e) / 5, 1e-3)
    n_warm = int(min(max(warmup_ms / est, 1), 200))
    n_rep = int(min(max(rep_ms / est, 10), 1000))
    for i in range(n_warm):
        call(states[i % n])
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        starts[i].record()
        call(states[i % n])
        ends[i].record()
    torch.cuda.synchronize()
    return _quantiles([a.elapsed_time(b) for a, b in zip(starts, ends)])


def _peak_memory(call, state) -> Dict[str, int]:
    """Peak allocated bytes during one call: absolute, and above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    call(state)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"peak_mem_bytes": int(peak), "peak_extra_bytes": int(peak - base)}


def n_rotations(set_bytes: int) -> int:
    """Copies of the inputs to rotate through so that consecutive calls do not hit L2 (at most 8)."""
    if DEVICE.type != "cuda" or set_bytes <= 0:
        return 1
    l2 = getattr(torch.cuda.get_device_properties(DEVICE), "L2_cache_size", 50 * 2**20)
    if set_bytes >= 2 * l2:
        return 1
    return int(min(8, math.ceil(3 * l2 / set_bytes)))


def run(benchmark, case: Case, pass_: str):
    """Time ``case`` for ``pass_`` ("fwd" | "bwd" | "fwdbwd" | "step": fn is a whole train step) and record it in ``benchmark.extra_info``."""
    benchmark.group = f"{case.op} | {case.shape} | {pass_}"
    info = benchmark.extra_info
    both = pass_ in ("fwdbwd", "step")
    flops = case.flops + case.bwd_flops if both else {"fwd": case.flops, "bwd": case.bwd_flops}[pass_]
    nbytes = case.bytes + case.bwd_bytes if both else {"fwd": case.bytes, "bwd": case.bwd_bytes}[pass_]
    info.update({"op": case.op, "shape": case.shape, "pass": pass_, "provider": case.provider,
                 "role": case.role, "kind": case.kind, "flops": flops, "bytes": nbytes,
                 "tokens": case.tokens, "mode": MODE, "timed": False, **case.extra})
    try:
        first = case.make_inputs(0)
        n_sets = n_rotations(_nbytes(first))
        del first
        states, call = _prepare(case, pass_, n_sets)
        if SMOKE:
            # One round: proves the code path runs; the wall time of a CPU/interpreter call means nothing.
            benchmark.pedantic(call, args=(states[0],), rounds=1, iterations=1, warmup_rounds=0)
            return
        info.update(_gpu_time(call, states))
        info.update(_peak_memory(call, states[0]))
        info["input_sets"] = len(states)
        info["timed"] = True
        it = iter(range(10**9))

        def synced():
            call(states[next(it) % len(states)])
            torch.cuda.synchronize()
        # pytest-benchmark's own (wall clock + sync) numbers, so its console table is meaningful too.
        benchmark.pedantic(synced, rounds=10, iterations=1, warmup_rounds=1)
    except Missing as e:
        missing(case.op, case.shape, pass_, case.provider, str(e))
    except Exception as e:  # noqa: BLE001
        import fastbert
        if isinstance(e, fastbert.BackendUnavailableError):
            missing(case.op, case.shape, pass_, case.provider, str(e))
        raise
    finally:
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()


def fastbert_fn(provider: str, family: str, opname: str) -> Callable:
    """The public op ``fastbert.ops.<opname>`` with the provider's backend (``fastbert-<backend>``) forced,
    or ``Missing`` with the reason it cannot run here."""
    backend = provider.split("-", 1)[1]
    fn = fastbert_op(opname)
    reason = backend_reason(backend, family)
    if reason:
        raise Missing(reason)
    return with_backend(backend, fn)


def bench(benchmark, make_case: Callable[[], Case], op: str, shape: str, provider: str, pass_: str):
    """Build the case (recording it as missing when it cannot be built) and run it."""
    try:
        case = make_case()
    except Missing as e:
        missing(op, shape, pass_, provider, str(e))
        return
    run(benchmark, case, pass_)


def rand(*shape, dtype=None, grad=False, scale=1.0, seed=0) -> torch.Tensor:
    """Normal random tensor on the bench device; the same seed gives every provider the same values."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    t = torch.randn(*shape, generator=g, device=DEVICE) * scale
    return t.to(dtype or DTYPE).requires_grad_(grad)


def env_info() -> dict:
    """GPU name, versions and the command line, for the results file."""
    import platform
    info = {"mode": MODE, "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "device": DEVICE.type,
            "command": " ".join([f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("FASTBERT_BENCH")]
                                + [os.path.basename(sys.executable), "-m", "pytest"] + sys.argv[1:])}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        info["triton"] = f"not importable: {e}"
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0")
    if DEVICE.type == "cuda":
        p = torch.cuda.get_device_properties(DEVICE)
        info.update({"gpu": p.name, "gpu_sms": p.multi_processor_count,
                     "gpu_mem_bytes": p.total_memory, "capability": f"{p.major}.{p.minor}",
                     "l2_bytes": getattr(p, "L2_cache_size", None)})
    else:
        info["gpu"] = None
    info["cpu"], info["cpu_count"] = cpu_name(), os.cpu_count()
    return info


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``), or what ``platform`` knows."""
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
