"""Helpers to check a kernel against the reference, used by tests/, the selftest and the benchmarks.

The tolerance rule (as in flash-attention's tests): a kernel's error against a high-precision reference
may be at most ``factor`` times the error PyTorch's own eager op makes in the same dtype against that
reference (``factor`` 2 for forward outputs, 3 for gradients), plus one ulp of the output dtype for the
final rounding, plus a tiny absolute floor so exact results (zero error) do not demand bit equality.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional

import torch


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a tensor with NaN (floats) or an absurd value (integers), so unwritten outputs show up."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(-12345)


def tolerance(ref: torch.Tensor, peer: Optional[torch.Tensor], dtype: torch.dtype, factor: float = 2.0,
              atol_floor: float = 1e-6) -> torch.Tensor:
    """Elementwise allowed error for an output of ``dtype`` against ``ref`` (fp32/fp64).

    ``peer``: PyTorch's eager op run in ``dtype`` on the same inputs (its error defines the scale);
    None uses ``eps(dtype) * |ref|`` alone.
    """
    ref64 = ref.double()
    ulp = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    bound = ulp * ref64.abs() + atol_floor
    if peer is not None:
        peer_err = (peer.double() - ref64).abs().max()
        bound = bound + factor * peer_err
    return bound


def assert_close(out: torch.Tensor, ref: torch.Tensor, peer: Optional[torch.Tensor] = None,
                 factor: float = 2.0, name: str = "output", atol_floor: float = 1e-6) -> None:
    """Assert ``out`` matches ``ref`` within the tolerance rule; reports the worst element on failure."""
    if out.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    o = out.double()
    if not torch.isfinite(o).all():
        bad = (~torch.isfinite(o)).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: non-finite values (unwritten or overflow) at {bad}")
    bound = tolerance(ref, peer, out.dtype, factor, atol_floor)
    err = (o - ref.double()).abs()
    excess = err - bound
    if (excess > 0).any():
        i = int(torch.argmax(excess.flatten()))
        idx = list(torch.unravel_index(torch.tensor(i), err.shape)) if err.dim() else []
        raise AssertionError(
            f"{name}: max error {err.max().item():.3e} exceeds tolerance; worst at {[int(x) for x in idx]}: "
            f"out={o.flatten()[i].item():.6g} ref={ref.double().flatten()[i].item():.6g} "
            f"allowed={bound.flatten()[i].item():.3e} ({out.dtype}, factor {factor})")


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in fp64."""
    r = ref.double()
    return ((out.double() - r).norm() / r.norm().clamp_min(1e-30)).item()


def double_or_none(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t.double()``, passing None through (optional arguments of the fp64 reference call)."""
    return None if t is None else t.double()


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Inside the block every ``torch.empty`` / ``torch.empty_like`` returns a poisoned tensor
    (NaN for floats, -12345 for integers, see :func:`poison_`).

    Wrap a primitive call in it so every output buffer and workspace the primitive allocates starts
    poisoned: an element the kernel forgets to write then fails the comparison instead of passing on
    whatever the allocator happened to hand back. Patches the ``torch`` module attributes (what a
    primitive written as ``torch.empty(...)`` looks up at call time) and restores them on exit.
    """
    empty, empty_like = torch.empty, torch.empty_like
    torch.empty = lambda *a, **k: poison_(empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison_(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def count_calls(monkeypatch, module, *names: str) -> Dict[str, int]:
    """Wrap ``module.<name>`` for each name so calls are counted; returns the live ``{name: count}`` dict.

    ``monkeypatch`` is pytest's fixture (it undoes the wrapping after the test). Used to check that an
    op really dispatched to a backend's primitives: the ops layer looks them up on the module at call
    time, so the wrapper sees every call.
    """
    calls = {n: 0 for n in names}
    for n in names:
        real = getattr(module, n)

        def wrapper(*a, _real=real, _n=n, **k):
            calls[_n] += 1
            return _real(*a, **k)
        monkeypatch.setattr(module, n, wrapper)
    return calls


def enable_triton_interpreter_if_no_gpu() -> bool:
    """Set ``TRITON_INTERPRET=1`` when no GPU is visible (must run before triton is imported).

    Returns whether the interpreter is on. Used by tests/conftest.py and bench/conftest.py.
    """
    import os
    import sys

    if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        if "triton" in sys.modules:
            raise RuntimeError("triton was imported before TRITON_INTERPRET could be set; import fastbert.testing "
                               "(or set TRITON_INTERPRET=1) first")
        os.environ["TRITON_INTERPRET"] = "1"
    return os.environ.get("TRITON_INTERPRET") == "1"


def patch_triton_interpreter_bf16_dot() -> bool:
    """TEST-ONLY workaround: make the Triton interpreter's ``tl.dot`` upcast bf16 operands to fp32.

    The interpreter stores bf16 as uint16 and hands it to ``np.matmul`` unconverted, so a bf16 ``tl.dot``
    returns garbage on CPU. On a GPU the tensor cores take bf16 operands with fp32 accumulation, which
    is exactly what upcasting and multiplying in fp32 computes. Returns whether the patch was applied.
    """
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter as interp
    except Exception:  # noqa: BLE001 - no triton, nothing to patch
        return False
    builder = interp.InterpreterBuilder
    if getattr(builder, "_fastbert_bf16_dot", False):
        return True
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def up(h):
            if h.dtype.scalar == tl.bfloat16:
                data = interp._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
                return interp.TensorHandle(data, tl.float32)
            return h
        return original(self, up(a), up(b), d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
    builder._fastbert_bf16_dot = True
    return True


class VisitLog:
    """The test hook behind the attention backends' ``record_visits()``: while ``record()`` is active,
    ``log`` is a dict the launchers fill with per-program counts of the blocks their kernel loops visited
    (``{"fwd" | "dq" | "dkdv": int32 tensor}``); otherwise ``log`` is None and launches count nothing."""

    def __init__(self):
        self.log: Optional[dict] = None

    @contextlib.contextmanager
    def record(self) -> Iterator[dict]:
        outer, self.log = self.log, {}
        try:
            yield self.log
        finally:
            self.log = outer


def patch_triton_interpreter_address_check() -> bool:
    """TEST-ONLY: every interpreted ``tl.load``/``tl.store``/atomic checks the addresses of its unmasked
    lanes against the tensor arguments of the launch and raises ``fastbert.memcheck.OutOfBounds`` (naming
    the kernel line, the argument and the distance) outside them, readable memory or not. Returns whether
    the patch was applied. Implementation: :func:`fastbert.memcheck.patch_triton_interpreter`."""
    from fastbert.memcheck import patch_triton_interpreter

    return patch_triton_interpreter()
