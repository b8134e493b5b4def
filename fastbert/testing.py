"""Helpers to check a kernel against the reference, used by tests/, the selftest and the benchmarks.

The tolerance rule (as in flash-attention's tests): a kernel's error against a high-precision reference
may be at most ``factor`` times the error PyTorch's own eager op makes in the same dtype against that
reference (``factor`` 2 for forward outputs, 3 for gradients), plus a floor of a few ulps of the output
dtype at the largest reference element (``FLOOR_ULPS``), plus a tiny absolute floor so exact results
(zero error) do not demand bit equality. The floor is what keeps the rule from flaking: PyTorch's error is
one random sample and is sometimes far below its typical size (the max of 40 fp32 sums that happen to round
well), so "3x PyTorch's error" alone fails correct kernels by chance (issue 22.6). flash-attention adds the
same kind of term (``2 * (ref + 0.3 - 0.3 - ref).abs().max()``, about an ulp of the largest output).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Dict, Iterator, Optional

import torch


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a tensor with NaN (floats) or an absurd value (integers), so unwritten outputs show up."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(-12345)


# The floor, in units of eps(output dtype) * max|ref|. bf16/fp16 outputs are computed in fp32 and rounded
# once, so a correct kernel is within half an ulp plus a little: one ulp of the largest element covers it
# whatever the peer's luck. fp32 outputs come out of fp32 reductions whose error, with a different (equally
# valid) summation order than PyTorch's, is a few ulps of the largest element: the LayerNorm dweight of
# test_layer_norm_many_partials (300 rows) reached 2.4 ulps over 2000 seeds with 8 partial rows of ~38
# rows each. The kernel it replaced summed 64 partial rows in one sequential chain (each addition rounding
# at the output's magnitude) and reached 5 ulps, 45 of 500 seeds over "3x PyTorch": that was a kernel to
# fix, not a floor to raise (DEVELOPERS.md, the tolerance rule).
FLOOR_ULPS = {torch.float16: 1.0, torch.bfloat16: 1.0, torch.float32: 4.0, torch.float64: 4.0}


def tolerance(ref: torch.Tensor, peer: Optional[torch.Tensor], dtype: torch.dtype, factor: float = 2.0,
              atol_floor: float = 1e-6) -> torch.Tensor:
    """Allowed error (a tensor broadcastable to ``ref``) for an output of ``dtype`` against ``ref`` (fp32/fp64).

    ``factor * max|peer - ref| + FLOOR_ULPS[dtype] * eps(dtype) * max|ref| + atol_floor``.
    ``peer``: PyTorch's eager op run in ``dtype`` on the same inputs (its error defines the scale);
    None replaces the peer term by ``eps(dtype) * |ref|`` elementwise.
    """
    ref64 = ref.double()
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    scale = ref64.abs().max() if ref64.numel() else ref64.new_zeros(())
    bound = FLOOR_ULPS.get(dtype, 4.0) * eps * scale + atol_floor
    if peer is not None:
        # PyTorch overflowing (inf/nan) where the reference is finite must not make the rule vacuous: the
        # peer's error is taken over the positions where both are finite.
        perr = (peer.double() - ref64).abs()
        perr = perr[torch.isfinite(perr)]
        bound = bound + factor * perr.max() if perr.numel() else bound
    else:
        bound = bound + eps * ref64.abs()
    return bound.expand_as(ref64) if bound.dim() == 0 else bound


def assert_close(out: torch.Tensor, ref: torch.Tensor, peer: Optional[torch.Tensor] = None,
                 factor: float = 2.0, name: str = "output", atol_floor: float = 1e-6) -> None:
    """Assert ``out`` matches ``ref`` within the tolerance rule; reports the worst element on failure."""
    if out.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    o, r = out.double(), ref.double()
    o_fin, r_fin = torch.isfinite(o), torch.isfinite(r)
    if not (o_fin.all() and r_fin.all()):
        # A non-finite value passes only where the reference holds the same one (inf of the same sign, or
        # nan); anything else fails, whichever side is non-finite (a nan reference compared "within
        # tolerance" of any output used to pass: every comparison with nan is False).
        same = (o == r) | (o.isnan() & r.isnan())
        bad = ((~o_fin | ~r_fin) & ~same).nonzero()
        if bad.numel():
            where = [tuple(int(x) for x in i) for i in bad[:5].tolist()]
            i = tuple(bad[0].tolist())
            raise AssertionError(
                f"{name}: non-finite values (unwritten, overflow, or a non-finite reference) at {where}: "
                f"out={o[i].item()} ref={r[i].item()}")
        keep = o_fin & r_fin  # both hold the same non-finite value elsewhere: compare the finite rest
        o, r = torch.where(keep, o, 0.0), torch.where(keep, r, 0.0)
        if peer is not None:
            peer = torch.where(keep, peer.double(), 0.0)
        ref = r
    bound = tolerance(ref, peer, out.dtype, factor, atol_floor)
    err = (o - r).abs()
    excess = err - bound
    if (excess > 0).any():
        i = int(torch.argmax(excess.flatten()))
        idx = list(torch.unravel_index(torch.tensor(i), err.shape)) if err.dim() else []
        raise AssertionError(
            f"{name}: max error {err.max().item():.3e} exceeds tolerance; worst at {[int(x) for x in idx]}: "
            f"out={o.flatten()[i].item():.6g} ref={r.flatten()[i].item():.6g} "
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


def _interpreter_patch(flag: str):
    """Decorator for the test-only interpreter patches: ``install(np, tl, interp, builder)`` runs once per
    process (``flag`` marks triton's ``InterpreterBuilder``); the decorated function takes no argument and
    returns whether the patch is in place (False without triton)."""
    def deco(install):
        @functools.wraps(install)
        def patch() -> bool:
            try:
                import numpy as np
                import triton.language as tl
                from triton.runtime import interpreter as interp
            except Exception:  # noqa: BLE001 - any import failure: no triton to patch
                return False
            builder = interp.InterpreterBuilder
            if not getattr(builder, flag, False):
                install(np, tl, interp, builder)
                setattr(builder, flag, True)
            return True
        return patch
    return deco


@_interpreter_patch("_fastbert_bf16_dot")
def patch_triton_interpreter_bf16_dot(np, tl, interp, builder) -> None:
    """TEST-ONLY workaround: make the Triton interpreter's ``tl.dot`` upcast bf16 operands to fp32.

    The interpreter stores bf16 as uint16 and hands it to ``np.matmul`` unconverted, so a bf16 ``tl.dot``
    returns garbage on CPU. On a GPU the tensor cores take bf16 operands with fp32 accumulation, which
    is exactly what upcasting and multiplying in fp32 computes. Returns whether the patch was applied.
    """
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def up(h):
            if h.dtype.scalar == tl.bfloat16:
                data = interp._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
                return interp.TensorHandle(data, tl.float32)
            return h
        return original(self, up(a), up(b), d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot


def _rne_f32_to_bf16_bits(x):
    """fp32 numpy array -> bf16 bit patterns (uint16), rounded to nearest even as the GPU's
    ``cvt.rn.bf16.f32`` does: overflow goes to inf, subnormals stay subnormal, NaN stays NaN (quiet)."""
    import numpy as np

    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, ((u >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16), rounded)


@_interpreter_patch("_fastbert_rne")
def patch_triton_interpreter_round_to_nearest(np, tl, interp, builder) -> None:
    """TEST-ONLY fix: make the Triton interpreter convert to bf16 by rounding to nearest even, as the GPU does.

    The interpreter (triton 3.x) converts fp32 -> bf16 by dropping the low 16 bits (truncation: bias-GELU of
    bf16 ``[[3.0]]`` gives 2.984375 instead of 3.0), its "RTNE" path rounds half up without carrying into the
    exponent, and int/fp64 <-> bf16 casts reinterpret the uint16 storage as a number. On a GPU every such
    conversion rounds to nearest even (``cvt.rn``). This patch routes every conversion that involves bf16
    through fp32 with exact bf16 -> fp32 widening and round-to-nearest-even narrowing (``.to(...,
    fp_downcast_rounding="rtz")`` truncates, subnormals included). fp32 -> fp16 already rounds correctly
    (numpy ``astype``). Returns whether the patch was applied.
    """
    original_cast, original_fp_to_fp = builder.cast_impl, builder.create_fp_to_fp
    bf16 = tl.bfloat16

    def to_f32(self, h):
        if h.dtype.scalar == bf16:
            return interp.TensorHandle((h.data.astype(np.uint32) << np.uint32(16)).view(np.float32), tl.float32)
        if h.dtype.scalar == tl.float32:
            return h
        return original_cast(self, h, tl.float32)  # ints, fp16, fp64 -> fp32 (numpy astype)

    def cast_impl(self, src, dst_type):
        src_t, dst_t = src.dtype.scalar, dst_type.scalar
        if dst_t == bf16 and src_t != bf16:
            return interp.TensorHandle(_rne_f32_to_bf16_bits(to_f32(self, src).data), bf16)
        if src_t == bf16 and dst_t != bf16:
            widened = to_f32(self, src)
            return widened if dst_t == tl.float32 else original_cast(self, widened, dst_type)
        return original_cast(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if dst_type.scalar == bf16 and src.dtype.scalar != bf16 and rounding_mode == interp._ir.ROUNDING_MODE.RTZ:
            u = to_f32(self, src).data.view(np.uint32)  # toward zero: drop the low half (NaN stays NaN)
            nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
            return interp.TensorHandle(((u >> np.uint32(16)) | (nan * np.uint32(0x40))).astype(np.uint16), bf16)
        if dst_type.scalar == bf16 or src.dtype.scalar == bf16:
            return cast_impl(self, src, dst_type)
        return original_fp_to_fp(self, src, dst_type, rounding_mode)

    builder.cast_impl = cast_impl
    builder.create_fp_to_fp = create_fp_to_fp


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
